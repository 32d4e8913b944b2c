"""The browser's shell: login, logout, navigation, the 403/404 pages, static files,
and the Events screen with its live tail over the session-authenticated WebSocket."""

import json

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from ingest.models import Event, Source
from kite import services
from kite.models import Membership
from tests.screens import median_ms, member, outsider, owner, teamless  # noqa: F401  (fixtures)


def _text(response) -> str:
    return response.content.decode()


def test_login_then_events_and_logout_by_post(team, client):
    user = get_user_model().objects.create_user("ada", password="correct horse")
    services.membership_add(team=team, user=user, role=Membership.Role.ADMIN)
    assert client.get("/")["Location"] == "/login/?next=/"  # the Overview (tests/federation/test_overview.py)
    assert client.get("/events/")["Location"] == "/login/?next=/events/"
    refused = client.post("/login/", {"username": "ada", "password": "wrong"})
    assert refused.status_code == 200 and "Please enter a correct username and password" in _text(refused)
    logged_in = client.post("/login/", {"username": "ada", "password": "correct horse", "next": ""})
    assert logged_in.status_code == 302 and logged_in["Location"] == "/"
    page = _text(client.get("/events/"))
    for link in ('href="/events/"', 'href="/fleet/"', 'href="/settings/federation/peers/"', 'href="/audit/"'):
        assert link in page
    assert 'href="/admin/"' not in page  # not staff
    assert client.get("/logout/").status_code == 200  # a page with the button: a GET logs nobody out
    assert client.get("/events/").status_code == 200
    assert client.post("/logout/")["Location"] == "/login/"
    assert client.get("/events/").status_code == 302


def test_staff_see_the_admin_link_and_the_admin_stays_available(team):
    user = get_user_model().objects.create_superuser("root", "", "pw-root-123")
    services.membership_add(team=team, user=user, role=Membership.Role.ADMIN)
    client = Client()
    client.force_login(user)
    assert 'href="/admin/"' in _text(client.get("/events/"))
    assert client.get("/admin/").status_code == 200


def test_forbidden_and_not_found_are_pages(member, owner):
    forbidden = member.get("/settings/federation/peers/")
    assert forbidden.status_code == 403 and "<h1>Not allowed</h1>" in _text(forbidden)
    missing = owner.get("/settings/federation/peers/999999/")
    assert missing.status_code == 404 and "No such peer in your team" in _text(missing)


def test_static_files_are_served(client, db):
    assert client.get("/static/kite.css").status_code == 200
    assert client.get("/static/kite.js").status_code == 200


def _event(team, ce_id: str, ce_type: str = "com.stripe.charge.succeeded", source: str = "kite", agent: str = ""):
    row = Source.objects.get_or_create(team=team, name=source, defaults={"kind": "none"})[0]
    return Event.objects.create(team=team, source=row, ce_id=ce_id, ce_source="kite://x", ce_type=ce_type,
                                ce_time=timezone.now(), data='{"amount": 4200}', agent=agent)  # fmt: skip


def test_events_screen_lists_the_teams_events_newest_first_with_filters(member, outsider, team):
    _event(team, "evt-1")
    _event(team, "gh-1", ce_type="com.github.push", source="github")
    _event(team, "msg-1", ce_type="com.kite.agent.message", agent="bob")
    page = _text(member.get("/events/"))
    assert page.index("gh-1") < page.index("evt-1") and "msg-1" not in page
    assert "4200" in page and 'data-after="' in page
    by_type = _text(member.get("/events/", {"type": "com.github.*"}))
    assert "gh-1" in by_type and "evt-1" not in by_type
    by_source = _text(member.get("/events/", {"source": "kite"}))
    assert "evt-1" in by_source and "gh-1" not in by_source
    assert member.get("/events/", {"source": "nope"}).status_code == 400
    assert "evt-1" not in _text(outsider.get("/events/"))


def test_events_screen_names_the_peer_that_handed_a_federated_event_over(member, team):
    event = _event(team, "fed-1")
    Event.objects.filter(pk=event.pk).update(extensions={"kitefedorigin": "kite-eu", "kitefedchain": '["kite-eu"]',
                                                         "kitefedhops": 1, "kitefedpeer": "eu-peer"})  # fmt: skip
    _event(team, "local-1")
    page = _text(member.get("/events/"))
    assert "from kite-eu · 1 hop · via peer eu-peer" in page and "local" in page


def test_events_screen_is_fast_with_many_events(owner, team, django_assert_max_num_queries):
    source = Source.objects.get(team=team, name="kite")
    now = timezone.now()
    Event.objects.bulk_create(Event(team=team, source=source, ce_id=f"e{n}", ce_source="kite://x", ce_type="t.x",
                                    ce_time=now, data="{}") for n in range(5000))  # fmt: skip
    with django_assert_max_num_queries(8) as queries:
        assert owner.get("/events/").status_code == 200
    count = len(queries)
    elapsed = median_ms(lambda: owner.get("/events/"))
    print(f"/events/: {elapsed:.1f} ms, {count} queries")
    assert elapsed <= 100


@pytest.mark.django_db(transaction=True)
def test_the_events_tail_websocket_authenticates_the_browser_session(team):
    from kite.asgi import application

    user = get_user_model().objects.create_user("tail", password="pw-tail-123")
    services.membership_add(team=team, user=user, role=Membership.Role.MEMBER)
    client = Client()
    client.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"

    async def stream(origin: bytes):
        headers = [(b"cookie", cookie.encode()), (b"host", b"kite.example:8443"), (b"origin", origin)]
        communicator = WebsocketCommunicator(application, "/ws/events?after=0-0", headers=headers)
        connected, _ = await communicator.connect(timeout=5)
        message = json.loads(await communicator.receive_from(timeout=10)) if connected else None
        await communicator.disconnect()
        return message

    _event(team, "live-1")
    assert async_to_sync(stream)(b"https://kite.example:8443")["id"] == "live-1"
    # Another site's page in the same browser: the session cookie goes along, and counts for nothing.
    assert async_to_sync(stream)(b"https://evil.example") is None
