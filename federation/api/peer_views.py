"""Endpoints other Kite instances call, signed as in SECURITY.md "The signed message" (not API-key auth)."""

import functools
import time

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from federation import audit, channel, inbound, invitations, metrics, services, signing, wire
from federation.api import openapi
from federation.contract import capabilities
from ingest.verifiers import lower_headers
from kite.errors import ApiError, json_error
from kite.fields import refuse_any, refuse_unapplied
from kite.models import Team
from kite.schema import documented_by

# What each peer-facing write takes (contract version 1); anything else is refused before the
# signature is checked, so a refusal uses no webhook-id and records no contact.
HANDSHAKE_FIELDS = ("code", "contract_version", "url", "instance_id", "team_id", "hook_url", "certificate_pem",
                    "tls_fingerprint", "inbound_secret", "grant_token")  # fmt: skip
MAX_REASON = 200


def _refused_fields(request, accepted, what: str):
    """A 400 response naming the fields of a JSON-object body outside `accepted`, or None: for a body
    that is not a JSON object, or signature headers that do not even parse, the endpoint's own
    refusal (400 malformed_signature, 401 …) comes first."""
    body = request.body
    if not body or not _signature_headers_parse(lower_headers(request.headers)):
        return None
    try:
        parsed = wire.json_object(body, what)
    except wire.BadBody:
        return None
    try:
        refuse_unapplied(parsed, accepted, what=what) if accepted else refuse_any(parsed, what=what)
    except ApiError as exc:
        metrics.CALLS.labels("unknown", "inbound", exc.code).inc()
        return exc.response()
    return None


def _only(method: str):
    """Another method is a 405 {detail, code} naming the one allowed (Django's require_GET answers an empty body)."""

    def decorate(view):
        @functools.wraps(view)
        def wrapped(request, *args, **kwargs):
            if request.method != method:
                refused = json_error(f"Use {method}.", "method_not_allowed", 405)
                refused["Allow"] = method
                return refused
            return view(request, *args, **kwargs)

        return wrapped

    return decorate


def _remote_addr(request) -> str:
    return request.META.get("REMOTE_ADDR", "")


def _authenticated(request, body: bytes, *, current_only: bool = False):
    """(peer, None) for a validly signed control call — bound to this method and path, its
    webhook-id not used before — or (None, the refusal response); a refusal is audited as
    Federation.AuthFailed with the failing factor, and counted."""
    headers = lower_headers(request.headers)
    unknown = _unknown_team(request)
    if unknown is not None:
        return None, unknown
    try:
        peer = inbound.authenticate(headers, body, team_id=inbound.team_hint(request), method=request.method,
                                    path=request.path, current_only=current_only)  # fmt: skip
        return peer, None
    except inbound.Refusal as refusal:
        inbound.refused(refusal, headers, endpoint=request.path, method=request.method,
                        remote_addr=_remote_addr(request))  # fmt: skip
        return None, json_error(refusal.detail, refusal.code, refusal.status)
    except ApiError as exc:  # rate limited: counted, not audited (that would defeat the limit)
        metrics.CALLS.labels("unknown", "inbound", exc.code).inc()
        return None, exc.response()


def _unknown_team(request):
    """404 `unknown_team` when `?team=` (the team of the hook URL the caller was given) is not a team
    here, as /hooks/<team>/kite answers: the caller's Ping then blames the URL, not its secret. It
    says no more than that hook URL does to anyone; nothing is stored, the refusal is counted."""
    team_id = inbound.team_hint(request)
    if team_id is None or Team.objects.filter(pk=team_id).exists():
        return None
    metrics.CALLS.labels("unknown", "inbound", "unknown_team").inc()
    return json_error(f"No team {team_id!r} on this instance: check the team in the hook URL you were given.",
                      "unknown_team", 404)  # fmt: skip


def _noted(request, peer, outcome: str = "ok") -> None:
    """Federation.RemoteRequest: every inbound peer call but event deliveries (see inbound.verify_kite_source)."""
    audit.remote_request(peer=peer, endpoint=request.path, method=request.method, outcome=outcome,
                         sender=request.headers.get("kite-peer", ""), remote_addr=_remote_addr(request))  # fmt: skip


@documented_by(openapi.PingDoc)
@csrf_exempt
@_only("GET")
def ping(request):
    if request.body and _signature_headers_parse(lower_headers(request.headers)):  # signed over no body
        return json_error("A ping takes no body.", "invalid", 400)
    peer, refusal = _authenticated(request, b"")
    if refusal is not None:
        return refusal
    _noted(request, peer)
    return JsonResponse(
        {
            "instance_id": settings.KITE_INSTANCE_ID,
            "version": settings.KITE_VERSION,
            "time": timezone.now().isoformat().replace("+00:00", "Z"),
            "capabilities": capabilities(),
        }
    )


@documented_by(openapi.TerminateDoc)
@csrf_exempt
@_only("POST")
def terminate(request):
    """The peer deleted us: revoke its row here (stop sending, stop accepting)."""
    bad = _refused_fields(request, ("reason",), "a termination")
    if bad is not None:
        return bad
    peer, refusal = _authenticated(request, request.body, current_only=True)
    if refusal is not None:
        return refusal
    _noted(request, peer)
    services.peer_revoke(peer=peer, reason=_termination_reason(request.body),
                         actor=f"peer {peer.remote_instance_id or peer.name}")  # fmt: skip
    return JsonResponse({"revoked": True, "instance_id": settings.KITE_INSTANCE_ID})


def _termination_reason(body: bytes) -> str:
    """The revocation's reason: "terminated by the peer", with the one it gave (printable, MAX_REASON at most)."""
    try:
        given = wire.json_object(body, "termination").get("reason") if body else None
    except wire.BadBody:
        given = None
    given = "".join(ch for ch in given if ch.isprintable())[:MAX_REASON].strip() if isinstance(given, str) else ""
    return f"terminated by the peer ({given})" if given else "terminated by the peer"


@documented_by(openapi.RotateDoc)
@csrf_exempt
@_only("POST")
def rotate(request):
    """The peer rotated something and tells us over the signed channel (federation.channel)."""
    body = request.body
    bad = _refused_fields(request, (*channel.CHANGES, "grace"), "a rotation")
    if bad is not None:
        return bad
    peer, refusal = _authenticated(request, body, current_only=True)
    if refusal is not None:
        return refusal
    try:
        change = channel.parse_change(body)
        applied = channel.apply(peer, change)
    except ApiError as exc:
        _noted(request, peer, outcome=str(exc.code))
        return exc.response()
    _noted(request, peer)
    return JsonResponse(applied)


def _signature_headers_parse(headers: dict) -> bool:
    try:
        signing.parse_headers(headers, int(time.time()))
    except signing.SignatureError:
        return False
    return True


@documented_by(openapi.HandshakeDoc)
@csrf_exempt
def handshake(request):
    """POST: an instance accepting one of our invitations (docs/architecture.md "Two ways to peer"). DELETE: it could not
    finish its side, drop the row its handshake made (with the nonce our answer gave it)."""
    body = request.body
    headers = lower_headers(request.headers)
    if request.method not in ("POST", "DELETE"):
        refused = json_error("Use POST (or DELETE to withdraw).", "method_not_allowed", 405)
        refused["Allow"] = "POST, DELETE"
        return refused
    bad = _refused_fields(request, HANDSHAKE_FIELDS if request.method == "POST" else ("nonce",),
                          "a handshake" if request.method == "POST" else "a withdrawal")  # fmt: skip
    if bad is not None:
        return bad
    try:
        if request.method == "DELETE":
            peer = invitations.withdraw(headers, body, path=request.path)
            _noted(request, peer)
            return JsonResponse({"withdrawn": True})
        answer, signed, peer = invitations.redeem(headers, body, path=request.path)
    except invitations.HandshakeRefused as refusal:
        if refusal.status == 401:
            audit.auth_failed(outcome=str(refusal.code), endpoint=request.path, method=request.method,
                              detail=refusal.detail, peer=refusal.peer, sender=headers.get("kite-peer", ""),
                              remote_addr=_remote_addr(request))  # fmt: skip
        elif refusal.peer is not None:
            _noted(request, refusal.peer, str(refusal.code))
        else:  # malformed before anyone is known (not JSON, other contract): counted only
            metrics.CALLS.labels("unknown", "inbound", str(refusal.code)).inc()
        return json_error(refusal.detail, str(refusal.code), refusal.status)
    _noted(request, peer)
    response = HttpResponse(answer, content_type="application/json")
    for name, value in signed.items():
        response[name] = value
    return response
