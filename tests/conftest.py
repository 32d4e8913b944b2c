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
