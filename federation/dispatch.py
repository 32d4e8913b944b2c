"""Waking delivery (docs/architecture.md "The outbox": kicks and the sweeper): after an event's commit its peers are kicked —
this web process's courier first (federation.courier), else a worker's task — and a kick flag in
Redis keeps a peer from being kicked again while a task for it is queued or draining. Also the
early heartbeat of a new peering (enrol_soon). Rows first, tasks second: a lost kick costs the
sweeper's second, nothing more."""

import functools
import logging

from django.conf import settings

from kite import ratelimit

log = logging.getLogger(__name__)
KICK_FLAG_SECONDS = 2  # a killed task's flag holds back kicks (and the sweeper's) this long at most
FLAG_REFRESH_SECONDS = 0.5  # a live drain's flag is set again this often (by the keeper thread)
TASK_PEERS = 10  # peers per task when one event wakes many at once (its kick flags last 2 s)

_local = None  # a web process's courier (federation.courier): delivers what this process just stored


def _tasks():
    from federation import tasks  # tasks sits above dispatch: its tasks run the drains that dispatch queues

    return tasks


def deliver_locally(courier) -> None:
    """From now on this process's kicks wake `courier` (federation.courier) first."""
    global _local
    _local = courier


def kick(peer_id: int) -> None:
    """After commit: deliver the peer's due entries soon — by this web process's courier when
    it takes the peer (no task is draining it and its courier is not sending already), else by
    a worker's task."""
    if _local is not None and not _task_draining([peer_id])[0] and _local.wake(peer_id):
        return
    queue_task(peer_id)


def _task_draining(peer_ids: list[int]) -> list[bool]:
    """Whether a worker's task holds each peer's kick flag (is queued or draining): then it takes
    the new entries at its next claim, and the courier stays out of its way."""
    if not settings.REDIS_URL:
        return [False] * len(peer_ids)
    try:
        pipe = ratelimit.redis_client().pipeline(transaction=False)
        for peer_id in peer_ids:
            pipe.exists(kick_key(peer_id))
        return [bool(held) for held in pipe.execute()]
    except Exception:
        return [False] * len(peer_ids)


def kick_all(peer_ids: list[int]) -> None:
    """After an event's commit: `kick` for each of its peers, in fewer round trips — the courier
    takes what it can, the others' kick flags are set in one Redis round trip and they go to the
    workers TASK_PEERS to a task. An event matching 200 peers was 200 Redis round trips and 200
    task messages before its 202 (~0.65 s)."""
    if _local is None:
        rest = list(peer_ids)
    else:
        draining = _task_draining(peer_ids)
        rest = [peer_id for peer_id, busy in zip(peer_ids, draining, strict=True) if busy or not _local.wake(peer_id)]
    if len(rest) <= 1:
        for peer_id in rest:
            queue_task(peer_id)
        return
    tasks = _tasks()

    if settings.REDIS_URL:
        rest = first_kicks(rest)
    for start in range(0, len(rest), TASK_PEERS):
        chunk = rest[start : start + TASK_PEERS]
        try:
            tasks.deliver_peers.delay(chunk)
        except Exception:  # the broker is down: the sweeper will find the entries
            log.warning("could not queue delivery for peers %s; the sweeper will retry", chunk, exc_info=True)


# SET NX EX of every flag (the first half of KEYS), answering the (1-based) positions of those it
# set: one command for the whole fan-out. A pipeline of 200 SETs cost the web process 2.2 ms of CPU
# to pack and parse, the script 0.6 ms (same process, same Redis, medians of 60). A flag that was
# set already belongs to a queued or draining task: its wake list (the second half of KEYS) gets
# one element, which a draining task waits on when it has nothing to do (federation.outbox._drain's
# `listen`: it claims the new entry the moment it is woken).
FIRST_KICKS_LUA = """
local first = {}
local n = #KEYS / 2
for i = 1, n do
  if redis.call('SET', KEYS[i], 1, 'NX', 'EX', ARGV[1]) then
    first[#first + 1] = i
  else
    redis.call('RPUSH', KEYS[n + i], 1)
    redis.call('LTRIM', KEYS[n + i], -1, -1)
    redis.call('EXPIRE', KEYS[n + i], ARGV[1])
  end
end
return first
"""


@functools.lru_cache(maxsize=4)
def _first_kicks_script(client):
    return client.register_script(FIRST_KICKS_LUA)  # redis-py's Script: EVALSHA, EVAL when not loaded


def first_kicks(peer_ids: list[int]) -> list[int]:
    """`first_kick` for many peers in one round trip: those whose flag this call set."""
    try:
        keys = [kick_key(peer_id) for peer_id in peer_ids] + [wake_key(peer_id) for peer_id in peer_ids]
        positions = _first_kicks_script(ratelimit.redis_client())(keys=keys, args=[KICK_FLAG_SECONDS])
        return [peer_ids[position - 1] for position in positions]
    except Exception:
        return peer_ids


def queue_task(peer_id: int) -> None:
    """A worker's task for the peer, unless one holds its kick flag already."""
    tasks = _tasks()

    if settings.REDIS_URL and not first_kick(peer_id):
        return
    try:
        tasks.deliver_peer.delay(peer_id)
    except Exception:  # the broker is down: the sweeper will find the entry
        log.warning("could not queue delivery for peer %s; the sweeper will retry", peer_id, exc_info=True)


def kick_key(peer_id: int) -> str:
    return f"kite:kick:{peer_id}"


def wake_key(peer_id: int) -> str:
    """A list a draining task waits on: a kick while its flag is held pushes to it (at most one
    element: a wake says "look again", not how often)."""
    return f"kite:wake:{peer_id}"


def wait_for_wake(key: str, timeout: float) -> bool:
    """Wait up to `timeout` s for a wake on `key` (True), taking it; False on timeout. Raises
    if Redis cannot be asked (the caller then waits on its calls alone)."""
    if timeout <= 0:
        return False  # (BLPOP's 0 waits for ever)
    return ratelimit.redis_client().blpop([key], timeout=timeout) is not None


def first_kick(peer_id: int) -> bool:
    """Coalesce kicks: while a task for the peer is queued or draining, the flag is set and a
    kick queues nothing; the draining task picks the new entries up at its next claim."""
    return bool(first_kicks([peer_id]))


def set_flag(key: str) -> None:
    """A long drain keeps its flag alive (else a second task would start draining alongside)."""
    if settings.REDIS_URL:
        try:
            ratelimit.redis_client().set(key, 1, ex=KICK_FLAG_SECONDS)
        except Exception:
            pass


def clear_flag(key: str) -> None:
    if settings.REDIS_URL:
        try:
            ratelimit.redis_client().delete(key)
        except Exception:
            pass


def helper_key(peer_id: int) -> str:
    return f"kite:kick-helper:{peer_id}"


def call_helper(peer_id: int) -> None:
    """A backlog: one helper task drains alongside the kicked one (its own flag, no kick protocol)."""
    tasks = _tasks()

    if not settings.REDIS_URL:
        return  # embedded: one worker process, nobody to help
    try:
        if ratelimit.redis_client().set(helper_key(peer_id), 1, nx=True, ex=KICK_FLAG_SECONDS):
            tasks.deliver_peer.delay(peer_id, helper=True)
    except Exception:
        log.warning("could not queue a helper delivery for peer %s", peer_id, exc_info=True)


def enrol_soon(peer_id: int) -> None:
    """Ping at once instead of at the next heartbeat: enrolled (and active) within seconds."""
    tasks = _tasks()

    try:
        tasks.heartbeat_peer.delay(peer_id)
    except Exception:  # the broker is down: the regular heartbeat will do it
        pass
