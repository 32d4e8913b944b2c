"""Sources and the ingest pipeline: verify → CloudEvent → dedup → store → broadcast."""

import functools
import logging
import re
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from ingest import broadcast, cloudevent, hooks, verifiers
from ingest.errors import Code
from ingest.models import Event, Source
from kite import crypto, fastsql, ratelimit, tracing
from kite.errors import ApiError
from kite.models import Team

SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,49}$")
BUILTIN_SOURCE = "kite"
SIGNED_KINDS = {Source.Kind.STRIPE, Source.Kind.GITHUB, Source.Kind.STANDARD, Source.Kind.CLOUDEVENTS}
TOKEN_PREFIX = "kce"  # a cloudevents source's bearer token: kce_<43 characters>
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CreatedSource:
    source: Source
    secret: str | None  # shown once when Kite generated it
    token: str | None = None  # a cloudevents source with auth=token: its bearer token, shown once


def source_ensure_builtin(*, team: Team) -> Source:
    source, _ = Source.objects.get_or_create(team=team, name=BUILTIN_SOURCE, defaults={"kind": Source.Kind.KITE})
    return source


def source_create(
    *,
    team: Team,
    name: str,
    kind: str,
    secret: str | None = None,
    rate_limit_per_second: int | None = None,
    auth: str | None = None,
) -> CreatedSource:
    if not SOURCE_NAME.match(name or ""):
        raise ApiError("name must be 1-50 lower-case letters, digits, '-' or '_'.", Code.INVALID)
    if name == BUILTIN_SOURCE or kind == Source.Kind.KITE:
        raise ApiError("The `kite` source is built in: every team has exactly one.", Code.INVALID)
    if kind not in Source.Kind.values:
        raise ApiError(f"kind must be one of stripe, github, standard, cloudevents, none; got {kind!r}.", Code.INVALID)
    _check_auth(kind, auth, secret)
    if kind == Source.Kind.NONE and secret:
        raise ApiError("A `none` source is unverified and takes no secret.", Code.INVALID)
    if secret and is_placeholder_secret(secret):
        raise ApiError(f"secret {secret[:20]!r} is a placeholder, not a signing secret: paste the provider's secret "
                       "(Stripe: the endpoint's whsec_…), or leave `secret` out and Kite generates one, shown once.",
                       Code.PLACEHOLDER_SECRET)  # fmt: skip
    generated = token = None
    source = Source(team=team, name=name, kind=kind, rate_limit_per_second=rate_limit_per_second)
    if auth == "token":  # only its hash is kept: what a request's bearer token is compared with
        token = crypto.new_bearer_token(TOKEN_PREFIX)
        source.token_sha256, source.secret_fingerprint = crypto.sha256_hex(token), crypto.fingerprint(token)
    elif kind in SIGNED_KINDS and not secret:
        secret = generated = crypto.new_webhook_secret()
    if secret:
        source.secret_encrypted = crypto.encrypt(secret)
        source.secret_fingerprint = crypto.fingerprint(secret)
    try:
        with transaction.atomic():
            source.save()
    except IntegrityError:
        raise ApiError(f"Team already has a source named {name!r}.", Code.CONFLICT, status=409) from None
    return CreatedSource(source=source, secret=generated, token=token)


def _check_auth(kind: str, auth: str | None, secret: str | None) -> None:
    if auth is None:
        return
    if kind != Source.Kind.CLOUDEVENTS:
        raise ApiError("auth applies to a cloudevents source only (signature or token).", Code.INVALID)
    if auth not in ("signature", "token"):
        raise ApiError(f"auth must be signature or token; got {auth!r}.", Code.INVALID)
    if auth == "token" and secret:
        raise ApiError("A source with auth=token takes no secret: Kite generates its token, shown once.", Code.INVALID)


_PLACEHOLDER_PREFIX = re.compile(r"^(whsec_|sk_|whk_|secret[_:-]?)", re.IGNORECASE)
_PLACEHOLDER_BODY = re.compile(r"^(|[.…*x_-]+|<[^>]*>|\{+[^}]*\}+|\$\{?[A-Za-z_]+\}?)$", re.IGNORECASE)
_PLACEHOLDER_WORDS = {"secret", "changeme", "change-me", "change_me", "placeholder", "todo", "xxx", "example",
                      "your-secret", "your_secret", "yoursecret", "mysecret", "signing-secret", "signing_secret"}  # fmt: skip


def is_placeholder_secret(secret: str) -> bool:
    """A value copied from documentation, not a provider's secret: `whsec_...`, `whsec_…`, `<secret>`,
    `xxxx`, `changeme`, `${SECRET}` — anything with an ellipsis in it. A real one is random."""
    value = secret.strip()
    if "..." in value or "…" in value or value.lower() in _PLACEHOLDER_WORDS:
        return True
    return bool(_PLACEHOLDER_BODY.match(_PLACEHOLDER_PREFIX.sub("", value, count=1)))


def source_secret(source: Source) -> str | None:
    return crypto.decrypt_cached(source.secret_encrypted) if source.secret_encrypted else None


def source_credential(source: Source) -> str | None:
    """What the source's verifier checks a request with: its signing secret, or the hash of its token."""
    if source.token_sha256:
        return verifiers.TokenDigest(source.token_sha256)
    return source_secret(source)


def ce_source_for(source: Source) -> str:
    """Stable across URL changes and unique across instances and teams."""
    return f"kite://{settings.KITE_INSTANCE_ID}/{source.team_id}/{source.name}"


@dataclass(frozen=True)
class Ingested:
    event: Event
    created: bool


def webhook_receive(*, source: Source, headers: dict[str, str], body: bytes) -> "Ingested | list[BatchItem]":
    """Everything after routing and size checks. Raises ApiError; stores nothing on error.

    The signature is checked before the rate limit, so unsigned junk cannot use
    up a source's quota and crowd out the real sender.
    """
    sender = webhook_verify(source, headers, body)
    verdict = ratelimit.hit(f"source:{source.pk}", source.rate_limit_per_second)
    if not verdict.allowed:
        raise ApiError(
            f"Source {source.name!r} is limited to {source.rate_limit_per_second} requests/s.",
            Code.RATE_LIMITED,
            status=429,
            headers={"Retry-After": str(verdict.retry_after)},
        )
    draft = webhook_draft(source, headers, body, sender)
    with tracing.storing(draft, headers):  # each event leaves with a `traceparent` (kite.tracing)
        if isinstance(draft, list):
            return events_store_batch(source=source, items=draft, sender=sender)
        return event_store(source=source, draft=draft, sender=sender)


def webhook_verify(source: Source, headers: dict[str, str], body: bytes):
    """The source's verifier over the request: what it learned about the sender (None for a
    provider), or ApiError."""
    cached = verifiers.from_cache.set(getattr(source, "from_cache", False))
    try:
        with tracing.span("kite.verify", {"kite.source.kind": source.kind}):
            return verifiers.VERIFIERS[source.kind](source_credential(source), headers, body, int(time.time()),
                                                    source.team_id)  # fmt: skip
    except verifiers.VerificationError as exc:
        raise ApiError(exc.detail, exc.code, status=exc.status) from None
    finally:
        verifiers.from_cache.reset(cached)


def webhook_draft(source: Source, headers: dict[str, str], body: bytes, sender):
    """The verified request as a CloudEvent Draft (a batch: a list, a bad event as its
    MalformedEvent), through the event_received hooks; ApiError if it is not one."""
    try:
        draft = cloudevent.CONVERTERS[source.kind](headers, body, timezone.now())
        return _received(source, draft, sender) if hooks.event_received else draft
    except cloudevent.MalformedEvent as exc:
        raise ApiError(exc.detail, exc.code, status=exc.status) from None


def _received(source: Source, draft, sender):
    """The event_received hooks over one draft or each draft of a batch (a refused one is rejected)."""
    if not isinstance(draft, list):
        for hook in hooks.event_received:
            hook(source, draft, sender)
        return draft
    items = []
    for item in draft:
        try:
            items.append(item if isinstance(item, cloudevent.MalformedEvent) else _received(source, item, sender))
        except cloudevent.MalformedEvent as exc:
            items.append(exc)
    return items


def new_event(source: Source, draft: cloudevent.Draft) -> Event:
    return Event(
        team_id=source.team_id,
        source=source,
        ce_id=draft.id,
        ce_source=draft.source or ce_source_for(source),
        ce_type=draft.type,
        ce_time=draft.time,
        ce_subject=draft.subject,
        datacontenttype=draft.datacontenttype,
        data=draft.data_json,
        extensions=_stored_extensions(draft),
        agent=draft.agent,
    )


def _stored_extensions(draft: cloudevent.Draft) -> dict:
    """The extensions column also keeps `dataschema` and whether `data` is binary (Event.to_cloudevent)."""
    if not (draft.dataschema or draft.data_base64):
        return draft.extensions
    extensions = dict(draft.extensions)
    if draft.dataschema:
        extensions["dataschema"] = draft.dataschema
    if draft.data_base64:
        extensions[cloudevent.DATA_BASE64] = True
    return extensions


def _insert(event: Event, sender) -> None:
    """INSERT plus the stored-event hooks, in the caller's transaction; IntegrityError on a duplicate."""
    fastsql.insert([event])
    for hook in hooks.event_stored:
        hook(event, sender)
    # robust: a failed notice is logged, never a 500 for an event that is already stored.
    transaction.on_commit(lambda: broadcast.event_stored(event), robust=True)


def _existing(event: Event) -> Event | None:
    return Event.objects.filter(team_id=event.team_id, ce_source=event.ce_source, ce_id=event.ce_id).first()


DEDUP = ("team", "ce_source", "ce_id")  # an event is stored once per team, source and id


class SourceChanged(Exception):
    """The cached copy of the source a webhook was verified with is out of date: verify it again."""


@functools.cache
def _store_alone_guard(sender_guard: str = "") -> str:
    qn = connection.ops.quote_name
    source, team = qn(Source._meta.db_table), qn(Team._meta.db_table)
    return (
        f"SELECT {team}.{qn('listening_until')} FROM {source} JOIN {team} ON {team}.{qn('id')} = {source}.{qn('team_id')}"
        f" WHERE {source}.{qn('id')} = %s AND {source}.xmin = %s::xid AND {team}.{qn('routes_version')} = %s"
        + (f" AND {sender_guard}" if sender_guard else "")
    )


def store_alone_statement(source: Source, event: Event, sender=None) -> fastsql.Guarded:
    """The one statement that stores an event no hook writes anything for (no transaction around
    it: one round trip where BEGIN, INSERT, COMMIT were three), which also checks that the source
    row, the team's routes and the sender's cached rows (its `store_guard`) are still as read.
    `stored_alone` takes its row."""
    sender_guard = getattr(sender, "store_guard", None)
    return fastsql.guarded_insert(
        event,
        guard=_store_alone_guard(sender_guard.sql if sender_guard else ""),
        guard_params=[source.pk, source.row_version, source.team_routes_version,
                      *(sender_guard.params if sender_guard else ())],  # fmt: skip
        skip_conflicts_on=DEDUP,
    )


def store_alone_statement_many(source: Source, events: list[Event], sender=None,
                               children: fastsql.Children | None = None) -> fastsql.GuardedMany:  # fmt: skip
    """`store_alone_statement` for several events of one source verified with the same copies:
    one statement, one commit for all — webhooks that arrive together (ingest.edge), or the
    events of one CloudEvents batch (a peer's batched delivery) — with the rows the event_stored
    hooks write for the events it inserts (`children`, hooks.event_stored_alone: a federated
    event's outbox entries)."""
    sender_guard = getattr(sender, "store_guard", None)
    return fastsql.guarded_insert_many(
        events,
        guard=_store_alone_guard(sender_guard.sql if sender_guard else ""),
        guard_params=[source.pk, source.row_version, source.team_routes_version,
                      *(sender_guard.params if sender_guard else ())],  # fmt: skip
        skip_conflicts_on=DEDUP,
        children=children,
    )


def after_alone(alone: hooks.Alone, inserted: list[bool]) -> None:
    """The hooks' follow-up of a statement that stored events alone (hooks.Alone): `stored` now,
    `committed` once it is committed (at once outside a transaction; robust: a failure is logged,
    never a 500 for events that are stored)."""
    if not any(inserted):
        return
    if alone.stored is not None:
        alone.stored(inserted)
    if alone.committed is not None:
        transaction.on_commit(functools.partial(alone.committed, inserted), robust=True)


def stored_alone(source: Source, statement, rows):
    """What a `store_alone_statement`'s row (or a `store_alone_statement_many`'s rows) says: None,
    the guard found nothing (the source, the team's peers or the sender's rows changed since they
    were read); else whether the event went in (many: a list, one per event; False: a duplicate
    of a stored event), and the source learns its team's `listening_until`."""
    guard, inserted = statement.result(rows)
    if guard is None:
        return None
    source.team_listening_until = guard[0]
    return inserted


def _run_alone(source: Source, statement, sender):
    """Run a `store_alone_statement(_many)`: what `stored_alone` says, with its None (the guard found
    something changed) turned into SourceChanged when the request was verified with cached copies
    (which are dropped): then it is verified again against fresh reads."""
    stored = stored_alone(source, statement, statement.run())
    if stored is None:
        sender_guard = getattr(sender, "store_guard", None)
        if sender_guard is not None:
            sender_guard.forget()
        if getattr(source, "from_cache", False) or sender_guard is not None:
            raise SourceChanged
    return stored


def _store_alone(source: Source, event: Event, sender, alone: hooks.Alone) -> "Ingested | None":
    """Store an event with `store_alone_statement` (with the hooks' rows, `store_alone_statement_many`).
    None: let the transactional path store it."""
    if alone.children is None:
        stored = _run_alone(source, store_alone_statement(source, event, sender), sender)
    else:
        inserted = _run_alone(source, store_alone_statement_many(source, [event], sender, alone.children), sender)
        stored = None if inserted is None else inserted[0]
    if stored is None:
        return None
    after_alone(alone, [stored])
    if not stored:
        existing = _existing(event)
        return Ingested(existing, created=False) if existing is not None else None
    # robust: a failed notice is logged, never a 500 for an event that is already stored.
    transaction.on_commit(lambda: broadcast.event_stored(event), robust=True)
    return Ingested(event, created=True)


def event_store(*, source: Source, draft: cloudevent.Draft, sender=None) -> Ingested:
    """Store one CloudEvent once per (team, source, id); broadcast after commit.

    Raises SourceChanged when `source` came from the per-process cache and has changed since:
    the caller verifies the webhook again against a fresh read."""
    event = new_event(source, draft)
    alone = hooks.event_stored_alone(source, [event], sender) if getattr(source, "row_version", None) else None
    if alone is not None:
        stored = _store_alone(source, event, sender, alone)
        if stored is not None:
            return stored
    if getattr(source, "from_cache", False) or getattr(sender, "store_guard", None) is not None:
        raise SourceChanged  # verified with cached rows only one statement checks: again, against fresh reads
    try:
        with transaction.atomic():
            _insert(event, sender)
    except IntegrityError:
        existing = _existing(event)
        if existing is None:
            raise
        return Ingested(existing, created=False)
    return Ingested(event, created=True)


@dataclass(frozen=True)
class BatchItem:
    id: str
    result: str  # accepted | duplicate | rejected
    detail: str = ""

    def as_dict(self) -> dict:
        return {"id": self.id, "result": self.result, **({"detail": self.detail} if self.detail else {})}


def events_store_batch(*, source: Source, items: list, sender=None) -> list[BatchItem]:
    """A CloudEvents batch in one transaction (one commit); a duplicate or a bad event affects only itself.

    The events not stored yet go in with one multi-row INSERT (a savepoint and an INSERT per
    event made B's side of a batched delivery the bottleneck of federation: bench/RESULTS.md);
    if that INSERT meets a duplicate after all (the same event stored concurrently), the batch
    is stored again one savepoint per event, which sorts it out.
    """
    if getattr(source, "row_version", None) is not None:
        results = _store_batch_alone(source, items, sender)
        if results is not None:
            return results
    if getattr(source, "from_cache", False) or getattr(sender, "store_guard", None) is not None:
        raise SourceChanged  # verified with cached rows only one statement checks: again, against fresh reads
    with transaction.atomic():
        results = _store_batch_at_once(source, items, sender)
        if results is None:
            results = _store_batch_one_by_one(source, items, sender)
    return results


# Batches up to this many events go in with one guarded statement: what a peer keeping up sends
# (a few events a call). A larger batch (a backlog) is bound by its rows, not its round trips, and
# its events' columns bound as arrays would be one more copy of a request of up to a megabyte.
ALONE_BATCH_MAX = 16


def batch_alone_events(source: Source, items: list) -> dict[int, Event] | None:
    """The events of a batch's valid items, by position, when one `store_alone_statement_many`
    can store them: None when there is none, or the same event twice (which copy is the
    duplicate is the one-by-one path's to tell)."""
    if len(items) > ALONE_BATCH_MAX:
        return None
    events = {
        i: new_event(source, item) for i, item in enumerate(items) if not isinstance(item, cloudevent.MalformedEvent)
    }
    keys = {(event.ce_source, event.ce_id) for event in events.values()}
    if not events or len(keys) != len(events):
        return None
    return events


def batch_alone_results(items: list, events: dict[int, Event], inserted: list[bool]) -> list[BatchItem]:
    """The answer to a batch `batch_alone_events` made events of, from what the statement inserted."""
    went_in = dict(zip(events, inserted, strict=True))
    return [
        BatchItem("", "rejected", item.detail) if i not in events
        else BatchItem(events[i].ce_id, "accepted" if went_in[i] else "duplicate")
        for i, item in enumerate(items)
    ]  # fmt: skip


def _store_batch_alone(source: Source, items: list, sender) -> list[BatchItem] | None:
    """A batch with `store_alone_statement_many`: one statement and its commit, with what the hooks
    write for its events (hooks.event_stored_alone), which also checks the copies the batch was
    verified with. None: let the transactional path store it (`batch_alone_events` cannot, or a
    hook needs the transaction). SourceChanged when the copies are out of date."""
    events = batch_alone_events(source, items)
    if events is None:
        return None
    alone = hooks.event_stored_alone(source, list(events.values()), sender)
    if alone is None:
        return None
    statement = store_alone_statement_many(source, list(events.values()), sender, alone.children)
    inserted = _run_alone(source, statement, sender)
    if inserted is None:
        return None
    after_alone(alone, inserted)
    for event, went_in in zip(events.values(), inserted, strict=True):
        if went_in:
            # robust: a failed notice is logged, never a 500 for an event that is already stored.
            transaction.on_commit(functools.partial(broadcast.event_stored, event), robust=True)
    return batch_alone_results(items, events, inserted)


def _store_batch_at_once(source: Source, items: list, sender) -> list[BatchItem] | None:
    """One INSERT … RETURNING for the events not stored yet, or None to go one by one."""
    if not connection.features.can_return_rows_from_bulk_insert:
        return None  # the hooks need each event's id
    events = {
        i: new_event(source, item) for i, item in enumerate(items) if not isinstance(item, cloudevent.MalformedEvent)
    }
    keys = [(event.ce_source, event.ce_id) for event in events.values()]
    if len(set(keys)) != len(keys):
        return None  # the same event twice in one batch: one by one tells which copy is the duplicate
    postgres = connection.vendor == "postgresql"
    stored = set()
    if keys and not postgres:
        stored = set(
            Event.objects.filter(
                team_id=source.team_id, ce_source__in={k[0] for k in keys}, ce_id__in={k[1] for k in keys}
            ).values_list("ce_source", "ce_id")
        )
    fresh = [event for event in events.values() if (event.ce_source, event.ce_id) not in stored]
    try:
        with transaction.atomic():
            if postgres:  # one statement: what is stored already is skipped, the rest comes back
                fresh = fastsql.insert(fresh, skip_conflicts_on=DEDUP)
                stored = set(keys) - {(event.ce_source, event.ce_id) for event in fresh}
            else:
                fastsql.insert(fresh)  # sets id and txid from RETURNING
            for event in fresh:
                for hook in hooks.event_stored:
                    hook(event, sender)
    except IntegrityError:
        return None
    for event in fresh:
        # robust: a failed notice is logged, never a 500 for an event that is already stored.
        transaction.on_commit(functools.partial(broadcast.event_stored, event), robust=True)
    results = []
    for i, item in enumerate(items):
        if i not in events:
            results.append(BatchItem("", "rejected", item.detail))
        elif (events[i].ce_source, events[i].ce_id) in stored:
            results.append(BatchItem(events[i].ce_id, "duplicate"))
        else:
            results.append(BatchItem(events[i].ce_id, "accepted"))
    return results


def _store_batch_one_by_one(source: Source, items: list, sender) -> list[BatchItem]:
    """A savepoint per event, in the caller's transaction."""
    results = []
    for item in items:
        if isinstance(item, cloudevent.MalformedEvent):
            results.append(BatchItem("", "rejected", item.detail))
            continue
        event = new_event(source, item)
        try:
            with transaction.atomic():
                _insert(event, sender)
        except IntegrityError:
            if _existing(event) is None:
                raise
            results.append(BatchItem(event.ce_id, "duplicate"))
            continue
        results.append(BatchItem(event.ce_id, "accepted"))
    return results


# Each batch's WAL (its rows' deletions and the full-page images of the pages it touches) is flushed
# by the commits of the webhooks that arrive while it runs: the smaller the batch, the less any one
# webhook waits for it (bench/RESULTS.md, Retention).
PURGE_BATCH = 250  # events per transaction
PURGE_PAUSE = 0.05  # seconds at least between batches
PURGE_YIELD = 4.0  # and after each batch a rest four times as long as it took: the purge takes at most a fifth
PURGE_LOG_EVERY = 50  # batches


def purge_budget() -> float:
    """Seconds a purge run may take: well within the Celery task's soft time limit. A run that meets it
    stops after a committed batch; the next scheduled run goes on from there."""
    return 0.75 * settings.CELERY_TASK_SOFT_TIME_LIMIT


def events_purge_expired(*, days: int, batch: int = PURGE_BATCH, pause: float = PURGE_PAUSE,
                         budget: float | None = None) -> int:  # fmt: skip
    """Delete events received more than `days` ago (0 keeps everything), oldest first, `batch` per
    transaction (committed without waiting for the WAL flush: fastsql.unflushed), resting between
    batches (at least `pause`, and four times as long as the batch took, so the purge takes at most
    about a fifth of a busy database's time). An event some app still needs
    (ingest.hooks.event_purging: federation keeps one still owed to a peer) stays until a later run.
    Restartable: every batch commits on its own, and a run starts again from the oldest expired event;
    one that has run `budget` seconds (purge_budget()) stops there and leaves the rest to the next."""
    if days <= 0:
        return 0
    cutoff = timezone.now() - timezone.timedelta(days=days)
    started, purged, kept, batches, after = time.monotonic(), 0, 0, 0, None
    deadline = started + (purge_budget() if budget is None else budget)
    while True:
        began = time.monotonic()
        with fastsql.unflushed():  # a batch lost in a database crash is deleted again by the next run
            found = _expired_batch(cutoff, after, batch)
            if not found:
                break
            keep = set().union(*(hook([pk for pk, _ in found]) for hook in hooks.event_purging))
            gone = [pk for pk, _ in found if pk not in keep]
            if gone:  # one DELETE: the hooks deleted what depends on them (a row left fails the commit)
                purged += Event.objects.filter(pk__in=gone)._raw_delete(Event.objects.db)
        kept, batches, after = kept + len(keep), batches + 1, found[-1]
        if batches % PURGE_LOG_EVERY == 0:
            log.info("event purge: %d deleted, %d kept so far, up to %s, %.0f s", purged, kept,
                     after[1].isoformat(), time.monotonic() - started)  # fmt: skip
        if len(found) < batch:
            break
        if time.monotonic() >= deadline:
            log.info("event purge: stopped at its time budget; the next run goes on from %s", after[1].isoformat())
            break
        time.sleep(max(pause, (time.monotonic() - began) * PURGE_YIELD))
    if purged or kept:
        log.info("event purge: %d events older than %d days deleted, %d kept (still needed), %.1f s",
                 purged, days, kept, time.monotonic() - started)  # fmt: skip
    return purged


def _expired_batch(cutoff, after, batch: int) -> list[tuple[int, object]]:
    """[(id, received_at)] of the next `batch` expired events after `after`, in event_received_at's
    order (a range of the index, from where the previous batch stopped: kept events are not read
    again, deleted ones not stepped over)."""
    expired = Event.objects.filter(received_at__lt=cutoff)
    if after is not None:
        pk, received_at = after
        # The >= bound makes the range an index condition: the OR alone would be a filter on a scan
        # from the oldest entry of the index again.
        expired = expired.filter(Q(received_at__gt=received_at) | Q(received_at=received_at, pk__gt=pk),
                                 received_at__gte=received_at)  # fmt: skip
    return list(expired.order_by("received_at", "pk").values_list("pk", "received_at")[:batch])
