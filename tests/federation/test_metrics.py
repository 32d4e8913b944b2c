"""GET /metrics (README "Audit log and metrics"): the federation series move with the calls, refusals and deliveries
they count; kite_outbox_entries is read from the database at scrape time."""

import json

from prometheus_client.parser import text_string_to_metric_families

from federation import heartbeat, outbox, services
from federation.models import OutboxEntry, Peer
from tests.federation.loopback import WRONG, deliver, loopback, pair  # noqa: F401  (fixtures)
from tests.federation.test_api import PEER_URL, SECRET
from tests.federation.test_delivery import make_event, endpoint  # noqa: F401  (fixture)


def scrape(client) -> dict[tuple, float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(scraped: dict, name: str, **labels) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def calls(scraped, peer, direction, outcome) -> float:
    return value(scraped, "kite_federation_calls_total", peer=peer, direction=direction, outcome=outcome)


def test_a_succeeding_and_a_refused_ping_are_counted_on_both_sides(client, pair, loopback):
    peer, sender = pair
    before = scrape(client)
    assert heartbeat.ping(peer).ok
    peer = services.peer_update(peer=peer, outbound_token=WRONG)
    assert not heartbeat.ping(peer).ok
    after = scrape(client)
    for side, name, outcome in [("outbound", "b", "ok"), ("outbound", "b", "bad_secret"),
                                ("inbound", "a", "ok"), ("inbound", "a", "bad_secret")]:  # fmt: skip
        assert calls(after, name, side, outcome) - calls(before, name, side, outcome) == 1, (side, outcome)


def test_an_unreachable_peer_is_counted_as_a_connection_failure(client, team):
    peer = services.peer_create(team=team, name="nowhere", peer_hook_url=PEER_URL).row  # port 9: refused
    before = scrape(client)
    assert not heartbeat.ping(peer).ok
    after = scrape(client)
    assert calls(after, "nowhere", "outbound", "connection") - calls(before, "nowhere", "outbound", "connection") == 1


def _delivery(client, team, secret: str, event_id: str):
    body = json.dumps({"specversion": "1.0", "id": event_id, "source": "kite://a/t/s", "type": "com.x.y"}).encode()
    return deliver(client, team, body, secret=secret)


def test_inbound_deliveries_are_counted_and_refusals_carry_the_failing_factor(client, team):
    services.trusted_sender_create(team=team, name="kite-a", inbound_token=SECRET)
    before = scrape(client)
    assert _delivery(client, team, SECRET, "e1").status_code == 202
    assert _delivery(client, team, WRONG, "e2").status_code == 401
    after = scrape(client)
    assert calls(after, "kite-a", "inbound", "ok") - calls(before, "kite-a", "inbound", "ok") == 1
    assert calls(after, "kite-a", "inbound", "bad_secret") - calls(before, "kite-a", "inbound", "bad_secret") == 1
    ingested = "kite_events_ingested_total"
    for outcome in ("accepted", "bad_secret"):
        assert value(after, ingested, source="kite", outcome=outcome) - value(before, ingested, source="kite",
                                                                              outcome=outcome) == 1  # fmt: skip


def test_a_delivery_moves_the_outbound_counter_and_the_delivery_histogram(client, team, endpoint):
    peer = services.peer_create(team=team, name="b", peer_hook_url=endpoint.url, outbound_token=SECRET, scopes=["*"],
                                tls_fingerprint=endpoint.fingerprint).row  # fmt: skip
    make_event(team)
    before = scrape(client)
    assert outbox.deliver_peer(peer.pk) == 1
    after = scrape(client)
    assert calls(after, "b", "outbound", "ok") - calls(before, "b", "outbound", "ok") == 1
    count = "kite_federation_delivery_seconds_count"
    assert value(after, count) - value(before, count) == 1


def test_the_outbox_gauge_counts_every_live_peer_by_status_at_scrape_time(client, team, other_team):
    def peer(team, name, scopes):
        return services.peer_create(team=team, name=name, peer_hook_url=PEER_URL, scopes=scopes).row

    b, _, gone = peer(team, "b", ["*"]), peer(team, "idle", ["nothing.*"]), peer(team, "gone", ["*"])
    twin = peer(other_team, "b", ["*"])  # another team's peer of the same name: one label set, added up
    for n in range(5):
        make_event(team, f"e{n}")
    make_event(other_team, "t1")
    for status, ids in [("dead", ["e0"]), ("in_flight", ["e1"]), ("delivered", ["e2"])]:
        OutboxEntry.objects.filter(peer=b, event__ce_id__in=ids).update(status=status)
    Peer.objects.filter(pk=gone.pk).update(status=Peer.Status.REVOKED)
    scraped = scrape(client)

    def gauge(name, status):
        return scraped.get(("kite_outbox_entries", (("peer", name), ("status", status))))

    assert (gauge("b", "pending"), gauge("b", "in_flight"), gauge("b", "dead")) == (2 + 1, 1, 1)  # twin's pending too
    assert (gauge("idle", "pending"), gauge("idle", "dead")) == (0, 0)
    assert gauge("gone", "pending") is None and gauge("b", "delivered") is None
    assert OutboxEntry.objects.filter(peer=twin).count() == 1
    OutboxEntry.objects.filter(peer=b, status="pending").update(status="dead")
    assert scrape(client)[("kite_outbox_entries", (("peer", "b"), ("status", "dead")))] == 3


def test_metrics_in_multiprocess_mode_still_read_the_outbox_gauge(client, team, tmp_path, monkeypatch):
    services.peer_create(team=team, name="b", peer_hook_url=PEER_URL, scopes=["*"])
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    scraped = scrape(client)
    assert scraped[("kite_outbox_entries", (("peer", "b"), ("status", "pending")))] == 0


def test_metrics_are_served_without_credentials(client):
    assert client.get("/metrics").status_code == 200  # a loopback caller, no token set (tests/kite/test_operational.py)
