"""An event's journey across two live instances (runkite over HTTPS on loopback, each with its own
PostgreSQL database and Redis, real Celery workers): an event sent A → B; A's journey shows B
delivered with the attempt, B's shows it arrived from peer A with A's provenance, and when."""

import secrets
from datetime import datetime

import pytest

from tests.e2e.harness import wait_for
from tests.e2e.test_federation import Cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kites(tmp_path_factory):
    cluster = Cluster(tmp_path_factory)
    try:
        yield cluster.start_together("journey-a", "journey-b")
    finally:
        cluster.close()


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _journey(kite, event_id: str) -> dict:
    answer = kite.api("GET", f"/api/events/{event_id}/journey")
    assert answer.status_code == 200, answer.text
    return answer.json()


def _delivered(kite, event_id: str):
    found = kite.api("GET", f"/api/events/{event_id}/journey")
    if found.status_code != 200:
        return None
    body = found.json()
    return body if body["peers"] and body["peers"][0]["status"] == "delivered" else None


def test_an_event_sent_a_to_b_is_delivered_on_as_journey_and_arrived_from_a_on_bs(kites):
    a, b = kites
    token = b.token("from-a")
    peer = a.add_peer(b, "b", outbound_token=token, scopes=["stripe.*"])
    b.trust("a", token)
    stripe = a.create_source("stripe", "stripe")
    event_id = f"evt_{secrets.token_hex(4)}"
    assert a.post_stripe(a.team_id(), stripe, event_id).status_code == 202

    on_a = wait_for(lambda: _delivered(a, event_id), 15, lambda: f"A's journey to show B delivered\n{a.state()}")
    (to_b,) = on_a["peers"]
    assert (to_b["peer"], to_b["peer_id"], to_b["attempt_count"]) == ("b", peer["id"], 1)
    (attempt,) = to_b["attempts"]
    assert (attempt["status_code"], attempt["outcome"], attempt["error"]) == (202, "delivered", "")
    assert attempt["latency_ms"] >= 0 and to_b["delivered_at"] == attempt["at"]
    assert on_a["arrival"]["source"] == "stripe" and on_a["arrival"]["verification"] == "verified"
    assert on_a["arrival"]["peer"] is None
    assert on_a["provenance"]["origin"] is None and on_a["provenance"]["path"] == [a.instance_id]

    on_b = _journey(b, event_id)
    arrival, provenance = on_b["arrival"], on_b["provenance"]
    seen = (arrival["source"], arrival["kind"], arrival["verification"], arrival["peer"])
    assert seen == ("kite", "kite", "verified", "a")
    assert arrival["ce_source"] == on_a["arrival"]["ce_source"] == f"kite://{a.instance_id}/{a.team_id()}/stripe"
    assert (provenance["origin"], provenance["chain"], provenance["hops"]) == (a.instance_id, [a.instance_id], 1)
    assert provenance["path"] == [a.instance_id, b.instance_id] and provenance["here"] == b.instance_id
    assert on_b["peers"] == []  # B sends to no one
    # When: received at A, then at B during A's attempt, which A records once B has answered.
    assert _moment(on_a["arrival"]["received_at"]) <= _moment(arrival["received_at"]) <= _moment(attempt["at"])
    listed = b.events(source="kite")
    assert on_b["event"] == next(event for event in listed if event["id"] == event_id)  # as /api/events shows it

    # An id B never got.
    missing = b.api("GET", f"/api/events/evt_{secrets.token_hex(4)}/journey")
    assert missing.status_code == 404 and missing.json()["code"] == "event_not_found"


def test_an_unverified_event_stays_verification_none_at_b(kites):
    a, b = kites
    token = b.token("from-a-open")
    a.add_peer(b, "b-open", outbound_token=token, scopes=["example.*"])
    b.trust("a-open", token)
    event_id = f"open_{secrets.token_hex(4)}"
    assert a.post_plain(a.team_id(), "plain", event_id).status_code == 202  # com.example.ping
    on_a = wait_for(lambda: _delivered(a, event_id), 15, lambda: f"A's journey to show b-open delivered\n{a.state()}")
    assert on_a["arrival"]["verification"] == "none" and on_a["peers"][0]["peer"] == "b-open"
    on_b = _journey(b, event_id)
    assert (on_b["arrival"]["verification"], on_b["arrival"]["peer"]) == ("none", "a-open")
