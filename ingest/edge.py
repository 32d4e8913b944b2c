"""Webhooks stored on the web process's event loop: the common case of POST /hooks/… without a thread.

A webhook served by Django (ingest.views.hook) takes a hop to a thread of the WSGI bridge, Django's
request handling and a synchronous database call, each turn of which competes for the GIL with the
event loop: most of a verified webhook's CPU is that, not its work (bench/RESULTS.md, "The ingest
ceiling"). The edge takes the common case on the loop itself — the same functions verify and
convert it, the same guarded statement stores it (ingest.services.store_alone_statement_many),
sent through an asynchronous psycopg connection, with the webhooks of the same source that wait
for a connection at the same time: one statement and one commit for all of them — and hands
everything else to Django unchanged, with the body it has read:

- the edge takes only a POST to /hooks/{team}/{source} with a Content-Length that came whole, a
  valid Host, for a source this process has cached (ingest.selectors) whose event_stored hooks
  can say without the database what they write (hooks.event_stored_alone: no peers, or the
  outbox entries of a federated event, written by the same statement, its peers kicked after
  it), without a rate limit, while tracing is off — of a provider's kind, or a peer's
  single event delivery (the `kite` source) that the sender's verifier judges from its own copies
  on the loop (ingest.verifiers.LOOP_VERIFIERS: federation.inbound.verify_kite_source_on_loop),
  stored by the statement that also checks the sender's row is still as copied;
- a peer's batch of up to services.ALONE_BATCH_MAX events goes in with one statement too, as
  Django's events_store_batch stores it, answered 200 with a result per event (accepted,
  duplicate, rejected);
- it answers only 202, for an event it stored, or 200 for such a batch. A request that fails
  verification, is malformed, a provider's batch, a larger batch or one with the same event
  twice, a duplicate, a delivery its sender's verifier cannot judge without the database, an
  event routing cannot write without a transaction (a peer's max_hops reached: its
  delivery_failed event), or meets a changed source, peers or sender (the statement's guard), a
  database error or
  no free connection in time, goes to Django, which answers it as it always has (its error, its
  200 for a duplicate, its 503 for an outage). Nothing the edge did is visible then: it stored
  nothing and counted nothing.

PostgreSQL only (the embedded SQLite default serves every webhook through Django).
KITE_LOOP_INGEST=off turns it off.
"""

import asyncio
import logging
import re
import time

import orjson
import psycopg
from django.conf import settings
from django.db import connections
from django.http.request import split_domain_port, validate_host

from ingest import broadcast, cloudevent, hooks, selectors, services, verifiers
from ingest.models import Source
from kite import metrics, tracing
from kite.errors import ApiError
from kite.bridge import environ_for

log = logging.getLogger(__name__)

PATH = re.compile(r"^/hooks/([^/]+)/([^/]+)$")
KINDS = frozenset({Source.Kind.STRIPE, Source.Kind.GITHUB, Source.Kind.STANDARD, Source.Kind.CLOUDEVENTS,
                   Source.Kind.NONE})  # fmt: skip
WAIT_SECONDS = 1.0  # for a free connection; then Django takes the webhook (its threads have their own)
APPLICATION_NAME = "kite-loop-ingest"  # how its connections show in pg_stat_activity
CONNECTIONS = 4  # per web process, besides its KITE_WSGI_THREADS threads' own (docs/scaling.md)
STATEMENT_SECONDS = 5.0  # a statement that takes longer: its connection is closed, Django takes its webhooks
BATCH = 100  # webhooks in one statement at most


class Pool:
    """Autocommit connections of this process's event loop, opened as needed up to `size`."""

    def __init__(self, size: int):
        self.size, self.opened = size, 0
        self.idle: asyncio.LifoQueue[psycopg.AsyncConnection] = asyncio.LifoQueue()

    @staticmethod
    def params() -> dict:
        """What Django connects with (its conninfo, adapters and prepare threshold), for psycopg's async API."""
        params = connections["default"].get_connection_params()
        params.pop("cursor_factory", None)  # Django's are synchronous; the async default binds server-side
        params["application_name"] = APPLICATION_NAME
        return params

    async def take(self) -> psycopg.AsyncConnection | None:
        if self.idle.empty() and self.opened < self.size:
            self.opened += 1
            try:
                return await psycopg.AsyncConnection.connect(**self.params(), autocommit=True)
            except BaseException:
                self.opened -= 1
                raise
        try:
            return await asyncio.wait_for(self.idle.get(), WAIT_SECONDS)
        except TimeoutError:
            return None

    def give_back(self, conn: psycopg.AsyncConnection) -> None:
        if conn.closed or conn.broken:
            self.opened -= 1
        else:
            self.idle.put_nowait(conn)

    async def discard(self, conn: psycopg.AsyncConnection) -> None:
        self.opened -= 1
        try:
            await conn.close()
        except Exception:  # noqa: BLE001 - already broken: nothing to keep
            pass

    async def close(self) -> None:
        while not self.idle.empty():
            await self.discard(self.idle.get_nowait())


class Edge:
    """One web process's edge: `take` is the WSGI bridge's `front` (kite.asgi)."""

    def __init__(self, *, connections: int):
        self.pool = Pool(connections)
        self.headers = _answer_headers()
        self.headers_https = [*self.headers, *_hsts()]
        # Webhooks verified and waiting for a statement, by source and the copy's version, and how
        # many tasks store them (at most one per connection).
        self.waiting: dict[tuple, list[tuple[Source, object, asyncio.Future, object]]] = {}
        self.storing: dict[tuple, int] = {}

    async def take(self, scope, body: bytes) -> tuple[int, list, bytes] | None:
        """The answer to a webhook the edge stored, or None: Django answers it."""
        match = PATH.match(scope["path"])
        if match is None or scope["method"] != "POST" or scope.get("root_path") or tracing.ENABLED:
            return None
        started = time.perf_counter()
        source = selectors.source_for_hook_copy(*match.groups())
        if source is None or source.rate_limit_per_second or source.row_version is None:
            return None
        on_loop = verifiers.LOOP_VERIFIERS.get(source.kind)
        if source.kind not in KINDS and on_loop is None:
            return None
        environ = environ_for(scope, body)
        if environ.get("CONTENT_LENGTH") != str(len(body)) or not _host_allowed(environ):
            return None
        headers = verifiers.headers_of(environ)
        if on_loop is None and headers.get("content-type", "").startswith(cloudevent.BATCH_CONTENT_TYPE):
            return None  # a provider's batch: Django's, before the loop spends a verification and a parse on it
        try:
            if on_loop is None:  # a provider's
                if services.webhook_verify(source, headers, body) is not None:
                    return None
                sender = None
            else:  # a sender's (a peer's delivery): from the verifier's copies, or Django decides
                sender = on_loop(headers, body, source.team_id)
                if sender is None:
                    return None
            draft = services.webhook_draft(source, headers, body, sender)
        except ApiError:
            return None
        except Exception:  # a bug must not be the answer: Django verifies it again and answers
            log.exception("webhook edge: verifying a webhook of %s failed; Django takes it", source.kind)
            return None
        if isinstance(draft, list):
            return await self._take_batch(scope, source, sender, draft, headers, started)
        with tracing.storing(draft, headers):  # a `traceparent` the request carried goes with the event
            event = services.new_event(source, draft)
        if not await self.store(source, event, sender):
            return None  # a database error, a changed source or sender, a duplicate: Django's to answer
        broadcast.event_stored(event)
        metrics.INGEST_SECONDS.observe(time.perf_counter() - started)
        metrics.EVENTS_INGESTED.labels(source.name, "accepted").inc()
        return self._answer(scope, 202, orjson.dumps({"id": event.ce_id, "duplicate": False}))

    async def _take_batch(self, scope, source: Source, sender, items: list, headers: dict, started: float):
        """A peer's batch of up to services.ALONE_BATCH_MAX events: one statement stores its valid
        events (`store_alone_statement_many`, as Django's `events_store_batch` does), answered 200
        with a result per event — accepted, duplicate (the statement met it stored) or rejected
        (not a valid CloudEvent). None (Django's) for anything that statement cannot store: a larger
        batch, the same event twice, no valid event, or the statement storing nothing."""
        tracing.storing(items, headers)  # (tracing is off here) a `traceparent` the request carried goes with its events
        events = services.batch_alone_events(source, items)
        if events is None:
            return None
        conn = await self._connection()
        if conn is None:
            return None
        inserted = await self._insert(conn, [(source, event, None, sender) for event in events.values()])
        if inserted is None:
            return None
        for event, went_in in zip(events.values(), inserted, strict=True):
            if went_in:
                broadcast.event_stored(event)
        results = services.batch_alone_results(items, events, inserted)
        metrics.INGEST_SECONDS.observe(time.perf_counter() - started)
        for item in results:
            metrics.EVENTS_INGESTED.labels(source.name, item.result).inc()
        return self._answer(scope, 200, orjson.dumps([item.as_dict() for item in results]))

    def _answer(self, scope, status: int, answer: bytes) -> tuple[int, list, bytes]:
        headers = self.headers_https if scope.get("scheme") == "https" else self.headers
        return status, [*headers, (b"content-length", b"%d" % len(answer))], answer

    async def store(self, source: Source, event, sender=None) -> bool:
        """True once the event is stored; False if it was not (nothing was, or a stored duplicate).

        Webhooks of one source (and one sender's copy) that wait for a connection at the same time
        go in together: one statement, one commit (services.store_alone_statement_many). A lone
        webhook goes at once."""
        guard = getattr(sender, "store_guard", None)
        key = (source.pk, source.row_version, source.team_routes_version, guard.params if guard else None)
        stored = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(key, []).append((source, event, stored, sender))
        if self.storing.get(key, 0) < self.pool.size:
            self.storing[key] = self.storing.get(key, 0) + 1
            asyncio.get_running_loop().create_task(self._store_waiting(key))
        return await stored

    async def _store_waiting(self, key) -> None:
        try:
            while self.waiting.get(key):
                conn = await self._connection()
                batch = self.waiting.pop(key, [])
                if len(batch) > BATCH:
                    self.waiting[key] = batch[BATCH:]
                    batch = batch[:BATCH]
                if conn is None:
                    _settle(batch, [False] * len(batch))
                    continue
                if not batch:  # another task took them meanwhile
                    self.pool.give_back(conn)
                    break
                inserted = await self._insert(conn, batch)
                _settle(batch, inserted if inserted is not None else [False] * len(batch))
        finally:
            self.storing[key] -= 1
            if not self.storing[key]:
                del self.storing[key]

    async def _connection(self):
        try:
            return await self.pool.take()
        except psycopg.Error as exc:
            log.warning("webhook edge: cannot connect to the database (%s); Django serves webhooks meanwhile", exc)
            return None

    async def _insert(self, conn, batch) -> list[bool] | None:
        """One statement for the batch (the connection goes back, or is closed if its state is not
        known); for each webhook whether it was stored (False: a stored duplicate), or None when
        nothing is known to be stored. Never raises: a failure is Django's to answer."""
        source, sender = batch[0][0], batch[0][3]
        events = [event for _, event, _, _ in batch]
        try:
            alone = hooks.event_stored_alone(source, events, sender)
            if alone is None:  # the hooks need a transaction: Django's
                self.pool.give_back(conn)
                return None
            statement = services.store_alone_statement_many(source, events, sender, alone.children)
            async with asyncio.timeout(STATEMENT_SECONDS):
                cursor = await conn.execute(statement.sql, statement.params)
                rows = await cursor.fetchall()
        except (psycopg.Error, TimeoutError) as exc:
            log.warning("webhook edge: %s: %s; Django takes the webhooks", type(exc).__name__, exc)
            await self.pool.discard(conn)
            return None
        except Exception:
            log.exception("webhook edge: storing %d webhooks failed; Django takes them", len(batch))
            await self.pool.discard(conn)
            return None
        self.pool.give_back(conn)
        try:
            inserted = services.stored_alone(source, statement, rows)
        except Exception:  # stored, but not known which: Django answers each (202, or 200 duplicate)
            log.exception("webhook edge: reading what %d webhooks stored failed; Django answers them", len(batch))
            return None
        if inserted is None:
            return None
        for other, _, _, _ in batch[1:]:  # each request's own copy of the source
            other.team_listening_until = source.team_listening_until
        if any(inserted):  # stored: a failure of what follows is logged, it is not the answer
            try:
                if alone.stored is not None:
                    alone.stored(inserted)
                if alone.committed is not None:  # a Redis round trip, maybe a task published: off the loop
                    await asyncio.to_thread(alone.committed, inserted)
            except Exception:
                log.exception("webhook edge: what follows storing %d webhooks failed", len(batch))
        return inserted

    async def close(self) -> None:
        await self.pool.close()


def _settle(batch, results) -> None:
    for (_, _, stored, _), result in zip(batch, results, strict=True):
        if not stored.done():  # its request was cancelled (the client left): nothing to tell
            stored.set_result(result)


def _host_allowed(environ) -> bool:
    """Django's request.get_host() check (ALLOWED_HOSTS) on the Host header; without one, Django decides."""
    domain, _ = split_domain_port(environ.get("HTTP_HOST", ""))
    return bool(domain) and validate_host(domain, settings.ALLOWED_HOSTS)


def _answer_headers() -> list[tuple[bytes, bytes]]:
    """What Django's answer to a stored webhook carries besides its body: its content type, the
    security middleware's headers and `kite-instance` (ingest.views._answer)."""
    headers = [(b"content-type", b"application/json")]
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append((b"x-content-type-options", b"nosniff"))
    if settings.SECURE_REFERRER_POLICY:
        headers.append((b"referrer-policy", settings.SECURE_REFERRER_POLICY.encode("latin-1")))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        headers.append((b"cross-origin-opener-policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY.encode("latin-1")))
    headers.append((b"x-frame-options", settings.X_FRAME_OPTIONS.encode("latin-1")))
    headers.append((b"kite-instance", settings.KITE_INSTANCE_ID.encode("latin-1")))
    return headers


def _hsts() -> list[tuple[bytes, bytes]]:
    """SecurityMiddleware's Strict-Transport-Security, which it sends on HTTPS only."""
    if not settings.SECURE_HSTS_SECONDS:
        return []
    value = f"max-age={settings.SECURE_HSTS_SECONDS}"
    if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
        value += "; includeSubDomains"
    if settings.SECURE_HSTS_PRELOAD:
        value += "; preload"
    return [(b"strict-transport-security", value.encode("latin-1"))]


def install() -> "Edge | None":
    """The edge of this serving process, or None where it does not apply (SQLite, KITE_LOOP_INGEST=off)."""
    if not settings.IS_POSTGRES or not settings.KITE_LOOP_INGEST:
        return None
    return Edge(connections=CONNECTIONS)
