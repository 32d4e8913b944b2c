"""The audit trail between two real instances (README "Audit log and metrics"): a ping is `Federation.PeerCalled` on
the caller and `Federation.RemoteRequest` on the callee; a wrong secret is `Federation.AuthFailed`
with outcome `bad_secret` on the callee — each read through GET /api/audit."""

import secrets

import pytest

from tests.e2e.harness import wait_for
from tests.e2e.test_federation import cluster, federate  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e


def audit(kite, **filters) -> list[dict]:
    response = kite.api("GET", "/api/audit", params=filters)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_a_ping_is_audited_on_both_sides_and_a_wrong_secret_on_the_receiver(cluster):
    a, b = cluster.start_together("a", "b")
    peer = federate(a, b, "b")
    ping = a.api("POST", f"/api/federation/peers/{peer['id']}/ping").json()
    assert ping["ok"], ping

    called = [row for row in audit(a, action="Federation.PeerCalled", peer="b") if row["actor"].startswith("api-key")]
    assert called and (called[0]["endpoint"], called[0]["outcome"]) == ("/api/federation/ping", "ok")
    assert called[0]["data"]["status_code"] == 200 and called[0]["data"]["latency_ms"] >= 0
    served = audit(b, action="Federation.RemoteRequest")
    assert [(row["endpoint"], row["outcome"], row["actor"]) for row in served][-1:] == [
        ("/api/federation/ping", "ok", a.instance_id)
    ], served  # the oldest: our ping, or a heartbeat just before it — either is A's signed ping

    wrong = {"outbound_token": "whsec_" + secrets.token_urlsafe(32)}
    assert a.api("PATCH", f"/api/federation/peers/{peer['id']}", json=wrong).status_code == 200
    refused = a.api("POST", f"/api/federation/peers/{peer['id']}/ping").json()
    assert not refused["ok"] and refused["factors"]["secret"] == "mismatch", refused
    rows = wait_for(lambda: audit(b, action="Federation.AuthFailed", outcome="bad_secret"), 5, "B's bad_secret row")
    assert (rows[0]["endpoint"], rows[0]["actor"]) == ("/api/federation/ping", a.instance_id)
    assert rows[0]["peer"]  # B's trusted sender for A, named
    assert audit(a, action="Federation.PeerCalled", outcome="bad_secret")
