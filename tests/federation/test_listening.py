"""A kicked task listens for the next kick before it lets its peer's flag go (federation.outbox._drain's
`listen`): an event committed while it waits is claimed by the same drain, no second task; its wait
is bounded (LINGER_SECONDS, during TURN_SECONDS); a task of many peers does not wait. Against a
real HTTPS endpoint on loopback, with events committed by another thread as a web process commits
them (their after-commit kicks included)."""

import json
import threading
import time

import pytest
from django.db import connection

from federation import dispatch, outbox, tasks
from federation.models import Delivery, OutboxEntry, Peer
from kite.ratelimit import redis_client
from tests.federation.test_delivery import make_event, endpoint, peer  # noqa: F401 - pytest fixtures, used by name

pytestmark = pytest.mark.django_db(transaction=True)


class Answers:
    """An endpoint's answer (one event or a batch), noting each call's events."""

    def __init__(self):
        self.calls, self.changed = [], threading.Condition()

    def __call__(self, body):
        events = json.loads(body)
        with self.changed:
            self.calls.append([event["id"] for event in (events if isinstance(events, list) else [events])])
            self.changed.notify_all()
        if isinstance(events, dict):
            return {"id": events["id"], "duplicate": False}
        return [{"id": event["id"], "result": "accepted"} for event in events]

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.calls) >= count, timeout=10), self.calls


@pytest.fixture(params=[50, None], ids=["batched", "unbatched"])
def batched(request, team, peer, endpoint, monkeypatch):
    """The peer takes batches (or one event per call); kicks that would queue a task are noted
    instead (no worker here)."""
    Peer.objects.filter(pk=peer.pk).update(batch_max=request.param)
    redis_client().delete(dispatch.kick_key(peer.pk), dispatch.wake_key(peer.pk), dispatch.helper_key(peer.pk))
    queued = []
    monkeypatch.setattr(tasks.deliver_peer, "delay", lambda *args, **kwargs: queued.append(args))
    yield queued
    redis_client().delete(dispatch.kick_key(peer.pk), dispatch.wake_key(peer.pk), dispatch.helper_key(peer.pk))


def _meanwhile(func) -> threading.Thread:
    """`func` in another thread, as another process (its own database connection, its own commits)."""

    def run():
        try:
            func()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_an_event_committed_while_the_drain_waits_is_claimed_by_it_and_queues_no_task(team, peer, endpoint, batched):
    answers = Answers()
    endpoint.default = (200, {}, answers)
    make_event(team, "l0")  # its kick sets the flag and queues this task
    assert batched == [(peer.pk,)]

    def later():
        answers.wait_for(1)
        time.sleep(outbox.LINGER_SECONDS / 4)  # the drain has nothing due now: it waits for a kick
        make_event(team, "l1")  # committed; its kick finds the flag set and wakes the drain

    thread = _meanwhile(later)
    assert outbox.deliver_peer(peer.pk) == 2
    thread.join()
    assert answers.calls == [["l0"], ["l1"]]
    assert batched == [(peer.pk,)]  # l1 queued no task: the drain that waited took it
    assert set(OutboxEntry.objects.values_list("status", "attempts")) == {("delivered", 1)}
    assert Delivery.objects.count() == 2
    assert redis_client().exists(dispatch.kick_key(peer.pk)) == 0  # let go at the end: the next kick queues a task


def test_a_drain_past_its_turn_waits_for_no_kick(team, peer, endpoint, batched, monkeypatch):
    """Past TURN_SECONDS a drain ends at its first empty claim: the next event queues a task behind
    the others' instead of a steady stream keeping a worker process."""
    monkeypatch.setattr(outbox, "TURN_SECONDS", 0)
    answers = Answers()
    endpoint.default = (200, {}, answers)
    make_event(team, "t0")
    assert outbox.deliver_peer(peer.pk) == 1
    make_event(team, "t1")
    assert batched == [(peer.pk,), (peer.pk,)]  # the drain had let the flag go: t1 queued a task of its own


def test_the_wait_for_a_kick_is_bounded(team, peer, endpoint, batched):
    answers = Answers()
    endpoint.default = (200, {}, answers)
    make_event(team, "w0")
    started = time.monotonic()
    assert outbox.deliver_peer(peer.pk) == 1
    assert time.monotonic() - started < outbox.LINGER_SECONDS + 2  # one call, one wait, then it ends


def test_a_task_for_many_peers_drains_each_in_turn_without_waiting_for_kicks(team, peer, endpoint, batched,
                                                                              monkeypatch):  # fmt: skip
    monkeypatch.setattr(outbox, "LINGER_SECONDS", 30)  # a wait would show
    endpoint.default = (200, {}, Answers())
    make_event(team, "m0")
    started = time.monotonic()
    assert tasks.deliver_peers([peer.pk]) == 1
    assert time.monotonic() - started < 10


def test_a_pause_while_the_drain_waits_applies_to_the_next_event(team, peer, endpoint, batched):
    """The waiting drain read the peer's row a moment ago; the kick that wakes it is a new event,
    and the row is read again for it, as a new task would: paused since, nothing is sent."""
    answers = Answers()
    endpoint.default = (200, {}, answers)
    make_event(team, "s0")

    def later():
        answers.wait_for(1)
        Peer.objects.filter(pk=peer.pk).update(paused="down")  # an operator, or a heartbeat's verdict
        make_event(team, "s1")  # its kick wakes the waiting drain

    thread = _meanwhile(later)
    assert outbox.deliver_peer(peer.pk) == 1
    thread.join()
    assert answers.calls == [["s0"]]
    assert dict(OutboxEntry.objects.values_list("event__ce_id", "status")) == {"s0": "delivered", "s1": "pending"}


def test_a_wake_claims_with_the_view_it_has_when_the_row_is_unchanged(team, peer, endpoint, batched):
    """The claim after a wake checks the peer's row version and the team's certificates itself, as
    every claim does: unchanged, neither is read again (one statement instead of three round trips)."""
    from django.db import connection as db
    from django.test.utils import CaptureQueriesContext

    answers = Answers()
    endpoint.default = (200, {}, answers)
    make_event(team, "u0")

    def later():
        answers.wait_for(1)
        time.sleep(outbox.LINGER_SECONDS / 4)
        make_event(team, "u1")

    thread = _meanwhile(later)
    with CaptureQueriesContext(db) as queries:
        assert outbox.deliver_peer(peer.pk) == 2
    thread.join()
    assert answers.calls == [["u0"], ["u1"]]
    statements = [query["sql"] for query in queries.captured_queries]
    assert sum("LEFT JOIN federation_peerhealth" in sql for sql in statements) == 1  # the row, read once
    assert sum("FROM federation_identitycertificate" in sql and "seen AS" not in sql for sql in statements) <= 1
    claims = [sql for sql in statements if "SET status = 'in_flight'" in sql]
    assert len(claims) >= 3 and all("seen AS" in sql for sql in claims)  # u0's, u1's, the empty ones: each checked


def test_a_certificate_issued_while_the_drain_waits_signs_the_next_event(team, peer, endpoint, batched):
    """The row is unchanged, the team's certificates are not: the checked claim finds it, and the
    next call is signed (and presented in TLS) with the certificates as a new task would read them."""
    from federation import certificates

    answers = Answers()
    endpoint.default = (200, {}, answers)
    make_event(team, "c0")
    issued = []

    def later():
        answers.wait_for(1)
        issued.append(certificates.issue(team=team, subject="kite-a identity, new"))
        make_event(team, "c1")

    thread = _meanwhile(later)
    assert outbox.deliver_peer(peer.pk) == 2
    thread.join()
    assert answers.calls == [["c0"], ["c1"]]
    (first, _), (second, _) = endpoint.requests
    assert issued[0].thumbprint not in first.get("kite-key", "")
    assert issued[0].thumbprint in second["kite-key"].split()


def test_a_pause_committed_just_before_the_last_claim_applies_to_it(team, peer, endpoint, batched, monkeypatch):
    """The drain's view of the peer is a moment old when it lets its flag go and claims once more;
    a pause and an event committed in between: that claim sees the pause (the row's version has
    changed), reads the row again, and sends nothing — not "within a second", at once."""
    monkeypatch.setattr(outbox, "TURN_SECONDS", 0)  # no wait for kicks: straight to the last claim
    answers = Answers()
    endpoint.default = (200, {}, answers)
    make_event(team, "p0")
    clear, done = outbox.Drain.clear_flag, []

    def clearing(drain):
        clear(drain)
        if not done:
            done.append(True)
            _meanwhile(lambda: (Peer.objects.filter(pk=peer.pk).update(paused="operator"), make_event(team, "p1"))).join()

    monkeypatch.setattr(outbox.Drain, "clear_flag", clearing)
    assert outbox.deliver_peer(peer.pk) == 1
    assert done and answers.calls == [["p0"]]
    assert dict(OutboxEntry.objects.values_list("event__ce_id", "status")) == {"p0": "delivered", "p1": "pending"}
