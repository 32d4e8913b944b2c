"""One peer's agent (the Ampora guide's "click an agent to open its details"): the peer-facing
GET /api/federation/fleet/agents/{id} and its abuse at the HTTP level, GET /api/fleet/agents/peer:<name>/<id>
over real HTTPS on loopback (this instance's app over TLS stands in for the peer: its second
team), writes to a peer's agent refused, and the agent's page on the Fleet screen."""

import http.client
import ssl
import time
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from federation import grants, services as federation_services, signing
from federation.models import AuditEvent, Grant, InboundReceipt, Peer
from fleet import federated, services
from fleet.models import Agent, Snapshot
from tests.fleet.servers import BlackHole, KiteOverTls, closed_port_url
from tests.screens import member, owner, outsider  # noqa: F401  (fixtures)

SECRET = "whsec_c2hhcmVkLXNlY3JldC1mb3ItZmVkZXJhdGlvbi10ZXN0cyE="
LIST = "/api/federation/fleet/agents"
DUMMY_URL = "https://127.0.0.1:9/hooks/x/kite"
DETAIL_KEYS = {"id", "name", "status", "last_seen", "version", "host", "labels", "peer", "read_only", "stale",
               "first_seen", "via"}  # fmt: skip


def _caller_row(team, name="instance-a"):
    """The owning side's row for the instance that will call it, checking SECRET inbound."""
    return federation_services.peer_create(team=team, name=name, peer_hook_url=DUMMY_URL, inbound_token=SECRET).row


def _headers(path: str, team_id: str, *, secret=SECRET, sender="instance-a", msg_id=None, timestamp=None,
             method="GET") -> dict:  # fmt: skip
    return signing.sign_headers(secret=secret, msg_id=msg_id or f"m{time.monotonic_ns()}",
                                timestamp=int(time.time()) if timestamp is None else timestamp, body=b"",
                                sender_id=sender, binding=signing.Binding(method, path, team_id))  # fmt: skip


def _get(path: str, headers: dict, token: str | None, *, remote_addr="127.0.0.1", method="get"):
    if token is not None:
        headers = {**headers, "kite-grant": token}
    meta = {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}
    return getattr(Client(REMOTE_ADDR=remote_addr), method)(path, **meta)


def _state(team) -> dict:
    """What a refused call must leave as it was: the audit trail (by action), agents, snapshots, peers."""
    return {
        "audit": sorted(AuditEvent.objects.values_list("action", "outcome", "endpoint")),
        "agents": list(Agent.objects.order_by("pk").values()),
        "snapshots": list(Snapshot.objects.order_by("pk").values()),
        "peers": list(Peer.objects.order_by("pk").values("pk", "status", "remote_instance_id", "inbound_secret_encrypted")),
        "grants": list(Grant.objects.order_by("pk").values_list("pk", flat=True)),
    }  # fmt: skip


def _new_audit(before: dict) -> list[tuple]:
    rows = sorted(AuditEvent.objects.values_list("action", "outcome", "endpoint"))
    for row in before["audit"]:
        rows.remove(row)
    return rows


def _unchanged_but_audit(before: dict, team) -> None:
    after = _state(team)
    assert {key: value for key, value in after.items() if key not in ("audit", "peers")} == {
        key: value for key, value in before.items() if key not in ("audit", "peers")}  # fmt: skip
    assert [(p["pk"], p["status"], p["inbound_secret_encrypted"]) for p in after["peers"]] == [
        (p["pk"], p["status"], p["inbound_secret_encrypted"]) for p in before["peers"]]  # fmt: skip


@pytest.fixture
def granted(team):
    """Team A (`team`) owns agents; `instance-a` is the peer calling it, holding a grant for all of them."""
    caller = _caller_row(team)
    worker = Agent.objects.create(team=team, name="w1", version="1.0", host="h1", labels={"region": "eu"})
    other = Agent.objects.create(team=team, name="w2", labels={"region": "us"}, via=Agent.Via.LISTEN)
    _, token = grants.create(peer=caller, resource_kind="fleet.agents")
    AuditEvent.objects.all().delete()
    return {"caller": caller, "worker": worker, "other": other, "token": token, "team": team}


def _detail_path(agent) -> str:
    return f"{LIST}/{agent.pk if hasattr(agent, 'pk') else agent}"


# --- the peer-facing detail -------------------------------------------------------------------


def test_a_granted_peer_reads_one_agent_with_first_seen_and_via_and_the_call_is_audited_with_its_id(granted):
    worker, team = granted["worker"], granted["team"]
    path = _detail_path(worker)

    response = _get(path, _headers(path, team.id), granted["token"])

    assert response.status_code == 200, response.content
    body = response.json()
    agent = body["agent"]
    assert set(agent) == {"id", "name", "status", "last_seen", "version", "host", "labels", "first_seen", "via"}
    assert (agent["id"], agent["name"], agent["status"], agent["version"], agent["host"], agent["labels"],
            agent["via"]) == (worker.pk, "w1", "online", "1.0", "h1", {"region": "eu"}, "api")  # fmt: skip
    assert agent["first_seen"].endswith("Z") and agent["last_seen"].endswith("Z")
    (row,) = AuditEvent.objects.filter(action="Federation.RemoteRequest")
    assert (row.peer_id, row.endpoint, row.outcome) == (granted["caller"].pk, path, "ok")
    assert row.data == {"method": "GET", "remote_addr": "127.0.0.1", "agent": worker.pk}


@pytest.mark.parametrize("resource_id", ["w2", "label:region=us"])
def test_an_agent_the_grant_does_not_show_is_the_same_404_as_one_that_does_not_exist(granted, resource_id):
    team = granted["team"]
    Grant.objects.all().delete()
    _, token = grants.create(peer=granted["caller"], resource_kind="fleet.agents", resource_id=resource_id)
    AuditEvent.objects.all().delete()
    hidden, missing = _detail_path(granted["worker"]), _detail_path(granted["other"].pk + 1000)
    shown = _detail_path(granted["other"])

    answers = [_get(path, _headers(path, team.id), token) for path in (hidden, missing, shown)]

    assert [answer.status_code for answer in answers] == [404, 404, 200]
    assert answers[0].json()["code"] == answers[1].json()["code"] == "agent_not_found"
    assert "w1" not in answers[0].content.decode() and answers[2].json()["agent"]["name"] == "w2"
    audited = AuditEvent.objects.filter(action="Federation.RemoteRequest").order_by("id")
    assert [(row.endpoint, row.outcome, row.data["agent"]) for row in audited] == [
        (hidden, "agent_not_found", granted["worker"].pk), (missing, "agent_not_found", granted["other"].pk + 1000),
        (shown, "ok", granted["other"].pk)]  # fmt: skip


def test_an_unsigned_call_is_401_and_audited_and_nothing_else_changes(granted):
    team, path = granted["team"], _detail_path(granted["worker"])
    before = _state(team)

    response = _get(path, {}, granted["token"])

    assert (response.status_code, response.json()["code"]) == (401, "missing_signature")
    assert "w1" not in response.content.decode()
    assert _new_audit(before) == [("Federation.AuthFailed", "missing_signature", path)]
    _unchanged_but_audit(before, team)


@pytest.mark.parametrize(
    ("forge", "code"),
    [
        (lambda path, team: _headers(path, team, secret="whsec_" + "A" * 43), "bad_secret"),  # forged
        (lambda path, team: _headers(path, "tm_someone_else"), "bad_secret"),  # signed for another team
        (lambda path, team: _headers(path, team, method="POST"), "bad_secret"),  # signed for another method
        (lambda path, team: _headers(LIST, team), "bad_secret"),  # the list's signature, on a detail
        (lambda path, team: _headers(LIST + "/1", team), "bad_secret"),  # another agent's
        (lambda path, team: _headers(path, team, timestamp=int(time.time()) - 301), "stale_timestamp"),
        (lambda path, team: _headers(path, team, timestamp=int(time.time()) + 301), "stale_timestamp"),
    ],
    ids=["forged", "wrong-team", "other-method", "list-signature", "other-agent", "stale", "future"],
)
def test_a_forged_cross_endpoint_wrong_team_or_stale_signature_is_401_naming_why(granted, forge, code):
    team, path = granted["team"], _detail_path(granted["worker"])
    before = _state(team)

    response = _get(path, forge(path, team.id), granted["token"])

    assert (response.status_code, response.json()["code"]) == (401, code), response.content
    assert "w1" not in response.content.decode()
    assert [row[:2] for row in _new_audit(before)] == [("Federation.AuthFailed", code)]
    assert not InboundReceipt.objects.exists()
    _unchanged_but_audit(before, team)


def test_a_replayed_webhook_id_is_refused_even_on_another_path(granted):
    team, path = granted["team"], _detail_path(granted["worker"])
    headers = _headers(path, team.id, msg_id="msg_once")
    assert _get(path, headers, granted["token"]).status_code == 200
    before = _state(team)

    again = _get(path, headers, granted["token"])
    fresh_signature_same_id = _get(path, _headers(path, team.id, msg_id="msg_once"), granted["token"])

    for response in (again, fresh_signature_same_id):
        assert (response.status_code, response.json()["code"]) == (401, "replayed"), response.content
        assert "w1" not in response.content.decode()
    assert _new_audit(before) == [("Federation.AuthFailed", "replayed", path)] * 2
    _unchanged_but_audit(before, team)


def test_a_signature_for_one_team_read_by_a_peer_of_another_team_shows_nothing_of_this_one(granted, other_team):
    """The calling instance is also a peer of team B here, with its own secret and grant: signed for
    team B, it reads team B's agents only; team A's agent id is 404 there."""
    other_secret = "whsec_" + "b" * 43 + "="
    caller_at_b = federation_services.peer_create(team=other_team, name="instance-a", peer_hook_url=DUMMY_URL,
                                                  inbound_token=other_secret).row  # fmt: skip
    _, token_b = grants.create(peer=caller_at_b, resource_kind="fleet.agents")
    path = _detail_path(granted["worker"])  # team A's agent
    before = _state(granted["team"])

    with_b = _get(f"{path}?team={other_team.id}", _headers(path, other_team.id, secret=other_secret), token_b)
    a_token_at_b = _get(f"{path}?team={other_team.id}", _headers(path, other_team.id, secret=other_secret),
                        granted["token"])  # fmt: skip

    assert (with_b.status_code, with_b.json()["code"]) == (404, "agent_not_found")
    assert (a_token_at_b.status_code, a_token_at_b.json()["code"]) == (403, "grant_peer")
    assert "w1" not in with_b.content.decode() + a_token_at_b.content.decode()
    assert sorted(row[:2] for row in _new_audit(before)) == [("Federation.AuthFailed", "grant_peer"),
                                                             ("Federation.RemoteRequest", "agent_not_found")]  # fmt: skip


def _revoked(granted):
    grants.revoke(peer=granted["caller"], grant_id=int(granted["token"][3:].split(".")[0]))
    return granted["token"]


def _expired(granted):
    Grant.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    return granted["token"]


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (lambda granted: None, "grant_required"),
        (lambda granted: "", "grant_required"),
        (_revoked, "bad_grant"),
        (_expired, "grant_expired"),
        (lambda granted: granted["token"][:-4] + "xxxx", "bad_grant"),
        (lambda granted: grants.create(peer=granted["caller"], resource_kind="fleet.agents",
                                       source_cidrs=["10.0.0.0/8"])[1], "grant_source"),  # fmt: skip
    ],
    ids=["no-grant", "empty-grant", "revoked-grant", "expired-grant", "forged-grant", "out-of-network"],
)
def test_without_a_usable_grant_the_detail_is_403_naming_why(granted, token, code):
    team, path = granted["team"], _detail_path(granted["worker"])
    presented = token(granted)
    AuditEvent.objects.all().delete()
    before = _state(team)

    response = _get(path, _headers(path, team.id), presented)

    assert (response.status_code, response.json()["code"]) == (403, code), response.content
    assert "w1" not in response.content.decode()
    assert _new_audit(before) == [("Federation.AuthFailed", code, path)]
    _unchanged_but_audit(before, team)


def test_a_revoked_peer_is_not_known_at_all(granted):
    team, path = granted["team"], _detail_path(granted["worker"])
    Peer.objects.filter(pk=granted["caller"].pk).update(status=Peer.Status.REVOKED)
    before = _state(team)

    response = _get(path, _headers(path, team.id), granted["token"])

    assert (response.status_code, response.json()["code"]) == (401, "unknown_peer")
    assert _new_audit(before) == [("Federation.AuthFailed", "unknown_peer", path)]
    _unchanged_but_audit(before, team)


ODD_IDS = ["../agents", "..%2F..%2Fping", "%2e%2e", "-1", "+1", "0", "007", "1.0", "0x10", "1e3", " 1", "%00", "١", "²",
           "1/2", "9" * 19, "9" * 10_240, "a" * 10_240]  # fmt: skip


@pytest.mark.parametrize("odd", ODD_IDS, ids=lambda odd: odd[:12] + (f"…{len(odd)}" if len(odd) > 12 else ""))
def test_an_odd_or_oversized_id_is_404_before_any_work_even_when_signed(granted, odd):
    team = granted["team"]
    path = f"{LIST}/{odd}"
    before = _state(team)

    signed = _get(path, _headers(path, team.id), granted["token"])
    unsigned = _get(path, {}, None)

    for response in (signed, unsigned):
        assert (response.status_code, response.json()["code"]) == (404, "agent_not_found"), response.content[:200]
        assert "w1" not in response.content.decode()
    assert _new_audit(before) == [] and not InboundReceipt.objects.exists()
    _unchanged_but_audit(before, team)


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_the_peer_facing_detail_only_reads(granted, method):
    team, path = granted["team"], _detail_path(granted["worker"])
    before = _state(team)

    response = _get(path, _headers(path, team.id, method=method.upper()), granted["token"], method=method)

    assert (response.status_code, response.json()["code"]) == (405, "method_not_allowed")
    assert response["Allow"] == "GET"
    assert _new_audit(before) == [] and Agent.objects.get(pk=granted["worker"].pk).name == "w1"
    _unchanged_but_audit(before, team)


def test_over_a_real_socket_a_raw_dot_segment_and_a_10_kb_id_are_404(granted, peer_site):
    """Django's test client hands the path over as it is; here the bytes go over TLS as a client
    writes them (`requests` would resolve the dot segments before sending)."""
    team = granted["team"]
    before = _state(team)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    for odd in ("../../ping", "%2E%2E/%2E%2E/ping", "7" * 10_240):
        path = f"{LIST}/{odd}"
        connection = http.client.HTTPSConnection("127.0.0.1", peer_site.port, context=context, timeout=10)
        try:
            connection.putrequest("GET", path, skip_accept_encoding=True)
            for name, value in {**_headers(path, team.id), "kite-grant": granted["token"]}.items():
                connection.putheader(name, value)
            connection.endheaders()
            answer = connection.getresponse()
            body = answer.read().decode()
        finally:
            connection.close()
        assert answer.status == 404 and '"agent_not_found"' in body and "w1" not in body, (odd[:20], body[:200])
    assert _new_audit(before) == []
    _unchanged_but_audit(before, team)


# --- GET /api/fleet/agents/peer:<name>/<id> over real HTTPS ----------------------------------------


@pytest.fixture
def fast(settings):
    settings.KITE_FLEET_PEER_TIMEOUT_SECONDS = 1.0
    settings.KITE_FLEET_DEADLINE_SECONDS = 3.0
    return settings


@pytest.fixture
def peer_site(tmp_path):
    site = KiteOverTls(tmp_path / "tls")
    yield site
    site.close()


@pytest.fixture
def black_hole():
    hole = BlackHole()
    yield hole
    hole.close()


def _our_peer(team, name, url, *, grant: str | None, fingerprint=""):
    peer = federation_services.peer_create(team=team, name=name, peer_hook_url=url, outbound_token=SECRET,
                                           tls_fingerprint=fingerprint).row  # fmt: skip
    Peer.objects.filter(pk=peer.pk).update(status=Peer.Status.ACTIVE, remote_instance_id=f"kite-{name}")
    if grant:
        services.remote_grant_set(peer=Peer.objects.get(pk=peer.pk), token=grant)
    return Peer.objects.get(pk=peer.pk)


@pytest.fixture
def mesh(team, other_team, peer_site, black_hole, fast):
    """Team A (`team`) asks team B of this instance (`b`, over TLS, granted every agent), `hole`
    (never answers), `gone` (connection refused) and `nogrant` (B, no grant from it)."""
    caller_at_b = _caller_row(other_team, name="a")
    _, token = grants.create(peer=caller_at_b, resource_kind="fleet.agents")
    Agent.objects.create(team=team, name="local-1")
    worker = Agent.objects.create(team=other_team, name="b-worker", version="3.1", host="b-box",
                                  labels={"role": "billing"}, via=Agent.Via.LISTEN)  # fmt: skip
    url = peer_site.hook_url(other_team.id)
    peers = {
        "b": _our_peer(team, "b", url, grant=token, fingerprint=peer_site.fingerprint),
        "hole": _our_peer(team, "hole", black_hole.url, grant="fg-1." + "h" * 40),
        "gone": _our_peer(team, "gone", closed_port_url(), grant="fg-2." + "g" * 40),
        "nogrant": _our_peer(team, "nogrant", url, grant=None, fingerprint=peer_site.fingerprint),
    }
    AuditEvent.objects.all().delete()
    return {**peers, "worker": worker, "caller_at_b": caller_at_b}


def _audit(team, action):
    return list(AuditEvent.objects.filter(team_id=team.pk, action=action).order_by("id"))


@pytest.mark.django_db(transaction=True)
def test_a_peers_agent_has_a_local_agents_fields_read_only_and_the_call_is_audited_on_both_sides(
        api, team, other_team, mesh):  # fmt: skip
    worker = mesh["worker"]
    local = api.get(f"/api/fleet/agents/{Agent.objects.get(name='local-1').pk}").json()

    response = api.get(f"/api/fleet/agents/peer:b/{worker.pk}")

    assert response.status_code == 200, response.content
    body = response.json()
    assert set(local) == DETAIL_KEYS and set(body) == DETAIL_KEYS | {"outcome", "last_contact"}
    assert (body["id"], body["name"], body["status"], body["version"], body["host"], body["labels"], body["via"]) == (
        f"peer:b/{worker.pk}", "b-worker", "online", "3.1", "b-box", {"role": "billing"}, "listen")  # fmt: skip
    assert (body["peer"], body["read_only"], body["stale"], body["outcome"]) == ("b", True, False, "ok")
    assert body["first_seen"] and body["last_seen"] and body["last_contact"]
    endpoint = f"{LIST}/{worker.pk}"
    (called,) = _audit(team, "Federation.PeerCalled")
    assert (called.peer_name, called.endpoint, called.outcome, called.data["agent"]) == ("b", endpoint, "ok", worker.pk)
    (served,) = _audit(other_team, "Federation.RemoteRequest")
    assert (served.peer_name, served.endpoint, served.outcome, served.data["agent"]) == ("a", endpoint, "ok", worker.pk)
    assert not Snapshot.objects.exists()  # a detail never writes a snapshot


@pytest.mark.django_db(transaction=True)
def test_a_peer_that_stops_answering_serves_the_agent_from_its_snapshot_flagged_stale(api, mesh):
    worker = mesh["worker"]
    assert api.get("/api/fleet/agents?peer=b").status_code == 200  # the snapshot
    snapshot = Snapshot.objects.get(peer=mesh["b"])
    Peer.objects.filter(pk=mesh["b"].pk).update(peer_hook_url=closed_port_url())

    response = api.get(f"/api/fleet/agents/peer:b/{worker.pk}")
    missing = api.get(f"/api/fleet/agents/peer:b/{worker.pk + 100}")

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["id"], body["name"], body["host"], body["stale"], body["read_only"], body["outcome"]) == (
        f"peer:b/{worker.pk}", "b-worker", "b-box", True, True, "unreachable")  # fmt: skip
    assert body["last_contact"] == snapshot.fetched_at.isoformat().replace("+00:00", "Z")
    assert (body["first_seen"], body["via"]) == (None, None)  # a list row does not hold them
    assert (missing.status_code, missing.json()["code"]) == (502, "peer_unreachable")
    assert Snapshot.objects.get(peer=mesh["b"]).attempted_at == snapshot.attempted_at  # not rewritten


@pytest.mark.django_db(transaction=True)
def test_a_peer_that_never_answers_is_given_up_on_within_its_timeout(api, team, mesh):
    started = time.monotonic()
    response = api.get("/api/fleet/agents/peer:hole/3")
    elapsed = time.monotonic() - started

    assert (response.status_code, response.json()["code"]) == (502, "peer_unreachable"), response.content
    assert "timeout" in response.json()["detail"]
    assert elapsed < 1.0 + 0.5, f"took {elapsed:.2f} s"
    assert [(row.peer_name, row.outcome) for row in _audit(team, "Federation.PeerCalled")] == [("hole", "timeout")]


@pytest.mark.django_db(transaction=True)
def test_an_id_the_peer_does_not_have_or_does_not_show_us_is_404(api, team, other_team, mesh):
    hidden = Agent.objects.create(team=other_team, name="b-secret")
    Grant.objects.filter(peer=mesh["caller_at_b"]).delete()
    _, narrow = grants.create(peer=mesh["caller_at_b"], resource_kind="fleet.agents", resource_id="b-worker")
    services.remote_grant_set(peer=mesh["b"], token=narrow)

    unknown = api.get(f"/api/fleet/agents/peer:b/{hidden.pk + 100}")
    not_shown = api.get(f"/api/fleet/agents/peer:b/{hidden.pk}")
    shown = api.get(f"/api/fleet/agents/peer:b/{mesh['worker'].pk}")

    for response in (unknown, not_shown):
        assert (response.status_code, response.json()["code"]) == (404, "remote_agent_not_found"), response.content
        assert "b-secret" not in response.content.decode()
    assert shown.status_code == 200 and shown.json()["name"] == "b-worker"
    outcomes = [row.outcome for row in _audit(team, "Federation.PeerCalled")]
    assert outcomes == ["not_found", "not_found", "ok"]


@pytest.mark.django_db(transaction=True)
def test_no_grant_from_the_peer_or_a_withdrawn_one_is_403_and_no_old_row_is_shown(api, other_team, mesh):
    worker = mesh["worker"]
    assert api.get("/api/fleet/agents?peer=b").status_code == 200  # a snapshot holding b-worker

    without = api.get(f"/api/fleet/agents/peer:nogrant/{worker.pk}")
    Grant.objects.filter(team_id=other_team.pk).delete()
    withdrawn = api.get(f"/api/fleet/agents/peer:b/{worker.pk}")

    assert (without.status_code, without.json()["code"]) == (403, "no_access")
    assert "remote-grant" in without.json()["detail"]
    assert (withdrawn.status_code, withdrawn.json()["code"]) == (403, "no_access")
    assert "Unknown grant token" in withdrawn.json()["detail"]
    assert "b-box" not in without.content.decode() + withdrawn.content.decode()


@pytest.mark.parametrize("agent_id", ["peer:nobody/1", "peer:b-but-not-ours/1", "peer:/1", "peer:b", "peer:b/",
                                      "peer:bad name/1", "peer:" + "x" * 10_240 + "/1"])  # fmt: skip
def test_a_peer_name_unknown_to_the_team_or_a_malformed_remote_id_is_404(api, team, agent_id):
    revoked = _our_peer(team, "b-but-not-ours", DUMMY_URL, grant="fg-3." + "t" * 40)
    Peer.objects.filter(pk=revoked.pk).update(status=Peer.Status.REVOKED)

    response = api.get(f"/api/fleet/agents/{agent_id}")

    assert response.status_code == 404, response.content[:300]
    assert response.json()["code"] in ("peer_not_found", "remote_agent_not_found")
    assert not AuditEvent.objects.filter(action="Federation.PeerCalled").exists()


def test_another_teams_peer_is_unknown_here(api, other_team):
    peer = _our_peer(other_team, "theirs", DUMMY_URL, grant="fg-3." + "t" * 40)

    response = api.get("/api/fleet/agents/peer:theirs/1")

    assert (response.status_code, response.json()["code"]) == (404, "peer_not_found")
    assert not AuditEvent.objects.filter(action="Federation.PeerCalled").exists()
    assert Peer.objects.get(pk=peer.pk).status == Peer.Status.ACTIVE


@pytest.mark.parametrize("odd", ["../agents", ".", "..", "a b", "ü", "1%2F2", "x" * 101])
def test_a_remote_id_that_cannot_go_in_a_path_is_404_without_calling_the_peer(api, team, odd):
    _our_peer(team, "b", DUMMY_URL, grant="fg-3." + "t" * 40)

    response = api.get(f"/api/fleet/agents/peer:b/{odd}")

    assert (response.status_code, response.json()["code"]) == (404, "remote_agent_not_found"), response.content
    assert not AuditEvent.objects.filter(action="Federation.PeerCalled").exists()


@pytest.mark.parametrize("method", ["put", "patch", "post", "delete"])
@pytest.mark.parametrize("body", [{"name": "renamed"}, {"labels": {"x": "y"}}, {}])
def test_every_write_to_a_peers_agent_is_405_read_only_and_changes_nothing(api, team, method, body):
    peer = _our_peer(team, "b", DUMMY_URL, grant="fg-3." + "t" * 40)
    Snapshot.objects.create(peer=peer, team=team, fetched_at=timezone.now(), rows=[{"id": 7, "name": "w"}])
    before = _state(team)

    response = getattr(api, method)("/api/fleet/agents/peer:b/7", body, format="json")

    assert (response.status_code, response.json()["code"]) == (405, "read_only"), response.content
    assert "GET" in response["Allow"]
    assert _state(team) == before


def test_a_write_to_a_peers_agent_needs_a_login_first(anonymous_api):
    response = anonymous_api.delete("/api/fleet/agents/peer:b/7")

    assert response.status_code in (401, 403)


# --- the screens ------------------------------------------------------------------------------------


def test_the_no_access_card_points_to_its_form_and_names_the_api_only_aside(owner, member, team):
    peer = _our_peer(team, "eu", DUMMY_URL, grant=None)
    page = owner.get("/fleet/", {"federation": "on"}).content.decode()
    card = page[page.index('class="card peer-card"'):page.index("</li>", page.index('class="card peer-card"'))]

    assert "paste its token in “Fleet access” below" in card
    detail = card[card.index('class="small detail"'):card.index("</p>", card.index('class="small detail"'))]
    assert "PUT" not in detail and "/api/" not in detail
    assert card.index("Fleet access from eu") > card.index('class="small detail"')  # the form follows the text
    assert f"PUT /api/fleet/peers/{peer.pk}/remote-grant" in card  # an aside, in the form's help
    member_page = member.get("/fleet/", {"federation": "on"}).content.decode()
    assert "a team admin stores the token" in member_page and "remote-grant" not in member_page


def test_a_local_agents_page_shows_its_details_and_no_control(owner, outsider, team):
    agent = Agent.objects.create(team=team, name="solo", version="1.2", host="box", labels={"k": "v"})

    response = owner.get(f"/fleet/agents/{agent.pk}")
    listing = owner.get("/fleet/").content.decode()

    page = response.content.decode()
    main = page[page.index("<main"):]
    assert response.status_code == 200 and "solo" in main and "box" in main and "k=v" in main
    assert "<form" not in main and "<button" not in main and "Includes federation" not in main
    assert f'href="/fleet/agents/{agent.pk}"' in listing
    assert outsider.get(f"/fleet/agents/{agent.pk}").status_code == 404
    assert owner.get("/fleet/agents/999999").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_a_peers_agent_page_is_linked_from_the_fleet_and_read_only_live_then_stale(owner, team, mesh):
    worker = mesh["worker"]
    listing = owner.get("/fleet/", {"federation": "on", "peer": "b"}).content.decode()
    href = f"/fleet/agents/peer:b/{worker.pk}"
    assert f'href="{href}"' in listing

    live = owner.get(href)
    Peer.objects.filter(pk=mesh["b"].pk).update(peer_hook_url=closed_port_url())
    stale = owner.get(href)
    none = owner.get("/fleet/agents/peer:nogrant/1")
    unknown = owner.get("/fleet/agents/peer:nobody/1")

    for response in (live, stale):
        main = response.content.decode()[response.content.decode().index("<main"):]
        assert response.status_code == 200 and "b-worker" in main and "b-box" in main and "role=billing" in main
        assert "Includes federation" in main and "read-only" in main
        assert "<form" not in main and "<button" not in main and "<input" not in main
    assert 'badge warn">stale' not in live.content.decode() and 'badge warn">stale' in stale.content.decode()
    assert "unreachable" in stale.content.decode()
    assert none.status_code == 403 and "No access to nogrant" in none.content.decode()
    assert unknown.status_code == 404


def test_the_fleet_links_the_agents_of_a_snapshot_by_their_namespaced_id(owner, team):
    peer = _our_peer(team, "ap", DUMMY_URL, grant="fg-3." + "t" * 40)
    Snapshot.objects.create(peer=peer, team=team, fetched_at=timezone.now(), outcome="ok",
                            rows=[{"id": 9, "name": "old-worker", "status": "online"}])  # fmt: skip

    page = owner.get("/fleet/", {"federation": "on"}).content.decode()  # `ap` refuses the connection: stale

    assert 'href="/fleet/agents/peer:ap/9">old-worker</a>' in page


def test_the_detail_call_path_and_its_signature_binding_agree():
    """What the caller signs (the URL's path) is what the peer checks (PATH/<id>), ?team= aside."""
    peer = Peer(name="b", peer_hook_url="https://peer.example:8443/hooks/tm_b/kite", team_id="tm_a")
    target_url = federated.ping_url(peer, f"{federated.PATH}/42")
    binding = signing.binding_for("GET", target_url)

    assert target_url == "https://peer.example:8443/api/federation/fleet/agents/42?team=tm_b"
    assert (binding.method, binding.path, binding.team) == ("GET", "/api/federation/fleet/agents/42", "tm_b")
