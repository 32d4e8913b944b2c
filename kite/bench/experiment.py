"""Development only: kite.asgi with what-if variants switched on by KITE_BENCH_PATCH.

Used by bench/ab.py to measure a tuning idea (or the state before one) against
production on the same deployment, e.g.:

    .venv/bin/python bench/ab.py --variant prod --variant 'before:patch=orm-source,per-event-broadcast'

Patches (comma-separated):
  orm-source           the hook's source lookup through the ORM (as before the raw query)
  per-event-broadcast  one group_send per event (as before coalescing)
  no-broadcast         no broadcast at all (what it costs)
  no-route             no federation routing hook (what the hook costs per event)
  raw-route            the routing hook as one raw-SQL peer SELECT per event (the shape before
                       federation cached its routes; kept to reproduce the 18:45 A/B)
  no-health            CONN_HEALTH_CHECKS off (one `SELECT 1` less per request)
  buffered             HTTP bridged with one thread hop per request instead of a2wsgi's four

Never used by production, by `runkite` or by the recorded bench/ingest.py runs.
"""

import asyncio
import contextvars
import os
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kite.settings")
import django  # noqa: E402

django.setup()
from django.conf import settings  # noqa: E402

PATCHES = {p.strip() for p in os.environ.get("KITE_BENCH_PATCH", "").split(",") if p.strip()}
if "no-health" in PATCHES:
    settings.DATABASES["default"]["CONN_HEALTH_CHECKS"] = False

import kite.asgi  # noqa: E402
from ingest import broadcast, hooks, selectors  # noqa: E402
from ingest.models import Source  # noqa: E402

if "orm-source" in PATCHES:
    selectors.source_for_hook = lambda team_id, name: Source.objects.filter(team_id=team_id, name=name).first()

if "no-broadcast" in PATCHES:
    broadcast.event_stored = lambda event: None

if "per-event-broadcast" in PATCHES:
    from channels.layers import get_channel_layer

    def _per_event(event):
        loop = broadcast._target_loop()
        if loop is None:
            return
        coro = get_channel_layer().group_send(broadcast.group_for(event.team_id), broadcast.notice_for(event))
        asyncio.run_coroutine_threadsafe(coro, loop).add_done_callback(broadcast._report)

    broadcast.event_stored = _per_event

if "no-route" in PATCHES or "raw-route" in PATCHES:
    from federation import outbox, routing
    from federation.models import Peer

    hooks.event_stored[:] = [h for h in hooks.event_stored if h is not outbox.route_event]
    if "raw-route" in PATCHES:
        _PEERS = (
            "SELECT * FROM federation_peer WHERE team_id = %s AND role = 'peer' "
            "AND status <> 'revoked' AND peer_hook_url <> ''"
        )

        def _route(event, sender):
            if event.ce_type.startswith(routing.INTERNAL_PREFIX):
                return
            if list(Peer.objects.raw(_PEERS, [event.team_id])):  # the bench has no peers: never taken
                outbox.route_event(event, sender)

        hooks.event_stored.append(_route)

if "buffered" in PATCHES:
    from a2wsgi.wsgi import Body, build_environ
    from channels.routing import ProtocolTypeRouter
    from django.core.wsgi import get_wsgi_application

    class BufferedWSGI:
        """WSGI under ASGI with one thread hop per request: the body (up to the size limit) is read on
        the loop before the app runs; a non-streaming response is sent from the loop after it ran."""

        def __init__(self, app, workers, max_body):
            self.app = app
            self.max_body = max_body
            self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="WSGI")

        async def __call__(self, scope, receive, send):
            loop = asyncio.get_running_loop()
            chunks, size, more = [], 0, True
            while more and size <= self.max_body:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
            body = Body(loop, receive)
            body.buffer.extend(b"".join(chunks))
            body._has_more = more
            environ = build_environ(scope, body)
            status, headers, content, streamed = await loop.run_in_executor(
                self.executor, contextvars.copy_context().run, self._run, environ, loop, send
            )
            if not streamed:
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": content})

        def _run(self, environ, loop, send):
            started = {}

            def start_response(status, response_headers, exc_info=None):
                started["status"] = int(status.split(" ", 1)[0])
                started["headers"] = [
                    (n.strip().encode("latin1").lower(), v.strip().encode("latin1")) for n, v in response_headers
                ]
                return lambda chunk: None  # Django never calls write()

            iterable = self.app(environ, start_response)
            try:
                if not getattr(iterable, "streaming", False):
                    return started["status"], started["headers"], b"".join(iterable), False

                def hop(message):
                    asyncio.run_coroutine_threadsafe(send(message), loop).result()

                hop({"type": "http.response.start", "status": started["status"], "headers": started["headers"]})
                for chunk in iterable:
                    hop({"type": "http.response.body", "body": chunk, "more_body": True})
                hop({"type": "http.response.body", "body": b""})
                return None, None, None, True
            finally:
                getattr(iterable, "close", lambda: None)()

    kite.asgi._router = ProtocolTypeRouter(
        {
            "http": BufferedWSGI(get_wsgi_application(), settings.KITE_WSGI_THREADS, settings.KITE_MAX_BODY_BYTES),
            "websocket": kite.asgi._router.application_mapping["websocket"],
        }
    )

application = kite.asgi.application
