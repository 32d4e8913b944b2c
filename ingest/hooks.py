"""Extension points ingest offers the apps above it (docs/architecture.md "Apps and their dependencies").

ingest knows nothing of federation or fleet: they register here from their
AppConfig.ready().
"""

from collections.abc import Callable

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


def event_stored_idle(source) -> bool:
    """True when every event_stored hook says it has nothing to write for an event of `source`
    (a hook says so through an `idle_for(source)` attribute): ingest may then store a lone
    event with one statement instead of a transaction."""
    return all(getattr(hook, "idle_for", None) is not None and hook.idle_for(source) for hook in event_stored)


def on_listener_connected(func: Callable) -> Callable:
    listener_connected.append(func)
    return func


def on_listener_disconnected(func: Callable) -> Callable:
    listener_disconnected.append(func)
    return func
