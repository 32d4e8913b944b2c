"""kite.postgres: the per-request health check is skipped only right after a request used
the connection without error; an idle or failed connection is still checked."""

import pytest
from django.db import close_old_connections, connection, connections

from kite.postgres import base


@pytest.fixture
def checks(monkeypatch):
    made = []
    real = connection.is_usable
    monkeypatch.setattr(connection, "is_usable", lambda: made.append(1) or real())
    return made


def _request(query=True):
    close_old_connections()  # request_started
    if query:
        connection.cursor().execute("SELECT 1")
    close_old_connections()  # request_finished


@pytest.mark.django_db(transaction=True)
def test_a_busy_connection_is_not_checked_an_idle_one_is(checks, monkeypatch):
    assert connection.vendor == "postgresql" and isinstance(connections["default"], base.DatabaseWrapper)
    _request()
    checks.clear()
    for _ in range(5):
        _request()
    assert checks == []  # each request follows one that just used the connection
    clock = base.time.monotonic()
    monkeypatch.setattr(base.time, "monotonic", lambda: clock + 5)  # five seconds idle
    _request()
    assert checks == [1]


@pytest.mark.django_db(transaction=True)
def test_a_request_that_failed_has_its_connection_checked(checks):
    _request()
    close_old_connections()
    with pytest.raises(Exception):
        connection.cursor().execute("SELECT * FROM no_such_table")
    connection.errors_occurred = True  # what Django's error wrapper records
    checks.clear()
    close_old_connections()  # request_finished: Django checks it at once (is_usable) and keeps it
    assert checks == [1] and connection.connection is not None


@pytest.mark.django_db(transaction=True)
def test_a_request_without_queries_does_not_vouch(checks):
    _request()
    _request(query=False)
    checks.clear()
    vouched = connection._vouched_at
    _request(query=False)
    assert connection._vouched_at == vouched
