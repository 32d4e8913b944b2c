"""A number in a query string is ASCII digits: str.isdigit() also admits "²" (int() refuses it: was a
500) and "٣", "１２", "𝟗" (int() reads them: were ids and limits). Each is a 400 {detail, code} here,
and nothing changes."""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from federation import audit
from federation.models import AuditEvent
from kite import services
from kite.models import Membership

NON_ASCII = ["²", "٣", "１２", "𝟗", "٣\u2003"]


def _audit_rows(team, count):
    for n in range(count):
        audit.record("Federation.TestEvent", team=team, actor="test", data={"n": n})
    return list(AuditEvent.objects.filter(team=team).order_by("id"))


@pytest.mark.django_db
@pytest.mark.parametrize("digits", NON_ASCII)
@pytest.mark.parametrize("name", ["before", "after", "limit"])
def test_audit_query_numbers_are_ascii(api, team, name, digits):
    rows = _audit_rows(team, 4)

    response = api.get("/api/audit", {name: digits})

    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid" and name in response.json()["fields"]
    assert list(AuditEvent.objects.filter(team=team).order_by("id")) == rows


@pytest.mark.django_db
def test_audit_ascii_numbers_still_work(api, team):
    rows = _audit_rows(team, 4)

    newest_two = api.get("/api/audit", {"limit": "2"}).json()
    older = api.get("/api/audit", {"before": newest_two["next"], "limit": "10"}).json()

    assert [row["id"] for row in newest_two["results"]] == [rows[3].pk, rows[2].pk]
    assert [row["id"] for row in older["results"]] == [rows[1].pk, rows[0].pk]


@pytest.mark.django_db
@pytest.mark.parametrize("after", ["٣-٣", "0-٣", "１２-1", "1-2x", "1-" + "9" * 20])
def test_event_cursors_are_ascii(api, team, after):
    response = api.get("/api/events", {"after": after})

    assert response.status_code == 400, response.content
    assert response.json()["code"] == "bad_cursor" and response.json()["detail"]


@pytest.mark.django_db
@pytest.mark.parametrize("digits", NON_ASCII)
def test_event_limit_is_ascii(api, team, digits):
    response = api.get("/api/events", {"limit": digits})

    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid" and "limit" in response.json()["fields"]


@pytest.mark.django_db
@pytest.mark.parametrize("after", ["9223372036854775807-9223372036854775807", "9" * 19 + "-" + "9" * 19])
def test_event_ascii_cursor_and_limit_still_work(api, team, after):
    response = api.get("/api/events", {"after": after, "limit": "5"})

    assert response.status_code == 200 and response.json()["results"] == []  # past every event


@pytest.mark.django_db
def test_the_audit_screen_reads_before_in_ascii_only(team):
    user = get_user_model().objects.create_user("auditor", password="x")
    services.membership_add(team=team, user=user, role=Membership.Role.ADMIN)
    browser = Client()
    browser.force_login(user)
    rows = _audit_rows(team, 4)

    refused = browser.get("/audit/", {"before": "٣"})
    page = browser.get("/audit/", {"before": str(rows[2].pk)})

    assert refused.status_code == 400
    assert page.status_code == 200
    assert list(AuditEvent.objects.filter(team=team).order_by("id")) == rows
