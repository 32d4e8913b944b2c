"""Fixtures of the browser screens' tests (Django's test client): an owner (team admin), a member
without the federation permissions, an outsider (admin of another team), a login of no team."""

import statistics
import time

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from kite import services
from kite.models import Membership


def client_for(username: str, team=None, role: str = Membership.Role.ADMIN) -> Client:
    user = get_user_model().objects.create_user(username, password="pw-" + username)
    if team is not None:
        services.membership_add(team=team, user=user, role=role)
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def owner(team):
    return client_for("owner", team)


@pytest.fixture
def member(team):
    return client_for("member", team, Membership.Role.MEMBER)


@pytest.fixture
def outsider(other_team):
    return client_for("outsider", other_team)


@pytest.fixture
def teamless(db):
    return client_for("teamless")


def median_ms(render, runs: int = 7) -> float:
    """Median server time of `render()` (the test client runs the whole request in-process)."""
    render()  # warm: templates compiled, connection open
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        response = render()
        timings.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    return statistics.median(timings)
