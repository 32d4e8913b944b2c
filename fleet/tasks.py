from celery import shared_task

from fleet import federated


@shared_task(ignore_result=True, time_limit=120, soft_time_limit=100)
def refresh_snapshots() -> int:
    """Beat, every KITE_FLEET_REFRESH_SECONDS: every live peer's fleet, kept for when it does not answer."""
    return federated.refresh_snapshots()
