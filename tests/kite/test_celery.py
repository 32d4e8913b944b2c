"""kite.celery: a worker keeps its database connection between tasks, as a web process does
between requests (Celery's Django fixup would close it around every task: ~5 ms per delivery)."""

import pytest
from celery.fixups.django import DjangoWorkerFixup
from celery.signals import task_postrun, task_prerun
from django.db import connection

from kite.celery import app


class _Request:
    is_eager = False


class _Task:
    request = _Request()


@pytest.mark.django_db(transaction=True)
def test_connections_survive_tasks_and_broken_ones_are_dropped():
    fixup = DjangoWorkerFixup(app)  # what `celery worker` installs
    assert fixup.db_reuse_max == 1000
    connection.ensure_connection()
    opened = connection.connection
    for _ in range(10):
        fixup.on_task_prerun(_Task())
        task_prerun.send(sender=_Task())
        connection.cursor().execute("SELECT 1")
        task_postrun.send(sender=_Task())
        fixup.on_task_postrun(_Task())
    assert connection.connection is opened  # one connection for ten tasks

    connection.errors_occurred = True  # a task hit a database error...
    connection.connection.close()  # ...because the server dropped the connection
    task_prerun.send(sender=_Task())
    assert connection.connection is None  # dropped before the next task, which reconnects
    connection.cursor().execute("SELECT 1")
