"""One-paste peering (docs/architecture.md "Two ways to peer": by invitation).

A issues `kite-invite-v1.<base64url(JSON)>`; B pastes it. B calls A's
`POST /api/federation/handshake` over a channel pinned as the invitation says,
with the code, its certificate and the secret B will check inbound, signed `v1a`
by B's key. A answers with the secret A will check inbound and its certificate,
signed by A's key. Each side generates the secret it verifies; nobody copies one.
Both rows are `accepted`; both sides ping at once, which enrols them, and the
first signed request each receives makes them `active`.
"""

import base64
import hashlib
import json
import re
import secrets
import time
import uuid
from datetime import timedelta
from urllib.parse import urlencode

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from federation import audit, certificates, client, dispatch, grants, peers, services, signing, wire
from federation.contract import CONTRACT_VERSION, capabilities
from federation.errors import Code
from federation.models import Grant, Peer
from federation.selectors import server_tls_fingerprint
from kite import crypto
from kite.errors import ApiError

PREFIX = "kite-invite-v1."
DEFAULT_TTL_SECONDS = 3600
MAX_TTL_SECONDS = 7 * 24 * 3600
MAX_INVITATION_CHARS = 4096
MAX_CODE_CHARS = 100
HANDSHAKE_TIMEOUT = (3.0, 10.0)
HANDSHAKE_PATH = "/api/federation/handshake"
WITHDRAW_SECONDS = 300  # how long after its handshake B may withdraw the row it made here
UNKNOWN_INVITATION = "unknown_invitation"
INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class HandshakeRefused(Exception):
    def __init__(self, status: int, code: str, detail: str, peer: Peer | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.peer = status, code, detail, peer


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _code_secret(code: str) -> str:
    """The invitation code as a Standard Webhooks secret: the v1 factor of the handshake."""
    return "whsec_" + code


def _own_certificate(team, actor: str = audit.SYSTEM):
    """The team's current identity certificate, issued on first need (an invitation pins it)."""
    subject = f"{settings.KITE_INSTANCE_ID} {team.name}".encode()[:64].decode("utf-8", "ignore")  # X.509 CN limit
    return certificates.current(team.id) or certificates.issue(team=team, subject=subject, actor=actor)


# --- A: issue -------------------------------------------------------------------


def issue(*, team, name: str = "", scopes: list | None = None, max_hops: int | None = None,
          ttl_seconds: int = DEFAULT_TTL_SECONDS, actor: str = "") -> tuple[Peer, str]:  # fmt: skip
    if not 60 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise ApiError(f"ttl_seconds must be between 60 and {MAX_TTL_SECONDS} (7 days).", Code.INVALID)
    code = base64.b64encode(secrets.token_bytes(32)).decode()
    expires_at = timezone.now() + timedelta(seconds=ttl_seconds)
    peer = Peer(
        team=team,
        name=peers.check_name(name or f"invited-{secrets.token_hex(3)}"),
        role=Peer.Role.PEER,
        scopes=peers.check_scopes(scopes if scopes is not None else []),
        status=Peer.Status.PROPOSED,
        invitation_code_sha256=_digest(code),
        invitation_expires_at=expires_at,
    )
    if max_hops is not None:
        peer.max_hops = max_hops
    with transaction.atomic():
        certificate = _own_certificate(team, actor)
        peers.save_new(peer)
        audit.record(audit.INVITATION_CREATED, peer=peer, actor=actor, data={
            "peer_id": peer.pk, "scopes": peer.scopes, "max_hops": peer.max_hops,
            "expires_at": expires_at.isoformat(), "certificate_thumbprint": certificate.thumbprint,
        })  # fmt: skip
    payload = {
        "contract_version": CONTRACT_VERSION,
        "url": settings.KITE_PUBLIC_URL,
        "instance_id": settings.KITE_INSTANCE_ID,
        "team_id": team.id,
        "hook_url": peers.hook_url_for(team),
        "certificate_thumbprint": certificate.thumbprint,
        "tls_fingerprint": server_tls_fingerprint() or None,
        "code": code,
        "expires_at": expires_at.isoformat().replace("+00:00", "Z"),
    }
    encoded = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")
    return peer, PREFIX + encoded


def parse(invitation: str) -> dict:
    invitation = (invitation or "").strip()
    if not invitation.startswith(PREFIX) or len(invitation) > MAX_INVITATION_CHARS:
        raise ApiError("Not a Kite invitation (it starts with 'kite-invite-v1.').", Code.INVALID)
    raw = invitation[len(PREFIX) :]
    try:
        payload = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, json.JSONDecodeError):
        raise ApiError("The invitation is damaged: paste it whole.", Code.INVALID) from None
    if not isinstance(payload, dict):
        raise ApiError("The invitation is damaged: paste it whole.", Code.INVALID)
    if payload.get("contract_version") != CONTRACT_VERSION:
        raise ApiError(
            f"This invitation uses contract version {payload.get('contract_version')!r}; this instance speaks "
            f"{CONTRACT_VERSION}.", "unsupported_contract", status=422,
        )  # fmt: skip
    for field in ("url", "instance_id", "team_id", "hook_url", "certificate_thumbprint", "code"):
        if not isinstance(payload.get(field), str) or not payload[field]:
            raise ApiError(f"The invitation is damaged: {field} is missing.", Code.INVALID)
    return payload


# --- B: accept --------------------------------------------------------------------


def accept(*, team, invitation: str, name: str = "", scopes: list | None = None, max_hops: int | None = None,
           actor: str = "") -> Peer:  # fmt: skip
    """The handshake first, with no transaction open (it may take A's whole timeout), then one
    short transaction storing our side. If that fails after A stored its side, A is told to drop it."""
    offer = parse(invitation)
    if offer["instance_id"] == settings.KITE_INSTANCE_ID and offer["team_id"] == team.id:
        raise ApiError("This is your own team's invitation: give it to the other instance's operator.", Code.INVALID)
    peers.check_url(offer["url"])  # the handshake goes there: refused here as a bad input, not a 502
    peers.check_url(offer["hook_url"])
    name = peers.check_name(name or offer["instance_id"])
    scopes = peers.check_scopes(scopes if scopes is not None else [])
    peers.check_tls_fingerprint(offer.get("tls_fingerprint") or "")
    _check_free(team, name, offer["instance_id"][:63])
    certificate = _own_certificate(team, actor)
    checked_here = crypto.new_webhook_secret()  # what we verify: never leaves except to A, once
    grant_token = _reserved_grant_token()
    target = client.Target(
        url=handshake_url(offer),
        secret=_code_secret(offer["code"]),
        sender_id=settings.KITE_INSTANCE_ID,
        tls_fingerprint=offer.get("tls_fingerprint") or "",
        signer=certificates.signer_for(team.id),
    )
    # Audited once our side is stored (then naming the peer), or once the handshake failed.
    called = audit.PeerCall(team_id=team.id, peer_name=name, actor=actor, deferred=True)
    answered = None  # A's answer, once it stored its side
    try:
        answer = _handshake(target, _handshake_request(team, offer, certificate, checked_here, grant_token), called)
        answered = answer.body if isinstance(answer.body, dict) else {}
        peer = _our_side(team, offer, answer, name=name, scopes=scopes, max_hops=max_hops, checked_here=checked_here)
        _store_accepted(peer, grant_token, offer, actor)
        called.peer = peer
    except Exception:
        if answered is not None:
            _abandon(target, answered, called)  # A stored its side: tell it to drop it, so no half-peer is left
        raise
    finally:
        called.flush()
    transaction.on_commit(lambda: dispatch.enrol_soon(peer.pk), robust=True)
    return peer


def _our_side(team, offer: dict, answer: client.PeerAnswer, *, name: str, scopes: list, max_hops: int | None,
              checked_here: str) -> Peer:  # fmt: skip
    """Our peer row for A, from A's answer once it is verified (not saved yet)."""
    reply = answer.body if isinstance(answer.body, dict) else {}
    their_pem, their_thumbprint = certificates.parse_peer_pem(str(reply.get("certificate_pem", "")))
    if their_thumbprint != offer["certificate_thumbprint"]:
        raise ApiError("The inviting instance answered with another certificate than the invitation names.",
                       Code.BAD_CERTIFICATE, status=502)  # fmt: skip
    _verify_reply(answer, their_pem, offer)
    if reply.get("instance_id") != offer["instance_id"]:  # the signed answer names the instance we peer with
        raise ApiError(f"The inviting instance answered as {str(reply.get('instance_id'))[:63]!r}, not the "
                       f"{offer['instance_id'][:63]!r} the invitation names.", Code.BAD_CERTIFICATE, status=502)  # fmt: skip
    peer = Peer(
        team=team, name=name, role=Peer.Role.PEER, peer_hook_url=offer["hook_url"],
        remote_instance_id=offer["instance_id"][:63], scopes=scopes,
        tls_fingerprint=peers.check_tls_fingerprint(offer.get("tls_fingerprint") or ""),
        status=Peer.Status.ACCEPTED, certificate_pem=their_pem, certificate_thumbprint=their_thumbprint,
    )  # fmt: skip
    if max_hops is not None:
        peer.max_hops = max_hops
    peers.set_secret(peer, "inbound", checked_here)
    peers.set_secret(peer, "outbound", peers.check_secret(str(reply.get("inbound_secret", "")),
                                                                  "inbound_secret"))  # fmt: skip
    if isinstance(reply.get("grant_token"), str) and reply["grant_token"].startswith("fg-"):
        peer.remote_grant_encrypted = crypto.encrypt(reply["grant_token"][:200])
    return peer


def _check_free(team, name: str, instance_id: str) -> None:
    live = Peer.objects.filter(team=team).exclude(status=Peer.Status.REVOKED)
    if live.filter(name=name).exists():
        raise ApiError(f"Team already has a peer named {name!r}.", Code.CONFLICT, status=409)
    if live.filter(remote_instance_id=instance_id).exists():
        raise ApiError(f"Team already has a peer with instance ID {instance_id!r}: delete it to peer again.",
                       Code.INSTANCE_ID_TAKEN, status=409)  # fmt: skip


def _reserved_grant_token() -> str:
    """The token of the default fleet.agents grant we give A. A stores it in the handshake, so it
    names its row id before the row exists: the id is taken now, and the row is written with it
    only if the handshake completes (an abandoned one leaves a gap in the ids, nothing else)."""
    return f"fg-{_next_grant_id()}.{secrets.token_urlsafe(32)}"


def _next_grant_id() -> int:
    table = Grant._meta.db_table
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT nextval(pg_get_serial_sequence(%s, 'id'))", [table])
            return cursor.fetchone()[0]
        # SQLite: an AUTOINCREMENT table never hands out an id at or below its sqlite_sequence.seq.
        with transaction.atomic():
            cursor.execute("UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = %s RETURNING seq", [table])
            row = cursor.fetchone()
            if row is None:  # no grant was ever stored here
                cursor.execute(f"INSERT INTO sqlite_sequence (name, seq) SELECT %s, COALESCE(MAX(id), 0) + 1 "
                               f"FROM {table} RETURNING seq", [table])  # fmt: skip
                row = cursor.fetchone()
        return row[0]


def _handshake_request(team, offer: dict, certificate, checked_here: str, grant_token: str) -> bytes:
    return client.encode({
        "code": offer["code"], "url": settings.KITE_PUBLIC_URL, "instance_id": settings.KITE_INSTANCE_ID,
        "team_id": team.id, "hook_url": peers.hook_url_for(team), "certificate_pem": certificate.pem,
        "tls_fingerprint": server_tls_fingerprint() or None, "inbound_secret": checked_here,
        "contract_version": CONTRACT_VERSION, "grant_token": grant_token,
    })  # fmt: skip


def _handshake(target: client.Target, body: bytes, called: audit.PeerCall) -> client.PeerAnswer:
    try:
        return client.call(target, "POST", body, timeout=HANDSHAKE_TIMEOUT, audit_as=called)
    except client.PeerCallError as failure:
        # The inviter's refusal keeps its meaning (a hook URL it refuses is a 400, an instance ID it
        # already has a 409, a used code a 401); no answer, or the inviter failing, is a 502.
        status = failure.status_code if failure.status_code in (400, 401, 403, 409, 422) else 502
        raise ApiError(f"The inviting instance refused the handshake: {failure.detail}",
                       failure.code or "handshake_failed", status=status) from None  # fmt: skip


def _store_accepted(peer: Peer, grant_token: str, offer: dict, actor: str) -> None:
    """Our side, in one short transaction: the peer row and the default grant A now holds the token of.
    The name or instance ID may have been taken while the handshake ran: 409, and A is told."""
    grant_id, _, grant_secret = grant_token.removeprefix("fg-").partition(".")
    with transaction.atomic():
        _check_free(peer.team, peer.name, peer.remote_instance_id)
        peers.save_new(peer)
        grant = Grant.objects.create(
            pk=int(grant_id), team_id=peer.team_id, peer=peer, resource_kind="fleet.agents",
            permission_scopes=["read"], secret_sha256=grants.digest(grant_secret),
            expires_at=timezone.now() + timedelta(seconds=grants.DEFAULT_TTL_SECONDS),
        )  # fmt: skip
        audit.record(audit.GRANT_CREATED, peer=peer, actor=actor, data=grants.audit_data(grant))
        audit.record(audit.INVITATION_ACCEPTED, peer=peer, actor=actor, data={
            **peers.peer_summary(peer), "inviting_instance": offer["instance_id"], "url": offer["url"],
        })  # fmt: skip


def handshake_url(offer: dict) -> str:
    """A's handshake endpoint; `?team=` names the inviting team, which the signature is bound to."""
    return offer["url"].rstrip("/") + HANDSHAKE_PATH + "?" + urlencode({"team": offer["team_id"]})


def _answer_binding(team_id: str) -> signing.Binding:
    """A's answer is signed for its own purpose: no request to anyone is ever bound to ANSWER."""
    return signing.Binding("ANSWER", HANDSHAKE_PATH, team_id)


def _verify_reply(answer, their_pem: str, offer: dict) -> None:
    headers = {k.lower(): v for k, v in answer.headers.items()}
    raw = answer.raw_body
    try:
        request = signing.parse_headers(headers, int(time.time()))
    except signing.SignatureError as exc:
        raise ApiError(f"The handshake answer is not signed: {exc.detail}", Code.BAD_CERTIFICATE, status=502) from None
    message = request.ed25519_message(raw, _answer_binding(offer["team_id"]))
    if not signing.ed25519_matches(certificates.verifier_for(their_pem), request, message):
        raise ApiError("The handshake answer's signature does not verify with the inviting instance's certificate.",
                       Code.BAD_CERTIFICATE, status=502)  # fmt: skip


def _abandon(target: client.Target, reply: dict, called: audit.PeerCall) -> None:
    """`target` is A's handshake endpoint: DELETE there withdraws the half A stored — with the
    nonce A's answer gave, signed v1a by the certificate we presented in the handshake."""
    nonce = reply.get("withdraw_nonce")
    if not isinstance(nonce, str) or not nonce:
        return
    target = client.Target(target.url, _code_secret(nonce), target.sender_id, target.tls_fingerprint, target.signer)
    try:
        client.call(target, "DELETE", client.encode({"nonce": nonce}), timeout=HANDSHAKE_TIMEOUT, audit_as=called)
    except client.PeerCallError:
        pass


# --- A: the handshake endpoint ---------------------------------------------------------


def redeem(headers: dict[str, str], raw: bytes, *, path: str = HANDSHAKE_PATH) -> tuple[bytes, dict, Peer]:
    """Check and redeem B's handshake; returns (answer body, signed headers, our peer row for B).
    Raises HandshakeRefused. The invitation is looked up before any signature is checked: junk
    signatures cost one indexed read, not an Ed25519 verification each."""
    offer = _handshake_body(raw)
    if offer.get("contract_version", CONTRACT_VERSION) != CONTRACT_VERSION:
        raise HandshakeRefused(422, "unsupported_contract", f"This instance speaks contract version {CONTRACT_VERSION}.")
    request = _signed(headers)
    invited = _open_invitation(offer["code"])
    binding = signing.Binding("POST", path, invited.team_id)
    if not signing.hmac_matches(_code_secret(offer["code"]), request, request.hmac_message(raw, binding)):
        raise HandshakeRefused(401, UNKNOWN_INVITATION, "Unknown, expired or already used invitation.")
    try:
        their_pem, their_thumbprint = certificates.parse_peer_pem(str(offer.get("certificate_pem", "")))
    except ApiError as exc:
        raise HandshakeRefused(400, exc.code, exc.detail) from None
    if not request.ed25519_entries:
        raise HandshakeRefused(401, Code.MISSING_CERTIFICATE, "The handshake must be signed v1a by the accepting instance.")
    if not signing.ed25519_matches(certificates.verifier_for(their_pem), request, request.ed25519_message(raw, binding)):
        raise HandshakeRefused(401, Code.BAD_CERTIFICATE, "The v1a signature does not verify with the certificate sent.")
    instance_id = str(offer.get("instance_id", ""))
    if not INSTANCE_ID.fullmatch(instance_id):
        raise HandshakeRefused(400, Code.INVALID, "instance_id must be 1-63 letters, digits, '.', '_' or '-'.", invited)
    try:  # before the transaction: the destination policy resolves the name (no I/O under a row lock)
        hook_url = peers.check_url(str(offer.get("hook_url", "")))
        tls_fingerprint = peers.check_tls_fingerprint(str(offer.get("tls_fingerprint") or ""))
        checked_there = peers.check_secret(str(offer.get("inbound_secret", "")), "inbound_secret")
    except ApiError as exc:
        raise HandshakeRefused(400, exc.code, exc.detail, invited) from None
    nonce = secrets.token_urlsafe(32)
    with transaction.atomic():
        peer = Peer.objects.select_for_update().filter(pk=invited.pk, status=Peer.Status.PROPOSED).first()
        if peer is None:  # redeemed by a concurrent handshake
            raise HandshakeRefused(401, UNKNOWN_INVITATION, "Unknown, expired or already used invitation.")
        taken = Peer.objects.filter(team_id=peer.team_id, remote_instance_id=instance_id).exclude(
            status=Peer.Status.REVOKED).exclude(pk=peer.pk)  # fmt: skip
        if taken.exists():
            raise HandshakeRefused(409, Code.INSTANCE_ID_TAKEN, f"This team already has a peer with instance ID "
                                   f"{instance_id!r}: that peer must be deleted first.", peer)  # fmt: skip
        peer.peer_hook_url, peer.tls_fingerprint = hook_url, tls_fingerprint
        checked_here = crypto.new_webhook_secret()
        peer.remote_instance_id = instance_id
        peer.certificate_pem, peer.certificate_thumbprint = their_pem, their_thumbprint
        peers.set_secret(peer, "inbound", checked_here)
        peers.set_secret(peer, "outbound", checked_there)
        peer.status = Peer.Status.ACCEPTED
        peer.invitation_code_sha256, peer.invitation_expires_at = "", None  # single use
        peer.handshake_nonce_sha256 = _digest(nonce)  # B may withdraw this row, and only this one, for a while
        peer.handshake_withdraw_until = timezone.now() + timedelta(seconds=WITHDRAW_SECONDS)
        given = offer.get("grant_token")
        if isinstance(given, str) and given.startswith("fg-"):
            peer.remote_grant_encrypted = crypto.encrypt(given[:200])
        peer.save()
        team = peer.team
        _, grant_token = grants.create(peer=peer, resource_kind="fleet.agents", actor=audit.SYSTEM)  # the default
    # No ping from here yet: B stores its side only after this answer. B pings at once, and
    # its first signed request makes this side ping back (inbound._note_contact).
    body = {
        "instance_id": settings.KITE_INSTANCE_ID, "certificate_pem": _own_certificate(team).pem,
        "inbound_secret": checked_here, "capabilities": capabilities(), "peer_name": peer.name,
        "grant_token": grant_token, "withdraw_nonce": nonce,
    }  # fmt: skip
    encoded = client.encode(body)
    signer = certificates.signer_for(team.id)
    headers = signing.sign_headers(
        secret=_code_secret(offer["code"]), msg_id=f"hs_{uuid.uuid4().hex}", timestamp=int(time.time()), body=encoded,
        sender_id=settings.KITE_INSTANCE_ID, binding=_answer_binding(team.id), ed25519_sign=signer.sign,
        key_thumbprint=signer.thumbprint,
    )  # fmt: skip
    return encoded, headers, peer


def _handshake_body(raw: bytes) -> dict:
    try:
        offer = wire.json_object(raw, "handshake body")
    except wire.BadBody as exc:
        raise HandshakeRefused(400, Code.INVALID, exc.detail) from None
    code = offer.get("code", offer.get("nonce"))
    if not isinstance(code, str) or not 1 <= len(code) <= MAX_CODE_CHARS:
        raise HandshakeRefused(400, Code.INVALID, "The handshake needs the invitation's code.")
    return offer


def _signed(headers: dict[str, str]) -> signing.SignedRequest:
    try:
        return signing.parse_headers(headers, int(time.time()))
    except signing.SignatureError as exc:
        raise HandshakeRefused(exc.status, exc.code, exc.detail) from None


def _open_invitation(code: str) -> Peer:
    invited = Peer.objects.filter(invitation_code_sha256=_digest(code), status=Peer.Status.PROPOSED).first()
    if invited is None or invited.invitation_expires_at is None or invited.invitation_expires_at <= timezone.now():
        raise HandshakeRefused(401, UNKNOWN_INVITATION, "Unknown, expired or already used invitation.")
    return invited


def withdraw(headers: dict[str, str], raw: bytes, *, path: str = HANDSHAKE_PATH) -> Peer:
    """B could not finish its side: drop the row its handshake made here. Only B can: it holds
    the nonce our answer gave it, signs v1a with the certificate it presented in that handshake,
    and only while the row is still `accepted` and within WITHDRAW_SECONDS. Raises HandshakeRefused."""
    body = _handshake_body(raw)
    nonce = body.get("nonce")
    request = _signed(headers)
    peer = None
    if isinstance(nonce, str):
        peer = Peer.objects.filter(handshake_nonce_sha256=_digest(nonce), status=Peer.Status.ACCEPTED,
                                   handshake_withdraw_until__gt=timezone.now()).first()  # fmt: skip
    if peer is None or not peer.certificate_pem:
        raise HandshakeRefused(401, "unknown_handshake", "No handshake of yours to withdraw here (unknown or "
                               "expired nonce).")  # fmt: skip
    message = request.ed25519_message(raw, signing.Binding("DELETE", path, peer.team_id))
    if not signing.ed25519_matches(certificates.verifier_for(peer.certificate_pem), request, message):
        raise HandshakeRefused(401, Code.BAD_CERTIFICATE, "The v1a signature does not verify with the certificate "
                               "presented in that handshake.", peer)  # fmt: skip
    with transaction.atomic():
        claimed = Peer.objects.filter(pk=peer.pk, handshake_nonce_sha256=peer.handshake_nonce_sha256,
                                      status=Peer.Status.ACCEPTED).update(handshake_nonce_sha256="")  # fmt: skip
        if claimed != 1:  # withdrawn concurrently: once is enough
            raise HandshakeRefused(401, "unknown_handshake", "This handshake was already withdrawn.", peer)
        services.peer_revoke(peer=peer, reason="handshake abandoned by the peer", actor=f"peer {request.sender}")
    return peer
