"""A drain's calls to a batching peer are pipelined, woken by the next event's kick: real PostgreSQL,
Redis (the kick's wake goes through pub/sub) and an HTTPS endpoint on loopback. Events are committed
(their kicks run on commit), the drain runs in a thread of its own, as in a worker."""

import json
import threading
import time

import pytest
from django.db import connections

from federation import dispatch, outbox
from federation.models import Delivery, OutboxEntry, Peer
from federation import tasks
from kite.ratelimit import redis_client
from tests.federation.test_delivery import SECRET, make_event, endpoint, peer  # noqa: F401 - pytest fixtures, used by name

pytestmark = pytest.mark.django_db(transaction=True)


def _accepted(body):
    return [{"id": event["id"], "result": "accepted"} for event in json.loads(body)]


def _ids(body) -> list[str]:
    return [event["id"] for event in json.loads(body)]


class Calls:
    """The endpoint's side: how many calls were in at once, and what each call carried."""

    def __init__(self):
        self.lock, self.now, self.most, self.seen = threading.Lock(), 0, 0, []
        self.arrived = threading.Condition(self.lock)

    def enter(self, body):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.seen.append(_ids(body))
            self.arrived.notify_all()

    def leave(self):
        with self.lock:
            self.now -= 1

    def wait_for(self, event_id: str, timeout: float) -> bool:
        with self.lock:
            return self.arrived.wait_for(lambda: any(event_id in ids for ids in self.seen), timeout=timeout)


def _commit_event(team, event_id):
    """An event committed from the endpoint's own thread (its own connection), its kick run on commit."""
    try:
        make_event(team, event_id)
    finally:
        connections.close_all()


def _drain_in_thread(peer_id, **kwargs):
    result = {}

    def run():
        try:
            result["delivered"] = outbox.deliver_peer(peer_id, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - shown by the test
            result["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


@pytest.fixture
def batching(peer):
    Peer.objects.filter(pk=peer.pk).update(batch_max=100)
    redis_client().delete(dispatch.kick_key(peer.pk), dispatch.helper_key(peer.pk))
    yield peer
    redis_client().delete(dispatch.kick_key(peer.pk), dispatch.helper_key(peer.pk))


def test_once_a_call_succeeded_the_next_events_go_out_on_a_second_call_while_the_first_is_out(team, batching,
                                                                                            endpoint):  # fmt: skip
    """p0 is answered at once; while its answer is on the way p1 commits (its kick wakes the drain),
    and p1's call waits at the peer until p2 — committed while p1 is out — arrives on a second call."""
    calls = Calls()

    def answer(body):
        calls.enter(body)
        try:
            ids = _ids(body)
            if "p0" in ids:
                _commit_event(team, "p1")
            elif "p1" in ids:
                _commit_event(team, "p2")
                assert calls.wait_for("p2", timeout=5), "p2 was not sent while p1's call was out"
            return _accepted(body)
        finally:
            calls.leave()

    endpoint.default = (200, {}, answer)
    make_event(team, "p0")
    thread, result = _drain_in_thread(batching.pk)
    thread.join(15)
    assert not thread.is_alive() and "error" not in result, result
    assert calls.seen == [["p0"], ["p1"], ["p2"]]
    assert calls.most == 2  # p2's call went while p1's was out: two calls in flight, no more
    assert result["delivered"] == 3
    assert set(OutboxEntry.objects.values_list("status", "attempts")) == {("delivered", 1)}
    rows = sorted(Delivery.objects.values_list("entry__event__ce_id", "outcome", "status_code"))
    assert rows == [("p0", "delivered", 200), ("p1", "delivered", 200), ("p2", "delivered", 200)]
    assert OutboxEntry.objects.filter(leased_until__isnull=False).count() == 0


def test_before_a_call_has_succeeded_there_is_one_call_out_at_a_time(team, batching, endpoint):
    """A peer that has not answered yet (it may be down) gets one call per drain: p1, committed and
    woken while p0's call is out, is not sent beside it; p0 fails and the drain stops."""
    calls = Calls()

    def failing(body):
        calls.enter(body)
        try:
            _commit_event(team, "p1")
            time.sleep(0.5)  # the wake has long reached the drain
            return {"detail": "busy", "code": "busy"}
        finally:
            calls.leave()

    endpoint.answers = [(503, {}, failing)]
    endpoint.default = (200, {}, lambda body: (calls.enter(body), calls.leave(), _accepted(body))[2])
    make_event(team, "p0")
    thread, result = _drain_in_thread(batching.pk)
    thread.join(15)
    assert not thread.is_alive() and result.get("delivered") == 0, result
    assert calls.seen == [["p0"]] and calls.most == 1
    by_id = {e.event.ce_id: (e.status, e.attempts) for e in OutboxEntry.objects.select_related("event")}
    assert by_id == {"p0": ("pending", 1), "p1": ("pending", 0)}  # p1 untouched: never claimed, no attempt
    assert Peer.objects.get(pk=batching.pk).consecutive_failures == 1


def test_a_drain_woken_by_a_stream_lingers_for_the_next_event_and_no_task_is_queued_for_it(team, batching,
                                                                                         endpoint, monkeypatch):  # fmt: skip
    """Events one after another: the drain that was woken waits (LINGER_SECONDS) for the next before
    letting go of its flag, and takes it itself; the kicks of those events queue no task."""
    monkeypatch.setattr(outbox, "LINGER_SECONDS", 3.0)  # room for this test's thread to commit
    queued = []
    monkeypatch.setattr(tasks.deliver_peer, "delay", lambda *args, **kwargs: queued.append(args))
    calls = Calls()

    def answer(body):
        calls.enter(body)
        try:
            if "s0" in _ids(body):
                _commit_event(team, "s1")  # a kick while the flag is held: a wake, not a task
            return _accepted(body)
        finally:
            calls.leave()

    endpoint.default = (200, {}, answer)
    make_event(team, "s0")
    queued.clear()  # s0's own kick (no drain yet) queued one; the drain below plays that task
    thread, result = _drain_in_thread(batching.pk)
    deadline = time.monotonic() + 5
    while not OutboxEntry.objects.filter(event__ce_id="s1", status="delivered").exists():
        assert time.monotonic() < deadline, "s1 was not delivered"
        time.sleep(0.02)
    make_event(team, "s2")  # after the drain found nothing more: it is lingering
    thread.join(15)
    assert not thread.is_alive() and result.get("delivered") == 3, result
    assert calls.seen == [["s0"], ["s1"], ["s2"]]
    assert queued == []  # s1's and s2's kicks found the flag held: the lingering drain took them
    assert not redis_client().exists(dispatch.kick_key(batching.pk))  # let go at the end


def test_a_task_that_drains_several_peers_in_turn_does_not_linger(team, batching, endpoint, monkeypatch):
    monkeypatch.setattr(outbox, "LINGER_SECONDS", 3.0)
    endpoint.default = (200, {}, _accepted)
    make_event(team, "t0")
    drain = outbox.Drain(dispatch.kick_key(batching.pk))
    drain.woken = True  # as if a stream of events had woken it
    monkeypatch.setattr(outbox, "Drain", lambda flag: drain)
    started = time.monotonic()
    assert tasks.deliver_peers([batching.pk]) == 1
    assert time.monotonic() - started < 2.0


class Woken:
    def __init__(self):
        self.times = threading.Event()

    def wake(self):
        self.times.set()


def test_a_kick_that_finds_the_flag_held_wakes_the_peers_drains_and_no_other():
    peer_id, other = 900_401, 900_402
    redis_client().delete(dispatch.kick_key(peer_id), dispatch.kick_key(other))
    mine, theirs = Woken(), Woken()
    try:
        with dispatch.wakes.listening(peer_id, mine), dispatch.wakes.listening(other, theirs):
            deadline = time.monotonic() + 5
            # the listener subscribes in its thread: until then a wake is lost (a hint, by design)
            while not mine.times.is_set():
                assert time.monotonic() < deadline, "no wake reached the drain"
                redis_client().set(dispatch.kick_key(peer_id), 1, ex=2)  # a task holds the flag
                assert dispatch.first_kicks([peer_id]) == []  # no task queued …
                mine.times.wait(0.2)  # … a wake instead
            assert not theirs.times.is_set()
            redis_client().delete(dispatch.kick_key(peer_id))
            mine.times.clear()
            assert dispatch.first_kicks([peer_id]) == [peer_id]  # no task held it: a task, no wake
            assert not mine.times.wait(0.3)
    finally:
        redis_client().delete(dispatch.kick_key(peer_id), dispatch.kick_key(other))
    assert peer_id not in dispatch.wakes.listeners and other not in dispatch.wakes.listeners


def test_wakes_come_back_after_redis_drops_the_subscription():
    """Redis closes the listener's connection (a restart, a failover): it subscribes again."""
    peer_id = 900_403
    mine = Woken()

    def woken_within(seconds) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            redis_client().set(dispatch.kick_key(peer_id), 1, ex=2)
            dispatch.first_kicks([peer_id])
            if mine.times.wait(0.2):
                return True
        return False

    try:
        with dispatch.wakes.listening(peer_id, mine):
            assert woken_within(5)
            assert redis_client().client_kill_filter(_type="pubsub") >= 1
            mine.times.clear()
            assert woken_within(10), "the listener did not subscribe again"
    finally:
        redis_client().delete(dispatch.kick_key(peer_id))
