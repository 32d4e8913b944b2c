"""Waking delivery (docs/architecture.md "The outbox": kicks and the sweeper): after an event's commit its peers are kicked —
this web process's courier first (federation.courier), else a worker's task — and a kick flag in
Redis keeps a peer from being kicked again while a task for it is queued or draining. Also the
early heartbeat of a new peering (enrol_soon). Rows first, tasks second: a lost kick costs the
sweeper's second, nothing more."""

import contextlib
import functools
import logging
import os
import threading
import time

from django.conf import settings

from kite import ratelimit

log = logging.getLogger(__name__)
KICK_FLAG_SECONDS = 2  # a killed task's flag holds back kicks (and the sweeper's) this long at most
FLAG_REFRESH_SECONDS = 0.5  # a live drain's flag is set again this often (by the keeper thread)
TASK_PEERS = 10  # peers per task when one event wakes many at once (its kick flags last 2 s)
WAKE_PREFIX = "kite:wake:"  # + peer id: the pub/sub channel a kick publishes on when a task holds the flag

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


# SET NX EX of every key, answering the (1-based) positions of those it set: one command for the
# whole fan-out. A pipeline of 200 SETs cost the web process 2.2 ms of CPU to pack and parse, the
# script 0.6 ms (same process, same Redis, medians of 60).
# A key already set means a task holds the peer's flag: its drain is queued or draining, and the
# script publishes a wake on the peer's channel (ARGV[i + 1]) so a drain waiting on a call or
# lingering claims at once instead of after its call (in the same round trip; see `Wakes`).
FIRST_KICKS_LUA = """
local first = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, 1, 'NX', 'EX', ARGV[1]) then first[#first + 1] = i
  else redis.call('PUBLISH', ARGV[i + 1], 1) end
end
return first
"""


@functools.lru_cache(maxsize=4)
def _first_kicks_script(client):
    return client.register_script(FIRST_KICKS_LUA)  # redis-py's Script: EVALSHA, EVAL when not loaded


def first_kicks(peer_ids: list[int]) -> list[int]:
    """`first_kick` for many peers in one round trip: those whose flag this call set."""
    try:
        keys = [kick_key(peer_id) for peer_id in peer_ids]
        channels = [wake_channel(peer_id) for peer_id in peer_ids]
        positions = _first_kicks_script(ratelimit.redis_client())(keys=keys, args=[KICK_FLAG_SECONDS, *channels])
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


def wake_channel(peer_id: int) -> str:
    return f"{WAKE_PREFIX}{peer_id}"


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


class Wakes:
    """Per process: a thread subscribed to the peers' wake channels that stirs the drains of this
    process waiting on them. A kick that finds a peer's flag held publishes a wake (FIRST_KICKS_LUA);
    the drain then claims the new entries at once, while its call is still out or while it lingers,
    rather than after its call has come back. A wake is only a hint: a drain claims again after
    every call and before it lets go of its flag, so a wake lost (Redis away, the thread
    reconnecting) costs that call's time, never an entry. Started with the first drain that
    listens; no Redis (embedded), no thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.listeners: dict[int, set] = {}  # peer id → drains (with .wake())
        self.started = False

    @contextlib.contextmanager
    def listening(self, peer_id: int, drain):
        if not settings.REDIS_URL:
            yield
            return
        with self.lock:
            if not self.started:
                threading.Thread(target=self._run, name="outbox-wakes", daemon=True).start()
                self.started = True
            self.listeners.setdefault(peer_id, set()).add(drain)
        try:
            yield
        finally:
            with self.lock:
                drains = self.listeners.get(peer_id, set())
                drains.discard(drain)
                if not drains:
                    self.listeners.pop(peer_id, None)

    def deliver(self, channel: bytes) -> None:
        try:
            peer_id = int(channel.rsplit(b":", 1)[1])
        except (ValueError, IndexError):
            return
        with self.lock:
            drains = list(self.listeners.get(peer_id, ()))
        for drain in drains:
            drain.wake()

    def _run(self) -> None:
        import redis

        while True:
            pubsub = None
            try:
                client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=None, socket_connect_timeout=1,
                                              health_check_interval=30)  # fmt: skip
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(f"{WAKE_PREFIX}*")
                while True:
                    message = pubsub.get_message(timeout=30)
                    if message and message["type"] == "pmessage":
                        self.deliver(message["channel"])
            except Exception:  # Redis away: wakes are hints, drains go on without them
                log.debug("outbox wakes: reconnecting", exc_info=True)
                time.sleep(1)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass


wakes = Wakes()
os.register_at_fork(after_in_child=wakes.__init__)  # a forked worker subscribes in its own thread
