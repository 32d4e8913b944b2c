"""Unbatched delivery keeps KITE_OUTBOX_IN_FLIGHT calls in flight to one peer, each entry its own
call and Delivery row, the outcomes recorded together — against a real HTTPS endpoint on loopback."""

import json
import threading
import time

from federation import contract, outbox
from federation.models import Delivery, OutboxEntry, Peer
from tests.federation.test_delivery import make_event, endpoint, peer  # noqa: F401 - pytest fixtures, used by name


class Overlap:
    """An answer that takes `seconds` and notes how many calls were in at once."""

    def __init__(self, seconds: float):
        self.seconds, self.now, self.most, self.lock = seconds, 0, 0, threading.Lock()

    def __call__(self, body):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.seconds)
        with self.lock:
            self.now -= 1
        return {"id": json.loads(body)["id"], "duplicate": False}


def test_unbatched_calls_overlap_up_to_the_setting_and_each_entry_has_its_own_delivery(team, peer, endpoint,
                                                                                       settings):  # fmt: skip
    settings.KITE_OUTBOX_IN_FLIGHT = 4
    overlap = Overlap(0.3)
    endpoint.default = (202, {}, overlap)
    for index in range(8):
        make_event(team, f"e{index}")
    assert outbox.deliver_peer(peer.pk) == 8  # one alone first, then 4 + 3 at once
    assert overlap.most == 4  # four answers were being waited for at once
    assert len(endpoint.requests) == 8
    assert sorted(json.loads(body)["id"] for _headers, body in endpoint.requests) == [f"e{i}" for i in range(8)]
    assert len({headers["webhook-id"] for headers, _body in endpoint.requests}) == 8
    assert set(OutboxEntry.objects.values_list("status", "attempts")) == {("delivered", 1)}
    rows = list(Delivery.objects.values_list("entry__event__ce_id", "outcome", "status_code"))
    assert sorted(rows) == [(f"e{i}", "delivered", 202) for i in range(8)]


def test_one_call_at_a_time_when_the_setting_is_1(team, peer, endpoint, settings):
    settings.KITE_OUTBOX_IN_FLIGHT = 1
    overlap = Overlap(0.05)
    endpoint.default = (202, {}, overlap)
    for index in range(5):
        make_event(team, f"e{index}")
    assert outbox.deliver_peer(peer.pk) == 5
    assert overlap.most == 1


def test_a_failed_call_among_those_in_flight_backs_off_alone_and_what_was_not_sent_goes_back(team, peer, endpoint,
                                                                                             settings):  # fmt: skip
    settings.KITE_OUTBOX_IN_FLIGHT = 4

    def answer(body):
        event_id = json.loads(body)["id"]
        if event_id == "e1":
            return {"detail": "busy", "code": "busy"}
        return {"id": event_id, "duplicate": False}

    # e0 goes alone and is delivered; then e1..e4 at once: e1 is answered 503, the other three 202;
    # e5..e9 are never sent.
    endpoint.default = (202, {}, answer)
    original = endpoint.server.RequestHandlerClass.do_POST

    def do_post(handler):
        length = int(handler.headers.get("Content-Length", 0))
        body = handler.rfile.read(length)
        endpoint.requests.append(({k.lower(): v for k, v in handler.headers.items()}, body))
        failing = json.loads(body)["id"] == "e1"
        payload = json.dumps(answer(body)).encode()
        handler.send_response(503 if failing else 202)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    endpoint.server.RequestHandlerClass.do_POST = do_post
    try:
        for index in range(10):
            make_event(team, f"e{index}")
        assert outbox.deliver_peer(peer.pk) == 4
    finally:
        endpoint.server.RequestHandlerClass.do_POST = original
    by_id = {e.event.ce_id: (e.status, e.attempts) for e in OutboxEntry.objects.select_related("event")}
    assert by_id["e1"] == ("pending", 1)
    assert [by_id[f"e{i}"] for i in (0, 2, 3, 4)] == [("delivered", 1)] * 4
    assert all(by_id[f"e{i}"] == ("pending", 0) for i in range(5, 10))  # released untouched: no attempt made
    assert len(endpoint.requests) == 5
    outcomes = sorted(Delivery.objects.values_list("entry__event__ce_id", "outcome", "status_code"))
    assert outcomes == [("e0", "delivered", 202), ("e1", "transient", 503), ("e2", "delivered", 202),
                        ("e3", "delivered", 202), ("e4", "delivered", 202)]  # fmt: skip
    assert Peer.objects.get(pk=peer.pk).consecutive_failures == 1


def test_a_peer_that_fails_the_first_call_gets_no_volley(team, peer, endpoint, settings):
    settings.KITE_OUTBOX_IN_FLIGHT = 4
    endpoint.default = (503, {}, {"detail": "down", "code": "down"})
    for index in range(6):
        make_event(team, f"e{index}")
    assert outbox.deliver_peer(peer.pk) == 0
    assert len(endpoint.requests) == 1
    assert sorted(OutboxEntry.objects.values_list("attempts", flat=True)) == [0, 0, 0, 0, 0, 1]


def test_batched_peers_still_get_one_call_per_claim(team, peer, endpoint, settings):
    settings.KITE_OUTBOX_IN_FLIGHT = 4
    Peer.objects.filter(pk=peer.pk).update(batch_max=100)
    endpoint.default = (200, {}, lambda body: [{"id": e["id"], "result": "accepted"} for e in json.loads(body)])
    for index in range(7):
        make_event(team, f"e{index}")
    assert outbox.deliver_peer(peer.pk) == 7
    assert len(endpoint.requests) == 1
    assert endpoint.requests[0][0]["content-type"] == contract.BATCH_CONTENT_TYPE


def test_a_lone_event_to_a_batched_peer_goes_as_one_structured_cloudevent(team, peer, endpoint, settings):
    """A claim of one event is not a batch of one: the receiving Kite stores a structured event on
    its event loop, where a batch goes through Django. Its 202 is the delivery's success."""
    Peer.objects.filter(pk=peer.pk).update(batch_max=100)
    endpoint.default = (202, {}, lambda body: {"id": json.loads(body)["id"], "duplicate": False})
    make_event(team, "alone")
    assert outbox.deliver_peer(peer.pk) == 1
    [(headers, body)] = endpoint.requests
    assert headers["content-type"] == contract.SINGLE_CONTENT_TYPE and json.loads(body)["id"] == "alone"
    assert OutboxEntry.objects.get().status == "delivered"
