from django.conf import settings
from django.db.models import Count
from django.utils import timezone

from federation.models import Delivery, FederationToken, IdentityCertificate, OutboxEntry, Peer
from kite import tls

PAGE = 200


def tokens(team_id: str):
    return FederationToken.objects.filter(team_id=team_id).order_by("id")


def peers(team_id: str):
    return Peer.objects.filter(team_id=team_id, role=Peer.Role.PEER).order_by("name", "id")


def trusted_senders(team_id: str):
    return Peer.objects.filter(team_id=team_id, role=Peer.Role.SENDER).order_by("name", "id")


def peer_for_team(team_id: str, peer_id, role: str | None = "peer") -> Peer | None:
    """One peer of the team (role None: a peer or a trusted sender)."""
    try:
        peers = Peer.objects.filter(team_id=team_id, pk=int(peer_id))
        return (peers if role is None else peers.filter(role=role)).first()
    except (TypeError, ValueError):
        return None


def outbox_depths(peer_ids: list[int]) -> dict[int, dict[str, int]]:
    """{peer_id: {pending, in_flight, delivered, dead}} in one query."""
    depths = {pk: {status: 0 for status in OutboxEntry.Status.values} for pk in peer_ids}
    rows = OutboxEntry.objects.filter(peer_id__in=peer_ids).values("peer_id", "status").annotate(n=Count("id"))
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
