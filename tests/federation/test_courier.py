"""A web process's courier delivers what it has just stored, with the outbox's own claim, leases and
records: against a real HTTPS endpoint on loopback, real PostgreSQL and Redis, committed transactions
(the courier is woken on commit, so these tests commit)."""

import threading
import time

import pytest

from federation import courier as courier_module
from federation import dispatch, outbox
from federation.models import Delivery, OutboxEntry, Peer
from tests.federation.test_delivery import SECRET, make_event, endpoint, peer  # noqa: F401 - pytest fixtures, used by name

pytestmark = pytest.mark.django_db(transaction=True)


def redis_client():
    import redis
    from django.conf import settings

    return redis.Redis.from_url(settings.REDIS_URL)


@pytest.fixture
def courier():
    installed = courier_module.Courier()
    dispatch.deliver_locally(installed)
    yield installed
    installed.close(5)
    dispatch.deliver_locally(None)


def _wait(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _kick_flag(peer) -> bool:
    return bool(redis_client().exists(f"kite:kick:{peer.pk}"))


def test_a_committed_event_is_delivered_by_the_courier_without_a_task(team, peer, endpoint, courier):
    redis_client().delete(f"kite:kick:{peer.pk}")
    started = time.monotonic()
    make_event(team, "c1")
    assert _wait(lambda: OutboxEntry.objects.get(event__ce_id="c1").status == "delivered")
    took = time.monotonic() - started
    assert len(endpoint.requests) == 1 and b'"c1"' in endpoint.requests[0][1]
    delivery = Delivery.objects.get(entry__event__ce_id="c1")
    assert (delivery.outcome, delivery.status_code) == ("delivered", 202)
    assert not _kick_flag(peer), "a task was queued for a delivery the courier made"
    assert took < 2.0, f"took {took:.2f} s"


def test_a_paused_peer_gets_nothing_from_the_courier(team, peer, endpoint, courier):
    Peer.objects.filter(pk=peer.pk).update(paused=Peer.Pause.OPERATOR)
    make_event(team, "p1")
    time.sleep(0.5)
    assert endpoint.requests == []
    assert OutboxEntry.objects.get(event__ce_id="p1").status == "pending"


def test_a_failed_call_backs_off_as_a_task_would_and_the_next_wake_reads_the_peer_again(team, peer, endpoint,
                                                                                        courier):  # fmt: skip
    endpoint.answers.append((503, {}, {"detail": "busy", "code": "busy"}))
    make_event(team, "f1")
    assert _wait(lambda: Delivery.objects.filter(entry__event__ce_id="f1").exists())
    entry = OutboxEntry.objects.get(event__ce_id="f1")
    assert (entry.status, entry.attempts) == ("pending", 1)
    assert Peer.objects.get(pk=peer.pk).consecutive_failures == 1
    # The operator pauses right after the failure: the next event's wake sees it (no cached row).
    Peer.objects.filter(pk=peer.pk).update(paused=Peer.Pause.OPERATOR)
    make_event(team, "f2")
    time.sleep(0.5)
    assert len(endpoint.requests) == 1
    assert OutboxEntry.objects.get(event__ce_id="f2").status == "pending"


def test_a_backlog_is_left_to_a_task_after_one_full_claim(team, peer, endpoint, courier):
    Peer.objects.filter(pk=peer.pk).update(paused=Peer.Pause.OPERATOR)
    for index in range(outbox.CLAIM_UNBATCHED + 5):  # unbatched peer (batch_max NULL): claims of 20
        make_event(team, f"b{index}")
    redis_client().delete(f"kite:kick:{peer.pk}")
    Peer.objects.filter(pk=peer.pk).update(paused="")
    dispatch.kick(peer.pk)  # as resuming the peer does, from a web process
    # One claim's worth sent by the courier, then the backlog handed to a worker's task (its kick
    # flag lives 2 s: looked for while the calls go out and right after).
    kicked = []
    assert _wait(lambda: kicked.append(_kick_flag(peer)) or len(endpoint.requests) == outbox.CLAIM_UNBATCHED, 30)
    assert _wait(lambda: any(kicked) or _kick_flag(peer), 2)
    time.sleep(0.3)
    statuses = list(OutboxEntry.objects.values_list("status", flat=True))
    assert statuses.count("delivered") == outbox.CLAIM_UNBATCHED  # one claim's worth, then it stopped
    assert statuses.count("pending") == 5  # no worker runs in this test: they wait for the task


def test_close_waits_for_the_call_out_and_then_refuses_wakes(team, peer, endpoint, courier):
    gate = threading.Event()

    def slow(body):
        gate.wait(3)
        return {"id": "x", "duplicate": False}

    endpoint.default = (202, {}, slow)
    make_event(team, "s1")
    assert _wait(lambda: len(endpoint.requests) == 1)
    threading.Timer(0.3, gate.set).start()
    started = time.monotonic()
    assert courier.close(5) is True
    assert time.monotonic() - started >= 0.2  # it waited for the answer
    assert OutboxEntry.objects.get(event__ce_id="s1").status == "delivered"
    assert courier.wake(peer.pk) is False  # closed: a kick now queues a task


def test_past_max_waiting_a_kick_queues_a_task(team, peer, endpoint):
    full = courier_module.Courier(max_waiting=0)
    dispatch.deliver_locally(full)
    try:
        redis_client().delete(f"kite:kick:{peer.pk}")
        make_event(team, "w1")
        assert _kick_flag(peer)
        time.sleep(0.3)
        assert endpoint.requests == []
    finally:
        dispatch.deliver_locally(None)


def test_an_event_matching_many_peers_wakes_them_in_one_round_trip_and_few_task_messages(team, endpoint):
    """The courier takes what it can; the other peers' kick flags are set together and they go to
    the workers dispatch.TASK_PEERS to a message (not one message per peer before the 202)."""
    import json

    from federation import services, tasks

    peers = [services.peer_create(team=team, name=f"p{n:02d}", peer_hook_url=endpoint.url, outbound_token=SECRET,
                                  scopes=["*"], tls_fingerprint=endpoint.fingerprint).row
             for n in range(25)]  # fmt: skip
    broker = redis_client()
    broker.delete("celery", *[f"kite:kick:{peer.pk}" for peer in peers])
    small = courier_module.Courier(max_waiting=3)
    dispatch.deliver_locally(small)
    try:
        make_event(team, "many")  # its commit wakes them all (flags live 2 s: looked at right away)
        flags = [_kick_flag(peer) for peer in peers]
        # The courier takes three waiting at a time (more in all if its threads pick some up meanwhile).
        taken = [peer.pk for peer, flagged in zip(peers, flags, strict=True) if not flagged]
        to_workers = [peer.pk for peer, flagged in zip(peers, flags, strict=True) if flagged]
        assert len(taken) >= 3 and len(to_workers) >= 10
        assert _wait(lambda: len(endpoint.requests) == len(taken))
    finally:
        small.close(5)
        dispatch.deliver_locally(None)
    messages = [json.loads(raw) for raw in broker.lrange("celery", 0, -1)]
    assert [m["headers"]["task"] for m in messages] == ["federation.tasks.deliver_peers"] * -(-len(to_workers) // 10)
    queued = sorted(peer_id for m in messages for peer_id in _task_args(m)[0][0])
    assert queued == to_workers
    broker.delete("celery")
    assert tasks.deliver_peers(to_workers[:2]) == 2  # what a worker does with one such message
    assert OutboxEntry.objects.filter(peer_id__in=to_workers[:2], status="delivered").count() == 2


def _task_args(message):
    import base64
    import json

    return json.loads(base64.b64decode(message["body"]))


def test_importing_the_asgi_app_installs_no_courier_only_serving_it_does(team, peer, endpoint):
    """Tests and tools import kite.asgi; only a process that serves it (lifespan startup) delivers:
    here a committed event's kick queues a worker's task."""
    import kite.asgi  # noqa: F401

    redis_client().delete(f"kite:kick:{peer.pk}")
    make_event(team, "imported")
    assert _kick_flag(peer)
    time.sleep(0.3)
    assert endpoint.requests == []


def test_an_event_while_a_task_drains_the_peer_is_left_to_that_task(team, peer, endpoint, courier):
    redis_client().set(f"kite:kick:{peer.pk}", 1, ex=30)  # as a worker's draining task holds it
    try:
        make_event(team, "t1")
        time.sleep(0.5)
        assert endpoint.requests == []  # the task's next claim takes it
        assert OutboxEntry.objects.get(event__ce_id="t1").status == "pending"
    finally:
        redis_client().delete(f"kite:kick:{peer.pk}")


def test_an_event_while_the_courier_is_sending_to_the_peer_goes_to_a_task(team, peer, endpoint, courier):
    """Events faster than one drain at a time: the next one queues a worker's task (which claims
    what piled up in one go) rather than waiting for another courier drain."""
    import json

    gate = threading.Event()

    def slow(body):
        gate.wait(5)
        return {"id": "x", "duplicate": False}

    broker = redis_client()
    broker.delete("celery", f"kite:kick:{peer.pk}")
    endpoint.default = (202, {}, slow)
    try:
        make_event(team, "s1")
        assert _wait(lambda: len(endpoint.requests) == 1)  # the courier is sending s1
        make_event(team, "s2")
        assert _kick_flag(peer)
        tasks = [json.loads(raw)["headers"]["task"] for raw in broker.lrange("celery", 0, -1)]
        assert tasks == ["federation.tasks.deliver_peer"]
    finally:
        gate.set()
    # The courier's drain claims again after s1 and finds s2 too (the queued task would find nothing).
    assert _wait(lambda: set(OutboxEntry.objects.values_list("status", flat=True)) == {"delivered"})
    assert sorted(json.loads(body)["id"] for _headers, body in endpoint.requests) == ["s1", "s2"]
    broker.delete("celery")
