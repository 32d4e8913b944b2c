import os

import pytest
from rest_framework.test import APIClient

from kite import services

# Kite's tests run against real PostgreSQL and Redis (`make test` starts them).
if not os.environ.get("DATABASE_URL", "").startswith("postgres") or not os.environ.get("REDIS_URL"):
    if os.environ.get("KITE_TEST_ALLOW_EMBEDDED") != "1":
        raise pytest.UsageError(
            "Run the suite with `make test` (PostgreSQL + Redis), or set KITE_TEST_ALLOW_EMBEDDED=1 "
            "to run it on SQLite without Redis."
        )


@pytest.fixture
def team(db):
    return services.team_create(name="owner-team")


@pytest.fixture
def other_team(db):
    return services.team_create(name="outsider-team")


@pytest.fixture
def api_key(team):
    return services.apikey_create(team=team, label="test").raw_key


@pytest.fixture
def other_api_key(other_team):
    return services.apikey_create(team=other_team, label="outsider").raw_key


@pytest.fixture
def api(api_key):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    return client


@pytest.fixture
def outsider_api(other_api_key):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {other_api_key}")
    return client


@pytest.fixture
def anonymous_api():
    return APIClient()


@pytest.fixture(autouse=True)
def peers_on_loopback(settings):
    """Two teams of this process, or test servers on 127.0.0.1, stand in for peer instances: allowed as
    two instances on one machine allow them (tests of the destination policy set their own)."""
    import ipaddress

    settings.KITE_PEER_ALLOWED_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def in_a_transaction_of_the_code() -> bool:
    """Inside transaction.atomic() opened by the code under test: the test's own transaction
    (pytest-django's `db` wraps each test in one) does not count."""
    from django.db import connections

    return any(not block._from_testcase for conn in connections.all(initialized_only=True)
               for block in conn.atomic_blocks)  # fmt: skip


@pytest.fixture(autouse=True)
def no_peer_call_inside_a_transaction(monkeypatch):
    """Every peer call made inside transaction.atomic() fails the test: the transaction would stay
    open for as long as the peer takes to answer (on PostgreSQL holding back every live stream's
    horizon, on SQLite the write lock). federation.client.call is the one way to client._send (the
    network); the guard sits there because tests/federation/loopback.py replaces _send itself.
    Yields the calls caught (a test of the guard empties it)."""
    from federation import client

    caught: list[str] = []
    real_call = client.call

    def guarded(target, method, *args, **kwargs):
        if in_a_transaction_of_the_code():
            caught.append(f"{method} {target.url}")
            raise AssertionError(f"peer call {method} {target.url} inside transaction.atomic()")
        return real_call(target, method, *args, **kwargs)

    monkeypatch.setattr(client, "call", guarded)
    yield caught
    assert not caught, f"peer calls made inside transaction.atomic(): {caught}"
