from celery import shared_task
from django.conf import settings

from kite import broker


@shared_task(ignore_result=True)
def broker_purge_consumed() -> int:
    return broker.purge_consumed(settings.CELERY_BROKER_URL)
