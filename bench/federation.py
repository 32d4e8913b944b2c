#!/usr/bin/env python3
"""Federation benchmark: two real Kite instances, A → B, PostgreSQL + Redis.

Starts its own PostgreSQL + Redis (scripts/services.sh, on ports of its own),
two fresh databases and two Redis database numbers, and two instances A and B
with `manage.py runkite` (uvicorn + Celery worker + Celery beat, TLS on, each
in its own process group). A gets a `none` source to post to; A → B is
federated the getting-started way (B generates the token, A adds B as a peer
with scopes ["*"] and B's pinned TLS fingerprint, B trusts A). Then:

1. latency: an open-loop generator posts to A at a fixed rate (default 200/s,
   20 s per round); a WebSocket client on B (`/ws/events?source=kite`) stamps
   each event as it arrives; latency = B's arrival − A's 202. Baseline in the
   same run: the same generator posting to B's own `none` source, stamped by
   the same kind of WebSocket on B (B's ingest → listener path alone).
2. throughput: N entries queued at A while nothing is due, then released;
   time until B has stored all N. Unbatched (A's peer row batch_max = NULL,
   one event per POST) and batched (batch_max = 500, what B's ping
   advertises), rounds alternating; ratio batched/unbatched per round.
3. catch-up: B stopped; events posted to A until A marks B `down` (queue
   paused), the rest of 10,000 entries queued; B started again; time from B
   answering /healthz to all 10,000 stored at B.
4. memory: 100,000 entries queued, drained batched; RSS of A's Celery worker
   processes sampled every second.

Backlogs (2-4) are written into A's database with SQL (one INSERT … SELECT of
events + outbox entries, copied from a real event and entry A made through
its API) so that setting up 100,000 entries takes seconds, not minutes.
Results (medians over rounds, the exact command, machine facts) are printed
and written into bench/RESULTS.md between the `bench:federation` markers.

    .venv/bin/python bench/federation.py --wait-quiet 1500           # the recorded run
    .venv/bin/python bench/federation.py --quick --no-write          # trial (~2 min)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import requests
import websockets

import common

ROOT = common.ROOT
RESULTS = common.RESULTS
SECTION = "federation"
SOURCE = "plain"
PEER_NAME = "b"
BATCH_MAX = 500  # what B's ping advertises (federation.contract.BATCH_CAP)
BELOW_EPHEMERAL = "below the ephemeral port range (32768+)"
_SCRUBBED = ("DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR", "SECRET_KEY", "DJANGO_SETTINGS_MODULE")


log = common.logger("fedbench")
med, pct = common.med, common.pct


def payload(event_id: str, event_type: str) -> bytes:
    """~0.6 kB JSON body: what a `none` source turns into the CloudEvent's data."""
    body = {
        "id": event_id,
        "type": event_type,
        "object": "order",
        "created": int(time.time()),
        "customer": {"id": "cus_QaBcDeFgHiJkLm", "email": "buyer@example.com", "name": "Ada Lovelace"},
        "items": [{"sku": f"sku-{i}", "quantity": i + 1, "unit_amount": 1250 + i} for i in range(4)],
        "shipping": {"city": "Berlin", "country": "DE", "line1": "Unter den Linden 1", "postal_code": "10117"},
        "metadata": {"team": "bench", "channel": "web", "campaign": "federation-benchmark"},
        "total": 5000,
        "currency": "eur",
    }
    return json.dumps(body, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- processes


class Instance:
    """One `manage.py runkite` with its own data dir, database, Redis db number and port."""

    def __init__(self, args, label: str, port: int, services: "Services", redis_db: int, extra_env: dict):
        self.args, self.label, self.port, self.services = args, label, port, services
        self.instance_id = f"fedbench-{label}-{secrets.token_hex(3)}"
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"kite-fedbench-{label}-"))
        self.db_name = f"kite_fedbench_{label}"
        self.database_url = f"postgres://postgres@127.0.0.1:{services.pg_port}/{self.db_name}"
        self.process: subprocess.Popen | None = None
        self.starts = 0
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith("KITE_")}
        env.update(
            KITE_DATA_DIR=str(self.data_dir),
            KITE_PORT=str(port),
            KITE_INSTANCE_ID=self.instance_id,
            KITE_TLS="on",
            KITE_PEER_ALLOWED_NETWORKS="127.0.0.0/8,::1/128",
            DATABASE_URL=self.database_url,
            REDIS_URL=f"redis://127.0.0.1:{services.redis_port}/{redis_db}",
            KITE_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
            **extra_env,
        )
        for item in args.env:
            key, _, value = item.partition("=")
            env[key] = value
        self.env = env
        self.db: psycopg.Connection | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def cert(self) -> str:
        return str(self.data_dir / "tls" / "cert.pem")

    def create_database(self) -> None:
        self.services.fresh_database(self.db_name)

    def start(self) -> float:
        """Start runkite; returns the time.time() at which /healthz first answered 200."""
        self.starts += 1
        self.log_path = self.data_dir / f"runkite-{self.starts}.log"
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "runkite"], cwd=ROOT, env=self.env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        healthy_at = common.wait_healthy(f"{self.label}: runkite", f"{self.url}/healthz", self.process, timeout=90,
                                         interval=0.05, log_tail=self.log_tail, verify=self.cert)  # fmt: skip
        if self.db is None:
            self.db = psycopg.connect(self.database_url, autocommit=True)
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {self.admin_key}"
        return healthy_at

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except (OSError, AttributeError):
            return ""

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin-api-key").read_text().strip()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        common.stop_process(process)  # runkite stops web, worker and beat
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.session.request(method, self.url + path, timeout=30, verify=self.cert, **kwargs)

    def sql(self, query: str, params=()) -> list[tuple]:
        cursor = self.db.execute(query, params)
        return cursor.fetchall() if cursor.description else []

    def one(self, query: str, params=()):
        rows = self.sql(query, params)
        return rows[0][0] if rows and len(rows[0]) == 1 else (rows[0] if rows else None)

    def worker_pids(self) -> list[int]:
        """The Celery worker's processes (main + prefork children), not beat."""
        if self.process is None:
            return []
        pids = common.descendants(self.process.pid)
        return sorted(p for p in pids if " worker " in f" {common.cmdline(p)} " and "celery" in common.cmdline(p))

    def close(self) -> None:
        self.stop()
        if self.db is not None:
            self.db.close()
        if not self.args.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------- setup


class Services(common.Services):
    """One PostgreSQL + Redis pair started by scripts/services.sh on ports of its own; kept with
    --keep-services, its files with --keep-data."""

    def __init__(self, args, pg_port: int, redis_port: int, directory: str):
        # track_commit_timestamp: B's commit time of each event, read back after a latency round.
        super().__init__(pg_port, redis_port, directory, log, pg_options="-c track_commit_timestamp=on")
        self.args = args

    def stop(self) -> None:
        if not self.args.keep_services:
            super().stop(remove=not self.args.keep_data)


class Bench:
    def __init__(self, args):
        self.args = args
        shared = Services(args, args.pg_port, args.redis_port, args.services_dir)
        self.services = [shared]
        if args.separate_services:  # B on a PostgreSQL + Redis of its own, as two real sites would be
            self.services.append(Services(args, args.pg_port + 1, args.redis_port + 1, args.services_dir + "-b"))
        fast = {"KITE_PROBE_DOWN_SECONDS": "1"}
        # A's heartbeat would set batch_max back to what B advertises; the unbatched rounds
        # set it to NULL by hand, so A's regular heartbeat is pushed out of the run.
        self.a = Instance(args, "a", args.port, self.services[0], 1, {**fast, "KITE_HEARTBEAT_SECONDS": "3600"})
        self.b = Instance(args, "b", args.port + 1, self.services[-1], 2, fast)
        self.serial = 0
        self.problems: list[str] = []

    def check(self, phase: str, stored: int, expected: int) -> None:
        dead = self.outbox_depth().get("dead", 0)
        if stored != expected:
            self.problems.append(f"{phase}: {stored} of {expected} events at B")
        if dead:
            self.problems.append(f"{phase}: {dead} dead entries at A")

    def start(self) -> None:
        for services in self.services:
            services.start()
        for kite in (self.a, self.b):
            kite.services.flush_redis(int(kite.env["REDIS_URL"].rsplit("/", 1)[1]))
        for kite in (self.a, self.b):
            kite.create_database()
            kite.start()
            log(f"{kite.label}: {kite.instance_id} on {kite.url} (pid {kite.process.pid})")
        a, b = self.a, self.b
        self.team_a = a.api("GET", "/api/me").json()["team"]["id"]
        self.team_b = b.api("GET", "/api/me").json()["team"]["id"]
        for kite in (a, b):
            answer = kite.api("POST", "/api/sources", json={"name": SOURCE, "kind": "none"})
            assert answer.status_code == 201, answer.text
        self.federate("from-a", "a")
        # A first event end to end: also the template the SQL backlogs copy.
        self.post(a, self.hook_a, self.next_id("warm"), "com.bench.warm")
        self.wait_stored(["com.bench.warm"], 1, timeout=30)
        self.template = a.one(
            "SELECT e.id, o.provenance::text FROM ingest_event e JOIN federation_outboxentry o ON o.event_id = e.id"
            " WHERE e.ce_type = 'com.bench.warm' ORDER BY e.id DESC LIMIT 1"
        )
        log(f"federated A → B (peer {self.peer_id}); first event delivered; batch_max {self.batch_max()}")

    def federate(self, token_label: str, sender_name: str) -> None:
        """A → B the getting-started way: B makes a token, A adds B as its peer PEER_NAME (scopes ["*"],
        B's pinned TLS fingerprint), B trusts A as `sender_name`."""
        a, b = self.a, self.b
        token = b.api("POST", "/api/federation/tokens", json={"label": token_label}).json()["token"]
        identity = b.api("GET", "/api/federation/identity").json()
        answer = a.api("POST", "/api/federation/peers", json={
            "name": PEER_NAME, "peer_hook_url": identity["hook_url"], "outbound_token": token, "scopes": ["*"],
            "tls_fingerprint": identity["tls_fingerprint"],
        })  # fmt: skip
        assert answer.status_code == 201, answer.text
        self.peer_id = answer.json()["id"]
        answer = b.api("POST", "/api/federation/trusted-senders", json={"name": sender_name, "inbound_token": token})
        assert answer.status_code == 201, answer.text
        self.hook_a = f"/hooks/{self.team_a}/{SOURCE}"
        self.hook_b = f"/hooks/{self.team_b}/{SOURCE}"

    def stop(self) -> None:
        for kite in (self.b, self.a):
            kite.close()
        for services in self.services:
            services.stop()

    # --- helpers -----------------------------------------------------------

    def next_id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.serial:07d}-{secrets.token_hex(3)}"

    def post(self, kite: Instance, path: str, event_id: str, event_type: str) -> None:
        answer = requests.post(kite.url + path, data=payload(event_id, event_type), verify=kite.cert, timeout=10,
                               headers={"Content-Type": "application/json"})  # fmt: skip
        assert answer.status_code == 202, answer.text

    def batch_max(self):
        return self.a.one("SELECT batch_max FROM federation_peer WHERE id = %s", (self.peer_id,))

    def set_batch_max(self, value) -> None:
        self.a.sql("UPDATE federation_peer SET batch_max = %s WHERE id = %s", (value, self.peer_id))

    def stored_at_b(self, event_type: str, after_id: int = 0) -> tuple[int, datetime | None, datetime | None]:
        count, first, last = self.b.one(
            "SELECT count(*), min(received_at), max(received_at) FROM ingest_event WHERE id > %s AND ce_type = %s",
            (after_id, event_type),
        )
        return count, first, last

    def wait_stored(self, types: list[str], count: int, timeout: float, interval: float = 0.05, after_id: int = 0):
        deadline = time.monotonic() + timeout
        while True:
            have = sum(self.stored_at_b(t, after_id)[0] for t in types)
            if have >= count:
                return time.time()
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out: {have}/{count} {types} stored at B; A outbox: {self.outbox_depth()}")
            time.sleep(interval)

    def cpu_snapshot(self) -> dict[str, float]:
        """CPU seconds used so far by A's and B's processes and by the PostgreSQL server(s)."""
        snapshot = {kite.label: common.cpu_seconds(common.descendants(kite.process.pid)) for kite in (self.a, self.b)}
        servers = [services.cpu() for services in self.services]
        for cpu, name in zip(servers, ("postgres", "postgres-b") if len(self.services) > 1 else ("postgres",)):
            snapshot[name] = cpu["postgres"]
        snapshot["redis"] = sum(cpu["redis"] for cpu in servers)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        snapshot["load generator"] = usage.ru_utime + usage.ru_stime
        return snapshot

    @staticmethod
    def cpu_per_event(before: dict, after: dict, events: int) -> dict[str, float]:
        return {name: 1e6 * (after[name] - before[name]) / max(events, 1) for name in before
                if name != "load generator"}

    def outbox_depth(self) -> dict:
        return dict(self.a.sql("SELECT status, count(*) FROM federation_outboxentry GROUP BY status"))

    def b_max_event_id(self) -> int:
        return self.b.one("SELECT coalesce(max(id), 0) FROM ingest_event")

    def queue(self, count: int, event_type: str, *, due: bool) -> None:
        """Write `count` events + outbox entries into A's database in one transaction, copied from
        the template event/entry A made itself; not due (an hour ahead) unless `due`."""
        template_id, provenance = self.template
        prefix = f"{event_type}-{secrets.token_hex(3)}"
        chunk = 25_000
        done = 0
        while done < count:
            n = min(chunk, count - done)
            self.a.sql(
                """
                WITH ev AS (
                  INSERT INTO ingest_event (team_id, source_id, ce_id, ce_source, ce_type, ce_time, ce_subject,
                                            datacontenttype, data, extensions, agent, received_at)
                  SELECT t.team_id, t.source_id, %(prefix)s || '-' || g, t.ce_source, %(type)s, now(), t.ce_subject,
                         t.datacontenttype, replace(t.data, t.ce_id, %(prefix)s || '-' || g), t.extensions, t.agent,
                         now()
                  FROM ingest_event t, generate_series(%(start)s::int, %(end)s::int) g WHERE t.id = %(template)s
                  RETURNING id, team_id
                )
                INSERT INTO federation_outboxentry (msg_id, team_id, peer_id, event_id, provenance, status, attempts,
                                                    next_attempt_at, leased_until, last_error, created_at)
                SELECT gen_random_uuid(), ev.team_id, %(peer)s, ev.id, %(provenance)s::jsonb, 'pending', 0,
                       now() + (CASE WHEN %(due)s THEN interval '0' ELSE interval '1 hour' END), NULL, '', now()
                FROM ev ORDER BY ev.id
                """,
                {"prefix": prefix, "type": event_type, "start": done + 1, "end": done + n, "template": template_id,
                 "peer": self.peer_id, "provenance": provenance, "due": due},
            )  # fmt: skip
            done += n
        self.a.sql("ANALYZE federation_outboxentry")

    def release(self, event_type: str) -> float:
        """Make the queued entries due, then post one event to A: its commit kicks delivery at once
        (the beat sweeper would within 1 s anyway). Returns time.time() of the release."""
        released_at = time.time()
        self.a.sql(
            "UPDATE federation_outboxentry o SET next_attempt_at = now() FROM ingest_event e"
            " WHERE o.event_id = e.id AND e.ce_type = %s AND o.status = 'pending'",
            (event_type,),
        )
        self.post(self.a, self.hook_a, self.next_id("kick"), "com.bench.kick")
        return released_at


    def pause(self, reason: str) -> None:
        self.a.sql("UPDATE federation_peer SET paused = %s WHERE id = %s", (reason, self.peer_id))

    def release_paused(self) -> float:
        """Resume a queue paused by hand and kick it (as a successful probe does)."""
        released_at = time.time()
        self.pause("")
        self.post(self.a, self.hook_a, self.next_id("kick"), "com.bench.kick")
        return released_at


# --------------------------------------------------------------------------- 1. latency


async def _latency_round(target: Instance, path: str, listener: Instance, ws_source: str, rate: float,
                         duration: float, event_type: str, prefix: str, connections: int,
                         trace: dict | None = None) -> dict:  # fmt: skip
    target_ctx = ssl.create_default_context(cafile=target.cert)
    listen_ctx = ssl.create_default_context(cafile=listener.cert)
    head = listener.api("GET", "/api/events/head").json()["cursor"]
    arrivals: dict[str, float] = {}
    ws = await websockets.connect(
        f"wss://127.0.0.1:{listener.port}/ws/events?source={ws_source}&after={head}",
        ssl=listen_ctx, additional_headers={"Authorization": f"Bearer {listener.admin_key}"}, max_size=None,
    )  # fmt: skip

    async def read():
        async for message in ws:
            at = time.perf_counter()
            event_id = json.loads(message)["id"]
            arrivals.setdefault(event_id, at)

    reader_task = asyncio.create_task(read())
    pool = common.KeepAlive("127.0.0.1", target.port, ssl=target_ctx)
    outcomes: collections.Counter = collections.Counter()
    await pool.open(connections)
    accepted: dict[str, float] = {}
    intended_at: dict[str, float] = {}
    ingest_ms: list[float] = []
    count = int(rate * duration)
    ids = [f"{prefix}-{i:06d}-{secrets.token_hex(2)}" for i in range(count)]
    raws = [common.raw_post(path, target.port, payload(event_id, event_type), {"Content-Type": "application/json"})
            for event_id in ids]  # fmt: skip

    async def one(i: int, intended: float):
        event_id, raw = ids[i], raws[i]
        for attempt in (1, 2):
            conn = pool.checkout()
            fresh = conn is None
            reader, writer = conn or await pool.connect()
            try:
                status = await common.exchange(reader, writer, raw)
            except Exception as exc:
                writer.close()
                if fresh or attempt == 2:
                    outcomes[type(exc).__name__] += 1
                    return
                continue  # closed under us before it was read: once more on a new connection, as clients do
            now = time.perf_counter()
            pool.checkin(reader, writer)
            outcomes[status] += 1
            if status == 202:
                accepted[event_id] = now
                intended_at[event_id] = intended
                ingest_ms.append((now - intended) * 1000)
            return

    sent_seconds = await common.at_rate(count, rate, one)
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline and not set(accepted) <= set(arrivals):
        await asyncio.sleep(0.05)
    reader_task.cancel()
    await ws.close()
    if trace is not None:  # wall-clock times, to line up with timestamps in the databases
        offset = time.time() - time.perf_counter()
        trace.update({i: (accepted[i] + offset, arrivals.get(i, float("nan")) + offset) for i in accepted})
    pool.close()
    latencies = sorted((arrivals[i] - accepted[i]) * 1000 for i in accepted if i in arrivals)
    from_send = sorted((arrivals[i] - intended_at[i]) * 1000 for i in accepted if i in arrivals)
    ingest_ms.sort()
    return {
        "offered": rate,
        "achieved": len(accepted) / sent_seconds,
        "accepted": len(accepted),
        "errors": sum(n for outcome, n in outcomes.items() if outcome != 202),
        "outcomes": dict(outcomes),
        "missing": len(set(accepted) - set(arrivals)),
        "connections": pool.opened,
        "p50": pct(latencies, 50),
        "p95": pct(latencies, 95),
        "p99": pct(latencies, 99),
        "max": latencies[-1] if latencies else float("nan"),
        "negative": sum(1 for v in latencies if v < 0),
        "send_p50": pct(from_send, 50),
        "send_p99": pct(from_send, 99),
        "ingest_p50": pct(ingest_ms, 50),
        "ingest_p99": pct(ingest_ms, 99),
    }


def stored_latencies(bench: Bench, event_type: str, accepted: dict) -> dict:
    """A's 202 → the commit of the event at B, from B's own commit timestamps (PostgreSQL's
    track_commit_timestamp, same clock as the generator's): the target's "B's stored event",
    with no observer in the path. Empty when the server was started without it."""
    if bench.b.one("SHOW track_commit_timestamp") != "on":
        return {}
    committed = dict(bench.b.sql(
        "SELECT ce_id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM ingest_event WHERE ce_type = %s",
        (event_type,)))  # fmt: skip
    values = sorted((committed[i] - at) * 1000 for i, (at, _) in accepted.items() if committed.get(i) is not None)
    return {"stored_p50": pct(values, 50), "stored_p95": pct(values, 95), "stored_p99": pct(values, 99),
            "stored_max": values[-1] if values else math.nan, "stored_n": len(values)}  # fmt: skip


def latency_round(bench: Bench, kind: str, rate: float, duration: float, tag: str, trace: dict | None = None) -> dict:
    if kind == "federated":
        bench.set_batch_max(BATCH_MAX)  # what A's heartbeat learns from B's ping
        args = (bench.a, bench.hook_a, bench.b, "kite", rate, duration, f"com.bench.lat.{tag}", f"lat-{tag}")
    else:  # baseline: B's own ingest → B's listener, no federation
        args = (bench.b, bench.hook_b, bench.b, SOURCE, rate, duration, f"com.bench.local.{tag}", f"loc-{tag}")
    cpu_before, started = bench.cpu_snapshot(), time.monotonic()
    accepted: dict = {} if trace is None else trace
    result = common.run_async(_latency_round(*args, connections=bench.args.connections, trace=accepted))
    elapsed = time.monotonic() - started
    cpu_after = bench.cpu_snapshot()
    if kind == "federated":
        result.update(stored_latencies(bench, args[6], accepted))
    # How busy the machine's CPUs were with this benchmark's processes during the round.
    result["cpu_busy"] = {name: (cpu_after[name] - cpu_before[name]) / elapsed for name in cpu_before}
    return result


def trace_report(bench: Bench, rate: float, duration: float) -> str:
    """Where a federated event's latency goes, per stage, from the timestamps both databases keep
    (diagnostic phase `trace`; not part of the report)."""
    trace: dict = {}
    tag = f"trace{int(rate)}"
    result = latency_round(bench, "federated", rate, duration, tag, trace=trace)
    a_rows = dict(((i, (r, d, at, ms)) for i, r, d, at, ms in bench.a.sql(
        "SELECT e.ce_id, extract(epoch FROM e.received_at), extract(epoch FROM o.delivered_at),"
        " extract(epoch FROM d.attempted_at), d.latency_ms FROM ingest_event e"
        " JOIN federation_outboxentry o ON o.event_id = e.id LEFT JOIN federation_delivery d ON d.entry_id = o.id"
        " WHERE e.ce_type = %s", (f"com.bench.lat.{tag}",))))  # fmt: skip
    b_rows = dict(bench.b.sql("SELECT ce_id, extract(epoch FROM received_at) FROM ingest_event WHERE ce_type = %s",
                              (f"com.bench.lat.{tag}",)))  # fmt: skip
    stages = collections.defaultdict(list)
    for event_id, (accepted, arrived) in trace.items():
        if event_id not in a_rows or event_id not in b_rows:
            continue
        a_received, delivered, attempted, call_ms = (float(v) if v is not None else math.nan for v in a_rows[event_id])
        b_received = float(b_rows[event_id])
        stages["A received → A 202 at client"].append(accepted - a_received)
        stages["A 202 → B received (queue, task, claim, send)"].append(b_received - accepted)
        stages["B received → B listener"].append(arrived - b_received)
        stages["B received → A records delivered"].append(delivered - b_received)
        stages["HTTP call as A measured it"].append((call_ms or math.nan) / 1000)
        stages["total (A 202 → B listener)"].append(arrived - accepted)
    lines = [f"trace at {rate:g}/s: {len(stages['total (A 202 → B listener)'])} events, p50 {result['p50']:.1f} ms"]
    for name, values in stages.items():
        values = sorted(v * 1000 for v in values if not math.isnan(v))
        lines.append(f"  {name:48s} p10 {pct(values, 10):7.1f}  p50 {pct(values, 50):7.1f}  p90 {pct(values, 90):7.1f}"
                     f"  p99 {pct(values, 99):7.1f} ms")  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------- 2. throughput


def drain(bench: Bench, count: int, event_type: str, timeout: float, interval: float = 0.05) -> dict:
    after = bench.b_max_event_id()
    cpu_before = bench.cpu_snapshot()
    released = bench.release(event_type)
    done = bench.wait_stored([event_type], count, timeout=timeout, interval=interval, after_id=after)
    cpu_after = bench.cpu_snapshot()
    stored, first, last = bench.stored_at_b(event_type, after)
    return {
        "cpu_us": bench.cpu_per_event(cpu_before, cpu_after, count),
        "events": stored,
        "seconds": done - released,
        "rate": count / (done - released),
        "first_after": first.timestamp() - released,
        # Between the first and the last event B stored: delivery alone, without the start-up.
        "steady_rate": (stored - 1) / max((last - first).total_seconds(), 1e-6),
    }


def throughput_round(bench: Bench, batched: bool, count: int, tag: str) -> dict:
    event_type = f"com.bench.tput.{tag}"
    bench.set_batch_max(BATCH_MAX if batched else None)
    bench.queue(count, event_type, due=False)
    time.sleep(1)  # let the ANALYZE and the sweeper settle
    result = drain(bench, count, event_type, timeout=max(120, count / 20))
    result["batch_max_after"] = bench.batch_max()
    result["dead"] = bench.outbox_depth().get("dead", 0)
    bench.check(f"throughput {tag}", result["events"], count)
    return result


# --------------------------------------------------------------------------- 3. catch-up


def catchup_round(bench: Bench, count: int, tag: str) -> dict:
    a, b = bench.a, bench.b
    event_type = f"com.bench.catchup.{tag}"
    bench.set_batch_max(BATCH_MAX)
    after = bench.b_max_event_id()
    b.stop()
    stopped = time.monotonic()
    posted = 0
    while a.one("SELECT paused FROM federation_peer WHERE id = %s", (bench.peer_id,)) != "down":
        if time.monotonic() - stopped > 90:
            raise SystemExit("A never marked B down")
        bench.post(a, bench.hook_a, bench.next_id("catchup"), event_type)
        posted += 1
        time.sleep(0.2)
    down_after = time.monotonic() - stopped
    bench.queue(count - posted, event_type, due=True)  # the rest of the backlog, queued behind the paused queue
    pending = a.one("SELECT count(*) FROM federation_outboxentry WHERE status IN ('pending', 'in_flight')")
    time.sleep(2)  # B stays away a little longer: probes fail, nothing is attempted
    attempts_while_down = a.one(
        "SELECT count(*) FROM federation_delivery WHERE attempted_at > now() - interval '2 seconds'"
    )
    healthy_at = b.start()
    done = bench.wait_stored([event_type], count, timeout=180, after_id=after)
    stored, first, _ = bench.stored_at_b(event_type, after)
    bench.check(f"catch-up {tag}", stored, count)
    return {
        "posted_until_down": posted,
        "down_after": down_after,
        "pending": pending,
        "attempts_while_paused": attempts_while_down,
        "drain": done - healthy_at,
        "first_after": first.timestamp() - healthy_at,
        "stored": stored,
        "dead": bench.outbox_depth().get("dead", 0),
    }


# --------------------------------------------------------------------------- 4. memory


# The outbox queries as federation/outbox.py issued them before this benchmark (one query over
# pending and expired entries ordered by id; the sweeper's DISTINCT over every due entry) and as it
# issues them now (each part in its index's order; an EXISTS probe per peer). Same parameters.
OLD_CLAIM = """SELECT id FROM federation_outboxentry WHERE peer_id = %(peer)s AND ((status = 'pending' AND
  next_attempt_at <= %(now)s) OR (status = 'in_flight' AND leased_until < %(now)s)) ORDER BY id LIMIT 500
  FOR UPDATE SKIP LOCKED"""
NEW_CLAIM = [
    """SELECT id FROM federation_outboxentry WHERE leased_until < %(now)s AND status = 'in_flight' AND peer_id = %(peer)s
  ORDER BY leased_until LIMIT 500 FOR UPDATE SKIP LOCKED""",
    """SELECT id FROM federation_outboxentry WHERE next_attempt_at <= %(now)s AND status = 'pending' AND
  peer_id = %(peer)s ORDER BY next_attempt_at LIMIT 500 FOR UPDATE SKIP LOCKED""",
]
OLD_SWEEP = """SELECT DISTINCT peer_id FROM federation_outboxentry WHERE (status = 'pending' AND next_attempt_at <= %(now)s)
  OR (status = 'in_flight' AND leased_until < %(now)s)"""
NEW_SWEEP = """SELECT p.id FROM federation_peer p WHERE p.role = 'peer' AND (EXISTS (SELECT 1 FROM federation_outboxentry o
  WHERE o.next_attempt_at <= %(now)s AND o.status = 'pending' AND o.peer_id = p.id LIMIT 1) OR EXISTS (SELECT 1
  FROM federation_outboxentry o WHERE o.leased_until < %(now)s AND o.status = 'in_flight' AND o.peer_id = p.id LIMIT 1))"""


def query_ms(kite: Instance, queries: list[str], params: dict, repeat: int = 5) -> float:
    """Median over `repeat` runs of the summed server-side execution time of `queries`."""
    times = []
    for _ in range(repeat):
        total = 0.0
        for query in queries:
            plan = kite.sql("EXPLAIN (ANALYZE, FORMAT JSON) " + query, params)[0][0]
            total += plan[0]["Execution Time"]
        times.append(total)
    return statistics.median(times)


BATCH_STORE_PROBE = r"""
import json, statistics, sys, time
import django
django.setup()
from django.db import transaction
from django.utils import timezone
from ingest import cloudevent, services
from kite.models import Team
source = services.source_ensure_builtin(team=Team.objects.get(name="default"))
data = sys.argv[1]
def drafts(tag):
    now = timezone.now()
    return [cloudevent.Draft(id=f"{tag}-{i}", type="com.bench.batchstore", time=now, data_json=data,
                             source="kite://bench/batch-store-probe",
                             extensions={"kitefedorigin": "a", "kitefedchain": '["a"]', "kitefedhops": 1})
            for i in range(500)]
def one_by_one(items):
    with transaction.atomic():
        return services._store_batch_one_by_one(source, items, None)
def at_once(items):
    return services.events_store_batch(source=source, items=items, sender=None)
out = {"one_by_one": [], "at_once": []}
for r in range(int(sys.argv[2])):
    for name, store in (("one_by_one", one_by_one), ("at_once", at_once))[:: 1 if r % 2 == 0 else -1]:
        items = drafts(f"{name}-{r}-{time.time()}")
        wall, cpu = time.perf_counter(), time.process_time()
        results = store(items)
        out[name].append(((time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000))
        assert all(item.result == "accepted" for item in results)
print(json.dumps({name: [statistics.median(v[0] for v in runs), statistics.median(v[1] for v in runs)]
                  for name, runs in out.items()}))
"""


def batch_store_costs(bench: Bench, rounds: int = 6) -> dict:
    """B's side of a 500-event batch: a savepoint + INSERT per event (how ingest stored batches before
    this benchmark, still the fallback) vs the multi-row INSERT, alternating, in B's database."""
    data = json.loads(payload("x", "com.bench.batchstore"))
    done = subprocess.run(
        [sys.executable, "-c", BATCH_STORE_PROBE, json.dumps(data, separators=(",", ":")), str(rounds)],
        cwd=ROOT, env={**bench.b.env, "DJANGO_SETTINGS_MODULE": "kite.settings"}, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"batch-store probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_run(bench: Bench, count: int) -> dict:
    event_type = "com.bench.memory"
    bench.set_batch_max(BATCH_MAX)
    log(f"memory: queueing {count} entries")
    bench.pause("auth_failed")  # held by hand: neither attempts nor probes until released
    queue_started = time.monotonic()
    bench.queue(count, event_type, due=True)
    queue_seconds = time.monotonic() - queue_started
    params = {"peer": bench.peer_id, "now": datetime.now(timezone.utc)}
    queries = {
        "claim_old": query_ms(bench.a, [OLD_CLAIM], params),
        "claim_new": query_ms(bench.a, NEW_CLAIM, params),
        "sweep_old": query_ms(bench.a, [OLD_SWEEP], params),
        "sweep_new": query_ms(bench.a, [NEW_SWEEP], params),
    }
    log(f"memory: with {count:,} entries due: " + ", ".join(f"{k} {v:.2f} ms" for k, v in queries.items()))
    pids = bench.a.worker_pids()
    samples: list[tuple[float, int, float, dict]] = []  # (t, stored, total RSS, per pid)

    def sample(t0: float, after: int):
        per = {pid: common.rss_mb(pid) for pid in pids}
        stored = bench.stored_at_b(event_type, after)[0]
        samples.append((time.time() - t0, stored, sum(v for v in per.values() if v), per))
        return stored

    after = bench.b_max_event_id()
    t0 = time.time()
    for _ in range(3):
        sample(t0, after)
        time.sleep(1)
    cpu_before = bench.cpu_snapshot()
    released = bench.release_paused()
    deadline = time.monotonic() + bench.args.memory_timeout
    stored = 0
    while stored < count and time.monotonic() < deadline:
        time.sleep(max(0.0, 1 - (time.time() - t0) % 1))
        stored = sample(t0, after)
    done = time.time()
    cpu_us = bench.cpu_per_event(cpu_before, bench.cpu_snapshot(), stored)
    bench.check("memory", stored, count)
    for _ in range(3):
        time.sleep(1)
        sample(t0, after)
    if set(bench.a.worker_pids()) != set(pids):
        log("warning: the worker's processes changed during the drain")
    before = med([s[2] for s in samples[:3]])
    at_tenth = next((s[2] for s in samples if s[1] >= count / 10), None)
    peak = max(s[2] for s in samples)
    end = samples[-1][2]
    # Delivery rate per tenth of the backlog, from B's received_at: does it slow down as A's
    # outbox fills with delivered rows?
    tenths = bench.b.sql(
        "SELECT k, count(*), min(received_at), max(received_at) FROM (SELECT received_at, ntile(10) OVER "
        "(ORDER BY received_at) k FROM ingest_event WHERE id > %s AND ce_type = %s) t GROUP BY k ORDER BY k",
        (after, event_type),
    )
    decile_rates = []
    for (_, n, _, end_at), (_, _, _, previous_end) in zip(tenths[1:], tenths[:-1]):
        decile_rates.append(n / max((end_at - previous_end).total_seconds(), 1e-6))
    return {
        "count": count,
        "queries": queries,
        "cpu_us": cpu_us,
        "queue_seconds": queue_seconds,
        "stored": stored,
        "seconds": done - released,
        "rate": stored / (done - released),
        "pids": pids,
        "cmdlines": {pid: common.cmdline(pid)[:80] for pid in pids},
        "before": before,
        "at_tenth": at_tenth,
        "peak": peak,
        "end": end,
        "growth": peak - (at_tenth if at_tenth is not None else before),
        "per_pid_before": samples[0][3],
        "per_pid_peak": {pid: max((s[3].get(pid) or 0) for s in samples) for pid in pids},
        "per_pid_end": samples[-1][3],
        "decile_rates": decile_rates,
        "samples": [(round(s[0], 1), s[1], round(s[2], 1)) for s in samples],
        "dead": bench.outbox_depth().get("dead", 0),
    }


# --------------------------------------------------------------------------- report


def machine_facts(bench: Bench) -> dict:
    versions = common.versions("django", "uvicorn", "celery", "psycopg")
    kite_settings = common.kite_settings(bench.a.env, "s.KITE_WEB_WORKERS", "s.KITE_WSGI_THREADS")
    return {
        "web_workers": kite_settings[0],
        "wsgi_threads": kite_settings[1],
        "separate": len(bench.services) > 1,
        "nproc": os.cpu_count(),
        "cpu": common.cpu_model(),
        "python": platform.python_version(),
        "django": versions[0],
        "uvicorn": versions[1],
        "celery": versions[2],
        "psycopg": versions[3],
        "postgres": bench.a.one("SHOW server_version"),
        "fsync": bench.a.one("SHOW fsync"),
        "synchronous_commit": bench.a.one("SHOW synchronous_commit"),
    }


BUSY = ("pytest", "bench/ingest.py|bench/ab.py")  # not a quiet machine while one of these runs


def others_busy() -> list[str]:
    return common.others_busy(BUSY)


def wait_until_quiet(limit: float, threshold: float) -> None:
    common.wait_until_quiet(limit, log, threshold, BUSY)


def at_start(args) -> dict:
    """The machine before the run (after waiting for a quiet one, if asked, and how long that took)."""
    waited_from = time.monotonic()
    if args.wait_quiet:
        wait_until_quiet(args.wait_quiet, args.quiet_load)
    return {"loadavg": os.getloadavg()[0], "busy": others_busy(), "waited": time.monotonic() - waited_from}


def pair_arguments(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, argparse.Namespace]:
    """A script's own arguments (--wait-quiet and --no-write added) and this script's defaults for the
    Bench it starts, after waiting for a quiet machine if asked (bench/trust.py, bench/security.py)."""
    common.output_arguments(parser)
    own = parser.parse_args(argv)
    args = build_parser().parse_args(["--no-write"])
    if own.wait_quiet:
        wait_until_quiet(own.wait_quiet, args.quiet_load)
    return own, args


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def report(args, facts, latency, low, tput, catchup, memory, costs, problems, started, finished) -> str:
    quiet = (facts["loadavg"] < args.quiet_load and not facts["busy"])
    lines = [
        *common.section_head(SECTION, "Federation A → B", started, common.command("federation.py")),
        f"- Machine: {facts['nproc']} CPUs ({facts['cpu']}); 1-min load average {facts['loadavg']:.2f} at the start, "
        f"{facts['loadavg_end']:.2f} at the end; pytest / ingest-benchmark processes at the start: "
        f"{len(facts['busy'])} → {'quiet' if quiet else '**NOT quiet**'}"
        f"{' (waited ' + format(facts['waited'], '.0f') + ' s for it)' if facts['waited'] > 5 else ''}. "
        f"Python {facts['python']}, Django {facts['django']}, uvicorn {facts['uvicorn']}, Celery {facts['celery']}, "
        f"psycopg {facts['psycopg']}, PostgreSQL {facts['postgres']} (fsync={facts['fsync']}, "
        f"synchronous_commit={facts['synchronous_commit']}), Redis. Everything — both instances, PostgreSQL, "
        "Redis and the load generator — shares these CPUs on loopback.",
        "- Two instances, each `manage.py runkite` (uvicorn with the default KITE_WEB_WORKERS="
        f"{facts['web_workers']} and KITE_WSGI_THREADS={facts['wsgi_threads']}, Celery worker concurrency 2 "
        "(runkite's default), beat), KITE_TLS=on (self-signed; A pins B's certificate with `tls_fingerprint`), "
        + ("each with a PostgreSQL server and a Redis server of its own (as two sites are; both servers from "
           "scripts/services.sh). " if facts["separate"] else
           "each with its own PostgreSQL database and Redis db number (broker, cache, channel layer) on one shared "
           "PostgreSQL/Redis pair. ") +
        "KITE_PROBE_DOWN_SECONDS=1 on both; A has KITE_HEARTBEAT_SECONDS=3600 so that its regular heartbeat "
        "does not set batch_max back during the unbatched rounds (batch_max is set on A's peer row by SQL "
        "before each round and checked after it)."
        + (f" Extra environment: {', '.join(args.env)}." if args.env else ""),
        "- Federation set up as an operator does it: B `POST /api/federation/tokens`, A `POST /api/federation/peers` "
        "(scopes [\"*\"], B's hook URL and TLS fingerprint from B's `GET /api/federation/identity`), "
        "B `POST /api/federation/trusted-senders`. Events are ~0.6 kB JSON posted to a `none` source on A.",
        "",
        f"**1. Latency, A's 202 → event stored at B, and → on B's listener** — open loop at {args.rate:g} events/s "
        f"offered for {args.duration:g} s per round (asyncio generator over {args.connections} keep-alive TLS "
        f"connections), {args.rounds} rounds. Two latencies per event, both from the moment A's 202 reached the "
        "generator: **stored at B** = the commit of the event's transaction in B's database (PostgreSQL's own "
        "commit timestamp, `track_commit_timestamp=on`, read back after the round: no observer in the path; the "
        "issue's measure), and **listener** = its arrival on a WebSocket listener on B "
        "(`/ws/events?source=kite&after=<head>`, what `kite listen` uses: adds B's broadcast, channel layer and "
        "the listener's read). Baseline in the same run, alternating with it: the same load posted to B's own "
        "`none` source and read by the same kind of listener on B (B's ingest → listener, no federation; "
        f"{args.baseline_duration:g} s rounds)."
        + (f" Last, one round of each at {args.low_rate:g} events/s: the same pipeline on an otherwise idle machine."
           if args.low_rate else ""),
        "",
        "| round | path | achieved/s | stored at B p50 / p95 / p99 / max ms | listener p50 ms | p95 ms | p99 ms "
        "| max ms | not arrived | from request sent p50/p99 ms | 202 p50/p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def stored(r):
        if "stored_p50" not in r:
            return ""
        return f"{r['stored_p50']:.1f} / {r['stored_p95']:.1f} / {r['stored_p99']:.1f} / {r['stored_max']:.0f}"

    for i, pair in enumerate(latency):
        for kind in ("federated", "local"):
            r = pair[kind]
            lines.append(
                f"| {i + 1} | {kind} | {r['achieved']:.0f} | {stored(r)} | {r['p50']:.1f} | {r['p95']:.1f} | "
                f"{r['p99']:.1f} | {r['max']:.0f} | {r['missing']} | {r['send_p50']:.1f} / {r['send_p99']:.1f} | "
                f"{r['ingest_p50']:.1f} / {r['ingest_p99']:.1f} |"
            )
    fed = {k: med([p["federated"][k] for p in latency]) for k in ("p50", "p95", "p99", "achieved")}
    has_stored = all("stored_p50" in p["federated"] for p in latency)
    if has_stored:
        fed |= {k: med([p["federated"][k] for p in latency]) for k in ("stored_p50", "stored_p95", "stored_p99")}
    loc = {k: med([p["local"][k] for p in latency]) for k in ("p50", "p95", "p99")}
    lines += [
        f"| **median** | federated | {fed['achieved']:.0f} | "
        + (f"**{fed['stored_p50']:.1f}** / {fed['stored_p95']:.1f} / **{fed['stored_p99']:.1f}** / " if has_stored else "")
        + f" | {fed['p50']:.1f} | {fed['p95']:.1f} | {fed['p99']:.1f} | | | | |",
        f"| **median** | local baseline | | | {loc['p50']:.1f} | {loc['p95']:.1f} | {loc['p99']:.1f} | | | | |",
        *(
            [f"| {args.low_rate:g}/s | federated | {low['federated']['achieved']:.0f} | {stored(low['federated'])} | "
             f"{low['federated']['p50']:.1f} | {low['federated']['p95']:.1f} | {low['federated']['p99']:.1f} | "
             f"{low['federated']['max']:.0f} | {low['federated']['missing']} | | |",
             f"| {args.low_rate:g}/s | local | {low['local']['achieved']:.0f} | | {low['local']['p50']:.1f} | "
             f"{low['local']['p95']:.1f} | {low['local']['p99']:.1f} | {low['local']['max']:.0f} | "
             f"{low['local']['missing']} | | |"]
            if low else []
        ),
        "",
        "CPU kept busy by the benchmark's own processes during the federated rounds (median, in CPUs of "
        f"{facts['nproc']}): "
        + ", ".join(f"{name} {med([p['federated']['cpu_busy'][name] for p in latency]):.2f}"
                    for name in latency[0]["federated"]["cpu_busy"])
        + f" = **{med([sum(p['federated']['cpu_busy'].values()) for p in latency]):.2f}**; during the local rounds "
        f"{med([sum(p['local']['cpu_busy'].values()) for p in latency]):.2f}. "
        f"Events that B showed before A's 202 reached the generator (negative latency, kept in the percentiles): "
        f"{sum(p['federated']['negative'] for p in latency)}. Answers the generator got over all rounds: "
        + "; ".join(
            f"{kind} " + ", ".join(f"{outcome}: {n}" for outcome, n in sum(
                (collections.Counter(p[kind]["outcomes"]) for p in latency), collections.Counter()).items())
            for kind in ("federated", "local")
        )
        + ".",
        "",
        (f"A's 202 → stored at B (the target's measure): target p50 ≤ 25 ms: {fed['stored_p50']:.1f} ms → "
         f"{verdict(fed['stored_p50'] <= 25)}; p99 ≤ 100 ms: {fed['stored_p99']:.1f} ms → "
         f"{verdict(fed['stored_p99'] <= 100)}. " if has_stored else "No commit timestamps (server without "
         "track_commit_timestamp): the listener figures below are the only measure. ")
        + f"On B's listener: p50 {fed['p50']:.1f} ms, p99 {fed['p99']:.1f} ms"
        f" ({'within' if fed['p50'] <= 25 and fed['p99'] <= 100 else 'over'} the same targets); federation adds "
        f"{fed['p50'] - loc['p50']:.1f} ms at p50 and {fed['p99'] - loc['p99']:.1f} ms at p99 to B's own ingest → "
        f"listener path (ratio federated/local p50 {fed['p50'] / loc['p50']:.1f}×).",
        "",
        f"**2. Delivery throughput A → B** — {args.unbatched:,} (unbatched) / {args.batched:,} (batched) events "
        "with their outbox entries written into A's database not yet due, then made due in one UPDATE and one "
        "event posted to A (its commit kicks delivery, as a live event does); time from that release until B has "
        "stored them all (polled in B's database every 50 ms). Unbatched: batch_max NULL on A's peer row (one "
        "structured CloudEvent per signed POST); batched: batch_max 500 (one `application/cloudevents-batch+json` "
        f"POST per 500). {args.tput_rounds} rounds, unbatched and batched alternating. \"steady\" = rate between "
        "the first and the last event B stored (without the release → first delivery start-up).",
        "",
        "| round | unbatched events/s (steady) | batched events/s (steady) | batched / unbatched |",
        "|---|---|---|---|",
    ]
    for i, pair in enumerate(tput):
        u, bt = pair["unbatched"], pair["batched"]
        lines.append(
            f"| {i + 1} | {u['rate']:.0f} ({u['steady_rate']:.0f}) | {bt['rate']:.0f} ({bt['steady_rate']:.0f}) | "
            f"{bt['rate'] / u['rate']:.1f}× |"
        )
    u_med = med([p["unbatched"]["rate"] for p in tput])
    b_med = med([p["batched"]["rate"] for p in tput])
    ratio = med([p["batched"]["rate"] / p["unbatched"]["rate"] for p in tput])
    lines += [
        f"| **median** | **{u_med:.0f}** ({med([p['unbatched']['steady_rate'] for p in tput]):.0f}) | "
        f"**{b_med:.0f}** ({med([p['batched']['steady_rate'] for p in tput]):.0f}) | **{ratio:.1f}×** |",
        "",
        f"batch_max after the unbatched rounds: {sorted({str(p['unbatched']['batch_max_after']) for p in tput})} "
        f"(still NULL = the rounds really were unbatched); dead entries: "
        f"{max(p['batched']['dead'] for p in tput)}. CPU per delivered event (median; A = web + worker + beat, "
        "B likewise, PostgreSQL = all its processes): "
        + "; ".join(
            f"{kind} " + ", ".join(f"{name} {med([p[kind]['cpu_us'][name] for p in tput]):.0f} µs"
                                   for name in tput[0][kind]["cpu_us"])
            for kind in ("unbatched", "batched")
        )
        + f". Target ≥ 2,000 events/s batched: {b_med:.0f}/s → {verdict(b_med >= 2000)}.",
        "",
        f"**3. Catch-up** — B stopped (SIGTERM to its process group); events posted to A every 0.2 s until A "
        f"marked B `down` (5 failed deliveries in a row → queue paused); the rest of {args.catchup:,} entries "
        "written into A's database, due; B started again (`manage.py runkite`, migrate + bootstrap + serve); "
        f"time from B answering /healthz to all {args.catchup:,} events stored at B. {args.catchup_rounds} rounds.",
        "",
        "| round | posted until down (s) | delivery attempts in the 2 s paused | first stored after healthy s | "
        "drain s | dead |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(catchup):
        lines.append(
            f"| {i + 1} | {r['posted_until_down']} ({r['down_after']:.1f}) | {r['attempts_while_paused']} | "
            f"{r['first_after']:.2f} | {r['drain']:.2f} | {r['dead']} |"
        )
    drain_med = med([r["drain"] for r in catchup])
    expected = args.catchup / b_med
    lines += [
        f"| **median** | | | {med([r['first_after'] for r in catchup]):.2f} | **{drain_med:.2f}** | |",
        "",
        f"Baseline from section 2 of this run: {args.catchup:,} events at the median batched rate take "
        f"{expected:.1f} s; the drain took {drain_med / expected:.1f}× that (the rest is the probe that notices "
        f"B is back, ≤ 1 s, and B's cold start). Target ≤ 10 s: {drain_med:.2f} s → {verdict(drain_med <= 10)}.",
        "",
    ]
    if memory:
        m = memory
        per_pid = ", ".join(
            f"{pid}: {m['per_pid_before'].get(pid) or 0:.0f} → peak {m['per_pid_peak'].get(pid) or 0:.0f} → "
            f"{m['per_pid_end'].get(pid) or 0:.0f}" for pid in m["pids"]
        )
        flat = m["growth"] < 20
        lines += [
            f"**4. Worker memory while draining {m['count']:,} entries** (batched) — {m['count']:,} events + "
            f"entries written into A's database in {m['queue_seconds']:.0f} s (SQL, as above), released as in 2; "
            "VmRSS of A's Celery worker processes (main + 2 prefork children, from /proc) summed, every second.",
            "",
            "| RSS MB | before release | after 10 % drained | peak | end |",
            "|---|---|---|---|---|",
            f"| worker total | {m['before']:.1f} | {m['at_tenth'] or float('nan'):.1f} | {m['peak']:.1f} | "
            f"{m['end']:.1f} |",
            "",
            f"Per process (MB, before → peak → end): {per_pid}. Drained {m['stored']:,} in {m['seconds']:.1f} s "
            f"({m['rate']:.0f} events/s; CPU per event: "
            + ", ".join(f"{name} {value:.0f} µs" for name, value in m["cpu_us"].items()) + "); "
            f"rate per tenth of the backlog, 2nd…10th: "
            f"{', '.join(f'{r:.0f}' for r in m['decile_rates'])} events/s. Flat = peak − RSS after the first 10 % "
            f"< 20 MB: {m['growth']:.1f} MB → {verdict(flat)}.",
            "",
        ]
    if costs or memory:
        lines += [
            "**5. Changes made while benchmarking, each against the code it replaced, in this run**",
            "",
        ]
    if costs:
        old, new = costs["one_by_one"], costs["at_once"]
        lines += [
            f"- B storing a 500-event batch (`ingest.services.events_store_batch`, in B's database, "
            "alternating, median of 6): a savepoint + INSERT per event (before; still the fallback) "
            f"{old[0]:.0f} ms wall / {old[1]:.0f} ms Python CPU → one `INSERT … ON CONFLICT DO NOTHING RETURNING` "
            f"{new[0]:.0f} ms / {new[1]:.0f} ms ({old[0] / new[0]:.1f}× / {old[1] / new[1]:.1f}×).",
        ]
    if memory:
        q = memory["queries"]
        lines += [
            f"- With {memory['count']:,} entries due (A's database, EXPLAIN ANALYZE execution time, median of 5): "
            f"claiming 500 — one query over pending + expired entries ORDER BY id (before) {q['claim_old']:.1f} ms → "
            f"each part in its index's order {q['claim_new']:.2f} ms; the once-a-second sweeper — DISTINCT over "
            f"every due entry (before) {q['sweep_old']:.1f} ms → an EXISTS probe per peer {q['sweep_new']:.2f} ms.",
        ]
    if costs or memory:
        lines.append("")
    lines += [
        f"Run took {(finished - started).seconds} s. Checked after every throughput, catch-up and memory round: "
        "B holds exactly the events queued at A (counted per round by event type; B's dedup key rules out a "
        "second copy) and A has no dead entry — "
        + common.held(problems),
    ]
    return common.section_text(lines, SECTION)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--rate", type=float, default=200, help="offered events/s of the latency phase")
    parser.add_argument("--duration", type=float, default=20, help="seconds per federated latency round")
    parser.add_argument("--baseline-duration", type=float, default=10, help="seconds per local-baseline round")
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (federated + local each)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--low-rate", type=float, default=20, help="one more latency round at this rate (0: none)")
    parser.add_argument("--unbatched", type=int, default=2000, help="events per unbatched throughput round")
    parser.add_argument("--batched", type=int, default=10000, help="events per batched throughput round")
    parser.add_argument("--tput-rounds", type=int, default=3)
    parser.add_argument("--catchup", type=int, default=10000)
    parser.add_argument("--catchup-rounds", type=int, default=3)
    parser.add_argument("--memory", type=int, default=100000, help="entries of the memory phase (0: skip it)")
    parser.add_argument("--memory-timeout", type=float, default=300)
    parser.add_argument("--phases", default="latency,throughput,costs,catchup,memory")
    parser.add_argument("--quick", action="store_true", help="short trial: 1 round each, small backlogs")
    common.service_arguments(parser, port=18610, pg_port=25632, redis_port=26579, env="extra environment for A and B",
                             services_dir="/tmp/kite-fedbench-services", port_help="A's port; B's is the next",
                             pg_port_help=BELOW_EPHEMERAL)  # fmt: skip
    parser.add_argument("--separate-services", action="store_true",
                        help="B gets a PostgreSQL + Redis of its own (ports +1, dir + '-b') instead of sharing A's")
    parser.add_argument("--keep-data", action="store_true", help="keep data dirs and logs (printed)")
    common.output_arguments(parser, quiet_load=1.0)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.duration, args.baseline_duration, args.rounds = 5, 3, 1
        args.unbatched, args.batched, args.tput_rounds = 300, 2000, 1
        args.catchup, args.catchup_rounds, args.memory = 2000, 1, min(args.memory, 10000)
    phases = set(args.phases.split(","))
    initial = at_start(args)
    bench = Bench(args)

    def stop() -> None:
        if args.keep_data:
            log(f"data dirs: {bench.a.data_dir}, {bench.b.data_dir}")
        bench.stop()

    return common.run_main(lambda: measure(args, bench, phases, initial), stop, log, "stopping A, B and the services")


def measure(args, bench: Bench, phases: set[str], initial: dict) -> int:
    started = datetime.now(timezone.utc)
    latency, tput, catchup, memory, costs, low = [], [], [], None, None, None
    bench.start()
    facts = machine_facts(bench) | initial
    if "latency" in phases:
        latency_round(bench, "federated", args.rate, 3, "warm")  # warm-up, discarded
        latency_round(bench, "local", args.rate, 2, "warm")
        for i in range(args.rounds):
            pair = {}
            for kind in ("federated", "local") if i % 2 == 0 else ("local", "federated"):
                duration = args.duration if kind == "federated" else args.baseline_duration
                pair[kind] = latency_round(bench, kind, args.rate, duration, f"r{i + 1}")
                r = pair[kind]
                stored = f"stored at B p50 {r['stored_p50']:.1f} p99 {r['stored_p99']:.1f} ms; " if "stored_p50" in r else ""
                log(f"latency {kind} r{i + 1}: {stored}listener {r['achieved']:.0f}/s p50 {r['p50']:.1f} p95 {r['p95']:.1f} "
                    f"p99 {r['p99']:.1f} max {r['max']:.0f} ms; missing {r['missing']}, errors {r['errors']}, "
                    f"A/B 202 p50 {r['ingest_p50']:.1f} p99 {r['ingest_p99']:.1f} ms; CPUs busy "
                    + ", ".join(f"{name} {busy:.2f}" for name, busy in r["cpu_busy"].items()))  # fmt: skip
            latency.append(pair)
        if args.low_rate:
            low = {kind: latency_round(bench, kind, args.low_rate, args.baseline_duration, "low")
                   for kind in ("federated", "local")}  # fmt: skip
            log(f"latency at {args.low_rate:g}/s: federated p50 {low['federated']['p50']:.1f} p99 "
                f"{low['federated']['p99']:.1f} ms, local p50 {low['local']['p50']:.1f} p99 {low['local']['p99']:.1f} ms")
    if "trace" in phases:
        for rate in (args.low_rate or 20, args.rate):
            log(trace_report(bench, rate, args.baseline_duration))
    if "throughput" in phases:
        for i in range(args.tput_rounds):
            pair = {}
            for batched in (False, True) if i % 2 == 0 else (True, False):
                kind = "batched" if batched else "unbatched"
                count = args.batched if batched else args.unbatched
                pair[kind] = throughput_round(bench, batched, count, f"{kind}{i + 1}")
                r = pair[kind]
                log(f"throughput {kind} r{i + 1}: {count} in {r['seconds']:.2f} s = {r['rate']:.0f}/s "
                    f"(steady {r['steady_rate']:.0f}/s, first after {r['first_after']:.2f} s), "
                    f"batch_max after {r['batch_max_after']}, CPU µs/event "
                    + " ".join(f"{k} {v:.0f}" for k, v in r["cpu_us"].items()))  # fmt: skip
            tput.append(pair)
    if "costs" in phases:
        costs = batch_store_costs(bench)
        log("batch store, 500 events, median ms wall / client CPU: "
            + ", ".join(f"{k} {v[0]:.0f} / {v[1]:.0f}" for k, v in costs.items()))  # fmt: skip
    if "catchup" in phases:
        for i in range(args.catchup_rounds):
            r = catchup_round(bench, args.catchup, f"r{i + 1}")
            catchup.append(r)
            log(f"catch-up r{i + 1}: down after {r['posted_until_down']} posts ({r['down_after']:.1f} s); "
                f"drained {r['stored']} in {r['drain']:.2f} s after healthy (first after {r['first_after']:.2f} s)")
    if "memory" in phases and args.memory:
        memory = memory_run(bench, args.memory)
        log(f"memory: {memory['stored']} in {memory['seconds']:.1f} s ({memory['rate']:.0f}/s); RSS MB before "
            f"{memory['before']:.1f}, at 10% {memory['at_tenth']}, peak {memory['peak']:.1f}, end "
            f"{memory['end']:.1f}; decile rates {[round(r) for r in memory['decile_rates']]}; CPU µs/event "
            + " ".join(f"{k} {v:.0f}" for k, v in memory["cpu_us"].items()))  # fmt: skip
        log(f"memory samples (s, stored, MB): {memory['samples']}")
    depth = bench.outbox_depth()
    log(f"A's outbox at the end: {depth}")
    finished = datetime.now(timezone.utc)
    facts["loadavg_end"] = os.getloadavg()[0]
    if latency and tput and catchup:
        section = report(args, facts, latency, low, tput, catchup, memory, costs, bench.problems, started,
                         finished)  # fmt: skip
        return common.publish(section, SECTION, not args.no_write, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
