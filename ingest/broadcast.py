"""Tell listeners an event was stored, after commit, without blocking the request.

Web requests run in the WSGI bridge's worker threads (kite.bridge); listeners live on the ASGI
server's event loop. The notice is scheduled onto that loop (`kite.asgi`
registers it), which is what makes the in-memory channel layer safe to use
from threads. Processes without an ASGI loop (Celery workers, commands) use a
private loop thread, and only when Redis carries the notice to the web process.
"""

import asyncio
import logging
import threading
from datetime import UTC

from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from kite import tracing

log = logging.getLogger(__name__)
_server_loop: asyncio.AbstractEventLoop | None = None
_private_loop: asyncio.AbstractEventLoop | None = None
_private_lock = threading.Lock()


def set_server_loop(loop: asyncio.AbstractEventLoop) -> None:
    global _server_loop
    _server_loop = loop


def group_for(team_id: str) -> str:
    return f"events.{team_id}"


def _private() -> asyncio.AbstractEventLoop:
    global _private_loop
    with _private_lock:
        if _private_loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="kite-broadcast", daemon=True).start()
            _private_loop = loop
    return _private_loop


def _target_loop() -> asyncio.AbstractEventLoop | None:
    if _server_loop is not None and _server_loop.is_running():
        return _server_loop
    if settings.REDIS_URL:
        return _private()
    return None  # in-memory layer, no server here: nobody can be listening in this process


def _report(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        # Listeners still get the event: they re-read the store on the next notice or poll.
        log.warning("event broadcast failed: %s", future.exception())


def notice_for(event) -> dict:
    return {
        "type": "event.stored",
        "source": event.source.name,
        "ce_type": event.ce_type,
        "agent": event.agent,
        "txid": event.txid,
        "id": event.id,
    }


# Notices not yet handed to the channel layer, per (loop, team); a key exists while a sender
# for it is scheduled or running. A burst of commits thus shares one hop to the loop and one
# group_send per kind of event instead of one each: a consumer uses a notice only to wake up
# and to learn the newest cursor (ingest.consumers), so the newest notice of each (source,
# type, agent) tells it all the others would have. A lone event is sent at once, as before.
_pending: dict[tuple[asyncio.AbstractEventLoop, str], dict[tuple[str, str, str], dict]] = {}
_pending_lock = threading.Lock()


def nobody_listening(event) -> bool:
    """True when the team's `listening_until`, read with the webhook's source, has passed: no
    listener connected in the last minute and a half anywhere, so there is nobody to notify (a
    listener that connects now reads the store itself). Unknown (no source read): False."""
    from ingest.models import Event

    source = event.source if Event._meta.get_field("source").is_cached(event) else None
    if source is None or not hasattr(source, "team_listening_until"):
        return False
    until = source.team_listening_until
    if isinstance(until, str):  # SQLite may hand the extra column back as text…
        until = parse_datetime(until)
    if until is not None and timezone.is_naive(until):  # …or as a naive UTC datetime
        until = timezone.make_aware(until, UTC)
    return until is None or until < timezone.now()


def event_stored(event) -> None:
    if tracing.ENABLED:
        with tracing.event_span("kite.broadcast", event, {"kite.listening": not nobody_listening(event)}):
            return _event_stored(event)
    return _event_stored(event)


def _event_stored(event) -> None:
    if nobody_listening(event):
        return
    loop = _target_loop()
    if loop is None:
        return
    notice = notice_for(event)
    kind = (notice["source"], notice["ce_type"], notice["agent"])
    key = (loop, event.team_id)
    with _pending_lock:
        waiting = _pending.get(key)
        if waiting is not None:  # its sender has not picked the team's notices up yet: ride along
            newest = waiting.get(kind)
            if newest is None or (newest["txid"], newest["id"]) < (notice["txid"], notice["id"]):
                waiting[kind] = notice
            return
        for stale in [k for k in _pending if k[0].is_closed()]:  # loops that died with a send scheduled
            del _pending[stale]
        _pending[key] = {kind: notice}
    try:
        asyncio.run_coroutine_threadsafe(_send_pending(key), loop).add_done_callback(_report)
    except RuntimeError:  # the loop closed a moment ago
        with _pending_lock:
            _pending.pop(key, None)
        raise


async def _send_pending(key) -> None:
    layer = get_channel_layer()
    group = group_for(key[1])
    finished = False
    try:
        while True:
            with _pending_lock:
                notices = _pending[key]
                if not notices:
                    del _pending[key]
                    finished = True
                    return
                _pending[key] = {}
            for notice in notices.values():
                try:
                    await layer.group_send(group, notice)
                except Exception as exc:
                    # Listeners still get the event: they re-read the store on the next notice or poll.
                    log.warning("event broadcast failed: %s", exc)
    finally:
        if not finished:  # cancelled with the loop: let the next event schedule a new sender
            with _pending_lock:
                _pending.pop(key, None)
