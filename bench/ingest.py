#!/usr/bin/env python3
"""Ingest benchmark: verified Stripe webhooks/s against a bare INSERT endpoint.

Starts its own PostgreSQL + Redis (scripts/services.sh, on ports of its own), a
fresh database and data dir, and Kite's web process the way production runs it
(`manage.py runkite` → uvicorn kite.asgi:application, here `--no-worker
--no-beat` and KITE_TLS=off as behind a TLS proxy), creates a Stripe source
through the API and then, alternating in the same run on the same server:

1. closed loop (wrk, fixed connections): max sustained rate of
   - POST /hooks/{team}/{source}: real Stripe webhooks, each with a fresh
     Stripe-Signature (HMAC-SHA256, timestamp of this round) and a unique id;
   - POST /bench/bare/{team}/{source}: the same Django stack doing the same
     INSERT into ingest_event as one autocommit statement (its own durable
     transaction, as a real webhook of a team without peers is stored) and
     nothing else (the physical ceiling of the database path); and optionally
     /bench/noop (no database).
2. open loop at a fixed offered rate (asyncio generator, latency measured
   from each request's *intended* send time, so no coordinated omission):
   p50/p99 of both endpoints.

Medians over the rounds, the ratio real/bare per round, the exact command and
the machine facts are printed and written into bench/RESULTS.md (between the
`bench:ingest` markers). Everything started is stopped at the end.

    .venv/bin/python bench/ingest.py   # defaults: 5 closed rounds × 10 s; 400/s and 800/s × 10 s × 3 rounds
    .venv/bin/python bench/ingest.py --rounds 2 --duration 5 --no-write   # quick trial
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import hmac
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import common

ROOT = common.ROOT
RESULTS = common.RESULTS
SOURCE_NAME = "stripe-bench"
QUIET = "first wait up to this long for load average < 0.5 and no pytest running"

WRK_LUA = r"""
local threads = {}
local counter = 1
function setup(thread)
  thread:set("tid", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

function init(args)
  local path, file, nthreads = args[1], args[2], tonumber(args[3])
  reqs = {}
  local i = 0
  for line in io.lines(file) do
    if i % nthreads == tid - 1 then
      local sig, body = line:match("^([^\t]*)\t(.*)$")
      reqs[#reqs + 1] = wrk.format("POST", path,
        {["Content-Type"] = "application/json", ["Stripe-Signature"] = sig}, body)
    end
    i = i + 1
  end
  idx = 0
  accepted = 0
  duplicate = 0
  other = 0
  wrapped = 0
end

function request()
  idx = idx + 1
  if idx > #reqs then
    idx = 1
    wrapped = wrapped + 1
  end
  return reqs[idx]
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
  elseif status == 200 then
    duplicate = duplicate + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local a, d, o, w = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("accepted")
    d = d + t:get("duplicate")
    o = o + t:get("other")
    w = w + t:get("wrapped")
  end
  local e = summary.errors
  io.write(string.format("KITE_RESULT %d %d %d %d %d %d %d %.0f %.0f %.0f\n",
    a, d, o, w, summary.requests, e.connect + e.read + e.write + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


# --------------------------------------------------------------------------- helpers


log = common.logger("bench")
run = common.run


def http_json(method: str, url: str, body=None, token: str | None = None, timeout=10):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.loads(response.read() or b"null")


def stripe_body(event_id: str, created: int) -> bytes:
    """A realistic payment_intent.succeeded event (~1.3 kB), compact JSON on one line."""
    payload = {
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": created,
        "type": "payment_intent.succeeded",
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": "req_" + event_id[-12:], "idempotency_key": "ik_" + event_id[-16:]},
        "data": {
            "object": {
                "id": "pi_" + event_id[-20:],
                "object": "payment_intent",
                "amount": 2000,
                "amount_capturable": 0,
                "amount_received": 2000,
                "capture_method": "automatic",
                "client_secret": "pi_" + event_id[-20:] + "_secret_x",
                "confirmation_method": "automatic",
                "created": created,
                "currency": "usd",
                "customer": "cus_QaBcDeFgHiJkLm",
                "description": "Kite benchmark order",
                "latest_charge": "ch_" + event_id[-20:],
                "livemode": False,
                "metadata": {"order_id": event_id[-10:], "team": "bench"},
                "payment_method": "pm_1PaBcDeFgHiJkLmNoPq",
                "payment_method_types": ["card"],
                "receipt_email": "buyer@example.com",
                "shipping": {
                    "address": {
                        "city": "Berlin", "country": "DE", "line1": "Unter den Linden 1",
                        "postal_code": "10117", "state": None,
                    },
                    "name": "Ada Lovelace",
                },
                "status": "succeeded",
            }
        },
    }  # fmt: skip
    return json.dumps(payload, separators=(",", ":")).encode()


def stripe_signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class Requests:
    """Signed Stripe webhooks, each with a unique event id, signed just before use."""

    def __init__(self, secret: str, run_id: str):
        self.secret = secret
        self.run_id = run_id
        self.serial = 0

    def batch(self, count: int) -> list[tuple[str, bytes]]:
        now = int(time.time())
        out = []
        for _ in range(count):
            self.serial += 1
            body = stripe_body(f"evt_{self.run_id}_{self.serial:09d}", now)
            out.append((stripe_signature(self.secret, now, body), body))
        return out

    def write(self, path: Path, count: int) -> None:
        with path.open("wb") as fh:
            for signature, body in self.batch(count):
                fh.write(signature.encode() + b"\t" + body + b"\n")


# --------------------------------------------------------------------------- deployment


class Deployment:
    def __init__(self, args):
        self.args = args
        # The ports lie in the ephemeral range: a client socket in TIME-WAIT can hold one for a minute.
        self.services = common.Services(args.pg_port, args.redis_port, args.services_dir, log, attempts=20, pause=5)
        self.data_dir = Path(tempfile.mkdtemp(prefix="kite-bench-data-"))
        self.work_dir = Path(tempfile.mkdtemp(prefix="kite-bench-work-"))
        self.web: subprocess.Popen | None = None
        self.base = f"http://127.0.0.1:{args.port}"
        self.database_url = f"postgres://postgres@127.0.0.1:{args.pg_port}/{args.database}"
        self.env = dict(
            os.environ,
            DJANGO_SETTINGS_MODULE="kite.settings",
            KITE_DATA_DIR=str(self.data_dir),
            DATABASE_URL=self.database_url,
            REDIS_URL=f"redis://127.0.0.1:{args.redis_port}/0",
            KITE_HOST="127.0.0.1",
            KITE_PORT=str(args.port),
            KITE_TLS="off",
            KITE_PUBLIC_URL=f"https://kite-bench.example:{args.port}",
            KITE_BENCH_ENDPOINTS="on",
            KITE_LOG_LEVEL="WARNING",
        )
        if args.workers:
            self.env["KITE_WEB_WORKERS"] = str(args.workers)
        if args.threads:
            self.env["KITE_WSGI_THREADS"] = str(args.threads)
        for item in args.env:
            key, _, value = item.partition("=")
            self.env[key] = value

    def start(self):
        self.services.start()
        self.services.fresh_database(self.args.database)
        self.services.flush_redis()
        py = sys.executable
        run([py, "manage.py", "migrate", "--verbosity", "0"], env=self.env)
        run([py, "manage.py", "bootstrap"], env=self.env, capture=True)
        self.api_key = (self.data_dir / "admin-api-key").read_text().strip()
        self._start_web()
        _, me = http_json("GET", f"{self.base}/api/me", token=self.api_key)
        self.team_id = me["team"]["id"]
        status, source = http_json(
            "POST", f"{self.base}/api/sources", {"name": SOURCE_NAME, "kind": "stripe"}, token=self.api_key
        )
        assert status == 201 and source.get("secret"), source
        self.secret = source["secret"]
        self.paths = {
            "stripe": f"/hooks/{self.team_id}/{SOURCE_NAME}",
            "bare": f"/bench/bare/{self.team_id}/{SOURCE_NAME}",
            "noop": "/bench/noop",
        }

    def setting(self, name: str) -> str:
        return common.kite_settings(self.env, f"s.{name}")[0]

    def sql(self, query: str) -> str:
        psql = shutil.which("psql") or "/usr/lib/postgresql/15/bin/psql"
        argv = [psql, "-h", "127.0.0.1", "-p", str(self.args.pg_port), "-U", "postgres", "-d", self.args.database]
        return run([*argv, "-v", "ON_ERROR_STOP=1", "-At", "-c", query], capture=True).stdout.strip()

    def _web_argv(self) -> list[str]:
        if self.args.server == "uvicorn" and self.args.app == "kite.asgi:application":
            return [sys.executable, "manage.py", "runkite", "--no-setup", "--no-worker", "--no-beat"]
        metrics_dir = self.data_dir / "metrics"
        metrics_dir.mkdir(exist_ok=True)
        self.env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        if self.args.server == "uvicorn":  # experiments: runkite's uvicorn command with another app
            return [
                sys.executable, "-m", "uvicorn", self.args.app, "--host", "127.0.0.1", "--port", str(self.args.port),
                "--workers", str(self.args.workers or self.setting("KITE_WEB_WORKERS")),
                "--lifespan", "on", "--no-access-log", "--proxy-headers",
            ]  # fmt: skip
        workers = self.args.workers or self.setting("KITE_WEB_WORKERS")
        threads = self.args.threads or self.setting("KITE_WSGI_THREADS")
        return [
            sys.executable, "-m", "gunicorn", "kite.wsgi:application", "-k", "gthread",
            "--workers", str(workers), "--threads", str(threads),
            "--bind", f"127.0.0.1:{self.args.port}", "--log-level", "warning",
        ]  # fmt: skip

    def _start_web(self):
        argv = self._web_argv()
        self.web_command = shlex.join(argv)
        log(f"web: {self.web_command}")
        self.web_log = (self.work_dir / "web.log").open("w")
        self.web = subprocess.Popen(
            argv, env=self.env, cwd=self.args.tree or ROOT, stdout=self.web_log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        common.wait_healthy("web", f"{self.base}/healthz", self.web, timeout=60, interval=0.2,
                            log_tail=lambda: (self.work_dir / "web.log").read_text())  # fmt: skip

    def stop_web(self):
        common.stop_process(self.web, group=False)  # runkite (or uvicorn, gunicorn) stops its workers
        self.web = None

    def stop(self):
        self.stop_web()
        if not self.args.keep_services:
            self.services.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def deployment_for(args) -> Deployment:
    """This script's Deployment for another script's parsed arguments (bench/scale.py, bench/ceiling.py): its
    ports, services directory, database, --max-rate, --wrk, --keep-services and --env."""
    argv = [
        "--port", str(args.port), "--pg-port", str(args.pg_port), "--redis-port", str(args.redis_port),
        "--services-dir", args.services_dir, "--database", args.database, "--max-rate", str(args.max_rate),
        "--wrk", args.wrk,
    ]  # fmt: skip
    if args.keep_services:
        argv.append("--keep-services")
    for item in args.env:
        argv += ["--env", item]
    return Deployment(build_parser().parse_args(argv))


# --------------------------------------------------------------------------- CPU accounting

def cpu_snapshot(dep: Deployment) -> dict[str, float]:
    """CPU seconds used so far by the web processes and by the bench's PostgreSQL and Redis."""
    snapshot = {"web": common.cpu_seconds(common.descendants(dep.web.pid)), **dep.services.cpu()}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    snapshot["loadgen"] = usage.ru_utime + usage.ru_stime
    return snapshot


def cpu_per_event(before: dict, after: dict, events: int) -> dict[str, float]:
    """Microseconds of CPU per accepted event, by process group."""
    return {name: 1e6 * (after[name] - before[name]) / max(events, 1) for name in before}


# --------------------------------------------------------------------------- closed loop (wrk)


def wrk_round(dep: Deployment, requests: Requests, name: str, duration: float, connections: int, threads: int):
    script = dep.work_dir / "ingest.lua"
    if not script.exists():
        script.write_text(WRK_LUA)
    data = dep.work_dir / f"{name}.requests"
    # Enough unique, freshly signed webhooks that no connection ever wraps around.
    requests.write(data, int(dep.args.max_rate * duration) + connections * 50)
    argv = [
        dep.args.wrk, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
        "-s", str(script), dep.base, "--", dep.paths[name], str(data), str(threads),
    ]  # fmt: skip
    before = cpu_snapshot(dep)
    out = run(argv, capture=True).stdout
    after = cpu_snapshot(dep)
    match = re.search(r"KITE_RESULT (.+)", out)
    if not match:
        raise SystemExit(f"wrk printed no result:\n{out}")
    accepted, duplicate, other, wrapped, total, sock_errors, dur_us, p50, p99, pmax = map(int, match[1].split())
    data.unlink()
    if wrapped and name == "stripe":  # repeated ids would be answered 200 duplicate, not counted
        log(f"warning: {name}: requests wrapped around ({wrapped}); raise --max-rate")
    seconds = dur_us / 1e6
    return {
        "rate": accepted / seconds,
        "requests": total,
        "accepted": accepted,
        "duplicate": duplicate,
        "other": other,
        "socket_errors": sock_errors,
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
        "cpu_us": cpu_per_event(before, after, accepted),
    }


# --------------------------------------------------------------------------- open loop (asyncio)


async def _open_loop(port: int, raw_requests: list[bytes], rate: float, warm: int):
    """Send raw_requests[i] at start + i/rate whatever happened before (open loop), each on an idle
    keep-alive connection or a new one; latency runs from the intended send time."""
    pool = common.KeepAlive("127.0.0.1", port)
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    errors: collections.Counter = collections.Counter()
    await pool.open(warm)

    async def one(i: int, intended: float):
        raw = raw_requests[i]
        reused = pool.checkout()
        try:
            reader, writer = reused or await pool.connect()
            try:
                status = await common.exchange(reader, writer, raw)
            except (asyncio.IncompleteReadError, ConnectionError):
                if reused is None:
                    raise
                writer.close()  # a keep-alive connection closed under us: once more on a new one, as clients do
                errors["retried on a new connection"] += 1
                reader, writer = await pool.connect()
                status = await common.exchange(reader, writer, raw)
        except Exception as exc:
            errors[type(exc).__name__] += 1
            return
        latencies.append(time.perf_counter() - intended)
        statuses[status] += 1
        pool.checkin(reader, writer)

    elapsed = await common.at_rate(len(raw_requests), rate, one)
    pool.close()
    return latencies, statuses, errors, pool.opened, elapsed


def signed_requests(dep: Deployment, requests: Requests, name: str, count: int) -> list[bytes]:
    """`count` freshly signed webhooks for endpoint `name`, as raw HTTP/1.1 requests."""
    return [
        common.raw_post(dep.paths[name], dep.args.port, body,
                        {"Content-Type": "application/json", "Stripe-Signature": signature})
        for signature, body in requests.batch(count)
    ]  # fmt: skip


def open_loop(dep: Deployment, raws: list[bytes], rate: float):
    """(latencies in s, sorted; statuses; errors; connections opened; elapsed s) of one open-loop run."""
    latencies, statuses, errors, opened, elapsed = common.run_async(
        _open_loop(dep.args.port, raws, rate, dep.args.connections)
    )
    return sorted(latencies), statuses, errors, opened, elapsed


def not_accepted(statuses, errors) -> int:
    """Answers other than 202, and requests that got no answer (a retry on a new connection is not one)."""
    return sum(v for k, v in statuses.items() if k != 202) + sum(
        v for k, v in errors.items() if not k.startswith("retried"))  # fmt: skip


def open_loop_round(dep: Deployment, requests: Requests, name: str, rate: float, duration: float):
    raws = signed_requests(dep, requests, name, int(rate * duration))
    latencies, statuses, errors, opened, elapsed = open_loop(dep, raws, rate)
    return {
        "offered": rate,
        "achieved": statuses.get(202, 0) / elapsed,
        "accepted": statuses.get(202, 0),
        "other": not_accepted(statuses, errors),
        "outcomes": dict(statuses) | dict(errors),
        "connections": opened,
        "p50_ms": common.pct(latencies, 50) * 1000,
        "p90_ms": common.pct(latencies, 90) * 1000,
        "p99_ms": common.pct(latencies, 99) * 1000,
        "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
    }


# --------------------------------------------------------------------------- report


def machine_facts(dep: Deployment) -> dict:
    versions = common.versions("django", "uvicorn", "psycopg")
    settings = common.kite_settings(
        dep.env, "s.KITE_WEB_WORKERS", "s.KITE_WSGI_THREADS", "s.DATABASES['default'].get('CONN_MAX_AGE')",
        "s.DATABASES['default'].get('CONN_HEALTH_CHECKS')", "bool(s.DATABASES['default'].get('OPTIONS', {}).get('pool'))",
    )  # fmt: skip
    return {
        "nproc": os.cpu_count(),
        "cpu": common.cpu_model(),
        "python": platform.python_version(),
        "django": versions[0],
        "uvicorn": versions[1],
        "psycopg": versions[2],
        "postgres": dep.sql("SHOW server_version"),
        "synchronous_commit": dep.sql("SHOW synchronous_commit"),
        "fsync": dep.sql("SHOW fsync"),
        "web_workers": settings[0],
        "wsgi_threads": settings[1],
        "conn_max_age": settings[2],
        "conn_health_checks": settings[3],
        "pool": settings[4],
    }


med = common.med
write_results = common.write_results
markers = common.markers


def machine_line(facts: dict, durability: str) -> str:
    """The report's line on the machine (bench/scale.py's too); `durability` closes PostgreSQL's brackets."""
    quiet = "quiet" if facts["loadavg"] < 0.5 and not facts["pytest"] else "NOT quiet (see load average)"
    return (
        f"- Machine: {facts['nproc']} CPUs ({facts['cpu']}); 1-min load average {facts['loadavg']:.2f} before the "
        f"run, {facts['loadavg_end']:.2f} after, other pytest processes at the start: {facts['pytest']} → {quiet}. "
        f"Python {facts['python']}, Django {facts['django']}, uvicorn {facts['uvicorn']}, psycopg {facts['psycopg']}, "
        f"PostgreSQL {facts['postgres']} (fsync={facts['fsync']}, synchronous_commit={facts['synchronous_commit']}: "
        f"{durability}), Redis; all on loopback on this one machine, load generators included."
    )


def report(args, dep, facts, closed, opened, verified, started, finished) -> str:
    names = [n for n in ("stripe", "bare", "noop") if closed and n in closed[0]]
    rates = {name: [r[name]["rate"] for r in closed] for name in names}
    ratios = [r["stripe"]["rate"] / r["bare"]["rate"] for r in closed]
    lines = [
        *common.section_head(args.section, args.title or args.section, started, common.command("ingest.py")),
        machine_line(facts, "durable commits"),
        f"- Web: `{dep.web_command}` with KITE_TLS=off (plain HTTP, as behind the TLS proxy), "
        f"KITE_WEB_WORKERS={facts['web_workers']}, KITE_WSGI_THREADS={facts['wsgi_threads']}, "
        f"CONN_MAX_AGE={facts['conn_max_age']}, CONN_HEALTH_CHECKS={facts['conn_health_checks']}, "
        "REDIS_URL set (broadcast on commit through Redis), PROMETHEUS_MULTIPROC_DIR set (as `runkite` does); "
        "no Celery worker/beat (they have no work in this benchmark)."
        + (f" Extra environment: {', '.join(args.env)}." if args.env else ""),
        f"- **stripe**: `POST /hooks/{{team}}/{SOURCE_NAME}` (kind stripe), {len(stripe_body('evt_x' * 4, 0))}-byte "
        "payment_intent.succeeded bodies, each with a unique event id and a valid Stripe-Signature made for its "
        "round, stored on the web process's event loop (ingest/edge.py; KITE_LOOP_INGEST=off: through Django): "
        "source (this process's copy) → signature check → CloudEvent → one autocommit statement per batch of "
        "webhooks waiting together: dedup INSERT guarded by the source row's version and the team's routes "
        "version → broadcast → metrics. **bare**: `POST /bench/bare/{team}/…` (kite/bench_endpoints.py): same body, "
        "through Django's request handling in a thread, the same INSERT into ingest_event as one autocommit "
        "statement, nothing else"
        + (". **noop**: `/bench/noop`, no database." if "noop" in names else "."),
        f"- Closed loop: `wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration:g}s` per endpoint, "
        f"{args.rounds} rounds alternating the order, after a {args.warmup:g} s warm-up of each; "
        "rate = 202 answers per second. CPU = CPU time of the web processes / PostgreSQL / Redis per 202, "
        "read from /proc around each run.",
        f"- Open loop: {', '.join(f'{r:g}' for r in args.rates)} requests/s offered for {args.open_duration:g} s "
        "per endpoint and rate, "
        f"{args.open_rounds} rounds alternating; asyncio generator (uvloop) on up to {args.connections}+ "
        "keep-alive connections, latency from each request's *intended* send time (no coordinated omission).",
        "",
        "| closed loop | " + " | ".join(f"r{i + 1}" for i in range(len(closed))) + " | **median** |",
        "|---|" + "---|" * (len(closed) + 1),
    ]
    for name in names:
        lines.append(
            f"| {name} events/s | " + " | ".join(f"{v:.0f}" for v in rates[name]) + f" | **{med(rates[name]):.0f}** |"
        )
    lines.append("| stripe / bare (same round) | " + " | ".join(f"{v:.0%}" for v in ratios) + f" | **{med(ratios):.0%}** |")
    for name in ("stripe", "bare"):
        values = [r[name]["p99_ms"] for r in closed]
        lines.append(f"| {name} p99 ms (wrk) | " + " | ".join(f"{v:.1f}" for v in values) + f" | {med(values):.1f} |")
    for name in names:
        for group, label in (("web", "web"), ("postgres", "PostgreSQL")):
            values = [r[name]["cpu_us"][group] for r in closed]
            lines.append(
                f"| {name} CPU µs/event, {label} | " + " | ".join(f"{v:.0f}" for v in values) + f" | {med(values):.0f} |"
            )
    if opened:
        lines += [
            "",
            f"| open loop (median of {args.open_rounds} rounds) | offered/s | achieved 202/s | p50 ms | p90 ms | "
            "p99 ms | max ms | non-202 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for rate, rounds in opened.items():
            for name in ("stripe", "bare"):
                rows = [r[name] for r in rounds]
                lines.append(
                    f"| {name} | {rate:g} | {med([r['achieved'] for r in rows]):.0f} | "
                    f"{med([r['p50_ms'] for r in rows]):.1f} | {med([r['p90_ms'] for r in rows]):.1f} | "
                    f"**{med([r['p99_ms'] for r in rows]):.1f}** | {med([r['max_ms'] for r in rows]):.1f} | "
                    f"{sum(r['other'] for r in rows)} |"
                )
        lines.append("")
        for rate, rounds in opened.items():
            for name in ("stripe", "bare"):
                total = collections.Counter()
                for r in rounds:
                    total.update(r[name]["outcomes"])
                lines.append(f"Open-loop outcomes at {rate:g}/s, {name}: {dict(total)}.")
        lines.append("")
        for rate, rounds in opened.items():
            lines.append(
                f"Per-round p50/p99 ms at {rate:g}/s — stripe: "
                + ", ".join(f"{r['stripe']['p50_ms']:.1f}/{r['stripe']['p99_ms']:.1f}" for r in rounds)
                + "; bare: "
                + ", ".join(f"{r['bare']['p50_ms']:.1f}/{r['bare']['p99_ms']:.1f}" for r in rounds)
                + "."
            )
    target = med(rates["stripe"]) >= 1000 and med(ratios) >= 0.8
    lines += [
        "",
        f"Target (≥ 1,000 verified events/s and ≥ 80 % of bare, durable commits): "
        f"{med(rates['stripe']):.0f}/s and {med(ratios):.0%} → **{'met' if target else 'not met'}**.",
        "",
        f"Checked after the run: {verified['reported']} webhooks were answered 202 (warm-ups included) and "
        f"{verified['stored']} Stripe events are stored (the few more are requests wrk cut off at the end of a run, "
        f"stored but never answered); non-2xx answers to webhooks: {verified['non202']}. "
        f"The run took {(finished - started).seconds} s.",
    ]
    return common.section_text(lines, args.section)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser(__doc__)
    common.wrk_arguments(parser, rounds=5, duration=10, warmup=3, rounds_help="closed-loop rounds (each: real, then bare)",
                         duration_help="seconds per closed-loop run", warmup_help="seconds of warm-up per endpoint")
    parser.add_argument("--rates", type=lambda v: [float(x) for x in v.split(",")], default=[400.0, 800.0],
                        help="offered loads of the open-loop phase, requests/s, comma-separated")
    parser.add_argument("--open-duration", type=float, default=10)
    parser.add_argument("--open-rounds", type=int, default=3)
    parser.add_argument("--max-rate", type=float, default=8000, help="requests signed per second of a wrk run")
    parser.add_argument("--noop", action="store_true", help="also measure /bench/noop (serving stack, no database)")
    parser.add_argument("--server", choices=["uvicorn", "gunicorn"], default="uvicorn",
                        help="uvicorn = production (runkite); gunicorn gthread for comparison only")  # fmt: skip
    parser.add_argument("--app", default="kite.asgi:application", help="ASGI app (other than the default: experiments)")
    parser.add_argument("--workers", type=int, help="KITE_WEB_WORKERS (default: Kite's default)")
    parser.add_argument("--threads", type=int, help="KITE_WSGI_THREADS (default: Kite's default)")
    parser.add_argument("--tree", help="serve the code of this checkout (another revision; bench/ab.py's tree=)")
    common.service_arguments(parser, port=18480, pg_port=55532, redis_port=56479,
                             services_dir="/tmp/kite-bench-services", database="kite_bench")  # fmt: skip
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    common.output_arguments(parser, QUIET, section="ingest")
    parser.add_argument("--hold", action="store_true", help="set up, print how to reach it, wait for Ctrl-C (profiling)")
    return parser


def others_busy() -> int:
    return len(common.others_busy())


def wait_until_quiet(limit: float) -> None:
    """Wait (up to `limit` s) for the 1-min load average < 0.5 and no pytest running elsewhere."""
    common.wait_until_quiet(limit, log)


def at_start(args) -> dict:
    """The machine before the run (after waiting for a quiet one, if asked): load average, pytest processes."""
    if args.wait_quiet:
        wait_until_quiet(args.wait_quiet)
    return {"loadavg": os.getloadavg()[0], "pytest": others_busy()}


def run_measured(args, deployment, measure, log) -> int:
    """`measure(args, deployment, the machine at the start)`'s exit code; `deployment` stopped at the end
    (bench/scale.py's and bench/retention.py's main too)."""
    initial = at_start(args)
    return common.run_main(lambda: measure(args, deployment, initial), deployment.stop, log, "stopping web and services")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_measured(args, Deployment(args), measure, log)


def measure(args, dep: Deployment, initial: dict) -> int:
    started = datetime.now(timezone.utc)
    dep.start()
    facts = machine_facts(dep) | initial
    log(f"team {dep.team_id}; load average {facts['loadavg']:.2f}")
    if args.hold:
        print(json.dumps({"base": dep.base, "paths": dep.paths, "secret": dep.secret, "web_pid": dep.web.pid,
                          "work_dir": str(dep.work_dir), "data_dir": str(dep.data_dir)}), flush=True)
        signal.pause()
    requests = Requests(dep.secret, run_id=started.strftime("%H%M%S"))
    names = ["stripe", "bare"] + (["noop"] if args.noop else [])
    warm = {name: wrk_round(dep, requests, name, args.warmup, args.connections, args.wrk_threads) for name in names}
    closed = []
    for i in range(args.rounds):
        result = {}
        for name in names if i % 2 == 0 else list(reversed(names)):
            result[name] = wrk_round(dep, requests, name, args.duration, args.connections, args.wrk_threads)
        closed.append(result)
        log(
            f"closed round {i + 1}: "
            + "  ".join(
                f"{n} {result[n]['rate']:.0f}/s (p99 {result[n]['p99_ms']:.1f} ms, CPU µs/event web "
                f"{result[n]['cpu_us']['web']:.0f} pg {result[n]['cpu_us']['postgres']:.0f})"
                for n in names
            )
            + f"  ratio {result['stripe']['rate'] / result['bare']['rate']:.0%}"
        )
    opened: dict[float, list] = {}
    for rate in args.rates:
        opened[rate] = []
        for i in range(args.open_rounds):
            result = {}
            for name in ("stripe", "bare") if i % 2 == 0 else ("bare", "stripe"):
                result[name] = open_loop_round(dep, requests, name, rate, args.open_duration)
            opened[rate].append(result)
            log(
                f"open round {i + 1} at {rate:g}/s: "
                + "  ".join(
                    f"{n} p50 {result[n]['p50_ms']:.1f} p99 {result[n]['p99_ms']:.1f} ms "
                    f"({result[n]['achieved']:.0f}/s, outcomes {result[n]['outcomes']})"
                    for n in ("stripe", "bare")
                )
            )
    stored = int(dep.sql(f"SELECT count(*) FROM ingest_event e JOIN ingest_source s ON s.id = e.source_id "
                         f"WHERE s.name = '{SOURCE_NAME}' AND e.ce_type LIKE 'com.stripe.payment_intent.%'"))  # fmt: skip
    everything = [warm, *closed, *(r for rounds in opened.values() for r in rounds)]
    reported = sum(r["stripe"]["accepted"] for r in everything)
    non202 = sum(r["stripe"]["other"] + r["stripe"].get("duplicate", 0) for r in everything)
    verified = {"reported": reported, "stored": stored, "non202": non202}
    finished = datetime.now(timezone.utc)
    facts["loadavg_end"] = os.getloadavg()[0]
    section = report(args, dep, facts, closed, opened, verified, started, finished)
    return common.publish(section, args.section, not args.no_write, log)


if __name__ == "__main__":
    sys.exit(main())
