"""Kick flags (federation.dispatch): one Redis command sets the flags of every peer an event wakes and
answers which it set — the peers whose task this call queues."""

from federation import dispatch
from kite.ratelimit import redis_client



def _clear(peer_ids):
    redis_client().delete(*[dispatch.kick_key(peer_id) for peer_id in peer_ids],
                          *[dispatch.wake_key(peer_id) for peer_id in peer_ids])  # fmt: skip


def test_first_kicks_answers_the_peers_whose_flag_it_set_in_their_order_and_sets_them_for_two_seconds():
    peer_ids = list(range(900_001, 900_201))  # 200 peers, as one fanned-out event wakes
    _clear(peer_ids)
    held = peer_ids[::7]  # a task for these is queued or draining: their flags are set
    for peer_id in held:
        redis_client().set(dispatch.kick_key(peer_id), 1, ex=dispatch.KICK_FLAG_SECONDS)
    try:
        first = dispatch.first_kicks(peer_ids)
        assert first == [peer_id for peer_id in peer_ids if peer_id not in held]
        ttls = {redis_client().ttl(dispatch.kick_key(peer_id)) for peer_id in peer_ids}
        assert ttls <= {1, 2} and -1 not in ttls, ttls  # every flag expires: a killed task holds nothing for good
        assert dispatch.first_kicks(peer_ids) == []  # all held now
        assert dispatch.first_kick(peer_ids[0]) is False
    finally:
        _clear(peer_ids)


def test_first_kicks_works_after_redis_forgot_its_scripts():
    """A Redis restarted (or SCRIPT FLUSH) no longer has the script: it is sent again."""
    peer_ids = [900_301, 900_302]
    _clear(peer_ids)
    try:
        assert dispatch.first_kicks(peer_ids[:1]) == peer_ids[:1]
        redis_client().script_flush()
        assert dispatch.first_kicks(peer_ids) == peer_ids[1:]
    finally:
        _clear(peer_ids)


def test_a_kick_that_finds_the_flag_set_wakes_the_drain_once_however_many_kicks():
    """The peers whose flag was set already get one element on their wake list (a listening drain
    waits on it), however many kicks arrive; the others' lists stay empty. Each list expires."""
    peer_ids = [900_401, 900_402, 900_403]
    _clear(peer_ids)
    redis_client().set(dispatch.kick_key(peer_ids[1]), 1, ex=dispatch.KICK_FLAG_SECONDS)
    try:
        assert dispatch.first_kicks(peer_ids) == [peer_ids[0], peer_ids[2]]
        for _ in range(5):
            assert dispatch.first_kicks(peer_ids) == []
        assert [redis_client().llen(dispatch.wake_key(peer_id)) for peer_id in peer_ids] == [1, 1, 1]
        assert 0 < redis_client().ttl(dispatch.wake_key(peer_ids[1])) <= dispatch.KICK_FLAG_SECONDS
        assert dispatch.wait_for_wake(dispatch.wake_key(peer_ids[1]), 0.05) is True
        assert dispatch.wait_for_wake(dispatch.wake_key(peer_ids[1]), 0.05) is False  # taken: one wake
        assert dispatch.wait_for_wake(dispatch.wake_key(peer_ids[1]), 0) is False  # 0 never waits (BLPOP's would)
    finally:
        _clear(peer_ids)
