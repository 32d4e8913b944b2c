"""The federated fleet: the peer-facing GET /api/federation/fleet/agents and its grant
checks, and the aggregated GET /api/fleet/agents?federation=true over real HTTPS on loopback —
this instance's app served over TLS stands in for a peer (its second team), next to a black
hole and a closed port."""

import json
import time
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone

from federation import grants, services as federation_services, signing
from federation.models import AuditEvent, Grant, Peer
from fleet import federated, selectors
from fleet.models import Agent, Snapshot
from tests.fleet.servers import BlackHole, KiteOverTls, closed_port_url

SECRET = "whsec_c2hhcmVkLXNlY3JldC1mb3ItZmVkZXJhdGlvbi10ZXN0cyE="
PATH = "/api/federation/fleet/agents"
DUMMY_URL = "https://127.0.0.1:9/hooks/x/kite"


def _agent(team, name, **fields):
    return Agent.objects.create(team=team, name=name, **fields)


def _caller_row(team, name="instance-a"):
    """The owning side's row for the instance that will call it, checking SECRET inbound."""
    return federation_services.peer_create(team=team, name=name, peer_hook_url=DUMMY_URL, inbound_token=SECRET).row


def _signed_get(token: str | None, *, secret=SECRET, sender="instance-a", remote_addr="127.0.0.1", path=PATH):
    team_id = Peer.objects.filter(name=sender).values_list("team_id", flat=True).first() or ""
    headers = signing.sign_headers(secret=secret, msg_id=f"m{time.monotonic_ns()}", timestamp=int(time.time()),
                                   body=b"", sender_id=sender,
                                   binding=signing.Binding("GET", urlsplit(path).path, team_id))  # fmt: skip
    if token is not None:
        headers["kite-grant"] = token
    meta = {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}
    return Client(REMOTE_ADDR=remote_addr).get(path, **meta)


def _audit(team, action):
    return list(AuditEvent.objects.filter(team_id=team.pk, action=action).order_by("id"))


# --- the peer-facing endpoint -----------------------------------------------------------


def test_a_granted_peer_reads_its_teams_agents_and_the_request_is_audited(team, other_team):
    caller = _caller_row(team)
    _agent(team, "w1", version="1.0", host="h1", labels={"region": "eu"})
    _agent(other_team, "not-yours")
    _, token = grants.create(peer=caller, resource_kind="fleet.agents")

    response = _signed_get(token)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["instance_id"] == django_settings.KITE_INSTANCE_ID
    assert [(r["name"], r["status"], r["version"], r["host"], r["labels"]) for r in body["results"]] == [
        ("w1", "online", "1.0", "h1", {"region": "eu"})]  # fmt: skip
    (row,) = _audit(team, "Federation.RemoteRequest")
    assert (row.peer_id, row.endpoint, row.outcome) == (caller.pk, PATH, "ok")


def test_the_team_hint_narrows_which_rows_are_tried_and_grants_nothing(team, other_team):
    """Kite adds ?team= (from the hook URL) to its calls: the peer tries that team's secrets only."""
    from federation.peers import ping_url

    caller = _caller_row(team)
    other_secret = "whsec_" + "b" * 43 + "="
    federation_services.peer_create(team=other_team, name="instance-a", peer_hook_url=DUMMY_URL,
                                    inbound_token=other_secret)  # fmt: skip
    _agent(team, "w1")
    _, token = grants.create(peer=caller, resource_kind="fleet.agents")

    assert _signed_get(token, path=f"{PATH}?team={team.id}").status_code == 200
    assert _signed_get(token, path=PATH).status_code == 200  # no hint: every team's rows are tried
    wrong = _signed_get(token, path=f"{PATH}?team={other_team.id}")  # team's secret, the other team named
    assert (wrong.status_code, wrong.json()["code"]) == (401, "bad_secret")
    assert _signed_get(token, path=f"{PATH}?team=no%20such").status_code == 200  # malformed: ignored
    assert ping_url(caller, PATH) == f"https://127.0.0.1:9{PATH}?team=x"
    caller.peer_hook_url = "https://peer.example/custom/inbox"
    assert ping_url(caller) == "https://peer.example/api/federation/ping"


@pytest.mark.parametrize(
    ("resource_id", "seen"),
    [(None, ["eu-1", "eu-2", "us-1"]), ("eu-2", ["eu-2"]), ("label:region=us", ["us-1"]), ("nobody", [])],
)
def test_a_grant_for_one_agent_or_one_label_narrows_what_the_peer_sees(team, resource_id, seen):
    caller = _caller_row(team)
    for name, region in (("eu-1", "eu"), ("eu-2", "eu"), ("us-1", "us")):
        _agent(team, name, labels={"region": region})
    _, token = grants.create(peer=caller, resource_kind="fleet.agents", resource_id=resource_id)

    response = _signed_get(token)

    assert response.status_code == 200, response.content
    assert [row["name"] for row in response.json()["results"]] == seen


@pytest.mark.parametrize("resource_id", [None, "eu-2", "label:region=us", "label:tier=", "label:nope=x", "nobody"])
def test_postgresql_renders_exactly_the_rows_python_would(team, other_team, resource_id):
    """The peer-facing list is rendered by PostgreSQL (selectors.granted_rows_json); the embedded
    (SQLite) path renders granted_rows in Python. Same rows, order, fields and values."""
    now = timezone.now()
    for name, labels, seen in (("eu-1", {"region": "eu"}, now), ("eu-2", {"region": "eu", "tier": ""}, now),
                               ("us-1", {"region": "us", "ünï": "cödé \"q\""}, now - timedelta(hours=2)),
                               ("a-0", {}, now.replace(microsecond=0) - timedelta(seconds=5))):  # fmt: skip
        agent = _agent(team, name, version="1.0", host=f"{name}.example", labels=labels)
        Agent.objects.filter(pk=agent.pk).update(last_seen=seen)
    _agent(other_team, "eu-3", labels={"region": "eu"})

    rendered = json.loads(selectors.granted_rows_json(team.id, resource_id))
    expected = selectors.granted_rows(team.id, resource_id)

    assert [row["name"] for row in rendered] == [row["name"] for row in expected]
    assert any(row["status"] == "offline" for row in expected) == (resource_id in (None, "label:region=us"))
    for got, want in zip(rendered, expected, strict=True):
        assert _instant(got.pop("last_seen")) == _instant(want.pop("last_seen"))
        assert got == want


def _instant(iso: str):
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _expired(grant_token):
    Grant.objects.filter(pk=int(grant_token[3:].split(".")[0])).update(expires_at=timezone.now() - timedelta(seconds=1))
    return grant_token


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda caller, other: None, "grant_required"),
        (lambda caller, other: "fg-999999.nope-nope-nope-nope", "bad_grant"),
        (lambda caller, other: "not a grant", "bad_grant"),
        (lambda caller, other: _expired(grants.create(peer=caller, resource_kind="fleet.agents")[1]), "grant_expired"),
        (lambda caller, other: grants.create(peer=caller, resource_kind="fleet.agents",
                                             source_cidrs=["10.0.0.0/8"])[1], "grant_source"),  # fmt: skip
        (lambda caller, other: grants.create(peer=caller, resource_kind="fleet.agents",
                                             permission_scopes=["write"])[1], "grant_scope"),  # fmt: skip
        (lambda caller, other: grants.create(peer=other, resource_kind="fleet.agents")[1], "grant_peer"),
    ],
)
def test_without_a_usable_grant_the_peer_gets_403_naming_why_and_the_refusal_is_audited(team, make, code):
    caller = _caller_row(team)
    someone_else = federation_services.peer_create(team=team, name="someone-else", peer_hook_url=DUMMY_URL).row
    _agent(team, "secret-agent")

    response = _signed_get(make(caller, someone_else))

    assert response.status_code == 403, response.content
    assert response.json()["code"] == code and response.json()["detail"]
    assert "secret-agent" not in response.content.decode()
    assert [row.outcome for row in _audit(team, "Federation.AuthFailed")] == [code]
    assert _audit(team, "Federation.RemoteRequest") == []


@pytest.mark.parametrize("digits", ["⁰¹²³⁴⁵⁶⁷⁸⁹", "٠١٢٣٤٥٦٧٨٩"])
def test_a_grant_token_whose_id_is_not_ascii_digits_is_403_bad_grant_not_its_grant(team, digits):
    """str.isdigit() admits both: int() refused the superscripts (a 500; they are latin-1, so
    any HTTP client can send them) and read the Arabic-Indic digits as the grant's id."""
    caller = _caller_row(team)
    _agent(team, "secret-agent")
    grant, token = grants.create(peer=caller, resource_kind="fleet.agents")
    grant_id, secret = token.removeprefix("fg-").split(".", 1)

    response = _signed_get(f"fg-{grant_id.translate(str.maketrans('0123456789', digits))}.{secret}")

    assert response.status_code == 403, response.content
    assert response.json()["code"] == "bad_grant" and "secret-agent" not in response.content.decode()
    assert [row.outcome for row in _audit(team, "Federation.AuthFailed")] == ["bad_grant"]
    assert _audit(team, "Federation.RemoteRequest") == []
    assert list(Grant.objects.values_list("pk", flat=True)) == [grant.pk]


def test_an_unsigned_or_badly_signed_call_is_401_naming_the_factor_and_audited(team):
    caller = _caller_row(team)
    _, token = grants.create(peer=caller, resource_kind="fleet.agents")

    unsigned = Client().get(PATH, HTTP_KITE_GRANT=token)
    wrong = _signed_get(token, secret="whsec_" + "A" * 43)

    assert unsigned.status_code == 401 and unsigned.json()["code"] == "missing_signature"
    assert wrong.status_code == 401 and wrong.json()["code"] == "bad_secret"
    outcomes = AuditEvent.objects.filter(action="Federation.AuthFailed").values_list("outcome", flat=True)
    assert sorted(outcomes) == ["bad_secret", "missing_signature"]


def test_the_peer_facing_endpoint_only_reads(team):
    caller = _caller_row(team)
    _, token = grants.create(peer=caller, resource_kind="fleet.agents")

    response = Client().post(PATH, {}, HTTP_KITE_GRANT=token)

    assert response.status_code == 405


# --- the aggregated list over real HTTPS -------------------------------------------------


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
        federated_peer = Peer.objects.get(pk=peer.pk)
        from fleet import services

        services.remote_grant_set(peer=federated_peer, token=grant)
    return Peer.objects.get(pk=peer.pk)


@pytest.fixture
def mesh(team, other_team, peer_site, black_hole, fast):
    """Team A (`team`) and its peers: `b` (team B of this instance, over TLS, granted), `hole`
    (accepts, never answers), `gone` (connection refused), `nogrant` (B, but no grant from it)."""
    caller_at_b = _caller_row(other_team, name="a")
    _, token = grants.create(peer=caller_at_b, resource_kind="fleet.agents")
    _agent(team, "local-1", host="a-box")
    _agent(other_team, "b-worker", host="b-box", labels={"role": "billing"})
    _agent(other_team, "b-lister", host="b-box-2")
    url = peer_site.hook_url(other_team.id)
    peers = {
        "b": _our_peer(team, "b", url, grant=token, fingerprint=peer_site.fingerprint),
        "hole": _our_peer(team, "hole", black_hole.url, grant="fg-1." + "h" * 40),
        "gone": _our_peer(team, "gone", closed_port_url(), grant="fg-2." + "g" * 40),
        "nogrant": _our_peer(team, "nogrant", url, grant=None, fingerprint=peer_site.fingerprint),
    }
    AuditEvent.objects.all().delete()
    return peers


def _list(api, query="?federation=true"):
    started = time.monotonic()
    response = api.get(f"/api/fleet/agents{query}")
    assert response.status_code == 200, response.content
    return response.json(), time.monotonic() - started


def _by_name(entries):
    return {entry["name"]: entry for entry in entries}


@pytest.mark.django_db(transaction=True)
def test_the_aggregated_list_has_ours_and_every_answering_peers_agents_and_names_each_outcome(api, team, other_team,
                                                                                             mesh):  # fmt: skip
    body, elapsed = _list(api)

    assert body["includes_federation"] is True
    assert elapsed < 1.0 + 1.5, f"took {elapsed:.2f} s"
    assert [(r["id"] if r["peer"] else "local", r["name"], r["read_only"]) for r in body["results"]] == [
        ("local", "local-1", False),
        (f"peer:b/{Agent.objects.get(name='b-lister').pk}", "b-lister", True),
        (f"peer:b/{Agent.objects.get(name='b-worker').pk}", "b-worker", True),
    ]
    remote = body["results"][2]
    assert (remote["peer"], remote["stale"], remote["host"], remote["labels"]) == ("b", False, "b-box", {"role": "billing"})
    peers = _by_name(body["peers"])
    assert {name: entry["outcome"] for name, entry in peers.items()} == {
        "b": "ok", "hole": "timeout", "gone": "unreachable", "nogrant": "unauthorized"}  # fmt: skip
    assert set(peers["b"]) >= {"name", "outcome", "latency_ms", "last_contact", "stale"}
    assert peers["b"]["latency_ms"] is not None and peers["b"]["last_contact"] and peers["b"]["stale"] is False
    assert peers["hole"]["last_contact"] is None and peers["hole"]["stale"] is False
    # One call, audited on both sides: Federation.PeerCalled at A (one per peer asked), RemoteRequest at B.
    called = {row.peer_name: row.outcome for row in _audit(team, "Federation.PeerCalled")}
    assert called == {"b": "ok", "hole": "timeout", "gone": "unreachable"}
    (served,) = _audit(other_team, "Federation.RemoteRequest")
    assert served.peer_name == "a" and served.endpoint == PATH


@pytest.mark.django_db(transaction=True)
def test_a_peer_that_stops_answering_is_served_from_its_snapshot_flagged_stale(api, mesh):
    first, _ = _list(api, "?federation=true&peer=b")
    fetched = Snapshot.objects.get(peer=mesh["b"]).fetched_at
    Peer.objects.filter(pk=mesh["b"].pk).update(peer_hook_url=closed_port_url())

    body, _ = _list(api, "?federation=true&peer=b")

    assert [row["name"] for row in body["results"]] == ["b-lister", "b-worker"]
    assert all(row["stale"] and row["read_only"] for row in body["results"])
    (entry,) = body["peers"]
    assert (entry["outcome"], entry["stale"]) == ("unreachable", True)
    assert entry["last_contact"] == fetched.isoformat().replace("+00:00", "Z")
    assert [row["id"] for row in body["results"]] == [row["id"] for row in first["results"]]


@pytest.mark.django_db(transaction=True)
def test_filter_by_peer_and_search_across_peers_server_side(api, mesh):
    only_b, _ = _list(api, "?peer=b")
    searched, _ = _list(api, "?federation=true&q=BOX")
    billing, _ = _list(api, "?federation=true&q=role=billing")

    assert {row["peer"] for row in only_b["results"]} == {"b"} and [p["name"] for p in only_b["peers"]] == ["b"]
    assert [row["name"] for row in searched["results"]] == ["local-1", "b-lister", "b-worker"]
    assert [row["name"] for row in billing["results"]] == ["b-worker"]


@pytest.mark.django_db(transaction=True)
def test_the_snapshot_refresh_fills_what_a_snapshot_only_read_serves_without_asking_anyone(api, team, mesh):
    asked = federated.refresh_snapshots()
    calls_after_refresh = len(_audit(team, "Federation.PeerCalled"))

    body, elapsed = _list(api, "?federation=true&snapshot=true")

    assert asked == 3  # b, hole, gone: `nogrant` has nothing to ask with
    assert len(_audit(team, "Federation.PeerCalled")) == calls_after_refresh == 3
    assert [row["name"] for row in body["results"] if row["peer"] == "b"] == ["b-lister", "b-worker"]
    peers = _by_name(body["peers"])
    assert (peers["b"]["outcome"], peers["b"]["stale"]) == ("ok", False)
    assert (peers["hole"]["outcome"], peers["hole"]["last_contact"]) == ("timeout", None)
    assert elapsed < 1.0


@pytest.mark.django_db(transaction=True)
def test_the_refresh_skips_peers_a_list_has_just_asked(api, mesh):
    _list(api, "?peer=b")

    asked = federated.refresh_snapshots()

    assert asked == 2  # hole and gone; b was asked a moment ago, and nogrant has nothing to ask with
    assert Snapshot.objects.get(peer=mesh["b"]).outcome == "ok"


@pytest.mark.django_db(transaction=True)
def test_lists_rewrite_a_peers_snapshot_at_most_every_half_period_unless_its_outcome_changes(api, other_team, mesh):
    _list(api, "?peer=b")
    first = Snapshot.objects.get(peer=mesh["b"])
    Agent.objects.filter(team=other_team, name="b-lister").delete()

    body, _ = _list(api, "?peer=b")  # within the half period, same outcome: served live, not rewritten
    assert [row["name"] for row in body["results"]] == ["b-worker"]
    again = Snapshot.objects.get(peer=mesh["b"])
    assert (again.attempted_at, len(again.rows)) == (first.attempted_at, 2)

    Snapshot.objects.filter(pk=first.pk).update(attempted_at=first.attempted_at - timedelta(seconds=16))
    _list(api, "?peer=b")  # half the 30 s period has passed: rewritten
    assert [row["name"] for row in Snapshot.objects.get(peer=mesh["b"]).rows] == ["b-worker"]

    Grant.objects.filter(team_id=other_team.pk).delete()
    _list(api, "?peer=b")  # the outcome changes (refused): at once, rows gone
    refused = Snapshot.objects.get(peer=mesh["b"])
    assert (refused.outcome, refused.rows) == ("unauthorized", [])


@pytest.mark.django_db(transaction=True)
def test_a_peer_that_withdraws_our_grant_is_not_served_from_an_old_snapshot(api, other_team, mesh):
    _list(api, "?peer=b")
    Grant.objects.filter(team_id=other_team.pk).delete()

    body, _ = _list(api, "?peer=b")

    assert body["results"] == []
    assert body["peers"][0]["outcome"] == "unauthorized"
    assert Snapshot.objects.get(peer=mesh["b"]).rows == []


@pytest.mark.django_db(transaction=True)
def test_federation_without_peers_is_just_ours(api, team, other_team, fast):
    _agent(team, "alone")

    body, _ = _list(api)

    assert body == {"includes_federation": True, "results": [body["results"][0]], "peers": []}
    assert body["results"][0]["name"] == "alone"


def test_a_peers_rows_are_checked_and_cut_to_size():
    from fleet import rows

    raws = [
        {"id": 1, "name": "ok", "status": "online", "last_seen": "2026-01-01T00:00:00Z", "labels": {"a": "b"}},
        {"id": 2, "name": "bad name"},
        {"id": True, "name": "boolean-id"},
        {"id": 3, "name": "weird", "status": "exploded", "last_seen": "yesterday", "labels": ["x"], "host": 5},
        "not a row",
    ]

    found = [rows.remote_row("p", wire, stale=False) for wire in rows.checked_rows(raws)]

    assert [(r["id"], r["status"], r["last_seen"], r["labels"], r["host"]) for r in found] == [
        ("peer:p/1", "online", "2026-01-01T00:00:00Z", {"a": "b"}, ""),
        ("peer:p/3", "offline", None, {}, ""),
    ]
    assert all(r["read_only"] and r["peer"] == "p" for r in found)


# --- storing the grant a hand-made peer's operator gave us ----------------------------------


def test_a_team_admin_stores_and_forgets_a_peers_grant_token(api, outsider_api, team):
    peer = federation_services.peer_create(team=team, name="manual", peer_hook_url=DUMMY_URL).row
    path = f"/api/fleet/peers/{peer.pk}/remote-grant"

    stored = api.put(path, {"token": "fg-12." + "s" * 43}, format="json")
    refused = api.put(path, {"token": "whsec_nope"}, format="json")
    elsewhere = outsider_api.put(path, {"token": "fg-12." + "s" * 43}, format="json")

    assert stored.status_code == 200 and stored.json()["has_remote_grant"] is True
    assert api.get(f"/api/federation/peers/{peer.pk}").json()["has_remote_grant"] is True
    assert refused.status_code == 400 and refused.json()["code"] == "invalid"
    assert elsewhere.status_code == 404 and elsewhere.json()["code"] == "not_found"
    assert api.delete(path).status_code == 204
    assert api.get(f"/api/federation/peers/{peer.pk}").json()["has_remote_grant"] is False
    audited = [(row.action, row.data, row.actor.startswith("api-key")) for row in AuditEvent.objects.filter(
        action__startswith="Federation.RemoteGrant").order_by("id")]  # fmt: skip
    assert audited == [("Federation.RemoteGrantStored", {"grant": "fg-12"}, True),
                       ("Federation.RemoteGrantForgotten", {}, True)]  # fmt: skip
