"""A web process delivers what it has just stored: no queue, no worker between the commit and the call.

An event's outbox entries are committed with it; the commit then wakes this process's courier
(dispatch.kick), whose threads claim the peer's due entries and send them exactly as a worker's task
does — same claim (SKIP LOCKED), same leases renewed by the keeper thread, same outcome records —
so nothing about at-least-once changes: an entry a dying web process held comes back when its lease
ends and the sweeper hands it to a worker. What the courier saves is the hop through the broker and
a worker's task start (a Redis round trip, the worker's dispatch, a task that reads the peer again):
the larger part of the time from an event's 202 to its call when the peer is keeping up.

It is the fast path for a peer that keeps up, and steps aside when events come faster than that:
a peer whose courier drain is already sending, or whose worker task is draining (its kick flag is
set), goes to the workers' tasks as before — one drain that claims what piled up meanwhile in one
batch beats a drain per event in the web process, where calls share the interpreter with requests
(bench/RESULTS.md: at 200 events/s a courier taking every event doubled p99). A few threads per
process (THREADS) serve the peers woken; more peers waiting than MAX_WAITING, or a claim that comes
back full (a backlog), go to the workers too, so a web process never spends itself draining what
piled up while a peer was away. Embedded (SQLite) and worker processes have no courier: every kick
there is a task.
"""

import collections
import logging
import threading

from django.conf import settings
from django.db import connections

from federation import dispatch, outbox

log = logging.getLogger(__name__)

THREADS = 2  # peers delivered to at the same time by one web process
MAX_WAITING = 16  # peers woken and not yet served; past this a kick queues a worker's task
IDLE_SECONDS = 5.0  # a thread with nothing to do this long closes its database connection


class Courier:
    def __init__(self, threads: int = THREADS, max_waiting: int = MAX_WAITING):
        self.threads, self.max_waiting = threads, max_waiting
        self.changed = threading.Condition()
        self.waiting: collections.deque[int] = collections.deque()
        self.state: dict[int, str] = {}  # peer id → "waiting" | "sending"
        self.views: dict[int, outbox.PeerView] = {}
        self.started = 0
        self.closing = False

    def wake(self, peer_id: int) -> bool:
        """Take the peer's due entries (True), or leave them to a worker's task (False)."""
        with self.changed:
            if self.closing:
                return False
            state = self.state.get(peer_id)
            if state == "waiting":
                return True  # its drain has not claimed yet: it will take this event too
            if state is not None or len(self.waiting) >= self.max_waiting:
                return False  # sending already: events are coming faster than one drain at a time, a task's turn
            self.state[peer_id] = "waiting"
            self.waiting.append(peer_id)
            if self.started < self.threads:
                self.started += 1
                threading.Thread(target=self._run, name=f"courier-{self.started}", daemon=True).start()
            self.changed.notify()
            return True

    def _run(self) -> None:
        while True:
            with self.changed:
                if not self.waiting and not self.changed.wait_for(lambda: self.waiting, timeout=IDLE_SECONDS):
                    connections.close_all()  # this thread's own
                    self.changed.wait_for(lambda: self.waiting)
                peer_id = self.waiting.popleft()
                self.state[peer_id] = "sending"
                view = self.views.setdefault(peer_id, outbox.PeerView(peer_id))
            try:
                self._deliver(view)
            except Exception:  # the database is away, say: the sweeper hands what is due to a worker
                log.warning("courier: delivery to peer %s failed; a worker will retry", peer_id, exc_info=True)
                view.forget()
                connections.close_all()
            with self.changed:
                del self.state[peer_id]
                self.changed.notify_all()  # close() waits for the state to empty

    def close(self, timeout: float) -> bool:
        """Take no more peers and wait up to `timeout` s for the calls out to finish (a web process
        stopping: what it would leave in flight would wait for its lease to end). True if none is left."""
        with self.changed:
            self.closing = True
            self.waiting.clear()
            for peer_id, state in list(self.state.items()):
                if state == "waiting":
                    del self.state[peer_id]
            return self.changed.wait_for(lambda: not self.state, timeout=timeout)

    @staticmethod
    def _deliver(view: outbox.PeerView) -> int:
        view.forget()  # each wake reads the peer row and its target afresh, as a task does: a pause,
        # a new secret or a new certificate applies to the next event
        return outbox.deliver_fresh(view)


def install() -> Courier | None:
    """In a web process (kite.asgi), on PostgreSQL: kicks go to this process's courier."""
    if not settings.IS_POSTGRES or not settings.KITE_WEB_DELIVERY:
        return None
    courier = Courier()
    dispatch.deliver_locally(courier)
    return courier
