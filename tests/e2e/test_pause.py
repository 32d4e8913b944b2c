"""An operator's maintenance pause between two real Kite instances (separate PostgreSQL databases,
HTTPS on loopback, real Celery workers and beat): while A's peer B is paused, events keep queuing
at A, no delivery is attempted, heartbeats go on (and do not lift the pause); resume delivers the
whole backlog at once, each event exactly once."""

import secrets
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import wait_for
from tests.e2e.test_federation import cluster, federate, stored_ids  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e

EVENTS = 20
RESUME_DRAIN_SECONDS = 5  # 20 events after a kick at commit; the sweeper alone would also take < 2 s


def _paused_gauge(kite, team_id: str) -> float:
    text = requests.get(f"{kite.url}/metrics", verify=str(kite.cert), timeout=10).text
    return next(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name == "kite_peer_paused"
                and sample.labels == {"peer": "b", "team": team_id, "reason": "operator"})  # fmt: skip


def test_a_paused_peer_queues_everything_and_resume_delivers_it_exactly_once(cluster):  # noqa: F811
    a, b = cluster.start_together("pause-a", "pause-b")
    peer = federate(a, b, "b", scopes=["stripe.*"])
    warm = f"warm_{secrets.token_hex(3)}"
    a.post_event("plain", warm)
    wait_for(lambda: warm in stored_ids(b, source="kite"), 15, "a first delivery")
    wait_for(lambda: a.peer(peer["id"])["last_success_at"], 15, "a first successful heartbeat")
    delivered_before = len(a.api("GET", f"/api/federation/peers/{peer['id']}/deliveries").json()["results"])

    paused = a.api("POST", f"/api/federation/peers/{peer['id']}/pause", json={"reason": "B's upgrade"})
    assert paused.status_code == 200 and paused.json()["paused"] == "operator", paused.text
    assert _paused_gauge(a, a.team_id()) == 1
    sent = [f"evt_{i}_{secrets.token_hex(3)}" for i in range(EVENTS)]
    for event_id in sent:
        a.post_event("plain", event_id)
    wait_for(lambda: len(a.outbox(peer["id"], "pending")) == EVENTS, 10, "every event queued at A")

    # Heartbeats go on: wait for two more successful ones (about 4 s at FAST's 2 s). Meanwhile the
    # sweeper (every second) and the kicks of 20 webhooks had every chance to deliver: none did.
    def success_after(previous):
        latest = a.peer(peer["id"])["last_success_at"]
        return latest if latest != previous else None

    seen = a.peer(peer["id"])["last_success_at"]
    for _ in range(2):
        seen = wait_for(lambda: success_after(seen), 15, "a successful heartbeat while paused", interval=0.2)
    shown = a.peer(peer["id"])
    assert (shown["paused"], shown["reachability"]) == ("operator", "Reachable"), a.state()
    pending = a.outbox(peer["id"], "pending")
    assert len(pending) == EVENTS and {entry["attempts"] for entry in pending} == {0}
    assert a.outbox(peer["id"], "in_flight") == [] and a.outbox(peer["id"], "dead") == []
    assert len(a.api("GET", f"/api/federation/peers/{peer['id']}/deliveries").json()["results"]) == delivered_before
    assert not set(sent) & set(stored_ids(b, source="kite"))

    again = a.api("POST", f"/api/federation/peers/{peer['id']}/pause", json={})
    assert again.status_code == 200 and again.json()["changed"] is False  # idempotent

    resumed_at = time.monotonic()
    resumed = a.api("POST", f"/api/federation/peers/{peer['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["paused"] == "", resumed.text
    wait_for(lambda: set(sent) <= set(stored_ids(b, source="kite")), RESUME_DRAIN_SECONDS,
             lambda: f"every queued event at B after the resume\n{a.state()}")  # fmt: skip
    assert time.monotonic() - resumed_at < RESUME_DRAIN_SECONDS
    ids = [i for i in stored_ids(b, source="kite") if i in sent]
    assert sorted(ids) == sorted(sent)  # each exactly once
    wait_for(lambda: len(a.outbox(peer["id"], "delivered")) == EVENTS + 1, 10, "A's outbox to record the deliveries")
    assert {entry["attempts"] for entry in a.outbox(peer["id"], "delivered")} == {1}
    assert a.outbox(peer["id"], "dead") == [] and a.outbox(peer["id"], "pending") == []
    assert _paused_gauge(a, a.team_id()) == 0
    actions = [row["action"] for row in a.api("GET", "/api/audit", params={"peer": "b"}).json()["results"]]
    assert actions.count("Federation.PeerPaused") == 1 and actions.count("Federation.PeerResumed") == 1
