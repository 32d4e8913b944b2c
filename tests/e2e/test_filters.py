"""Per-peer filters between two real Kite instances (separate PostgreSQL databases, HTTPS on
loopback, real Celery workers and beat): A's peer B, whose filters ask for Stripe events, no test
subject, and region eu or an unverified source, gets exactly the events they match — by type,
subject and extensions, an attribute the event lacks included — and A counts every other one as
dropped with reason `filter`. A filter changed with PATCH is obeyed from the next event on, in
every process of A."""

import base64
import json
import secrets

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import wait_for
from tests.e2e.test_federation import cluster, federate, stored_ids  # noqa: F401  (fixture)
from tests.signing import standard_webhook_headers

pytestmark = pytest.mark.e2e

FILTERS = [
    {"prefix": {"type": "com.stripe."}},
    {"not": {"exact": {"subject": "test"}}},
    {"any": [{"exact": {"region": "eu"}}, {"exact": {"kiteunverified": "true"}}]},
]


def _dropped(kite, peer: str, reason: str) -> float:
    text = requests.get(f"{kite.url}/metrics", verify=str(kite.cert), timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "kite_federation_dropped_total"
               and sample.labels == {"peer": peer, "reason": reason})  # fmt: skip


class Upstream:
    """Another instance's signed deliveries to A (as Kite sends them: structured CloudEvents with a
    subject and extensions), from a trusted sender of A's."""

    def __init__(self, kite, name: str):
        self.kite, self.name = kite, name
        self.secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        kite.trust(name, self.secret)
        self.team_id = kite.team_id()

    def deliver(self, event_id: str, event_type: str = "com.stripe.charge.succeeded", **attributes) -> None:
        body = json.dumps({"specversion": "1.0", "id": event_id, "source": f"kite://{self.name}/tm/stripe",
                           "type": event_type, "data": {"n": 1}, **attributes}).encode()  # fmt: skip
        headers = {**standard_webhook_headers(self.secret, f"msg_{event_id}", body), "kite-peer": self.name,
                   "content-type": "application/cloudevents+json"}  # fmt: skip
        response = requests.post(f"{self.kite.url}/hooks/{self.team_id}/kite", data=body, headers=headers,
                                 verify=str(self.kite.cert), timeout=10)  # fmt: skip
        assert response.status_code == 202, response.text


def test_a_peer_with_filters_gets_exactly_the_events_they_match(cluster):  # noqa: F811
    a, b = cluster.start_together("filters-a", "filters-b")
    peer = federate(a, b, "b", scopes=["*"], filters=FILTERS)
    assert peer["filters"] == FILTERS and a.peer(peer["id"])["filters"] == FILTERS
    upstream = Upstream(a, "upstream")
    tag = secrets.token_hex(3)

    wanted = {f"live-eu-{tag}", f"plain-stripe-{tag}"}
    upstream.deliver(f"live-eu-{tag}", subject="cus_1", region="eu")
    a.post_event("plain", f"plain-stripe-{tag}")  # kiteunverified: true, and no subject at all
    upstream.deliver(f"test-eu-{tag}", subject="test", region="eu")  # the test subject
    upstream.deliver(f"live-us-{tag}", subject="cus_2", region="us")  # neither eu nor unverified
    upstream.deliver(f"no-region-{tag}")  # region missing: matches no exact
    upstream.deliver(f"github-eu-{tag}", event_type="com.github.push", region="eu")  # not com.stripe.
    a.post_event("plain", f"plain-github-{tag}", event_type="com.github.push")

    # Outbox entries are written in each event's own transaction: once the webhooks are answered, A's
    # queue for B is complete. It holds the wanted events, and B receives exactly those.
    assert {entry["event_id"] for entry in a.outbox(peer["id"])} == wanted
    wait_for(lambda: wanted <= set(stored_ids(b, source="kite")), 20, lambda: f"the wanted events at B\n{a.state()}")
    assert sorted(stored_ids(b, source="kite")) == sorted(wanted)
    live = next(event for event in b.events(source="kite") if event["id"] == f"live-eu-{tag}")
    assert (live["subject"], live["region"], live["kitefedhops"]) == ("cus_1", "eu", 2)
    assert _dropped(a, "b", "filter") == 5

    # A changed filter is obeyed by the next event, whichever of A's processes takes the webhook.
    changed = [{"exact": {"subject": "test"}}]
    patched = a.api("PATCH", f"/api/federation/peers/{peer['id']}", json={"filters": changed})
    assert patched.status_code == 200 and patched.json()["filters"] == changed, patched.text
    for n in range(3):
        upstream.deliver(f"test-{n}-{tag}", subject="test")
        upstream.deliver(f"live-{n}-{tag}", subject="cus_3", region="eu")
    tests = {f"test-{n}-{tag}" for n in range(3)}
    assert {entry["event_id"] for entry in a.outbox(peer["id"])} == wanted | tests
    wait_for(lambda: tests <= set(stored_ids(b, source="kite")), 20, lambda: f"the test events at B\n{a.state()}")
    assert sorted(stored_ids(b, source="kite")) == sorted(wanted | tests)
    assert _dropped(a, "b", "filter") == 8

    refused = a.api("PATCH", f"/api/federation/peers/{peer['id']}", json={"filters": [{"regex": {"type": "x"}}]})
    assert refused.status_code == 400 and refused.json()["code"] == "invalid_filters", refused.text
    assert a.peer(peer["id"])["filters"] == changed
