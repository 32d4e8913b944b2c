import hashlib
import hmac
import ipaddress
import logging

from django.conf import settings
from django.db import connection
from django.http import HttpResponse, JsonResponse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from kite import metrics
from kite.errors import Code, json_error

log = logging.getLogger(__name__)
HEALTH_RETRY_SECONDS = 5
# Headers a proxy adds: a loopback caller carrying one is a proxy on this machine relaying someone else.
FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-Ip")


ME = inline_serializer("Me", {
    "team": inline_serializer("MeTeam", {"id": serializers.CharField(), "name": serializers.CharField()}),
    "instance_id": serializers.CharField(),
    "public_url": serializers.CharField(),
})  # fmt: skip


class Me(APIView):
    @extend_schema(responses=ME)
    def get(self, request):
        team = request.user.team
        return Response(
            {
                "team": {"id": team.id, "name": team.name},
                "instance_id": settings.KITE_INSTANCE_ID,
                "public_url": settings.KITE_PUBLIC_URL,
            }
        )


def healthz(request):
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # anything at all means unhealthy; what it was is for the log, not the caller
        log.error("health check failed: database unreachable (%s: %s)", type(exc).__name__, exc)
        response = JsonResponse({"ok": False, "detail": "The database is unavailable.", "code": Code.UNAVAILABLE},
                                status=503)  # fmt: skip
        response["Retry-After"] = str(HEALTH_RETRY_SECONDS)
        return response
    return JsonResponse({"ok": True, "instance_id": settings.KITE_INSTANCE_ID})


def prometheus_metrics(request):
    """Label values name every team's peers and sources: a bearer token (KITE_METRICS_TOKEN), or
    without one, callers on this machine only (REMOTE_ADDR is the real peer: runkite believes proxy
    headers from KITE_TRUSTED_PROXIES only)."""
    if settings.KITE_METRICS_TOKEN:
        if not _bearer_matches(request.headers.get("Authorization", ""), settings.KITE_METRICS_TOKEN):
            response = json_error("A valid metrics token is required.", Code.NOT_AUTHENTICATED, 401)
            response["WWW-Authenticate"] = 'Bearer realm="kite-metrics"'
            return response
    elif not _is_local_caller(request):
        return json_error("Metrics are served to this machine only: set KITE_METRICS_TOKEN to scrape from "
                          "elsewhere.", Code.PERMISSION_DENIED, 403)  # fmt: skip
    return HttpResponse(metrics.render(), content_type=metrics.CONTENT_TYPE_LATEST)


def _bearer_matches(header: str, token: str) -> bool:
    scheme, _, presented = header.partition(" ")
    # Digests first: compare_digest of unequal lengths would return early and time the token's length.
    presented_digest = hashlib.sha256(presented.strip().encode("utf-8", "replace")).digest()
    matches = hmac.compare_digest(presented_digest, hashlib.sha256(token.encode()).digest())
    return scheme.lower() == "bearer" and matches


def _is_local_caller(request) -> bool:
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    address = getattr(address, "ipv4_mapped", None) or address
    return address.is_loopback and not any(name in request.headers for name in FORWARDING_HEADERS)
