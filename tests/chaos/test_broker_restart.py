"""Redis restarted without persistence under load, in the production shape: instance A (web with 2
uvicorn workers, runkite's Celery worker, a second `celery worker` process, beat) on a Redis of its own,
federated to B, Stripe webhooks at 60/s. Before kite/celery_fixes.py a sending worker holding unacked
messages died for good (AttributeError 'hostname', exit 1) in every run.

Asserts: every worker and beat process alive at the end with the pid it had before (nothing crashed,
nothing was restarted), deliveries resume within 30 s of Redis coming back, every acknowledged webhook
stored once on A and delivered once to B, no dead entry."""

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
import requests

from tests.chaos.servers import RedisServer
from tests.e2e.conftest import Instances
from tests.e2e.harness import REPO, Kite, wait_for

pytestmark = pytest.mark.e2e

RATE = 60  # webhooks per second
LOAD_SECONDS = 24
OUTAGE_AT, OUTAGE_SECONDS = 8, 3  # Redis shut down 8 s into the load, started again 3 s later
RESUME_SECONDS = 30


@pytest.fixture
def broker(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def instances(tmp_path_factory):
    started = Instances(tmp_path_factory)
    try:
        yield started
    finally:
        started.close()


def federate(sender: Kite, receiver: Kite) -> int:
    """The by-hand flow: the receiver's token, the sender's peer with it, the receiver trusting the sender."""
    token = receiver.api("POST", "/api/federation/tokens", json={"label": "chaos"}).json()["token"]
    identity = receiver.api("GET", "/api/federation/identity").json()
    created = sender.api("POST", "/api/federation/peers", json={
        "name": "b", "peer_hook_url": identity["hook_url"], "tls_fingerprint": identity["tls_fingerprint"],
        "scopes": ["stripe.*"], "outbound_token": token,
    })  # fmt: skip
    assert created.status_code == 201, created.text
    trusted = receiver.api("POST", "/api/federation/trusted-senders", json={"name": "a", "inbound_token": token})
    assert trusted.status_code == 201, trusted.text
    return created.json()["id"]


def stored_ids(kite: Kite, source: str) -> list[str]:
    found, after = [], "0-0"
    while True:
        page = kite.api("GET", "/api/events", params={"source": source, "after": after, "limit": 1000}).json()
        if not page["results"]:
            return found
        found += [event["id"] for event in page["results"]]
        after = page["next"]


def celery_children(pid: int) -> dict[str, int]:
    """runkite's Celery children by role (worker, beat): their pids."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"celery" in argv:
            found[next(role for role in ("worker", "beat") if role.encode() in argv)] = int(entry.name)
    return found


class Load:
    """Stripe webhooks to A at RATE per second, from a few threads (one HTTPS round trip takes longer than
    1/RATE s on a busy machine); remembers what A acknowledged (202) and when."""

    THREADS = 8

    def __init__(self, kite: Kite, team_id: str, source: dict):
        self.kite, self.team_id, self.source = kite, team_id, source
        self.acknowledged: list[tuple[float, str]] = []
        self.refused: Counter = Counter()
        self.started = time.monotonic()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.THREADS)]
        for thread in self.threads:
            thread.start()

    def _run(self, first: int) -> None:
        session = requests.Session()
        for number in range(first, RATE * LOAD_SECONDS, self.THREADS):
            time.sleep(max(0.0, self.started + number / RATE - time.monotonic()))
            event_id = f"evt_chaos_{number}_{secrets.token_hex(3)}"
            try:
                response = self.kite.post_stripe(self.team_id, self.source, event_id, session=session)
            except requests.RequestException as exc:
                self.refused[type(exc).__name__] += 1
                continue
            if response.status_code == 202:
                self.acknowledged.append((time.monotonic(), event_id))
            else:
                self.refused[f"{response.status_code} {response.text[:120]}"] += 1

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=LOAD_SECONDS + 60)
            assert not thread.is_alive()
        self.acknowledged.sort()


def test_workers_survive_a_redis_restart_under_load_and_every_acknowledged_webhook_is_delivered_once(
    instances, broker, tmp_path
):
    a = instances.start("chaos-a", extra_env={"REDIS_URL": broker.url})
    b = instances.start("chaos-b")
    peer_id = federate(a, b)
    team_id, source = a.team_id(), a.create_source("stripe", "stripe")
    liveness = tmp_path / "second-worker.alive"
    second_worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "kite", "worker", "--concurrency", "2", "--loglevel", "WARNING",
         "--hostname", "second@%h", "--liveness-file", str(liveness)],
        cwd=REPO, env=a.env(), stdout=open(tmp_path / "second-worker.log", "wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        warm = f"evt_warm_{secrets.token_hex(3)}"
        assert a.post_stripe(team_id, source, warm).status_code == 202
        wait_for(lambda: warm in stored_ids(b, "kite"), 30, lambda: f"a first delivery; A:\n{a.log_tail}")
        wait_for(liveness.exists, 30, "the second worker to consume")
        before = celery_children(a.process.pid)
        assert set(before) == {"worker", "beat"}, before

        load = Load(a, team_id, source)
        time.sleep(OUTAGE_AT)
        broker.shutdown_nosave()  # queued kicks, unacked messages, kick flags, cache: all gone
        time.sleep(OUTAGE_SECONDS)
        broker.start()
        back_at, back_wall = time.monotonic(), time.time()
        load.join()

        first_after = next(event_id for at, event_id in load.acknowledged if at > back_at)
        wait_for(lambda: first_after in stored_ids(b, "kite"), RESUME_SECONDS - (time.monotonic() - back_at),
                 lambda: f"deliveries to resume after Redis came back; A:\n{a.log_tail}")  # fmt: skip
        acknowledged = [event_id for _, event_id in load.acknowledged] + [warm]

        def missing_at_b() -> set[str]:
            return set(acknowledged) - set(stored_ids(b, "kite"))

        wait_for(lambda: not missing_at_b(), 60, lambda: f"{len(missing_at_b())} events to reach B; A:\n{a.log_tail}")

        # Nothing died: the same worker and beat processes, no restart by runkite, none unrecoverable.
        assert celery_children(a.process.pid) == before
        assert second_worker.poll() is None
        assert liveness.stat().st_mtime > back_wall  # and it consumes again (touched only while connected)
        assert (a.data_dir / "celerybeat-schedule.alive").stat().st_mtime > back_wall
        second_log = (tmp_path / "second-worker.log").read_text(errors="replace")
        for log in (a.log_tail, second_log):
            assert "Unrecoverable error" not in log and "restarting it in" not in log, log[-3000:]
    finally:
        if second_worker.poll() is None:
            second_worker.send_signal(signal.SIGTERM)
        second_returncode = second_worker.wait(timeout=30)
    assert second_returncode == 0

    # Once on A, once at B, nothing dead. Webhooks A refused while Redis was away are not acknowledged:
    # their senders retry (Stripe does); refusals are counted for the report, not hidden.
    assert len(acknowledged) >= RATE * (LOAD_SECONDS - OUTAGE_SECONDS - 2), load.refused
    on_a = Counter(stored_ids(a, "stripe"))
    assert set(acknowledged) <= set(on_a) and max(on_a.values()) == 1
    at_b = Counter(event_id for event_id in stored_ids(b, "kite") if event_id in set(acknowledged))
    assert set(at_b) == set(acknowledged) and max(at_b.values()) == 1
    database_a = next(database for kite, database, _ in instances.started if kite is a)
    with psycopg.connect(database_a.url) as connection:
        statuses = dict(connection.execute(
            "SELECT status, count(*) FROM federation_outboxentry WHERE peer_id = %s GROUP BY status", [peer_id],
        ).fetchall())  # fmt: skip
        sends = connection.execute(
            "SELECT count(*), count(DISTINCT entry_id) FROM federation_delivery WHERE peer_id = %s"
            " AND outcome = 'delivered'", [peer_id],
        ).fetchone()  # fmt: skip
    assert statuses == {"delivered": len(acknowledged)}, statuses  # none pending, in flight or dead
    assert sends == (len(acknowledged), len(acknowledged))  # each entry sent and accepted exactly once
    took = load.acknowledged[-1][0] - load.started
    print(f"\nchaos: {len(acknowledged)} acknowledged in {took:.1f} s, refused: {dict(load.refused)}")
