"""Celery tasks: thin, each runs one module's function. Their names (`federation.tasks.*`) are in
beat's schedule (kite/settings.py) and in queued messages: they stay."""

from celery import shared_task
from django.conf import settings

from federation import heartbeat, inbound, outbox, renewal, services
from federation.models import Peer


@shared_task(ignore_result=True)
def deliver_peer(peer_id: int, helper: bool = False) -> int:
    return outbox.deliver_peer(peer_id, helper=helper)


@shared_task(ignore_result=True)
def deliver_peers(peer_ids: list[int]) -> int:
    """Several peers' kicks in one message (an event that matched many): each drained in turn."""
    return sum(outbox.deliver_peer(peer_id, alone=False) for peer_id in peer_ids)


@shared_task(ignore_result=True)
def sweep_outbox() -> int:
    return outbox.sweep()


@shared_task(ignore_result=True)
def heartbeats() -> int:
    inbound.receipts_purge()  # control calls' webhook-ids past the tolerance window: replays are stale anyway
    return heartbeat.heartbeat_all()


@shared_task(ignore_result=True)
def probe_down_peers() -> int:
    return heartbeat.heartbeat_all(only_down=True)


@shared_task(ignore_result=True)
def heartbeat_peer(peer_id: int) -> bool:
    peer = Peer.objects.filter(pk=peer_id).first()
    return bool(peer and peer.sends_to and heartbeat.heartbeat(peer).ok)


@shared_task(ignore_result=True)
def retention_purge() -> dict:
    return services.retention_purge(days=settings.KITE_AUDIT_RETENTION_DAYS)


@shared_task(ignore_result=True)
def certificates_check() -> dict:
    return renewal.check()
