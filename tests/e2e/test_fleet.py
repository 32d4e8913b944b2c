"""The fleet across real instances (issue 5): A peered by invitation with B (healthy) and C
(answers once, then stopped), and by hand with a black hole (accepts TCP, never answers).

One set of instances for the whole module, started once: A, B and C with PostgreSQL + Redis,
`runkite` each (web, worker, beat), TLS on.
"""

import json
import socket
import time

import psycopg
import pytest

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
        a, b, c = started.start("fleet-a"), started.start("fleet-b"), started.start("fleet-c")
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
