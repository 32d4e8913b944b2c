"""One ASGI application: WebSockets → Channels, HTTP → Django's WSGI app via kite.bridge.

Django's own ASGI handler measured ~5x slower for plain HTTP on this machine
(bench/RESULTS.md "Serving stack"); the bridge runs the WSGI app in a thread pool on the same port, with
one thread hop per request (a2wsgi, used before, took four: bench/RESULTS.md).
"""

import asyncio
import multiprocessing
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kite.settings")

if multiprocessing.parent_process() is not None:  # a worker of `uvicorn --workers N`: it ends with its master
    from kite.lifeline import die_with_parent

    die_with_parent()

import django  # noqa: E402

django.setup()

from kite import tracing  # noqa: E402

tracing.setup(web=True)  # OTEL_EXPORTER_OTLP_ENDPOINT set: before the WSGI handler is built (its middleware first)

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.urls import get_resolver  # noqa: E402

from federation import courier  # noqa: E402
from ingest import broadcast, edge  # noqa: E402
from ingest.websocket_urls import websocket_urlpatterns  # noqa: E402
from kite import heap  # noqa: E402
from kite.bridge import WSGIBridge  # noqa: E402

_bridge = WSGIBridge(get_wsgi_application(), threads=settings.KITE_WSGI_THREADS, max_body=settings.KITE_MAX_BODY_BYTES)
_router = ProtocolTypeRouter(
    {
        "http": _bridge,
        "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
    }
)


_serving: dict = {}

# How long a thread holding the GIL keeps it while another waits (CPython's default: 5 ms). A web
# process runs the event loop (HTTP in and out, WebSockets) and KITE_WSGI_THREADS threads running
# Django; each request hands the GIL from the loop to a thread and back, and each of its database
# round trips gives it up and takes it again. Under load every hand-off could wait up to 5 ms for a
# thread busy in Python: 1 ms cut the p99 of webhooks at 800/s (bench/RESULTS.md, "Threads and the
# GIL"). Set when the process starts serving, so importing the app (tests, tools) changes nothing.
SWITCH_INTERVAL = 0.001


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        return await _lifespan(receive, send)
    broadcast.set_server_loop(asyncio.get_running_loop())
    return await _router(scope, receive, send)


async def _lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            broadcast.set_server_loop(asyncio.get_running_loop())
            # A serving process (not one that only imports the app, as tests do) delivers what it
            # stores, on PostgreSQL (federation.courier).
            _serving["courier"] = courier.install()
            # …and stores the common webhook on its event loop (ingest.edge), the rest through Django.
            _serving["edge"] = edge.install()
            _bridge.front = _serving["edge"].take if _serving["edge"] is not None else None
            get_resolver().url_patterns  # the URLconf and every view module: loaded now, not by the first requests
            heap.freeze_loaded()  # what start-up loaded stays out of full GC passes (kite.heap)
            sys.setswitchinterval(SWITCH_INTERVAL)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if _serving.get("courier") is not None:  # calls out finish (≤ 5 s) rather than wait for their leases
                await asyncio.get_running_loop().run_in_executor(None, _serving["courier"].close, 5.0)
            if _serving.get("edge") is not None:
                _bridge.front = None
                await _serving["edge"].close()
            await send({"type": "lifespan.shutdown.complete"})
            return


__all__ = ["application", "settings"]
