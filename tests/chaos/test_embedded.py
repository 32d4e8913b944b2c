"""The embedded default under load and faults: two `runkite` instances on SQLite, the in-memory
channel layer and the SQLAlchemy (kombu sqla+sqlite) broker, as `make run` starts them (one web
worker), federated by invitation over HTTPS on loopback.

Webhooks flow to A at RATE a second while (a) B's whole process group is stopped and started
again, (b) A's Celery worker is SIGKILLed, (c) A's whole process group is stopped (SIGTERM) and
started again on the same data dir. After each: every webhook A acknowledged (202) is stored
once on A and delivered once to B, A's outbox holds nothing dead, pending or in flight, and each
entry has exactly one `delivered` attempt on record. A webhook refused or unanswered while A is
down is not acknowledged: its provider retries it (counted, not hidden).
"""

import os
import secrets
import signal
import sqlite3
import threading
import time
from collections import Counter

import pytest
import requests

from tests.e2e.conftest import Instances
from tests.e2e.harness import Kite, wait_for

pytestmark = pytest.mark.e2e

RATE = 30  # webhooks a second
FAST = {
    "KITE_WEB_WORKERS": "1",
    "KITE_PROBE_DOWN_SECONDS": "1",  # a peer paused as down is probed every second
    "KITE_HEARTBEAT_SECONDS": "2",
}
DELIVERED_SECONDS = 45  # after the load: everything acknowledged has reached B


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A and B, embedded, peered by invitation (A invites, B accepts); A has a `plain` source."""
    started = Instances(tmp_path_factory)
    try:
        a, b = started.start_together(*((label, {"embedded": True, "extra_env": FAST}) for label in ("emb-a", "emb-b")))
        for kite in (a, b):
            created = kite.api("POST", "/api/federation/certificates", json={"subject": f"kite {kite.instance_id}"})
            assert created.status_code == 201, created.text
        invited = a.api("POST", "/api/federation/invitations", json={"name": "b", "scopes": ["*"]}).json()
        accepted = b.api("POST", "/api/federation/invitations/accept",
                         json={"invitation": invited["invitation"], "name": "a", "scopes": ["*"]})  # fmt: skip
        assert accepted.status_code == 201, accepted.text
        peer_id = invited["peer_id"]
        wait_for(lambda: a.api("GET", f"/api/federation/peers/{peer_id}").json()["status"] == "active", 30,
                 lambda: f"B active on A:\n{a.log_tail}")  # fmt: skip
        a.create_source("plain", "none")
        yield {"a": a, "b": b, "peer_id": peer_id, "team": a.team_id()}
    finally:
        started.close()


class Load:
    """Webhooks to A's `plain` source at RATE a second from a few threads, each with its own
    session; remembers the ids A acknowledged (202) and counts every other outcome."""

    THREADS = 4

    def __init__(self, kite: Kite, team: str, prefix: str):
        self.kite, self.team, self.prefix = kite, team, prefix
        self.acknowledged: list[str] = []
        self.refused: Counter = Counter()
        self.stopping = threading.Event()
        self.started = time.monotonic()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.THREADS)]
        for thread in self.threads:
            thread.start()

    def _run(self, first: int) -> None:
        session = requests.Session()
        number = first
        while not self.stopping.is_set():
            time.sleep(max(0.0, self.started + number / RATE - time.monotonic()))
            event_id = f"{self.prefix}-{number}-{secrets.token_hex(2)}"
            number += self.THREADS
            try:
                response = session.post(f"{self.kite.url}/hooks/{self.team}/plain", verify=str(self.kite.cert),
                                        json={"id": event_id, "type": "com.example.load"}, timeout=10)  # fmt: skip
            except requests.RequestException as exc:
                self.refused[type(exc).__name__] += 1
                session = requests.Session()
                time.sleep(0.2)  # A is down: a provider retries later too
                continue
            if response.status_code == 202:
                self.acknowledged.append(event_id)
            else:
                self.refused[f"{response.status_code} {response.text[:80]}"] += 1

    def stop(self) -> list[str]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)
            assert not thread.is_alive()
        self.seconds = time.monotonic() - self.started
        return self.acknowledged

    def kept_up(self, seconds_down: float = 0.0) -> bool:
        """A acknowledged at least 80 % of RATE for the time it was up."""
        return len(self.acknowledged) >= 0.8 * RATE * (self.seconds - seconds_down)


def stored(kite: Kite, source: str) -> Counter:
    found, after = Counter(), "0-0"
    while True:
        page = kite.api("GET", "/api/events", params={"source": source, "after": after, "limit": 1000}).json()
        if not page["results"]:
            return found
        found.update(event["id"] for event in page["results"])
        after = page["next"]


def outbox_of(kite: Kite, peer_id: int) -> tuple[dict, tuple[int, int]]:
    """A's outbox for the peer straight from its SQLite file (WAL: a reader beside the writer):
    entries by status, and (delivered attempts, distinct entries delivered)."""
    with sqlite3.connect(f"file:{kite.data_dir / 'kite.sqlite3'}?mode=ro", uri=True, timeout=20) as db:
        statuses = dict(db.execute(
            "SELECT status, count(*) FROM federation_outboxentry WHERE peer_id = ? GROUP BY status", [peer_id]
        ).fetchall())  # fmt: skip
        delivered = db.execute(
            "SELECT count(*), count(DISTINCT entry_id) FROM federation_delivery WHERE peer_id = ? AND outcome = ?",
            [peer_id, "delivered"],
        ).fetchone()
    return statuses, delivered


def failed_attempts(kite: Kite, peer_id: int) -> int:
    with sqlite3.connect(f"file:{kite.data_dir / 'kite.sqlite3'}?mode=ro", uri=True, timeout=20) as db:
        return db.execute("SELECT count(*) FROM federation_delivery WHERE peer_id = ? AND outcome != ?",
                          [peer_id, "delivered"]).fetchone()[0]  # fmt: skip


def assert_each_once_and_outbox_drained(pair, acknowledged: list[str]) -> None:
    a, b, peer_id = pair["a"], pair["b"], pair["peer_id"]

    def missing_at_b() -> set[str]:
        return set(acknowledged) - set(stored(b, "kite"))

    wait_for(lambda: not missing_at_b(), DELIVERED_SECONDS, lambda: f"{len(missing_at_b())} of {len(acknowledged)} "
             f"acknowledged events at B; A's outbox {outbox_of(a, peer_id)}\n{a.log_tail}")  # fmt: skip
    wait_for(lambda: set(outbox_of(a, peer_id)[0]) == {"delivered"}, 10, lambda: f"A's outbox {outbox_of(a, peer_id)}")
    on_a, at_b = stored(a, "plain"), stored(b, "kite")
    assert [event_id for event_id in acknowledged if on_a[event_id] != 1] == []  # each stored once on A
    assert [event_id for event_id in acknowledged if at_b[event_id] != 1] == []  # each delivered once to B
    statuses, (attempts, entries) = outbox_of(a, peer_id)
    assert attempts == entries == statuses["delivered"], (statuses, attempts, entries)  # none delivered twice


def group_processes(kite: Kite) -> dict[int, str]:
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(entry)) == kite.process.pid:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    found[int(entry)] = cmdline.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def test_a_peer_outage_under_load_delivers_everything_once_nothing_dead(pair):
    a, b = pair["a"], pair["b"]
    failed_before = failed_attempts(a, pair["peer_id"])
    load = Load(a, pair["team"], "outage")
    time.sleep(3)
    assert b.stop(signal.SIGTERM) == 0
    time.sleep(6)  # A takes webhooks and queues them; its deliveries fail, then it pauses B as down
    b.start()
    time.sleep(3)
    acknowledged = load.stop()

    assert load.kept_up() and not load.refused, (len(acknowledged), load.seconds, load.refused)
    assert failed_attempts(a, pair["peer_id"]) > failed_before  # the outage was felt
    assert_each_once_and_outbox_drained(pair, acknowledged)


def test_a_celery_worker_killed_under_load_has_its_work_recovered(pair):
    a = pair["a"]
    load = Load(a, pair["team"], "worker-kill")
    time.sleep(3)
    workers = [pid for pid, argv in group_processes(a).items() if "celery" in argv and " worker " in argv]
    assert workers, group_processes(a)
    wait_for(lambda: outbox_of(a, pair["peer_id"])[0].get("in_flight"), 10, "entries in flight", interval=0.005)
    for pid in workers:  # mid-delivery, the worker and its pool processes, as the OOM killer takes them
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: [pid for pid, argv in group_processes(a).items() if "celery" in argv and " worker " in argv
                      and pid not in workers], 15, lambda: f"runkite to start a new worker\n{a.log_tail}")  # fmt: skip
    time.sleep(4)
    acknowledged = load.stop()

    assert load.kept_up() and not load.refused, (len(acknowledged), load.seconds, load.refused)
    assert_each_once_and_outbox_drained(pair, acknowledged)


def pool_processes(kite: Kite) -> list[int]:
    """The prefork pool processes of runkite's Celery worker."""
    workers = {pid for pid, argv in group_processes(kite).items() if "celery" in argv and " worker " in argv}
    return [pid for pid in workers if parent_of(pid) in workers]


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def ignores_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        mask = next(int(line.split()[1], 16) for line in status if line.startswith("SigIgn:"))
    return bool(mask & 1 << (signal.SIGTERM - 1))


def test_a_restart_of_the_whole_instance_under_load_loses_and_duplicates_nothing(pair):
    a = pair["a"]
    # The group's SIGTERM reaches the pool processes too: one that died writing a result used to
    # hang the worker's shutdown until runkite killed it (and `stop` fails on "did not stop").
    pool = pool_processes(a)
    assert pool and all(ignores_sigterm(pid) for pid in pool), pool
    load = Load(a, pair["team"], "restart")
    time.sleep(3)
    down_at = time.monotonic()
    assert a.stop(signal.SIGTERM) == 0  # within 12 s, no process killed (runkite's log says so otherwise)
    a.start()
    down_for = time.monotonic() - down_at
    time.sleep(3)
    acknowledged = load.stop()

    assert len(acknowledged) >= RATE * 3, (len(acknowledged), load.seconds, down_for, load.refused)
    assert_each_once_and_outbox_drained(pair, acknowledged)
    print(f"\nrestart: {len(acknowledged)} acknowledged; refused or unanswered while A was down: {dict(load.refused)}")


def test_the_embedded_broker_keeps_only_recent_messages(pair):
    """kombu's SQLAlchemy transport keeps every message it handed out; beat has A's worker purge them
    every 30 s (kite.broker), so after this module's minutes of load most are gone."""
    path = pair["a"].data_dir / "celery-broker.sqlite3"

    def kept_and_sent() -> tuple[int, int]:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=20) as db:
            kept = db.execute("SELECT count(*) FROM kombu_message").fetchone()[0]
            sent = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'kombu_message'").fetchone()[0]
        return kept, sent

    wait_for(lambda: kept_and_sent()[0] < kept_and_sent()[1] / 3, 35, lambda: f"(kept, sent) {kept_and_sent()}")
