"""The Fleet screen: local agents, the Federation toggle with every peer's agents
read-only, per-peer Unreachable badge with last contact, the grant a peer gave us; fast with
1,000 agents and 50 peers."""

from datetime import timedelta

import pytest
from django.utils import timezone

from federation import services as federation_services
from federation.models import Peer
from fleet import federated, services
from fleet.models import Agent, Snapshot
from fleet.services import FleetAnswer
from tests.federation.test_api import PEER_URL
from tests.screens import median_ms, member, outsider, owner, teamless  # noqa: F401  (fixtures)

GRANT = "fg-7." + "g" * 40


def _agents(team, count: int):
    now = timezone.now()
    Agent.objects.bulk_create(Agent(team=team, name=f"agent-{n:04}", version="1.2", host=f"host-{n % 7}",
                                    labels={"region": "eu" if n % 2 else "us"}, first_seen=now, last_seen=now)
                              for n in range(count))  # fmt: skip


def _peer(team, name: str, grant: str | None = GRANT) -> Peer:
    peer = federation_services.peer_create(team=team, name=name, peer_hook_url=PEER_URL).row
    Peer.objects.filter(pk=peer.pk).update(status=Peer.Status.ACTIVE)
    if grant:
        services.remote_grant_set(peer=peer, token=grant)
    return Peer.objects.get(pk=peer.pk)


def _text(response) -> str:
    return response.content.decode()


def test_fleet_is_for_team_members_and_team_scoped(owner, member, outsider, teamless, client, team):
    _agents(team, 3)
    assert "agent-0002" in _text(member.get("/fleet/"))
    assert "agent-0002" not in _text(outsider.get("/fleet/"))
    assert teamless.get("/fleet/").status_code == 403
    assert client.get("/fleet/")["Location"].startswith("/login/")


def test_local_agents_search_and_pages(owner, team):
    _agents(team, 250)
    first = owner.get("/fleet/")
    assert first.status_code == 200 and len(first.context["page"]) == 100 and "Page 1 of 3" in _text(first)
    found = owner.get("/fleet/", {"q": "agent-0249"})
    assert [row["name"] for row in found.context["page"]] == ["agent-0249"]
    assert "Includes federation" not in _text(first)


def test_federation_toggle_adds_peers_agents_read_only_and_names_the_unreachable_one(owner, team, monkeypatch):
    _agents(team, 2)
    _peer(team, "us-region")
    down = _peer(team, "ap-region")
    contact = timezone.now() - timedelta(minutes=7)
    Snapshot.objects.create(peer=down, team=team, fetched_at=contact, outcome="ok",
                            rows=[{"id": 9, "name": "old-worker", "status": "online"}])  # fmt: skip

    def fetch(call, timeout):
        if call.peer_id == down.pk:
            return FleetAnswer("unreachable", 3, None, "connection refused")
        return FleetAnswer("ok", 12, [{"id": 4, "name": "remote-worker", "status": "online", "last_seen": None,
                                      "version": "", "host": "", "labels": {}}])  # fmt: skip

    monkeypatch.setattr(federated, "fetch", fetch)
    response = owner.get("/fleet/", {"federation": "on"})
    page = _text(response)
    assert response.status_code == 200 and "Includes federation" in page
    assert "peer:us-region/4" in page and "Reachable · 12 ms" in page
    assert 'badge bad">Unreachable' in page and contact.isoformat()[:16] in page and "connection refused" in page
    assert "peer:ap-region/9" in page and 'badge warn">stale' in page
    remote_rows = [row for row in page.split("<tr") if 'class="remote"' in row]
    assert len(remote_rows) == 2 and all("<form" not in row and "<button" not in row for row in remote_rows)
    only = owner.get("/fleet/", {"federation": "on", "peer": "us-region"})
    assert [row["id"] for row in only.context["page"]] == ["peer:us-region/4"]
    assert owner.get("/fleet/", {"peer": "nope"}).status_code == 400


def test_a_peer_without_our_grant_offers_the_form_to_store_one(owner, member, team):
    peer = _peer(team, "eu", grant=None)
    page = _text(owner.get("/fleet/", {"federation": "on"}))
    assert 'badge warn">No access' in page and f"/fleet/peers/{peer.pk}/access" in page
    assert f"/fleet/peers/{peer.pk}/access" not in _text(member.get("/fleet/", {"federation": "on"}))
    assert member.post(f"/fleet/peers/{peer.pk}/access", {"token": GRANT}).status_code == 403
    refused = owner.post(f"/fleet/peers/{peer.pk}/access", {"token": "not-a-grant"})
    assert refused.status_code == 400 and "fg-&lt;id&gt;.&lt;secret&gt;" in _text(refused)
    peer.refresh_from_db()
    assert not peer.remote_grant_encrypted
    stored = owner.post(f"/fleet/peers/{peer.pk}/access", {"token": GRANT})
    assert stored.status_code == 302
    peer.refresh_from_db()
    assert peer.remote_grant_encrypted


def test_another_teams_peer_grant_is_not_found(outsider, team):
    peer = _peer(team, "eu", grant=None)
    assert outsider.post(f"/fleet/peers/{peer.pk}/access", {"token": GRANT}).status_code == 404


@pytest.mark.parametrize("query", [{}, {"federation": "on"}, {"q": "eu"}])
def test_fleet_renders_fast_with_1000_agents_and_50_peers(query, owner, team, django_assert_max_num_queries):
    _agents(team, 1000)
    for n in range(50):
        _peer(team, f"peer-{n:02}", grant=None)
    with django_assert_max_num_queries(12) as queries:
        assert owner.get("/fleet/", query).status_code == 200
    count = len(queries)
    elapsed = median_ms(lambda: owner.get("/fleet/", query))
    print(f"/fleet/ {query}: {elapsed:.1f} ms, {count} queries")
    assert elapsed <= 100, f"/fleet/ {query} took {elapsed:.1f} ms"
