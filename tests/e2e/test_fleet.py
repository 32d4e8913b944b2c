"""The fleet across real instances: A peered by invitation with B (healthy) and C
(answers once, then stopped), and by hand with a black hole (accepts TCP, never answers);
one remote agent's detail through A's API (live from B, from the snapshot once C is stopped),
writes to it refused, and B's peer-facing detail attacked over HTTPS.

One set of instances for the whole module, started once: A, B and C with PostgreSQL + Redis,
`runkite` each (web, worker, beat), TLS on.
"""

import http.client
import json
import secrets
import socket
import ssl
import time

import psycopg
import pytest
import requests

from federation import signing
from tests.e2e.harness import wait_for
from tests.e2e.test_federation import Cluster
from tests.fleet.servers import BlackHole

pytestmark = pytest.mark.e2e

PATH = "/api/federation/fleet/agents"
PEER_TIMEOUT = 2.0  # KITE_FLEET_PEER_TIMEOUT_SECONDS' default
DEADLINE = 3.0  # KITE_FLEET_DEADLINE_SECONDS' default (timeout + 1 s)


def invite(inviter, invitee, name_there: str, name_here: str) -> tuple[int, int]:
    """The one-paste invitation: both sides get the default fleet.agents grant of the other.
    Returns (inviter's peer id, invitee's peer id)."""
    created = inviter.api("POST", "/api/federation/invitations", json={"name": name_there, "scopes": []})
    assert created.status_code == 201, created.text
    accepted = invitee.api("POST", "/api/federation/invitations/accept",
                           json={"invitation": created.json()["invitation"], "name": name_here})  # fmt: skip
    assert accepted.status_code == 201, accepted.text
    return created.json()["peer_id"], accepted.json()["id"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    started, hole = Cluster(tmp_path_factory), BlackHole()
    try:
        a, b, c = started.start_together("fleet-a", "fleet-b", "fleet-c")
        a_b, b_a = invite(a, b, "b", "a")
        a_c, _ = invite(a, c, "c", "a")
        body = {"name": "hole", "peer_hook_url": hole.url, "scopes": []}
        made = a.api("POST", "/api/federation/peers", json=body)
        assert made.status_code == 201, made.text
        # A grant token it "gave" us, so that A really calls it.
        stored = a.api("PUT", f"/api/fleet/peers/{made.json()['id']}/remote-grant", json={"token": "fg-1." + "h" * 43})
        assert stored.status_code == 200, stored.text
        for kite, name in ((a, "a-worker"), (b, "b-worker"), (c, "c-worker")):
            answer = kite.api("POST", "/api/fleet/agents", json={"name": name, "version": "2.0", "host": f"{name}-box",
                                                                 "labels": {"role": "billing"}})  # fmt: skip
            assert answer.status_code == 201, answer.text
        yield {"a": a, "b": b, "c": c, "a_b": a_b, "b_a": b_a, "a_c": a_c}
    finally:
        hole.close()
        started.close()


def fleet_list(kite, **params) -> tuple[dict, float]:
    started = time.monotonic()
    response = kite.api("GET", "/api/fleet/agents", params=params)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    return response.json(), elapsed


def peers_of(body) -> dict[str, dict]:
    return {entry["name"]: entry for entry in body["peers"]}


def audit_rows(kite, action: str) -> list[tuple]:
    with psycopg.connect(kite.database_url) as db:
        return db.execute("SELECT peer_name, endpoint, outcome FROM federation_auditevent WHERE action = %s ORDER BY id",
                          (action,)).fetchall()  # fmt: skip


def test_kite_listen_agent_registers_with_its_version_and_host(fleet, listen):
    b = fleet["b"]
    listener = listen(b, "--agent", "b-listener", "--label", "role=ops")

    def registered():
        rows = fleet_list(b)[0]["results"]
        return next((row for row in rows if row["name"] == "b-listener"), None)

    row = wait_for(registered, 20, lambda: f"b-listener in B's fleet; {listener.diagnostics()}")
    assert (row["status"], row["host"], row["labels"]) == ("online", socket.gethostname(), {"role": "ops"})
    assert row["version"] and row["read_only"] is False and row["peer"] is None


def test_one_fleet_call_is_audited_on_both_sides(fleet):
    a, b = fleet["a"], fleet["b"]
    served_before = len(audit_rows(b, "Federation.RemoteRequest"))

    body, _ = fleet_list(a, peer="b")

    assert peers_of(body)["b"]["outcome"] == "ok", body["peers"]
    assert ("b", PATH, "ok") in audit_rows(a, "Federation.PeerCalled")
    served = [row for row in audit_rows(b, "Federation.RemoteRequest")[served_before:] if row[1] == PATH]
    assert ("a", PATH, "ok") in served  # (A's snapshot refresh may have asked B as well meanwhile)


def test_grants_narrow_what_a_peer_sees_and_expired_or_out_of_network_ones_are_refused_and_audited(fleet):
    a, b = fleet["a"], fleet["b"]
    b.api("POST", "/api/fleet/agents", json={"name": "b-other", "labels": {"role": "search"}})

    def grant_from_b(**fields) -> str:
        made = b.api("POST", f"/api/federation/peers/{fleet['b_a']}/grants",
                     json={"resource_kind": "fleet.agents", **fields})  # fmt: skip
        assert made.status_code == 201, made.text
        assert a.api("PUT", f"/api/fleet/peers/{fleet['a_b']}/remote-grant",
                     json={"token": made.json()["token"]}).status_code == 200  # fmt: skip
        return made.json()["token"]

    def seen_from_a() -> tuple[str, list[str]]:
        body, _ = fleet_list(a, peer="b")
        return body["peers"][0]["outcome"], sorted(row["name"] for row in body["results"])

    refused_before = len(audit_rows(b, "Federation.AuthFailed"))
    try:
        grant_from_b(resource_id="b-worker")
        assert seen_from_a() == ("ok", ["b-worker"])
        grant_from_b(resource_id="label:role=search")
        assert seen_from_a() == ("ok", ["b-other"])

        grant_from_b(source_cidrs=["10.0.0.0/8"])
        assert seen_from_a() == ("unauthorized", [])
        expiring = grant_from_b()
        with psycopg.connect(b.database_url) as db:
            db.execute("UPDATE federation_grant SET expires_at = now() - interval '1 second' WHERE id = %s",
                       (int(expiring[3:].split(".")[0]),))  # fmt: skip
        assert seen_from_a() == ("unauthorized", [])

        refusals = {row[2] for row in audit_rows(b, "Federation.AuthFailed")[refused_before:] if row[1] == PATH}
        assert refusals == {"grant_source", "grant_expired"}
        called = [row[2] for row in audit_rows(a, "Federation.PeerCalled") if row[:2] == ("b", PATH)]
        assert called[-1] == "unauthorized"
    finally:
        grant_from_b()  # every agent again, for the tests after this one


def test_the_aggregated_list_serves_healthy_peers_a_stale_snapshot_and_each_outcome_within_the_deadline(fleet):
    a, c = fleet["a"], fleet["c"]
    first, _ = fleet_list(a, federation="true")
    assert {name: entry["outcome"] for name, entry in peers_of(first).items()} == {
        "b": "ok", "c": "ok", "hole": "timeout"}, first["peers"]  # fmt: skip
    c_rows = [row for row in first["results"] if row["peer"] == "c"]
    assert [row["name"] for row in c_rows] == ["c-worker"]

    c.stop()
    body, elapsed = fleet_list(a, federation="true")

    assert elapsed < DEADLINE + 0.5, f"the list took {elapsed:.2f} s"
    peers = peers_of(body)
    assert {name: entry["outcome"] for name, entry in peers.items()} == {
        "b": "ok", "c": "unreachable", "hole": "timeout"}, body["peers"]  # fmt: skip
    # Its last contact: our first list (or a snapshot refresh just after it, before it stopped).
    assert peers["c"]["stale"] is True and peers["c"]["last_contact"] >= peers_of(first)["c"]["last_contact"]
    assert peers["hole"]["last_contact"] is None and PEER_TIMEOUT * 1000 * 0.9 <= peers["hole"]["latency_ms"]
    by_peer = {}
    for row in body["results"]:
        by_peer.setdefault(row["peer"], []).append(row)
    assert "hole" not in by_peer  # never answered: listed in peers, no rows
    assert [(row["id"], row["stale"], row["read_only"]) for row in by_peer["c"]] == [(c_rows[0]["id"], True, True)]
    assert all(row["id"].startswith("peer:b/") and not row["stale"] for row in by_peer["b"])
    assert body["includes_federation"] is True and [row["name"] for row in by_peer[None]] == ["a-worker"]
    # Search runs across every peer's rows on A.
    searched, _ = fleet_list(a, federation="true", q="c-worker-box")
    assert [row["id"] for row in searched["results"]] == [c_rows[0]["id"]]
    assert json.dumps(searched["peers"])  # still names every peer's outcome


# --- one remote agent -------------------------------------------------------------------------------


def agent_id_on(kite, name: str) -> int:
    return next(row["id"] for row in fleet_list(kite)[0]["results"] if row["name"] == name)


def audit_data(kite, action: str, endpoint: str) -> list[tuple]:
    with psycopg.connect(kite.database_url) as db:
        return db.execute("SELECT peer_name, outcome, data FROM federation_auditevent WHERE action = %s AND endpoint = %s"
                          " ORDER BY id", (action, endpoint)).fetchall()  # fmt: skip


def test_a_remote_agents_detail_comes_from_the_peer_with_a_local_details_fields_audited_on_both_sides(fleet):
    a, b = fleet["a"], fleet["b"]
    worker = agent_id_on(b, "b-worker")
    at_b = b.api("GET", f"/api/fleet/agents/{worker}").json()

    answer = a.api("GET", f"/api/fleet/agents/peer:b/{worker}")

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == set(at_b) | {"outcome", "last_contact"}
    same = ("name", "status", "last_seen", "first_seen", "version", "host", "labels", "via")
    assert {key: body[key] for key in same} == {key: at_b[key] for key in same}
    assert (body["id"], body["peer"], body["read_only"], body["stale"]) == (f"peer:b/{worker}", "b", True, False)
    endpoint = f"{PATH}/{worker}"
    assert [(peer, outcome, data["agent"]) for peer, outcome, data in audit_data(a, "Federation.PeerCalled", endpoint)
            ] == [("b", "ok", worker)]  # fmt: skip
    assert [(peer, outcome, data["agent"]) for peer, outcome, data in
            audit_data(b, "Federation.RemoteRequest", endpoint)] == [("a", "ok", worker)]  # fmt: skip


def test_an_id_b_does_not_have_and_a_peer_a_does_not_have_are_404(fleet):
    a = fleet["a"]

    unknown = a.api("GET", "/api/fleet/agents/peer:b/987654321")
    nobody = a.api("GET", "/api/fleet/agents/peer:nobody/1")

    assert (unknown.status_code, unknown.json()["code"]) == (404, "remote_agent_not_found")
    assert (nobody.status_code, nobody.json()["code"]) == (404, "peer_not_found")


@pytest.mark.parametrize("method", ["PUT", "PATCH", "POST", "DELETE"])
def test_every_write_to_a_remote_agent_is_refused_and_changes_nothing_on_either_side(fleet, method):
    a, b = fleet["a"], fleet["b"]
    worker = agent_id_on(b, "b-worker")
    before_b = b.api("GET", f"/api/fleet/agents/{worker}").json()
    called_before = len(audit_rows(a, "Federation.PeerCalled"))

    answer = a.api(method, f"/api/fleet/agents/peer:b/{worker}", json={"name": "renamed", "labels": {"x": "y"}})

    assert (answer.status_code, answer.json()["code"]) == (405, "read_only"), answer.text
    assert b.api("GET", f"/api/fleet/agents/{worker}").json() == before_b
    assert all(row[1] != f"{PATH}/{worker}" for row in audit_rows(a, "Federation.PeerCalled")[called_before:])
    assert "renamed" not in json.dumps(fleet_list(a, federation="true")[0])


def _signed(secret: str, path: str, team: str, *, msg_id: str | None = None) -> dict:
    return signing.sign_headers(secret=secret, msg_id=msg_id or f"msg_{secrets.token_hex(8)}",
                                timestamp=int(time.time()), body=b"", sender_id="mallory-inst",
                                binding=signing.Binding("GET", path, team))  # fmt: skip


def test_bs_peer_facing_detail_refuses_replays_cross_endpoint_signatures_and_odd_ids_over_https(fleet):
    """The test plays Mallory, a peer B made by hand (the test holds the secret B checks) with a
    fleet grant from B: a valid detail call works once; its replay, the list's signature on a
    detail, another agent's signature, a raw `../` and a 10 KB id are refused, and B's audit trail
    holds nothing but the one answer and the refusals."""
    b = fleet["b"]
    team, secret = b.team_id(), "whsec_" + secrets.token_urlsafe(32)
    made = b.api("POST", "/api/federation/peers", json={"name": "mallory", "peer_hook_url": "https://127.0.0.1:9/hooks/m/kite",
                                                        "inbound_token": secret, "scopes": []})  # fmt: skip
    assert made.status_code == 201, made.text
    granted = b.api("POST", f"/api/federation/peers/{made.json()['id']}/grants", json={"resource_kind": "fleet.agents"})
    assert granted.status_code == 201, granted.text
    token, worker = granted.json()["token"], agent_id_on(b, "b-worker")
    path = f"{PATH}/{worker}"

    def get(target: str, headers: dict) -> requests.Response:
        return requests.get(b.url + target, headers={**headers, "kite-grant": token}, verify=str(b.cert), timeout=10)

    first = _signed(secret, path, team)
    assert get(path, first).json()["agent"]["name"] == "b-worker"
    replayed = get(path, first)
    list_signature = get(path, _signed(secret, PATH, team))
    other_agent = get(path, _signed(secret, f"{PATH}/{worker + 1}", team))
    for answer, code in ((replayed, "replayed"), (list_signature, "bad_secret"), (other_agent, "bad_secret")):
        assert (answer.status_code, answer.json()["code"]) == (401, code), answer.text
        assert "b-worker" not in answer.text
    context = ssl.create_default_context(cafile=str(b.cert))
    context.check_hostname = False
    for odd in ("../../ping", "..%2F..%2Fping", "9" * 10_240):
        connection = http.client.HTTPSConnection("127.0.0.1", b.port, context=context, timeout=10)
        try:
            connection.putrequest("GET", f"{PATH}/{odd}", skip_accept_encoding=True)
            for name, value in {**_signed(secret, f"{PATH}/{odd}", team), "kite-grant": token}.items():
                connection.putheader(name, value)
            connection.endheaders()
            answer = connection.getresponse()
            text = answer.read().decode()
        finally:
            connection.close()
        assert answer.status == 404 and '"agent_not_found"' in text and "b-worker" not in text, (odd[:20], text[:200])
    with psycopg.connect(b.database_url) as db:
        audited = db.execute("SELECT action, outcome, endpoint FROM federation_auditevent WHERE peer_name = 'mallory'"
                             " AND action IN ('Federation.RemoteRequest', 'Federation.AuthFailed') ORDER BY id"
                             ).fetchall()  # fmt: skip
    assert audited == [("Federation.RemoteRequest", "ok", path), ("Federation.AuthFailed", "replayed", path),
                       ("Federation.AuthFailed", "bad_secret", path), ("Federation.AuthFailed", "bad_secret", path)]


def test_a_stopped_peers_agent_is_served_from_its_snapshot_flagged_stale(fleet):
    a, c = fleet["a"], fleet["c"]
    if c.process is not None:  # run alone: C answers once (the snapshot), then stops
        assert peers_of(fleet_list(a, peer="c")[0])["c"]["outcome"] == "ok"
        c.stop()
    listed, _ = fleet_list(a, peer="c")
    (row,) = listed["results"]
    assert row["name"] == "c-worker" and row["stale"] is True

    started = time.monotonic()
    answer = a.api("GET", f"/api/fleet/agents/{row['id']}")
    elapsed = time.monotonic() - started

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["id"], body["name"], body["host"], body["labels"]) == (row["id"], "c-worker", "c-worker-box",
                                                                        {"role": "billing"})  # fmt: skip
    assert (body["stale"], body["read_only"], body["peer"], body["outcome"]) == (True, True, "c", "unreachable")
    assert body["last_contact"] == peers_of(listed)["c"]["last_contact"]
    assert elapsed < PEER_TIMEOUT + 0.5, f"took {elapsed:.2f} s"
    for method in ("PUT", "DELETE"):
        refused = a.api(method, f"/api/fleet/agents/{row['id']}", json={})
        assert (refused.status_code, refused.json()["code"]) == (405, "read_only")
