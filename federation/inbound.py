"""Who is calling (DESIGN §3): authenticate a signed peer request.

The sender is found by `kite-peer` (its instance ID, or the name of a
hand-made peer whose ID is not known yet), otherwise by trying the inbound
secrets in constant time; its instance ID is learned on first success. A
refusal names the factor that failed.
"""

import functools
import re
import time
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.db.models import Case, F, Value, When
from django.utils import timezone

from federation import audit, metrics, services, signing
from federation.errors import Code
from federation.models import Peer
from ingest.verifiers import VerificationError
from kite import ratelimit
from kite.errors import ApiError

LAST_SEEN_RESOLUTION = timedelta(seconds=1)  # don't rewrite the peer row on every request


@dataclass
class Refusal(Exception):
    code: str
    detail: str
    peer: Peer | None = None  # the peer the request named, when it is known here (for the audit trail)


def _candidates(team_id: str | None, sender: str) -> tuple[list[Peer], list[Peer]]:
    """(rows `kite-peer` names, rows whose instance ID is not known yet) — the second
    list is tried when the first is empty or none of it matches. One query in plain SQL
    (every peer request makes it; the ORM's compilation cost more than the query)."""
    sql = (
        f"SELECT * FROM {Peer._meta.db_table} WHERE status <> %s AND inbound_secret_encrypted <> ''"
        f"{' AND team_id = %s' if team_id is not None else ''} AND (remote_instance_id = %s OR remote_instance_id = '')"
    )
    params = [Peer.Status.REVOKED.value, *([team_id] if team_id is not None else []), sender or ""]
    found = list(Peer.objects.raw(sql, params))
    named = [p for p in found if sender and (p.remote_instance_id == sender or (not p.remote_instance_id and p.name == sender))]
    unnamed = [p for p in found if not p.remote_instance_id and p not in named]
    return named, unnamed


def _first_match(peers: list[Peer], request, body: bytes) -> Peer | None:
    matched = None
    for peer in peers:  # every candidate is checked: the time taken does not say which matched
        ok = any(signing.hmac_matches(secret, request, body) for secret in services.inbound_secrets(peer))
        matched = matched or (peer if ok else None)
    return matched


_TEAM_HINT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def team_hint(request) -> str | None:
    """`?team=` on a peer-facing endpoint: the team whose rows the caller says know it (Kite adds it
    from the hook URL it delivers to). It only narrows which rows are tried — one team's rather
    than those of every team peered with that instance; the signature decides, as without it."""
    team = request.GET.get("team", "")
    return team if _TEAM_HINT.fullmatch(team) else None


def authenticate(headers: dict[str, str], body: bytes, *, team_id: str | None, now: int | None = None) -> Peer:
    """The peer that signed this request, or Refusal(code, detail)."""
    now = int(time.time()) if now is None else now
    try:
        request = signing.parse_headers(headers, now)
    except signing.SignatureError as exc:
        raise Refusal(exc.code, exc.detail) from None
    named, unnamed = _candidates(team_id, request.sender)
    matched = _first_match(named, request, body) or _first_match(unnamed, request, body)
    if matched is None:
        if named:
            raise Refusal(Code.BAD_SECRET, f"Signature does not match the inbound secret for {request.sender!r}.",
                          named[0] if len(named) == 1 else None)  # fmt: skip
        raise Refusal(Code.UNKNOWN_PEER, "No peer or trusted sender known here signed this request.")
    if matched.certificate_thumbprint:
        _check_certificate(matched, request, body)
    _check_rate(matched)
    _note_contact(matched, request.sender)
    return matched


def _check_certificate(peer: Peer, request, body: bytes) -> None:
    """A peer with a pinned certificate must also sign `v1a` with it (DESIGN §3)."""
    if not request.ed25519_entries:
        raise Refusal(
            Code.MISSING_CERTIFICATE,
            f"{peer.name!r} has a pinned certificate ({peer.certificate_thumbprint[:19]}…) but the request has no "
            "v1a signature: the sender has no valid identity certificate.",
            peer,
        )
    thumbprints = request.key_thumbprint.split()  # several while the sender rotates its certificate
    if thumbprints and peer.certificate_thumbprint not in thumbprints:
        raise Refusal(
            Code.BAD_CERTIFICATE,
            f"Signed with certificate {thumbprints[0][:19]}…, but {peer.name!r} is pinned to "
            f"{peer.certificate_thumbprint[:19]}…: paste the sender's current certificate.",
            peer,
        )
    if not signing.ed25519_matches(_verifier(peer.certificate_pem), request, body):
        raise Refusal(
            Code.BAD_CERTIFICATE, f"The v1a signature does not verify with {peer.name!r}'s pinned certificate.", peer
        )


@functools.lru_cache(maxsize=256)
def _verifier(pem: str):
    from federation import certificates

    return certificates.verifier_for(pem)


def _check_rate(peer: Peer) -> None:
    verdict = ratelimit.hit(f"peer-in:{peer.pk}", peer.rate_limit_per_second)
    if not verdict.allowed:
        raise ApiError(
            f"Peer {peer.name!r} is limited to {peer.rate_limit_per_second} requests/s.",
            Code.RATE_LIMITED,
            status=429,
            headers={"Retry-After": str(verdict.retry_after)},
        )


def _note_contact(peer: Peer, sender: str) -> None:
    now = timezone.now()
    updates = {}
    if sender and not peer.remote_instance_id:
        updates["remote_instance_id"] = sender[:63]  # learned on first success
    if peer.last_inbound_at is None or now - peer.last_inbound_at > LAST_SEEN_RESOLUTION:
        updates["last_inbound_at"] = now
        if peer.status in (Peer.Status.ENROLLED, Peer.Status.ACCEPTED):
            # Active once enrolled — judged by the row now (our ping may have just enrolled it).
            updates["status"] = Case(
                When(status=Peer.Status.ENROLLED, then=Value(Peer.Status.ACTIVE)), default=F("status")
            )
    if peer.status == Peer.Status.ACCEPTED and peer.last_success_at is None and peer.sends_to and (
        peer.last_inbound_at is None
    ):
        # A new peering (invitation): the other side just reached us; ping back now rather than at
        # the next heartbeat, so both sides are enrolled and active within seconds.
        from federation.invitations import _enrol_soon

        transaction.on_commit(lambda: _enrol_soon(peer.pk))
    if updates:
        Peer.objects.filter(pk=peer.pk).update(**updates)
        if "remote_instance_id" in updates:
            from federation.outbox import forget_routes

            forget_routes(peer.team_id)
        for field, value in updates.items():
            if field != "status":
                setattr(peer, field, value)
        if "status" in updates:
            peer.refresh_from_db(fields=["status"])


def verify_kite_source(secret, headers, body, now, team_id=None):
    """The `kite` source's verifier, registered into ingest by FederationConfig.ready().

    Event deliveries are the hot path: an accepted one is only counted (its Event row is its
    record); a refused one is also audited (Federation.AuthFailed, rare)."""
    try:
        peer = authenticate(headers, body, team_id=team_id, now=now)
    except Refusal as refusal:
        refused(refusal, headers, endpoint=f"/hooks/{team_id}/kite", method="POST", team_id=team_id)
        raise VerificationError(str(refusal.code), refusal.detail) from None
    metrics.CALLS.labels(peer.name, "inbound", "ok").inc()
    return peer


def refused(refusal: Refusal, headers: dict[str, str], *, endpoint: str, method: str, team_id: str | None = None,
            remote_addr: str = "") -> None:  # fmt: skip
    """Audit and count a refused peer request, the failing factor as its outcome."""
    audit.auth_failed(outcome=str(refusal.code), endpoint=endpoint, method=method, detail=refusal.detail,
                      peer=refusal.peer, team_id=team_id, sender=headers.get("kite-peer", ""),
                      remote_addr=remote_addr)  # fmt: skip
