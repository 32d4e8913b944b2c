"""Tell listeners an event was stored, after commit, without blocking the request.

Web requests run in a2wsgi's worker threads; listeners live on the ASGI
server's event loop. The notice is scheduled onto that loop (`kite.asgi`
registers it), which is what makes the in-memory channel layer safe to use
from threads. Processes without an ASGI loop (Celery workers, commands) use a
private loop thread, and only when Redis carries the notice to the web process.
"""

import asyncio
import logging
import threading

from channels.layers import get_channel_layer
from django.conf import settings

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


def event_stored(event) -> None:
    loop = _target_loop()
    if loop is None:
        return
    layer = get_channel_layer()
    coro = layer.group_send(group_for(event.team_id), notice_for(event))
    asyncio.run_coroutine_threadsafe(coro, loop).add_done_callback(_report)
