from celery import shared_task

from federation import heartbeat, outbox


@shared_task(ignore_result=True)
def deliver_peer(peer_id: int, helper: bool = False) -> int:
    return outbox.deliver_peer(peer_id, helper=helper)


@shared_task(ignore_result=True)
def deliver_peers(peer_ids: list[int]) -> int:
    """Several peers' kicks in one message (an event that matched many): each drained in turn."""
    return sum(outbox.deliver_peer(peer_id) for peer_id in peer_ids)


@shared_task(ignore_result=True)
def sweep_outbox() -> int:
    return outbox.sweep()


@shared_task(ignore_result=True)
def heartbeats() -> int:
    from federation import inbound

    inbound.receipts_purge()  # control calls' webhook-ids past the tolerance window: replays are stale anyway
    return heartbeat.heartbeat_all()


@shared_task(ignore_result=True)
def probe_down_peers() -> int:
    return heartbeat.heartbeat_all(only_down=True)


@shared_task(ignore_result=True)
def heartbeat_peer(peer_id: int) -> bool:
    from federation.models import Peer

    peer = Peer.objects.filter(pk=peer_id).first()
    return bool(peer and peer.sends_to and heartbeat.heartbeat(peer).ok)


@shared_task(ignore_result=True)
def retention_purge() -> dict:
    from django.conf import settings

    from federation import services

    return services.retention_purge(days=settings.KITE_AUDIT_RETENTION_DAYS)


@shared_task(ignore_result=True)
def certificates_check() -> dict:
    from federation import renewal

    return renewal.check()
