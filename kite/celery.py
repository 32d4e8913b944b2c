import os

from celery import Celery
from celery.signals import task_postrun, task_prerun

from kite import celery_fixes  # noqa: F401 - workers survive a broker restart (see the module)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kite.settings")

app = Celery("kite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def _database_connections(**kwargs):
    """What Django does around a request: drop a connection that is broken, past CONN_MAX_AGE or
    left in a transaction; keep the others (CELERY_DB_REUSE_MAX stops Celery closing them all)."""
    from django.db import close_old_connections

    close_old_connections()
