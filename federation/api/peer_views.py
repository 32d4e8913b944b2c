"""Endpoints other Kite instances call, signed as in DESIGN §3 (not API-key auth)."""

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from federation import CONTRACT_VERSION, inbound, metrics
from federation.outbox import BATCH_CAP
from ingest.verifiers import lower_headers
from kite.errors import ApiError, json_error


def capabilities() -> dict:
    return {"contract_version": CONTRACT_VERSION, "batch_max": BATCH_CAP}


@csrf_exempt
@require_GET
def ping(request):
    try:
        peer = inbound.authenticate(lower_headers(request.headers), b"", team_id=None)
    except inbound.Refusal as refusal:
        metrics.CALLS.labels("unknown", "inbound", str(refusal.code)).inc()
        return json_error(refusal.detail, refusal.code, 401)
    except ApiError as exc:
        return exc.response()
    metrics.CALLS.labels(peer.name, "inbound", "ok").inc()
    return JsonResponse(
        {
            "instance_id": settings.KITE_INSTANCE_ID,
            "version": settings.KITE_VERSION,
            "time": timezone.now().isoformat().replace("+00:00", "Z"),
            "capabilities": capabilities(),
        }
    )


@csrf_exempt
@require_POST
def terminate(request):
    """The peer deleted us: revoke its row here (stop sending, stop accepting)."""
    from federation import services

    body = request.body
    try:
        peer = inbound.authenticate(lower_headers(request.headers), body, team_id=None)
    except inbound.Refusal as refusal:
        metrics.CALLS.labels("unknown", "inbound", str(refusal.code)).inc()
        return json_error(refusal.detail, refusal.code, 401)
    except ApiError as exc:
        return exc.response()
    metrics.CALLS.labels(peer.name, "inbound", "terminate").inc()
    services.peer_revoke(peer=peer, reason="terminated by the peer")
    return JsonResponse({"revoked": True, "instance_id": settings.KITE_INSTANCE_ID})


@csrf_exempt
def handshake(request):
    """POST: an instance accepting one of our invitations (DESIGN §4). DELETE: it could not
    finish its side, drop ours."""
    from federation import invitations

    body = request.body
    headers = lower_headers(request.headers)
    if request.method == "DELETE":
        return JsonResponse({"withdrawn": invitations.withdraw(headers, body)})
    if request.method != "POST":
        return json_error("Use POST.", "method_not_allowed", 405)
    try:
        answer, signed = invitations.redeem(headers, body)
    except invitations.HandshakeRefused as refusal:
        metrics.CALLS.labels("unknown", "inbound", f"handshake_{refusal.code}").inc()
        return json_error(refusal.detail, str(refusal.code), refusal.status)
    response = HttpResponse(answer, content_type="application/json")
    for name, value in signed.items():
        response[name] = value
    return response
