"""Extension points ingest offers the apps above it (docs/architecture.md "Apps and their dependencies").

ingest knows nothing of federation or fleet: they register here from their
AppConfig.ready().
"""

from collections.abc import Callable
from dataclasses import dataclass

# (source, draft, sender) → None, called for each event a source's verifier accepted, before it is
# stored: may complete the draft (federation adds provenance from the authenticated peer) or raise
# cloudevent.MalformedEvent (400; for one event of a batch, that event is rejected).
event_received: list[Callable] = []
# (event, sender) → None, called inside the transaction that stores the event;
# `sender` is what the source's verifier returned (the peer, for federation).
event_stored: list[Callable] = []
# (team_id, agent_name, meta) → None, called when a listener connects/disconnects; the connect
# hooks run again about every 30 s while it stays connected (fleet keeps the agent online).
listener_connected: list[Callable] = []
listener_disconnected: list[Callable] = []
# (event, attempts_shown) → [{peer, status, attempts, …}]: where a stored event went, for its journey
# (GET /api/events/{id}/journey); federation answers with its outbox entry per peer and their attempts.
event_journey: list[Callable] = []
# (event ids) → the ids of those that must stay, called by the retention purge in its transaction
# before it deletes a batch of expired events: a hook deletes its own rows that depend on the others
# and keeps what must not go yet (federation: an event still owed to a peer).
event_purging: list[Callable] = []


# Storing without a transaction. An event_stored hook says, without the database, what it writes
# for events of a source: `idle_for(source)` True when it writes nothing for them; `alone_for(source)`
# True when it can work out what it writes, and then `alone(source, events, sender)` → an Alone, or
# None when it cannot for these events after all. Ingest then stores them with one statement
# (ingest.services.store_alone_statement(_many)) that also writes the hook's rows, instead of a
# transaction that calls the hook.


@dataclass(frozen=True)
class Alone:
    """What one statement writes for a hook besides the events, and what runs once it has run."""

    children: object = None  # kite.fastsql.Children: rows for the events the statement inserts
    # (inserted: list[bool], one per event) → None: once the statement has run (`stored`: counts),
    # once it is committed (`committed`: a federated event's peers kicked)
    stored: Callable | None = None
    committed: Callable | None = None


def _alone_for(hook, source) -> bool:
    alone_for = getattr(hook, "alone_for", None)
    if alone_for is not None:
        return alone_for(source)
    idle_for = getattr(hook, "idle_for", None)
    return idle_for is not None and idle_for(source)


def event_stored_alone_for(source) -> bool:
    """True when every event_stored hook is idle for `source` or can say what it writes for its
    events without the database: a webhook may then be verified with a cached copy of the source
    (ingest.selectors), its event stored by one statement that checks the copy is current."""
    return all(_alone_for(hook, source) for hook in event_stored)


def event_stored_alone(source, events: list, sender) -> Alone | None:
    """What one statement storing `events` of `source` must also write for the event_stored hooks
    (one hook's at most), or None: the events are stored in a transaction that calls the hooks."""
    found = None
    for hook in event_stored:
        if getattr(hook, "idle_for", None) is not None and hook.idle_for(source):
            continue
        if getattr(hook, "alone_for", None) is None or not hook.alone_for(source) or found is not None:
            return None
        found = hook.alone(source, events, sender)
        if found is None:
            return None
    return found or Alone()


def on_listener_connected(func: Callable) -> Callable:
    listener_connected.append(func)
    return func


def on_listener_disconnected(func: Callable) -> Callable:
    listener_disconnected.append(func)
    return func
