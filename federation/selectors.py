from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

from federation.models import AuditEvent, Delivery, FederationToken, IdentityCertificate, OutboxEntry, Peer
from kite import tls

PAGE = 200


def tokens(team_id: str):
    return FederationToken.objects.filter(team_id=team_id).order_by("id")


def peers(team_id: str):
    return Peer.objects.filter(team_id=team_id, role=Peer.Role.PEER).select_related("health").order_by("name", "id")


def trusted_senders(team_id: str):
    return Peer.objects.filter(team_id=team_id, role=Peer.Role.SENDER).select_related("health").order_by("name", "id")


def peer_for_team(team_id: str, peer_id, role: str | None = "peer") -> Peer | None:
    """One peer of the team (role None: a peer or a trusted sender)."""
    try:
        peers = Peer.objects.filter(team_id=team_id, pk=int(peer_id)).select_related("health")
        return (peers if role is None else peers.filter(role=role)).first()
    except (TypeError, ValueError):
        return None


def peer_by_ref(team_id: str, ref: str, role: str | None = "peer") -> Peer | None:
    """A peer named on the command line: a live peer by name, else any peer of the team by id."""
    peers = Peer.objects.filter(team_id=team_id, **({"role": role} if role else {})).select_related("health")
    found = peers.filter(name=ref).exclude(status=Peer.Status.REVOKED).first()
    ref = str(ref)
    return found or (peers.filter(pk=int(ref)).first() if ref.isascii() and ref.isdigit() else None)


# What a peer's outbox counts show: its queue and its dead letters, an index-only range of
# outbox_due (peer, status, …). Delivered history is not counted: it grows with every event (at
# 700,000 entries a 400 ms read of the whole table per listing of the peers) and is nobody's work.
OWED_OR_DEAD = [OutboxEntry.Status.PENDING.value, OutboxEntry.Status.IN_FLIGHT.value, OutboxEntry.Status.DEAD.value]


def outbox_depths(peer_ids: list[int]) -> dict[int, dict[str, int]]:
    """{peer_id: {pending, in_flight, dead}} in one index-only read of outbox_due."""
    depths = {pk: {status: 0 for status in OWED_OR_DEAD} for pk in peer_ids}
    rows = (
        OutboxEntry.objects.filter(peer_id__in=peer_ids, status__in=OWED_OR_DEAD)
        .values("peer_id", "status")
        .annotate(n=Count("*"))
        .order_by()
    )
    for row in rows:
        depths[row["peer_id"]][row["status"]] = row["n"]
    return depths


def outbox_entries(peer: Peer, status: str | None = None):
    entries = OutboxEntry.objects.filter(peer=peer).select_related("event").order_by("-id")
    if status:
        entries = entries.filter(status=status)
    return entries[:PAGE]


def deliveries(peer: Peer):
    return Delivery.objects.filter(peer=peer).order_by("-attempted_at", "-id")[:PAGE]


def server_tls_fingerprint() -> str | None:
    cert = settings.KITE_DATA_DIR / "tls" / "cert.pem"
    if not settings.KITE_TLS or not cert.exists():
        return None
    return tls.fingerprint_of_pem(cert.read_bytes())


def identity(team) -> dict:
    return {
        "instance_id": settings.KITE_INSTANCE_ID,
        "public_url": settings.KITE_PUBLIC_URL,
        "team_id": team.id,
        "hook_url": f"{settings.KITE_PUBLIC_URL}/hooks/{team.id}/kite",
        "tls_fingerprint": server_tls_fingerprint(),
        "certificates": [
            {"id": row.pk, "thumbprint": row.thumbprint, "pem": row.pem, "not_after": row.not_after}
            for row in IdentityCertificate.objects.filter(team_id=team.id, not_after__gt=timezone.now())
            .order_by("-created_at", "-id")
        ],
    }


@dataclass(frozen=True)
class AuditFilter:
    """`after` / `before`: an audit event id (a cursor) or a time."""

    action: str | None = None
    peer: str | None = None
    outcome: str | None = None
    after: int | datetime | None = None
    before: int | datetime | None = None

    FIELDS = ("action", "peer", "outcome", "after", "before")


def _bound(name: str, value) -> Q:
    if value is None:
        return Q()
    field = "id" if isinstance(value, int) else "at"
    return Q(**{f"{field}__{'gt' if name == 'after' else 'lt'}": value})


def audit_events(team_id: str, filters: AuditFilter, limit: int) -> tuple[list[AuditEvent], bool]:
    """The team's audit events, newest first, and whether there are more (older) ones."""
    rows = AuditEvent.objects.filter(team_id=team_id).filter(_bound("after", filters.after),
                                                             _bound("before", filters.before))  # fmt: skip
    if filters.action:
        rows = rows.filter(action=filters.action)
    if filters.outcome:
        rows = rows.filter(outcome=filters.outcome)
    if filters.peer:
        peer = filters.peer
        by_id = Q(peer_id=int(peer)) if peer.isascii() and peer.isdigit() and len(peer) <= 18 else Q()
        rows = rows.filter(Q(peer_name=filters.peer) | by_id)
    found = list(rows.order_by("-id")[: limit + 1])
    return found[:limit], len(found) > limit
