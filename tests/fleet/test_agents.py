"""Agents: registered by POST /api/fleet/agents and by `kite listen --agent`, online
while seen, offline after the window, never gone; team-scoped; bad input changes nothing."""

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from fleet import rows
from fleet.models import Agent, Snapshot
from ingest import consumers
from kite import services as kite_services
from kite.asgi import application
from kite.models import Membership

ROW_KEYS = {"id", "name", "status", "last_seen", "version", "host", "labels", "peer", "read_only", "stale"}


def register(api, **body):
    return api.post("/api/fleet/agents", body, format="json")


def listed(api, query=""):
    response = api.get(f"/api/fleet/agents{query}")
    assert response.status_code == 200, response.content
    return response.json()


@pytest.fixture
def member_api(team):
    user = get_user_model().objects.create_user("mia", password="pw-mia-123")
    kite_services.membership_add(team=team, user=user, role=Membership.Role.MEMBER)
    client = APIClient()
    client.force_login(user)
    return client


# --- register, refresh, list, detail ------------------------------------------------


def test_registering_a_worker_lists_it_online_with_what_it_said(api):
    created = register(api, name="billing-worker", version="2.1.0", host="worker-3", labels={"region": "eu"})

    assert created.status_code == 201, created.content
    body = listed(api)
    assert body["includes_federation"] is False and body["peers"] == []
    (row,) = body["results"]
    assert set(row) == ROW_KEYS
    assert row["id"] == created.json()["id"]
    assert (row["name"], row["status"], row["version"], row["host"], row["labels"]) == (
        "billing-worker", "online", "2.1.0", "worker-3", {"region": "eu"})  # fmt: skip
    assert (row["peer"], row["read_only"], row["stale"]) == (None, False, False)
    assert row["last_seen"].endswith("Z")


def test_a_heartbeat_refreshes_last_seen_and_keeps_what_it_left_out(api):
    first = register(api, name="w1", version="1.0", host="h1", labels={"tier": "gold"}).json()
    Agent.objects.filter(pk=first["id"]).update(last_seen=timezone.now() - timedelta(seconds=30))

    again = register(api, name="w1")

    assert again.status_code == 200, again.content
    agent = Agent.objects.get(pk=first["id"])
    assert timezone.now() - agent.last_seen < timedelta(seconds=5)
    assert (agent.version, agent.host, agent.labels) == ("1.0", "h1", {"tier": "gold"})
    assert Agent.objects.count() == 1


def test_an_agent_missing_its_window_goes_offline_but_stays_listed_with_its_last_seen(api, settings):
    settings.KITE_AGENT_OFFLINE_SECONDS = 90
    agent_id = register(api, name="quiet").json()["id"]
    gone_at = timezone.now() - timedelta(seconds=91)
    Agent.objects.filter(pk=agent_id).update(last_seen=gone_at)

    (row,) = listed(api)["results"]

    assert row["status"] == "offline"
    assert row["last_seen"] == gone_at.isoformat().replace("+00:00", "Z")
    assert api.get(f"/api/fleet/agents/{agent_id}").json()["status"] == "offline"


def test_detail_shows_one_local_agent_with_first_seen_and_how_it_came(api):
    agent_id = register(api, name="solo", host="box").json()["id"]

    detail = api.get(f"/api/fleet/agents/{agent_id}")

    assert detail.status_code == 200
    assert detail.json()["name"] == "solo" and detail.json()["via"] == "api" and detail.json()["first_seen"]


def test_search_matches_name_host_and_labels(api):
    register(api, name="alpha", host="eu-box-1", labels={"role": "billing"})
    register(api, name="beta", host="us-box-2", labels={"role": "search"})

    assert [r["name"] for r in listed(api, "?q=EU-BOX")["results"]] == ["alpha"]
    assert [r["name"] for r in listed(api, "?q=role=search")["results"]] == ["beta"]
    assert [r["name"] for r in listed(api, "?q=box")["results"]] == ["alpha", "beta"]
    assert listed(api, "?q=nothing-like-it")["results"] == []


# --- who may see what -----------------------------------------------------------------


def test_agents_never_cross_teams(api, outsider_api):
    mine = register(api, name="shared-name").json()
    theirs = register(outsider_api, name="shared-name").json()

    assert [r["id"] for r in listed(api)["results"]] == [mine["id"]]
    assert [r["id"] for r in listed(outsider_api)["results"]] == [theirs["id"]]
    refused = outsider_api.get(f"/api/fleet/agents/{mine['id']}")
    assert refused.status_code == 404 and refused.json()["code"] == "not_found"


def test_team_members_see_and_register_their_teams_agents(api, member_api):
    register(api, name="by-key")

    assert register(member_api, name="by-member").status_code == 201
    assert [r["name"] for r in listed(member_api)["results"]] == ["by-key", "by-member"]


def test_anonymous_callers_are_refused(anonymous_api, api):
    register(api, name="hidden")

    assert anonymous_api.get("/api/fleet/agents").status_code in (401, 403)
    assert anonymous_api.post("/api/fleet/agents", {"name": "x"}, format="json").status_code in (401, 403)
    assert Agent.objects.count() == 1


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": 42},
        {"name": "has space"},
        {"name": "peer:b/1"},
        {"name": "x" * 101},
        {"name": "w", "version": 3},
        {"name": "w", "host": ["a"]},
        {"name": "w", "host": "h" * 256},
        {"name": "w", "labels": ["region=eu"]},
        {"name": "w", "labels": {"region": 1}},
        {"name": "w", "labels": {"bad key": "x"}},
        {"name": "w", "labels": {"k": "v" * 201}},
        {"name": "w", "labels": {f"k{i}": "v" for i in range(rows.MAX_LABELS + 1)}},
        {"name": "w", "colour": "blue"},
    ],
)
def test_bad_registrations_are_400_and_store_nothing(api, body):
    response = register(api, **body)

    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid" and response.json()["detail"]
    assert Agent.objects.count() == 0


def test_a_body_that_is_not_an_object_is_400(api):
    response = api.post("/api/fleet/agents", ["name"], format="json")

    assert response.status_code == 400 and response.json()["code"] == "invalid"
    assert Agent.objects.count() == 0


@pytest.mark.parametrize("query", ["?federation=maybe", "?snapshot=2", "?q=" + "x" * 201, "?peer=nobody"])
def test_bad_list_queries_are_400(api, query):
    response = api.get(f"/api/fleet/agents{query}")

    assert response.status_code == 400 and response.json()["code"] == "invalid", response.content


@pytest.mark.parametrize("query", [{"peer": "b\x00"}, {"q": "eu\x00"}, {"peer": "\x00", "q": "\x00"}])
def test_a_nul_in_the_list_query_is_400_not_a_database_error(api, team, query):
    """PostgreSQL text cannot hold NUL: the peer lookup raised a DataError (a 500)."""
    Agent.objects.create(team=team, name="eu-1")

    response = api.get("/api/fleet/agents", query)

    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid" and "NUL" in response.json()["detail"]
    assert list(Agent.objects.values_list("name", flat=True)) == ["eu-1"] and not Snapshot.objects.exists()


# --- a remote agent cannot be addressed for a change ------------------------------------


@pytest.mark.parametrize("method", ["put", "patch", "delete", "post"])
def test_a_remote_agent_id_cannot_be_written(api, method):
    response = getattr(api, method)("/api/fleet/agents/peer:b/7", {"name": "x"}, format="json")

    assert response.status_code == 405 and response.json()["code"] == "read_only"
    assert Agent.objects.count() == 0


def test_a_remote_agent_of_a_peer_the_team_does_not_have_is_404(api):
    response = api.get("/api/fleet/agents/peer:b/7")

    assert response.status_code == 404 and response.json()["code"] == "peer_not_found"


def test_a_local_agent_cannot_be_changed_through_its_detail_either(api):
    agent_id = register(api, name="fixed").json()["id"]

    response = api.patch(f"/api/fleet/agents/{agent_id}", {"name": "renamed"}, format="json")

    assert response.status_code == 405
    assert Agent.objects.get(pk=agent_id).name == "fixed"


# --- `kite listen --agent` (the WebSocket) --------------------------------------------


async def _listen_as_agent(api_key, query):
    communicator = WebsocketCommunicator(application, f"/ws/events{query}",
                                         headers=[(b"authorization", f"Bearer {api_key}".encode())])  # fmt: skip
    connected, code = await communicator.connect(timeout=5)
    assert connected, code
    return communicator


@pytest.mark.django_db(transaction=True)
def test_a_listening_agent_is_registered_with_its_version_host_and_labels_and_seen_when_it_leaves(api_key, team):
    query = "?agent=lister&agent_version=0.1.0&agent_host=laptop&agent_label=role%3Dops&agent_label=zone%3Da"

    async def scenario():
        communicator = await _listen_as_agent(api_key, query)
        try:
            agent = await sync_to_async(Agent.objects.get)(team=team, name="lister")
            await _age("lister")
        finally:
            await communicator.disconnect()
        return agent

    agent = async_to_sync(scenario)()

    assert (agent.version, agent.host, agent.labels, agent.via) == ("0.1.0", "laptop", {"role": "ops", "zone": "a"},
                                                                    "listen")  # fmt: skip
    assert timezone.now() - Agent.objects.get(pk=agent.pk).last_seen < timedelta(seconds=5)


@pytest.mark.django_db(transaction=True)
def test_a_connected_agent_reannounces_itself_and_stays_online(api_key, team, monkeypatch):
    monkeypatch.setattr(consumers, "LISTENING_REFRESH_SECONDS", 0.2)
    monkeypatch.setattr(consumers, "IDLE_POLL_SECONDS", 0.1)

    async def scenario():
        communicator = await _listen_as_agent(api_key, "?agent=stayer")
        try:
            await _age("stayer")
            for _ in range(100):
                if await _seen_recently("stayer"):
                    return True
                await asyncio.sleep(0.1)
            return False
        finally:
            await communicator.disconnect()

    assert async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_a_listener_without_agent_or_with_a_bad_name_registers_nothing(api_key, team):
    async def scenario():
        for query in ("", "?agent=bad%20name", "?agent=ok&agent_label=novalue"):
            communicator = await _listen_as_agent(api_key, query)
            await communicator.disconnect()

    async_to_sync(scenario)()

    assert Agent.objects.count() == 0


async def _age(name):
    await sync_to_async(Agent.objects.filter(name=name).update)(last_seen=timezone.now() - timedelta(seconds=600))


async def _seen_recently(name):
    agent = await sync_to_async(Agent.objects.get)(name=name)
    return timezone.now() - agent.last_seen < timedelta(seconds=60)


# --- the ops console ----------------------------------------------------------------------


def test_the_admin_lists_agents_with_their_status_and_changes_none(admin_client, team):
    Agent.objects.create(team=team, name="seen-long-ago", last_seen=timezone.now() - timedelta(days=2))

    page = admin_client.get("/admin/fleet/agent/")
    detail = admin_client.get(f"/admin/fleet/agent/{Agent.objects.get().pk}/change/")

    assert page.status_code == 200 and b"seen-long-ago" in page.content and b"offline" in page.content
    assert detail.status_code == 200 and b'name="_save"' not in detail.content
    assert admin_client.get("/admin/fleet/snapshot/").status_code == 200
