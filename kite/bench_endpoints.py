"""Baseline endpoints for bench/ingest.py, mounted at /bench/ only with KITE_BENCH_ENDPOINTS=on
(kite/urls.py; off by default, and kite/settings.py warns at every start when it is on).

`bare` is the physical ceiling of the ingest database path on the same serving
stack: the same Django process, middleware and connection handling, and the
same INSERT into ingest_event as a real webhook, as one statement in its own
transaction (autocommit: one round trip, like a real webhook of a team without
peers) through the same prepared INSERT (kite.fastsql) — but no source lookup,
no signature check, no CloudEvent conversion, no broadcast and no metrics.
`noop` is the ceiling of the serving stack alone (no database). Neither asks
who is calling: benchmark baselines, never for an instance anyone can reach.

Plain views here rather than in bench/: a baseline has to be served by the very
stack it is the ceiling of (the settings, URLconf and middleware `runkite`
serves), and bench/ingest.py also serves other checkouts (`--tree`), which
mount it the same way.
"""

import threading
import uuid

from django.http import HttpResponseNotAllowed, JsonResponse
from django.urls import path
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from ingest.models import Event, Source
from kite import fastsql

_sources: dict[tuple[str, str], Source] = {}
_lock = threading.Lock()


def _source(team_id: str, name: str) -> Source | None:
    """Resolved once per process, so the measured path holds only the INSERT."""
    key = (team_id, name)
    source = _sources.get(key)
    if source is None:
        source = Source.objects.filter(team_id=team_id, name=name).first()
        if source is not None:
            with _lock:
                _sources[key] = source
    return source


@csrf_exempt
def bare(request, team_id: str, source: str):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    found = _source(team_id, source)
    if found is None:
        return JsonResponse({"detail": "no such source"}, status=404)
    now = timezone.now()
    event = Event(
        team_id=found.team_id,
        source=found,
        ce_id=uuid.uuid4().hex,
        ce_source="kite-bench://bare",
        ce_type="com.stripe.bench.bare",
        ce_time=now,
        data=request.body.decode(),
        received_at=now,
    )
    fastsql.insert([event])  # autocommit: BEGIN and COMMIT are the statement's own
    return JsonResponse({"id": event.ce_id, "duplicate": False}, status=202)


@csrf_exempt
def noop(request):
    return JsonResponse({"ok": True}, status=202)


urlpatterns = [
    path("bare/<str:team_id>/<str:source>", bare),
    path("noop", noop),
]
