"""Changes carried to a peer over the signed channel (docs/architecture.md "Rotation"): a rotated secret,
a new identity certificate. The other side applies them itself through its signed
`POST /api/federation/rotate`, so peers with an authenticated channel (every invitation peer)
never copy a secret or a PEM by hand.

The change is one JSON object, named from the receiver's side:
`{"inbound_secret": …}` (check my requests with this from now on; your previous inbound
secret stays valid 24 h), `{"outbound_secret": …}` (sign to me with this), or
`{"certificate_pem": …}` (pin my new identity certificate).
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cryptography import x509
from django.db import IntegrityError, connections, transaction
from django.utils import timezone

from federation import audit, certificates, client, peers, services, wire
from federation.errors import Code
from federation.models import CertificateAcknowledgement, IdentityCertificate, Peer
from kite import crypto
from kite.errors import ApiError

ROTATE_PATH = "/api/federation/rotate"
CHANGES = ("inbound_secret", "outbound_secret", "certificate_pem")
TIMEOUT = (3.0, 10.0)


def has_channel(peer: Peer) -> bool:
    """A peer we reach and that knows our certificate: what an invitation handshake sets up."""
    return bool(peer.role == Peer.Role.PEER and peer.peer_hook_url and peer.remote_instance_id
                and peer.certificate_thumbprint and peer.status != Peer.Status.REVOKED)  # fmt: skip


def tell(peer: Peer, change: dict, *, actor: str = "") -> client.PeerAnswer:
    """Send one change, signed with the current secret and certificates; raises PeerCallError."""
    target = peers.target_for(peer)
    target = client.Target(peers.ping_url(peer, ROTATE_PATH), target.secret, target.sender_id, target.tls_fingerprint,
                           target.signer)  # fmt: skip
    return client.call(target, "POST", client.encode(change), timeout=TIMEOUT,
                       audit_as=audit.PeerCall(peer=peer, actor=actor or audit.SYSTEM))  # fmt: skip


@dataclass(frozen=True)
class Rotated:
    peer: Peer
    direction: str
    propagated: bool
    secret: str | None  # shown once: generated and not carried to the peer
    error: str = ""


def rotate_secret(*, peer: Peer, direction: str, secret: str | None = None, propagate: bool, grace: bool = True,
                  actor: str = "") -> Rotated:  # fmt: skip
    """`services.rotate_secret`, and with `propagate` the other side is told over the channel.

    outbound (the secret we sign with): the peer learns it first, while our requests are still
    signed with the old one; only once it answered do we switch, so nothing is ever refused.
    A peer that cannot be told → ApiError 502 and nothing changed here.
    inbound (the secret we check): we switch first (the old one stays valid 24 h), then tell
    the peer; if that fails the new secret is returned once, to be pasted on the other side.
    grace=False (a suspected leak): the secret being replaced stops working at once on the side
    that checks it — here for inbound, at the peer (told so) for outbound."""
    if not propagate:
        issued = services.rotate_secret(peer=peer, direction=direction, secret=secret, grace=grace, actor=actor)
        return Rotated(issued.row, direction, False, issued.secrets.get("secret"))
    if direction not in ("inbound", "outbound"):
        raise ApiError("direction must be inbound or outbound.", Code.INVALID)
    if not (peer.sends_to and peer.outbound_secret_encrypted):  # no URL to call, or no secret to sign it with
        raise ApiError(f"{peer.name!r} cannot be told over a channel (a trusted sender, or an invitation not yet "
                       "accepted): rotate with propagate=false.", Code.INVALID)  # fmt: skip
    new = peers.check_secret(secret, "secret") if secret else crypto.new_webhook_secret()
    if direction == "outbound":
        try:
            tell(peer, {"inbound_secret": new, **({} if grace else {"grace": False})}, actor=actor)
        except client.PeerCallError as failure:
            raise ApiError(f"{peer.name!r} could not be told the new secret, nothing changed: {failure}",
                           Code.PEER_UNREACHABLE, status=502) from None  # fmt: skip
        issued = services.rotate_secret(peer=peer, direction="outbound", secret=new, actor=actor)
        return Rotated(issued.row, direction, True, None)
    issued = services.rotate_secret(peer=peer, direction="inbound", secret=new, grace=grace, actor=actor)
    try:
        tell(issued.row, {"outbound_secret": new}, actor=actor)
    except client.PeerCallError as failure:
        return Rotated(issued.row, direction, False, new, str(failure))
    return Rotated(issued.row, direction, True, None)


def parse_change(body: bytes) -> dict:
    try:
        return wire.json_object(body, "change")
    except wire.BadBody as exc:
        raise ApiError(exc.detail, Code.INVALID) from None


def apply(peer: Peer, change: object) -> dict:
    """What the receiving side does with one change (the view authenticated `peer`)."""
    if not isinstance(change, dict):
        raise ApiError(f"Send exactly one of {', '.join(CHANGES)}.", Code.INVALID)
    change = dict(change)
    grace = change.pop("grace", True)
    if len(change) != 1 or next(iter(change)) not in CHANGES:
        raise ApiError(f"Send exactly one of {', '.join(CHANGES)} (and, with inbound_secret, grace).", Code.INVALID)
    (name, value), = change.items()
    if grace is not True and (name != "inbound_secret" or grace is not False):
        raise ApiError("grace: false goes only with inbound_secret.", Code.INVALID)
    if not isinstance(value, str):
        raise ApiError(f"{name} must be a string.", Code.INVALID)
    if name == "certificate_pem":
        return _repin(peer, value)
    direction = name.removesuffix("_secret")
    issued = services.rotate_secret(peer=peer, direction=direction, secret=peers.check_secret(value, name),
                                    grace=grace, actor=f"peer {peer.name}")  # fmt: skip
    return {"applied": name, "fingerprint": getattr(issued.row, f"{direction}_fingerprint")}


def _repin(peer: Peer, pem: str) -> dict:
    pem, thumbprint = certificates.parse_peer_pem(pem)
    not_after = x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc
    if not_after <= timezone.now():
        raise ApiError("certificate_pem has expired.", Code.INVALID)
    with transaction.atomic():
        row = Peer.objects.select_for_update().get(pk=peer.pk)
        if not row.certificate_thumbprint:  # nothing pinned here: the operator chose so, keep it
            return {"applied": None, "pinned": False}
        row.certificate_pem, row.certificate_thumbprint = pem, thumbprint
        row.save(update_fields=["certificate_pem", "certificate_thumbprint"])
    return {"applied": "certificate_pem", "pinned": True, "thumbprint": thumbprint}


def channel_peers(team_id: str) -> list[Peer]:
    return [peer for peer in Peer.objects.filter(team_id=team_id, role=Peer.Role.PEER) if has_channel(peer)]


def announce_certificate(*, team_id: str, pem: str, peers: list[Peer] | None = None) -> list[dict]:
    """Tell every peer with a channel (or `peers`) to pin `pem` (in parallel); one result per peer.
    Each answer is recorded as that peer's acknowledgement of the certificate, or not (federation.renewal)."""
    peers = channel_peers(team_id) if peers is None else peers

    def one(peer: Peer) -> tuple[dict, object]:
        try:
            answer = tell(peer, {"certificate_pem": pem})
        except client.PeerCallError as failure:
            return {"peer": peer.name, "ok": False, "error": str(failure)}, None
        finally:
            connections.close_all()  # this thread's own (the audit row's): the pool's threads end here
        pinned = isinstance(answer.body, dict) and answer.body.get("pinned", False)
        return {"peer": peer.name, "ok": True, "pinned": bool(pinned)}, answer.body

    if not peers:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(peers))) as pool:
        outcomes = list(pool.map(one, peers))
    certificate = IdentityCertificate.objects.filter(team_id=team_id, pem=pem).first()
    if certificate is not None:
        for peer, (result, body) in zip(peers, outcomes, strict=True):
            _note_acknowledgement(certificate, peer, body, result.get("error", ""))
    return [result for result, _ in outcomes]


def _note_acknowledgement(certificate: IdentityCertificate, peer: Peer, body: object, error: str) -> None:
    """A peer acknowledged `certificate` when it answered that it pinned it, or that it pins no
    certificate of ours (then retiring an older one cannot break it either)."""
    pinned = isinstance(body, dict) and body.get("pinned") is True
    if pinned and body.get("thumbprint", certificate.thumbprint) != certificate.thumbprint:
        error = f"it answered that it pinned {str(body.get('thumbprint'))[:80]!r}, not {certificate.thumbprint}"
    elif body is not None and not pinned and not (isinstance(body, dict) and body.get("pinned") is False):
        error = f"its answer does not say it pinned the certificate: {str(body)[:200]}"
    acknowledged = body is not None and not error
    now = timezone.now()
    try:
        with transaction.atomic():
            row, _ = CertificateAcknowledgement.objects.select_for_update().get_or_create(
                certificate=certificate, peer=peer
            )
            row.attempts += 1
            row.last_attempt_at, row.last_error = now, error[:2000]
            if acknowledged:
                row.acknowledged_at, row.pinned = row.acknowledged_at or now, pinned
            row.save()
    except IntegrityError:  # the certificate or the peer was deleted meanwhile: nothing to note
        pass
