"""Development only: kite.asgi with what-if variants switched on by KITE_BENCH_PATCH.

Used by bench/ab.py to measure a tuning idea (or the state before one) against
production on the same deployment, e.g.:

    .venv/bin/python bench/ab.py --variant prod \
        --variant 'before:app=bench.experiment:application;patch=orm-source,per-event-broadcast'

The web server imports it as `bench.experiment` from its working directory, the
checkout it serves (bench/ingest.py starts it there; `bench` is a namespace
package: no __init__.py). It patches Kite's modules in that server process only;
nothing in the kite package knows of it.

Patches (comma-separated):
  orm-source           the hook's source lookup through the ORM (as before the raw query)
  per-event-broadcast  one group_send per event (as before coalescing)
  no-broadcast         no broadcast at all (what it costs)
  no-route             no federation routing hook (what the hook costs per event)
  raw-route            the routing hook as one raw-SQL peer SELECT per event (the shape before
                       federation cached its routes; kept to reproduce the 18:45 A/B)
  no-health            CONN_HEALTH_CHECKS off (one `SELECT 1` less per request)
  a2wsgi               HTTP served through a2wsgi's WSGIMiddleware (four thread hops per request),
                       as before kite.bridge; `buffered`, the experiment that became kite.bridge,
                       is production now and so a no-op here

Never used by production, by `runkite` or by the recorded bench/ingest.py runs.
"""

import asyncio
import os

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
    from federation import routing
    from federation.models import Peer

    # Federation's routing hook, by its name: whichever federation module holds it.
    route_event = next(h for h in hooks.event_stored if getattr(h, "__name__", "") == "route_event")
    hooks.event_stored[:] = [h for h in hooks.event_stored if h is not route_event]
    if "raw-route" in PATCHES:
        _PEERS = (
            "SELECT * FROM federation_peer WHERE team_id = %s AND role = 'peer' "
            "AND status <> 'revoked' AND peer_hook_url <> ''"
        )

        def _route(event, sender):
            if event.ce_type.startswith(routing.INTERNAL_PREFIX):
                return
            if list(Peer.objects.raw(_PEERS, [event.team_id])):  # the bench has no peers: never taken
                route_event(event, sender)

        hooks.event_stored.append(_route)

if "a2wsgi" in PATCHES:
    from a2wsgi import WSGIMiddleware
    from channels.routing import ProtocolTypeRouter
    from django.core.wsgi import get_wsgi_application

    kite.asgi._router = ProtocolTypeRouter(
        {
            "http": WSGIMiddleware(get_wsgi_application(), workers=settings.KITE_WSGI_THREADS),
            "websocket": kite.asgi._router.application_mapping["websocket"],
        }
    )

application = kite.asgi.application
