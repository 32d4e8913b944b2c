from celery import shared_task
from django.conf import settings

from ingest import services


@shared_task
def events_purge_expired() -> int:
    return services.events_purge_expired(days=settings.KITE_EVENT_RETENTION_DAYS)
