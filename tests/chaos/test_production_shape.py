"""Every fault at once, in the production shape: two instances federated by invitation, each web with
2 uvicorn workers, runkite's Celery worker and beat, A with a second `celery worker` process, on
PostgreSQL and Redis (A's Redis of its own, without persistence), 3,000 Stripe webhooks to A at
60/s. During the load:

     5 s  A's runkite worker SIGKILLed (runkite starts a new one)
    12 s  A's Redis shut down without saving, started again 3 s later (empty)
    22 s  PostgreSQL restarted (`pg_ctl restart -m fast`), under both instances
    28 s  B's web stopped (SIGSTOP) for 20 s: A's deliveries hang, then time out
    38 s  A's web (uvicorn master) SIGKILLed (runkite starts a new one)

Webhooks A did not acknowledge (connection refused, 503) are sent again afterwards, as Stripe
retries. Asserts: every webhook stored exactly once on A and exactly once at B, every outbox entry
delivered (none dead, none twice); every answer A gave was 2xx or JSON {detail, code}, every 5xx
a 503 with Retry-After; A's web answers within 15 s of PostgreSQL being back; deliveries resume
within 30 s of Redis being back; every process alive at the end, and the two killed ones started
again by runkite, which logged it.
"""

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import pytest
import requests

from tests.chaos.procs import alive, runkite_children, web_workers
from tests.chaos.test_broker_restart import broker, instances  # noqa: F401  (fixtures)
from tests.chaos.test_database_restart import restart_postgres
from tests.e2e.harness import REPO, wait_for
from tests.signing import stripe_signature

ACK_LOST = re.compile(r"CRITICAL/MainProcess\] Couldn't ack '[^']*', reason:\S*ConnectionError")

pytestmark = pytest.mark.e2e

RATE, TOTAL = 60, 3000  # 50 s of load
THREADS = 8
WORKER_KILL_AT = 5
REDIS_DOWN_AT, REDIS_DOWN_SECONDS = 12, 3
POSTGRES_RESTART_AT = 22
RECEIVER_STOP_AT, RECEIVER_STOP_SECONDS = 28, 20
SENDER_WEB_KILL_AT = 38
WEB_BACK_SECONDS = 15  # after PostgreSQL is back
RESUME_SECONDS = 30  # after Redis is back


@dataclass
class Answer:
    event_id: str
    at: float
    status: int | None
    body: object = None
    retry_after: str | None = None
    error: str = ""


class StripeLoad:
    """TOTAL Stripe webhooks to A at RATE per second from a few threads; every answer kept."""

    def __init__(self, kite, team_id: str, source: dict):
        self.kite, self.url, self.secret = kite, f"{kite.url}/hooks/{team_id}/{source['name']}", source["secret"]
        self.event_ids = [f"evt_prod_{number}_{secrets.token_hex(3)}" for number in range(TOTAL)]
        self.answers: list[Answer] = []
        self.started = time.monotonic()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(THREADS)]
        for thread in self.threads:
            thread.start()

    def send(self, event_id: str, session) -> Answer:
        body = json.dumps({"id": event_id, "type": "payment_intent.succeeded", "created": int(time.time()),
                           "data": {"object": {"id": f"pi_{event_id}", "amount": 4200}}}).encode()  # fmt: skip
        headers = {"Stripe-Signature": stripe_signature(self.secret, body), "Content-Type": "application/json"}
        try:
            response = session.post(self.url, data=body, headers=headers, verify=str(self.kite.cert), timeout=15)
        except requests.RequestException as exc:
            reason = next((r for r in ("refused", "reset", "RemoteDisconnected", "timed out", "EOF") if r in str(exc)), "")
            answer = Answer(event_id, time.monotonic(), None, error=f"{type(exc).__name__} {reason}".strip())
        else:
            try:
                parsed = response.json()
            except ValueError:
                parsed = response.text[:300]
            answer = Answer(event_id, time.monotonic(), response.status_code, parsed,
                            response.headers.get("Retry-After"))  # fmt: skip
        self.answers.append(answer)
        return answer

    def _run(self, first: int) -> None:
        session = requests.Session()
        for number in range(first, TOTAL, THREADS):
            time.sleep(max(0.0, self.started + number / RATE - time.monotonic()))
            self.send(self.event_ids[number], session)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=TOTAL / RATE + 120)
            assert not thread.is_alive()

    def acknowledged(self) -> set[str]:
        return {a.event_id for a in list(self.answers) if a.status in (200, 202)}

    def retry_unacknowledged(self, within: float) -> None:
        """What a provider does with a refused or unanswered delivery: send it again until acknowledged."""
        deadline = time.monotonic() + within
        sessions = [requests.Session() for _ in range(THREADS)]
        while missing := sorted(set(self.event_ids) - self.acknowledged()):
            assert time.monotonic() < deadline, f"{len(missing)} webhooks still refused; last {self.answers[-3:]}"
            with ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(lambda k: [self.send(e, sessions[k]) for e in missing[k::THREADS]], range(THREADS)))
            time.sleep(0.5)


def ids_by_count(database_url: str, source_name: str) -> Counter:
    """ce_id → how many times it is stored, for the events of the source named `source_name`."""
    with psycopg.connect(database_url) as connection:
        rows = connection.execute("SELECT e.ce_id FROM ingest_event e JOIN ingest_source s ON s.id = e.source_id"
                                  " WHERE s.name = %s", [source_name]).fetchall()  # fmt: skip
    return Counter(row[0] for row in rows)


def received_at(database_url: str, ce_id: str) -> datetime | None:
    with psycopg.connect(database_url) as connection:
        row = connection.execute("SELECT received_at FROM ingest_event WHERE ce_id = %s", [ce_id]).fetchone()
    return row[0] if row else None


def answers_within(kite, seconds: float) -> float:
    """Seconds until A's API answers 200 again (a read that needs the database)."""
    started = time.monotonic()

    def answers() -> bool:
        try:
            return kite.api("GET", "/api/me").status_code == 200
        except requests.RequestException:
            return False

    wait_for(answers, seconds, "A's API to answer after PostgreSQL came back", interval=0.1)
    return time.monotonic() - started


def at(load: StripeLoad, second: float) -> None:
    time.sleep(max(0.0, load.started + second - time.monotonic()))


def test_every_fault_at_once_under_3000_stripe_webhooks_loses_and_duplicates_nothing(broker, instances, tmp_path):  # noqa: F811
    # (broker before instances: A's processes stop before its Redis does)
    a = instances.start("prod-a", extra_env={"REDIS_URL": broker.url})
    b = instances.start("prod-b")
    invited = a.api("POST", "/api/federation/invitations", json={"name": "b", "scopes": ["stripe.*"]})
    assert invited.status_code == 201, invited.text
    accepted = b.api("POST", "/api/federation/invitations/accept",
                     json={"invitation": invited.json()["invitation"], "name": "a"})  # fmt: skip
    assert accepted.status_code == 201, accepted.text
    peer_id = invited.json()["peer_id"]
    wait_for(lambda: a.api("GET", f"/api/federation/peers/{peer_id}").json()["status"] == "active", 20,
             lambda: f"A's peer B active\n{a.log_tail}")  # fmt: skip
    team_id, source = a.team_id(), a.create_source("stripe", "stripe")

    second_worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "kite", "worker", "--concurrency", "2", "--loglevel", "WARNING",
         "--hostname", "second@%h"],
        cwd=REPO, env=a.env(), stdout=open(tmp_path / "second-worker.log", "wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        a_before, b_before = runkite_children(a.process.pid), runkite_children(b.process.pid)
        assert set(a_before) == set(b_before) == {"web", "worker", "beat"}, (a_before, b_before)
        assert len(web_workers(a_before["web"])) == len(web_workers(b_before["web"])) == 2
        load = StripeLoad(a, team_id, source)

        at(load, WORKER_KILL_AT)
        os.kill(a_before["worker"], signal.SIGKILL)  # its pool processes follow (parent-death signal)

        at(load, REDIS_DOWN_AT)
        broker.shutdown_nosave()
        time.sleep(REDIS_DOWN_SECONDS)
        broker.start()
        redis_back, redis_back_wall = time.monotonic(), datetime.now(UTC)

        at(load, POSTGRES_RESTART_AT)
        restart_postgres()
        web_back_in = answers_within(a, WEB_BACK_SECONDS)

        at(load, RECEIVER_STOP_AT)
        receiver_web = [b_before["web"], *web_workers(b_before["web"])]
        for pid in receiver_web:
            os.kill(pid, signal.SIGSTOP)
        try:
            at(load, SENDER_WEB_KILL_AT)
            os.kill(runkite_children(a.process.pid)["web"], signal.SIGKILL)
            at(load, RECEIVER_STOP_AT + RECEIVER_STOP_SECONDS)
        finally:
            for pid in receiver_web:
                os.kill(pid, signal.SIGCONT)

        load.join()
        load.retry_unacknowledged(within=120)
        first_after_redis = next(x.event_id for x in sorted(load.answers, key=lambda x: x.at)
                                 if x.at > redis_back and x.status == 202)  # fmt: skip

        def missing_at_b() -> set[str]:
            return set(load.event_ids) - set(ids_by_count(b.database_url, "kite"))

        wait_for(lambda: not missing_at_b(), 90,
                 lambda: f"{len(missing_at_b())} events to reach B\nA:\n{a.log_tail}\nB:\n{b.log_tail}")  # fmt: skip
        assert second_worker.poll() is None, (tmp_path / "second-worker.log").read_text()[-3000:]
    finally:
        if second_worker.poll() is None:
            second_worker.send_signal(signal.SIGTERM)
        second_worker.wait(timeout=30)

    # Each webhook once on A, once at B; every entry delivered, once, none dead.
    on_a, at_b = ids_by_count(a.database_url, "stripe"), ids_by_count(b.database_url, "kite")
    assert set(on_a) == set(load.event_ids) and max(on_a.values()) == 1, "each webhook stored once on A"
    assert set(at_b) == set(load.event_ids) and max(at_b.values()) == 1, "each event stored once at B"
    with psycopg.connect(a.database_url) as connection:
        statuses = dict(connection.execute(
            "SELECT status, count(*) FROM federation_outboxentry WHERE peer_id = %s GROUP BY status", [peer_id],
        ).fetchall())  # fmt: skip
        twice = connection.execute(
            "SELECT count(*) FROM (SELECT entry_id FROM federation_delivery WHERE peer_id = %s"
            " AND outcome = 'delivered' GROUP BY entry_id HAVING count(*) > 1) AS t", [peer_id],
        ).fetchone()[0]  # fmt: skip
    assert statuses == {"delivered": TOTAL}, statuses
    assert twice == 0, "an entry recorded delivered twice"

    # Every answer A gave: 2xx, or JSON {detail, code}; a 5xx only as 503 with Retry-After.
    answered = [x for x in load.answers if x.status is not None]
    not_json = [x for x in answered if x.status not in (200, 202)
                and not (isinstance(x.body, dict) and x.body.get("detail") and x.body.get("code"))]  # fmt: skip
    assert not_json == [], f"{len(not_json)} error answers not JSON {{detail, code}}: {not_json[:3]}"
    bad_5xx = [x for x in answered if x.status >= 500 and not (x.status == 503 and int(x.retry_after or 0) > 0)]
    assert bad_5xx == [], f"{len(bad_5xx)} 5xx answers other than 503 with Retry-After: {bad_5xx[:3]}"
    refused_4xx = [x for x in answered if 400 <= x.status < 500]
    assert refused_4xx == [], f"{len(refused_4xx)} webhooks refused as bad input: {refused_4xx[:3]}"

    # Timings: A's web back ≤ 15 s after PostgreSQL, deliveries ≤ 30 s after Redis.
    assert web_back_in <= WEB_BACK_SECONDS
    resumed_in = (received_at(b.database_url, first_after_redis) - redis_back_wall).total_seconds()
    assert resumed_in <= RESUME_SECONDS, f"the first webhook after Redis came back reached B {resumed_in:.1f} s later"

    # Every process alive; the two killed ones started again by runkite, which said so; nothing else died.
    a_after, b_after = runkite_children(a.process.pid), runkite_children(b.process.pid)
    assert b_after == b_before, (b_before, b_after)
    assert a_after["beat"] == a_before["beat"], "A's beat died"
    assert a_after["web"] != a_before["web"] and a_after["worker"] != a_before["worker"]
    assert all(alive(pid) for pid in [*a_after.values(), *b_after.values()])
    assert len(web_workers(a_after["web"])) == 2
    log_a = a.log_path.read_text(errors="replace")
    restarts = [line for line in log_a.splitlines() if "restarting it in" in line]
    assert [line.split("kite: ", 1)[1].split(";")[0] for line in restarts] == [
        "worker was killed by SIGKILL", "web was killed by SIGKILL"], restarts  # fmt: skip
    for log in (log_a, b.log_path.read_text(errors="replace"), (tmp_path / "second-worker.log").read_text()):
        # Tracebacks of connections lost and retried are expected; a process giving up is not. kombu
        # logs a task's ack that met the lost broker at CRITICAL and carries on (kombu.message.
        # Message.ack_log_error): the message is delivered again, which the counts above allow for.
        critical = [line for line in log.splitlines() if "CRITICAL" in line and not ACK_LOST.search(line)]
        assert "Unrecoverable error" not in log and critical == [], log[-4000:]

    refused = Counter(x.status or x.error for x in load.answers if x.status not in (200, 202))
    windows = {}
    for x in (x for x in load.answers if x.status not in (200, 202)):
        first, last = windows.get(x.status or x.error, (x.at, x.at))
        windows[x.status or x.error] = (min(first, x.at), max(last, x.at))
    print({kind: f"{first - load.started:.1f}-{last - load.started:.1f} s" for kind, (first, last) in windows.items()})
    print(f"\n{TOTAL} webhooks in {load.answers[-1].at - load.started:.0f} s with retries; not acknowledged at first:"
          f" {dict(refused)}; web back {web_back_in:.1f} s after PostgreSQL; deliveries {resumed_in:.1f} s after"
          f" Redis; {sum(at_b.values())} at B")
