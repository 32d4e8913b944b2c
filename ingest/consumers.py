"""WS /ws/events: replay what a listener missed, then push live, in cursor order.

A broadcast notice only wakes the consumer; events are always read from the
store after the consumer's cursor, so live and replayed events form one
ordered stream without gaps or repeats, whatever the channel layer drops.
"""

import asyncio
import json
import logging
import time
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from ingest import broadcast, hooks, selectors
from ingest.errors import Code
from kite import auth
from kite.auth import bearer_from_header, principal_for_key, principal_for_user
from kite.errors import ApiError

log = logging.getLogger(__name__)
BATCH = 500
# A stream holds one batch read from the store while it sends it, for as long as the client takes
# to read it: sized after the last one to about BATCH_BYTES of event data (events of up to
# KITE_MAX_BODY_BYTES each would make 500 of them half a gigabyte), starting small.
BATCH_BYTES = 1024 * 1024
FIRST_BATCH = 16
IDLE_POLL_SECONDS = 5.0  # safety net if a notice is lost
# While connected a listener keeps its team's `listening_until` ahead (webhooks skip the
# broadcast when it has passed). A webhook that read the old value just before this listener
# announced itself may commit just after its first read, unnoticed: look again shortly after.
LISTENING_SECONDS = 90
LISTENING_REFRESH_SECONDS = 30
CATCH_UP_READS_AFTER = (0.25, 1.0, 3.0)
# A noticed event held back behind an older transaction: look again after 2, 4, 8 … 50 ms
# (such transactions are usually a webhook's few milliseconds), then give up after 10 s.
HELD_BACK_FIRST_POLL_SECONDS = 0.002
HELD_BACK_MAX_POLL_SECONDS = 0.05
HELD_BACK_GIVE_UP_SECONDS = 10.0
# A stream outlives neither its API key nor its user's membership: the principal is looked at
# again at least this often, while events flow and while idle. A verdict is shared by the
# process's streams of one principal for half that time, so a revocation ends them all within
# 1.5 × REVALIDATE_SECONDS (plus a query) at one query per principal per process per second.
REVALIDATE_SECONDS = 2.0
# Close codes (4000 + the HTTP status it stands for) and reasons: 4401 the credentials are no
# longer valid (API key revoked, user deactivated), 4403 the user left the stream's team.
CLOSES = {
    auth.KEY_REVOKED: (4401, "API key revoked"),
    auth.USER_INACTIVE: (4401, "user deactivated"),
    auth.NOT_A_MEMBER: (4403, "no longer a member of the team"),
}
# A listener that stops reading costs the server a bounded amount: the ASGI server buffers what
# the client has not taken up to its transport's high-water mark (64 KiB) and then makes the next
# send wait (flow control); the stream itself holds one batch read from the store. A send still
# waiting after SLOW_LISTENER_SECONDS (the client took less than that buffer in that time) ends
# the stream with 4008 (4000 + HTTP 408), the reason naming the cursor to resume from: the last
# event sent, which is the listener's last `kitecursor` once it has read up to the close frame.
# That frame waits behind the buffer too; a listener that has not read it after
# CLOSE_WAIT_SECONDS is dropped without it (and resumes from its own last cursor all the same).
SLOW_LISTENER_SECONDS = 5.0
CLOSE_WAIT_SECONDS = 30.0
TOO_SLOW = 4008
SENT, SLOW, GONE = "sent", "slow", "gone"  # how sending what is new ended


def _authenticate(scope):
    headers = dict(scope.get("headers") or [])
    raw = bearer_from_header(headers.get(b"authorization", b"").decode("latin-1"))
    if raw:
        return principal_for_key(raw)
    if not _same_origin(headers):
        return None  # another site's page must not ride the browser's session (cross-site WebSocket hijacking)
    return principal_for_user(scope.get("user"))


def _same_origin(headers: dict) -> bool:
    """A browser's session counts only from Kite's own pages: no Origin (not a browser), or the
    Origin is this Host or the public URL (CSRF_TRUSTED_ORIGINS)."""
    origin = headers.get(b"origin", b"").decode("latin-1")
    if not origin:
        return True
    host = headers.get(b"host", b"").decode("latin-1")
    return urlsplit(origin).netloc == host or origin in settings.CSRF_TRUSTED_ORIGINS


def _filters(query: dict[str, list[str]], team_id: str) -> tuple[selectors.EventFilter, selectors.Cursor]:
    """Without `after` a listener starts at "now"; with it, it first gets what it missed."""

    def one(name):
        values = query.get(name)
        return values[-1].strip() if values and values[-1].strip() else None

    raw_after = one("after")
    after = selectors.cursor_parse(raw_after) if raw_after is not None else selectors.events_head(team_id=team_id)
    source = one("source")
    if source is not None and not selectors.sources_for_team(team_id).filter(name=source).exists():
        # A typo would otherwise be a stream that waits forever for events that never come.
        raise ApiError(f"The team has no source {source[:50]!r} (GET /api/sources lists them).", Code.UNKNOWN_SOURCE,
                       status=404)  # fmt: skip
    return selectors.EventFilter(source=source, type_glob=one("type"), agent=one("agent")), after


def keep_listening(team_id: str) -> None:
    """Push the team's `listening_until` ahead; at most one write per team per refresh period."""
    from django.db.models import Q
    from django.utils import timezone

    from kite.models import Team

    now = timezone.now()
    stale = now + timedelta(seconds=LISTENING_SECONDS - LISTENING_REFRESH_SECONDS)
    Team.objects.filter(pk=team_id).filter(Q(listening_until__isnull=True) | Q(listening_until__lt=stale)).update(
        listening_until=now + timedelta(seconds=LISTENING_SECONDS)
    )


_lost = database_sync_to_async(auth.principal_lost)
_verdicts: dict[tuple, tuple[float, str | None]] = {}  # principal → (monotonic time looked, why lost)


def _principal_key(principal) -> tuple:
    if principal.api_key is not None:
        return ("key", principal.api_key.pk)
    return ("user", principal.user.pk, principal.team.pk)


async def principal_lost(principal) -> str | None:
    """auth.principal_lost, shared by the process's streams of one principal for a moment."""
    key, now = _principal_key(principal), time.monotonic()
    looked = _verdicts.get(key)
    if looked is not None and now - looked[0] < REVALIDATE_SECONDS / 2:
        return looked[1]
    verdict = await _lost(principal)
    if len(_verdicts) > 10_000:
        _verdicts.clear()  # only a cache: the next look at each principal queries again
    _verdicts[key] = (now, verdict)
    return verdict


# Reads share the one database thread Channels keeps per process (thread-sensitive):
# each is one indexed query, and wake-ups coalesce under load, so one thread serves
# many listeners; a pool of threads would hold a connection each for good.
_read = database_sync_to_async(selectors.events_after)


class EventStreamConsumer(AsyncWebsocketConsumer):
    principal = None
    pump_task = None
    catch_up = ()
    batch_limit = FIRST_BATCH

    async def connect(self):
        self.principal = await database_sync_to_async(_authenticate)(self.scope)
        if self.principal is None:
            return await self.deny(401, "Send 'Authorization: Bearer <api key>' or log in.", "not_authenticated")
        self.team_id = self.principal.team.id
        query = parse_qs(self.scope.get("query_string", b"").decode())
        self.query = query  # listener hooks read what they need of it (e.g. an agent's version)
        try:
            self.filters, self.cursor = await database_sync_to_async(_filters)(query, self.team_id)
        except ApiError as exc:
            return await self.deny(exc.status, exc.detail, exc.code)
        self.group = broadcast.group_for(self.team_id)
        self.notified = self.cursor
        self.wake = asyncio.Event()
        self.wake.set()  # replay first
        await self.channel_layer.group_add(self.group, self.channel_name)
        await database_sync_to_async(keep_listening)(self.team_id)
        await self.accept()
        loop = asyncio.get_running_loop()
        self.validated_at = loop.time()  # just authenticated
        self.catch_up = [loop.call_later(delay, self.wake.set) for delay in CATCH_UP_READS_AFTER]
        self.pump_task = asyncio.create_task(self.pump())
        await self.run_hooks(hooks.listener_connected)

    async def disconnect(self, code):
        if self.pump_task is None:
            return
        self.pump_task.cancel()
        for handle in self.catch_up:
            handle.cancel()
        await self.channel_layer.group_discard(self.group, self.channel_name)
        await self.run_hooks(hooks.listener_disconnected)

    async def deny(self, status: int, detail: str, code: str):
        """Refuse the handshake with an HTTP answer where the server supports it."""
        if "websocket.http.response" in self.scope.get("extensions", {}):
            body = json.dumps({"detail": detail, "code": code}).encode()
            await self.send_raw(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await self.send_raw({"type": "websocket.http.response.body", "body": body})
        else:
            await self.close(code=4000 + status)
        self.pump_task = None

    async def send_raw(self, message):
        await self.base_send(message)

    async def run_hooks(self, functions):
        meta = {"agent": self.filters.agent, "client": self.scope.get("client"), "query": self.query}
        for function in functions:
            try:
                await database_sync_to_async(function)(self.team_id, self.filters.agent, meta)
            except Exception:  # a presence hook must never break the stream
                log.exception("listener hook %s failed", function)

    async def event_stored(self, message):
        if not self.filters.matches(message["source"], message["ce_type"], message["agent"]):
            return
        noticed = selectors.Cursor(message["txid"], message["id"])
        if (noticed.txid, noticed.id) > (self.notified.txid, self.notified.id):
            self.notified = noticed
        self.wake.set()

    async def pump(self):
        try:
            await self._pump()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event stream failed; closing")
            await self.end(1011, "")

    async def end(self, code: int, reason: str) -> None:
        """Close the stream, waiting at most CLOSE_WAIT_SECONDS for room to send the close frame."""
        try:
            async with asyncio.timeout(CLOSE_WAIT_SECONDS):
                await self.close(code=code, reason=reason)
            return
        except TimeoutError:
            pass
        except (OSError, RuntimeError):  # already gone (uvicorn: ClientDisconnected, or its keepalive closed it)
            return
        # The pump cannot end the consumer itself: a message to its own channel does.
        await self.channel_layer.send(self.channel_name, {"type": "stream.abandon", "code": code})

    async def stream_abandon(self, message):
        """The listener never made room for the close frame: end the connection without it."""
        await self.disconnect(message["code"])
        raise StopConsumer

    async def still_allowed(self) -> bool:
        """Re-check the principal once REVALIDATE_SECONDS have passed (a clock read otherwise);
        close the stream and answer False once it may no longer read the team's events."""
        loop = asyncio.get_running_loop()
        if loop.time() - self.validated_at < REVALIDATE_SECONDS:
            return True
        self.validated_at = loop.time()
        lost = await principal_lost(self.principal)
        if lost is None:
            return True
        await self.end(*CLOSES[lost])
        return False

    async def _pump(self):
        held_back_since, poll = None, HELD_BACK_FIRST_POLL_SECONDS
        loop = asyncio.get_running_loop()
        announced = polled = loop.time()
        while True:
            idle = held_back_since is None
            woken = await self._wait(min(IDLE_POLL_SECONDS, REVALIDATE_SECONDS) if idle else poll)
            if not await self.still_allowed():
                return
            if idle and not woken and loop.time() - polled < IDLE_POLL_SECONDS:
                continue  # only the revalidation timer
            polled = loop.time()
            if loop.time() - announced >= LISTENING_REFRESH_SECONDS:
                announced = loop.time()
                await database_sync_to_async(keep_listening)(self.team_id)
                # Connect hooks run again while the listener stays (a presence heartbeat: an agent
                # listening for hours stays online); they must be idempotent.
                await self.run_hooks(hooks.listener_connected)
            self.wake.clear()
            if not await self.drain():
                return
            # On PostgreSQL a noticed event can be invisible for a moment behind an
            # older transaction still running; look again soon, then give up.
            behind = (self.cursor.txid, self.cursor.id) < (self.notified.txid, self.notified.id)
            if not behind:
                held_back_since, poll = None, HELD_BACK_FIRST_POLL_SECONDS
            elif held_back_since is None:
                held_back_since = asyncio.get_running_loop().time()
            elif asyncio.get_running_loop().time() - held_back_since > HELD_BACK_GIVE_UP_SECONDS:
                self.notified, held_back_since = self.cursor, None
            else:
                poll = min(poll * 2, HELD_BACK_MAX_POLL_SECONDS)

    async def _wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def drain(self) -> bool:
        """Send what is new; False once the stream is over (access lost, listener too slow or gone)."""
        outcome = await self._send_new()
        if outcome == SLOW:  # closed here, where the batch being sent is no longer held
            log.warning("listener %s too slow: closing with %s, resume after %s", self.scope.get("client"),
                        TOO_SLOW, self.cursor)  # fmt: skip
            await self.end(TOO_SLOW, f"too slow; resume with after={self.cursor}")
        return outcome == SENT

    async def _send_new(self) -> str:
        while True:
            limit = self.batch_limit
            batch = await _read(team_id=self.team_id, after=self.cursor, filters=self.filters, limit=limit)
            if batch:
                average = sum(len(event.data) for event in batch) // len(batch) + 1
                self.batch_limit = max(1, min(BATCH, BATCH_BYTES // average))
            for event in batch:
                if not await self.still_allowed():  # events flowing without pause must not keep it open
                    return GONE
                outcome = await self.send_event(event)
                if outcome != SENT:
                    return outcome
                self.cursor = selectors.Cursor(event.txid, event.id)
            if len(batch) < limit:
                return SENT

    async def send_event(self, event) -> str:
        text = event.to_cloudevent_json().decode()
        try:
            async with asyncio.timeout(SLOW_LISTENER_SECONDS):
                await self.send(text_data=text)
        except TimeoutError:  # still no room: nothing of this event was written
            return SLOW
        except (OSError, RuntimeError):  # the connection went (see `end`)
            return GONE
        return SENT
