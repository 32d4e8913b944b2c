#!/usr/bin/env python3
"""Ingest ceiling: verified Stripe webhooks against PostgreSQL's bare INSERT rate, and the serving stack between.

Starts, as bench/ingest.py does (its Deployment): its own PostgreSQL + Redis
(scripts/services.sh, ports of its own, fsync and synchronous_commit on:
durable commits), a fresh database and Kite's web process (`manage.py runkite
--no-worker --no-beat`, KITE_TLS=off as behind a TLS proxy,
KITE_BENCH_ENDPOINTS=on), creates the Stripe source through the API, and
starts beside it, on `--asgi-port`, bench/ceiling_app.py — a minimal ASGI
application without Django — under the uvicorn command runkite serves Kite's
web with (same workers, HTTP implementation, event loop and flags; Kite's
application swapped for it). Then, in the same run, closed loop at the same
concurrency (`--connections` wrk connections or pgbench clients, `--wrk-threads`
threads), in rounds whose order is rotated each round, after a warm-up of each:

1. pgbench: one INSERT per transaction into ingest_event on the same
   PostgreSQL (bench/scale.py's pgbench round: its script, the same row);
2. stripe: real verified Stripe webhooks through Kite (bench/ingest.py's wrk
   round);
3. bare: Kite's `/bench/bare/…` — the same Django stack, one INSERT, nothing else;
4. noop: Kite's `/bench/noop` — the Django stack, no database;
5. asgi: the minimal ASGI app answering 202 after reading the body — the
   HTTP server's own ceiling in Python on this machine;
6. asgi-insert: the same app doing one INSERT of pgbench's row per request
   (autocommit, psycopg's async API, `--pool` connections per worker process,
   prepared statements) — the floor a Python HTTP service doing one durable
   INSERT per request could reach here.

Per variant: the rate of each round (2xx answers or transactions per second),
the median, the median of the ratios to pgbench of the same round, and CPU µs
per request of the web server's processes and of PostgreSQL (its backends that
exited during the run included). Printed, and written into bench/RESULTS.md
between the `bench:ceiling` markers unless --no-write. Everything started is
stopped at the end.

    .venv/bin/python bench/ceiling.py --wait-quiet 1500                     # 5 rounds × 10 s per variant (~7 min)
    .venv/bin/python bench/ceiling.py --rounds 1 --duration 3 --no-write    # quick trial (~1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import common

bench = common.load("ingest")
scale = common.load("scale")

ROOT = bench.ROOT
VARIANTS = ["pgbench", "stripe", "bare", "noop", "asgi", "asgi-insert"]
ASGI_PATHS = {"asgi": "/noop", "asgi-insert": "/insert"}  # bench/ceiling_app.py's
ASGI_SOURCE = "asgi-insert"  # ce_source of the rows the ASGI app inserts
TARGET = 0.6  # verified webhooks ≥ 60 % of pgbench

log = common.logger("ceiling")
med = common.med


@dataclasses.dataclass
class Served:
    """What bench/ingest.py's wrk_round and cpu_snapshot read of a Deployment, another server in front: its
    base URL and paths, and its process (its tree's CPU is the "web" CPU)."""

    base: str
    paths: dict[str, str]
    web: subprocess.Popen
    work_dir: Path
    args: argparse.Namespace
    services: common.Services


class Ceiling:
    """bench/ingest.py's Deployment (Kite's web on --port) and bench/ceiling_app.py on --asgi-port."""

    # bench/scale.py's round itself; it reads self.args, self.dep, self.requests, self.team, self.stripe_source_id
    pgbench_round = scale.Scale.pgbench_round

    def __init__(self, args):
        self.args = args
        self.dep = bench.deployment_for(args)
        self.asgi: subprocess.Popen | None = None

    def start(self) -> None:
        dep = self.dep
        dep.start()
        self.team = dep.team_id
        self.stripe_source_id = int(dep.sql(f"SELECT id FROM ingest_source WHERE team_id = '{self.team}' "
                                            f"AND name = '{bench.SOURCE_NAME}'"))  # fmt: skip
        self.requests = bench.Requests(dep.secret, run_id=datetime.now(UTC).strftime("c%H%M%S"))
        self.start_asgi()

    def asgi_argv(self) -> list[str]:
        """runkite's uvicorn command as it would start Kite's web with this deployment's settings, serving
        bench/ceiling_app.py on --asgi-port instead."""
        code = ("import json, django; django.setup()\n"
                "from kite.management.commands.runkite import Command\n"
                "print(json.dumps(Command()._web_command()))")  # fmt: skip
        out = common.run([sys.executable, "-c", code], env=self.dep.env, capture=True).stdout
        argv = json.loads(out.splitlines()[-1])
        if "kite.asgi:application" not in argv or "--port" not in argv:
            raise SystemExit(f"runkite's web command is not what this script knows how to adapt: {argv}")
        argv[argv.index("kite.asgi:application")] = "ceiling_app:app"
        argv[argv.index("--port") + 1] = str(self.args.asgi_port)
        return [*argv, "--app-dir", str(ROOT / "bench")]

    def start_asgi(self) -> None:
        dep, argv = self.dep, self.asgi_argv()
        self.asgi_command = shlex.join(argv)
        log(f"asgi: {self.asgi_command}")
        env = dict(os.environ, CEILING_DATABASE_URL=dep.database_url, CEILING_TEAM_ID=self.team,
                   CEILING_SOURCE_ID=str(self.stripe_source_id), CEILING_POOL=str(self.args.pool))  # fmt: skip
        path = dep.work_dir / "asgi.log"
        with path.open("wb") as out:
            self.asgi = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        base = f"http://127.0.0.1:{self.args.asgi_port}"
        common.wait_healthy("asgi", f"{base}/healthz", self.asgi, timeout=60, interval=0.2, log_tail=path.read_text)
        self.served = Served(base, ASGI_PATHS, self.asgi, dep.work_dir, dep.args, dep.services)

    def stop(self) -> None:
        common.stop_process(self.asgi, group=False)  # uvicorn stops its workers (lifespan: the pools close)
        self.asgi = None
        self.dep.stop()

    def round(self, name: str, duration: float) -> dict:
        """One closed-loop run of a variant. PostgreSQL's CPU is read here with the backends that exited during
        the run (pgbench's connect and leave with it; Kite's and the ASGI app's stay open)."""
        a = self.args
        before = self.dep.services.cpu(reaped=True)["postgres"]
        if name == "pgbench":
            result = self.pgbench_round(duration)
            count = result["transactions"]
        else:
            target = self.served if name in ASGI_PATHS else self.dep
            result = bench.wrk_round(target, self.requests, name, duration, a.connections, a.wrk_threads)
            count = result["accepted"]
        time.sleep(0.2)  # the last backends' exit reaped by the postmaster
        after = self.dep.services.cpu(reaped=True)["postgres"]
        result["cpu_us"]["postgres"] = 1e6 * (after - before) / max(count, 1)
        return result

    def stored(self) -> dict[str, int]:
        """Rows of ingest_event by the variant that stored them."""
        rows = self.dep.sql(
            "SELECT CASE ce_source WHEN 'pgbench' THEN 'pgbench' WHEN 'kite-bench://bare' THEN 'bare'"
            f" WHEN '{ASGI_SOURCE}' THEN 'asgi-insert' ELSE 'stripe' END, count(*) FROM ingest_event"
            f" WHERE source_id = {self.stripe_source_id} GROUP BY 1"
        )
        return {name: int(count) for name, count in (line.split("|") for line in rows.splitlines())}


# --------------------------------------------------------------------------- report


def report(args, ceiling: Ceiling, facts, warm, rounds, stored, started, finished) -> str:
    dep, n = ceiling.dep, len(rounds)
    rates = {v: [r[v]["rate"] for r in rounds] for v in VARIANTS}
    ratios = {v: [r[v]["rate"] / r["pgbench"]["rate"] for r in rounds] for v in VARIANTS}
    lines = [
        *common.section_head(args.section, args.title or "Ingest ceiling", started, common.command("ceiling.py")),
        bench.machine_line(facts, "durable commits"),
        f"- Kite's web: `{dep.web_command}` with KITE_TLS=off, KITE_BENCH_ENDPOINTS=on, "
        f"KITE_WEB_WORKERS={facts['web_workers']}, KITE_WSGI_THREADS={facts['wsgi_threads']}, CONN_MAX_AGE={facts['conn_max_age']}, REDIS_URL set; no Celery "
        f"worker/beat. ASGI app: `{ceiling.asgi_command}` (runkite's uvicorn command, Kite's application swapped "
        f"for bench/ceiling_app.py), {args.pool} psycopg AsyncConnections per worker process for asgi-insert. "
        "Both stay started; one takes load at a time."
        + (f" Extra environment: {', '.join(args.env)}." if args.env else ""),
        ("- **pgbench**: one INSERT per transaction of the same ~1 kB row into ingest_event (bench/scale.py's "
        "script, simple protocol); **stripe**: `POST /hooks/{team}/…`, verified Stripe webhooks with unique ids; "
        "**bare**: `POST /bench/bare/{team}/…`, Kite's Django stack, one INSERT, nothing else; **noop**: "
        "`/bench/noop`, Kite's Django stack, no database; **asgi**: the ASGI app without Django, body read, 202; "
        "**asgi-insert**: the same app, one INSERT of pgbench's row (the body as data) per request, autocommit, "
        "prepared, then 202."),
        (f"- Closed loop: `wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration:g}s` / `pgbench -n "
        f"-c{args.pgbench_clients or args.connections} -j{args.wrk_threads} -T{max(1, round(args.duration))}`, "
        f"{n} round(s), the order rotated each round, after a {args.warmup:g} s warm-up of each; rate = 2xx answers "
        "(pgbench: transactions) per second. CPU µs per request (pgbench: per transaction) from /proc around each "
        "run: web = Kite's web or the ASGI server's processes; PostgreSQL = all its processes, backends that exited "
        "during the run included."),
        "",
        "| variant | " + " | ".join(f"r{i + 1}" for i in range(n))
        + " | **median**/s | vs pgbench (same round) | CPU µs web | CPU µs PostgreSQL |",
        "|---|" + "---|" * (n + 4),
    ]  # fmt: skip
    for v in VARIANTS:
        web = "–" if v == "pgbench" else f"{med([r[v]['cpu_us']['web'] for r in rounds]):.0f}"
        lines.append(
            f"| {v} | " + " | ".join(f"{x:.0f}" for x in rates[v]) + f" | **{med(rates[v]):.0f}** | "
            f"{med(ratios[v]):.0%} | {web} | {med([r[v]['cpu_us']['postgres'] for r in rounds]):.0f} |"
        )
    lines += ["", "Answers other than 2xx and socket errors (measured rounds):", ""]
    for v in VARIANTS:
        if v == "pgbench":
            lines.append(f"- pgbench: {sum(r[v]['failed'] for r in rounds)} failed transactions.")
        else:
            duplicates = f", {sum(r[v]['duplicate'] for r in rounds)} answered 200 duplicate" if v == "stripe" else ""
            lines.append(f"- {v}: {sum(r[v]['other'] for r in rounds)} non-2xx, "
                         f"{sum(r[v]['socket_errors'] for r in rounds)} socket errors{duplicates}.")  # fmt: skip
    answered = {v: sum(r[v]["transactions" if v == "pgbench" else "accepted"] for r in [warm, *rounds])
                for v in ("pgbench", "stripe", "bare", "asgi-insert")}  # fmt: skip
    stripe = med(ratios["stripe"])
    reach = [v for v in VARIANTS[1:] if med(ratios[v]) >= TARGET]
    lines += [
        "",
        "Rows stored in ingest_event after the run against 202 answers / pgbench transactions, warm-ups included "
        "(a few more rows: requests wrk cut off at the end of a run, stored but never answered): "
        + ", ".join(f"{v} {stored.get(v, 0)} / {answered[v]}" for v in answered) + ".",
        "",
        (f"Median stripe / pgbench of the same round: **{stripe:.0%}** against the {TARGET:.0%} target → "
        f"**{'met' if stripe >= TARGET else 'not met'}**. Variants at ≥ {TARGET:.0%} of pgbench (median of the "
        f"same-round ratios): {', '.join(reach) if reach else 'none'}. The run took {(finished - started).seconds} s."),
    ]
    return common.section_text(lines, args.section)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser(__doc__)
    common.wrk_arguments(parser, rounds=5, duration=10, warmup=3, rounds_help="rounds (each: every variant once)",
                         duration_help="seconds per wrk / pgbench run", warmup_help="seconds of warm-up per variant")
    parser.add_argument("--pgbench-clients", type=int, help="default: --connections")
    parser.add_argument("--max-rate", type=float, default=8000, help="webhooks signed per second of a wrk run")
    parser.add_argument("--pool", type=int, default=16, help="database connections per ASGI worker process")
    common.service_arguments(parser, port=18760, pg_port=55760, redis_port=56760, port_help="Kite's web port",
                             services_dir="/tmp/kite-ceiling-services", database="kite_ceiling")  # fmt: skip
    parser.add_argument("--asgi-port", type=int, default=18761, help="the minimal ASGI app's port")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--pgbench", default=shutil.which("pgbench") or scale.PGBENCH)
    common.output_arguments(parser, bench.QUIET, section="ceiling")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.pgbench).exists():
        raise SystemExit(f"no pgbench at {args.pgbench} (Debian's postgresql-15 ships it)")
    if not Path(args.wrk).exists():
        raise SystemExit(f"no wrk at {args.wrk} (apt-get install wrk)")
    return bench.run_measured(args, Ceiling(args), measure, log)


def measure(args, ceiling: Ceiling, initial: dict) -> int:
    started = datetime.now(UTC)
    ceiling.start()
    facts = bench.machine_facts(ceiling.dep) | initial
    log(f"team {ceiling.team}; load average {facts['loadavg']:.2f}")
    warm = {v: ceiling.round(v, args.warmup) for v in VARIANTS}  # discarded but for the stored-rows check
    rounds = []
    for i in range(args.rounds):
        order = VARIANTS[i % len(VARIANTS):] + VARIANTS[: i % len(VARIANTS)]
        result = {v: ceiling.round(v, args.duration) for v in order}
        rounds.append(result)
        log(f"round {i + 1}: " + "  ".join(
            f"{v} {result[v]['rate']:.0f}/s ({result[v]['rate'] / result['pgbench']['rate']:.0%}, CPU µs web "
            f"{result[v]['cpu_us']['web']:.0f} pg {result[v]['cpu_us']['postgres']:.0f})" for v in order)
        )  # fmt: skip
    stored = ceiling.stored()
    finished = datetime.now(UTC)
    facts["loadavg_end"] = os.getloadavg()[0]
    section = report(args, ceiling, facts, warm, rounds, stored, started, finished)
    return common.publish(section, args.section, not args.no_write, log)


if __name__ == "__main__":
    sys.exit(main())
