"""POST /hooks/{team_id}/{source}: the provider-facing edge. Plain Django, no DRF: it is the hot path."""

import re
import time

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from ingest import selectors, services, verifiers
from ingest.api import openapi
from ingest.errors import Code
from kite import metrics, selectors as kite_selectors, tracing
from kite.errors import ApiError
from kite.schema import documented_by


def _read_body(request) -> bytes:
    limit = settings.KITE_MAX_BODY_BYTES
    declared = request.META.get("CONTENT_LENGTH")
    too_large = ApiError(f"Body is larger than {limit} bytes.", Code.TOO_LARGE, status=413)
    if declared:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise ApiError("Content-Length is not a number.", Code.INVALID) from None
        return request.body
    if "chunked" not in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
        return b""
    # Django reads no body without Content-Length; read the chunked stream
    # ourselves and never buffer more than the limit.
    body = request.META["wsgi.input"].read(limit + 1)
    if len(body) > limit:
        raise too_large
    return body


def _source(team_id: str, name: str, *, fresh: bool = False):
    source = (selectors.source_for_hook if fresh else selectors.source_for_hook_cached)(team_id, name)
    if source is not None:
        return source
    if kite_selectors.team_by_id(team_id) is None:
        raise ApiError(f"No team {team_id!r} on this instance.", Code.UNKNOWN_TEAM, status=404)
    raise ApiError(f"Team has no source {name!r}.", Code.UNKNOWN_SOURCE, status=404)


def _answer(response):
    response["kite-instance"] = settings.KITE_INSTANCE_ID  # how a federating peer learns who we are
    return response


# CloudEvents HTTP Webhook §4 (abuse protection): the validation request names the sender's
# origin, a DNS name (a port at most); anything else is not reflected into a response header.
_ORIGIN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})(:\d{1,5})?$")


def _webhook_validation(request, team_id: str, name: str):
    """OPTIONS on a cloudevents source's hook URL: 200 with WebHook-Allowed-Origin (the origin asked
    for) and WebHook-Allowed-Rate (the source's limit a minute, `*` without one). Unauthenticated,
    as the spec has it; it says no more than a POST's 404 or 401 would (the source exists). A
    WebHook-Request-Callback is never called: the answer is given at once."""
    found = _source(team_id, name)
    if found.kind != found.Kind.CLOUDEVENTS:
        raise ApiError("Use POST.", Code.METHOD_NOT_ALLOWED, status=405, headers={"Allow": "POST"})
    origin = request.headers.get("WebHook-Request-Origin", "")
    if not origin:
        raise ApiError("WebHook-Request-Origin header is required.", Code.INVALID)
    if not _ORIGIN.match(origin):
        raise ApiError("WebHook-Request-Origin must be a DNS name, e.g. eventemitter.example.com.", Code.INVALID)
    response = HttpResponse(status=200)
    response["Allow"] = "POST, OPTIONS"
    response["WebHook-Allowed-Origin"] = origin
    rate = found.rate_limit_per_second
    response["WebHook-Allowed-Rate"] = str(rate * 60) if rate else "*"
    return response


@documented_by(openapi.HookDoc)
@csrf_exempt
def hook(request, team_id: str, source: str):
    started = time.perf_counter()
    label = "unknown"
    try:
        if request.method == "OPTIONS":
            return _answer(_webhook_validation(request, team_id, source))
        if request.method != "POST":
            raise ApiError("Use POST.", Code.METHOD_NOT_ALLOWED, status=405, headers={"Allow": "POST"})
        found = _source(team_id, source)
        label = found.name
        body = _read_body(request)
        headers = verifiers.headers_of(request.META)
        with tracing.span("kite.receive", {"kite.source": found.name, "kite.team": team_id}):
            try:
                result = services.webhook_receive(source=found, headers=headers, body=body)
            except services.SourceChanged:  # verified against a cached copy that is out of date: again
                found = _source(team_id, source, fresh=True)
                result = services.webhook_receive(source=found, headers=headers, body=body)
    except ApiError as exc:
        metrics.EVENTS_INGESTED.labels(label, exc.code).inc()
        return _answer(exc.response())
    metrics.INGEST_SECONDS.observe(time.perf_counter() - started)
    if isinstance(result, list):  # a CloudEvents batch: one result per event
        for item in result:
            metrics.EVENTS_INGESTED.labels(label, item.result).inc()
        return _answer(JsonResponse([item.as_dict() for item in result], safe=False, status=200))
    metrics.EVENTS_INGESTED.labels(label, "accepted" if result.created else "duplicate").inc()
    return _answer(
        JsonResponse({"id": result.event.ce_id, "duplicate": not result.created}, status=202 if result.created else 200)
    )
