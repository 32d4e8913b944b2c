#!/usr/bin/env python3
"""Retention benchmark: webhook latency while a day of expired rows is purged.

An operator storing `--per-day` events a day purges one day of them every day — the events, their
outbox entries and delivery attempts, the day's audit rows — while webhooks keep arriving. This
measures what that purge costs the webhooks.

Set-up (bench/scale.py's, through bench/ingest.py's Deployment: PostgreSQL + Redis on ports of their own,
fsync and synchronous_commit on, a fresh database, Kite's web process `manage.py runkite --no-worker
--no-beat`, KITE_TLS=off as behind a TLS proxy, a Stripe source made through the API): bulk load with
SQL `--days` whole days of `--per-day` events each, day k received between k+1 and k days ago (an
hour's margin at each end), shaped as bench/scale.py's bulk: 70 % from the Stripe source, each of
those with an outbox entry to a (revoked) peer — delivered, 0.5 % dead, 0.1 % still pending — and
one or two delivery rows; 30 % federated in; one audit row per 20 events. VACUUM ANALYZE,
CHECKPOINT.

Then `--rounds` pairs of rounds, alternating which goes first:

- baseline: verified Stripe webhooks at `--rate`/s, open loop (bench/ingest.py's generator: latency
  from each request's intended send time), `--chunk`-second runs for `--baseline-seconds`, no purge;
- purge: the same load while another process runs the real tasks — ingest.tasks.events_purge_expired,
  then federation.tasks.retention_purge, each again until a run finds nothing (a run stops at its time
  budget) — with KITE_EVENT_RETENTION_DAYS = KITE_AUDIT_RETENTION_DAYS
  set so that exactly the oldest day still stored has expired; the load runs in `--chunk`-second runs
  for as long as the purge does (at least one).

Reported: p50/p99 of each kind of round, medians over rounds, the ratio purge p99 / baseline p99
(target ≤ 2), and the purge's duration and rows deleted per second (events, outbox entries, delivery
attempts, audit rows, counted before and after). `--purge-code previous` runs the purge as Kite did
before batching by index (for comparison; not the tasks). Printed, and written into bench/RESULTS.md
between the `bench:retention` markers unless --no-write.

    .venv/bin/python bench/retention.py --per-day 100000 --rounds 2 --no-write   # trial, ~5 min
    .venv/bin/python bench/retention.py --per-day 1000000 --rounds 3 --wait-quiet 1500   # the recorded run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

import psycopg

import common

bench = common.load("ingest")

ROOT = bench.ROOT
PEER_NAME = common.BulkLoad.PEER_NAME
STRIPE_TYPES = [
    "com.stripe.payment_intent.succeeded", "com.stripe.charge.succeeded", "com.stripe.invoice.paid",
    "com.stripe.customer.updated", "com.stripe.checkout.session.completed", "com.stripe.charge.refunded",
]  # fmt: skip
ROWS_PER_TXID = 4  # bulk rows share a transaction id this many at a time (batched receipts do)
TABLES = ("ingest_event", "federation_outboxentry", "federation_delivery", "federation_auditevent")
CHUNK = 200_000
MARGIN_HOURS = 1  # a day's events stay this far from its ends: the load and the purges may be minutes apart


log = common.logger("retention")


def pct(values: list[float], p: float) -> float:
    """The p-th percentile of latencies in s, in ms."""
    return common.pct(sorted(values), p) * 1000


# One chunk of one day's bulk: bench/scale.py's shape (common.BulkLoad's), with the day's times and
# 0.1 % of the entries still pending (a peer that was down): the purge must keep those events.
BULK_SQL = common.BulkLoad.bulk_sql(
    ce_type="(%(types)s::text[])[1 + (g %% 6)]",
    received="now() - interval '1 day' * %(day)s::int - interval '1 hour' * %(margin)s::int"
    " - (interval '1 day' - interval '2 hours' * %(margin)s::int) * (g::float8 / %(count)s)",
    pending="h %% 1000 = 7",
)

# The purge process: the real tasks, with the retention of the environment.
PURGE_TASKS = """
import json, time, django
django.setup()
from ingest import tasks as ingest_tasks
from federation import tasks as federation_tasks
# A run stops at its time budget: run again, as the next scheduled runs would, until one finds nothing.
t0, events = time.monotonic(), 0
while n := ingest_tasks.events_purge_expired():
    events += n
t1, other = time.monotonic(), {"audit": 0, "deliveries": 0}
while any((found := federation_tasks.retention_purge()).values()):
    other = {key: other[key] + found[key] for key in other}
t2 = time.monotonic()
print(json.dumps({"events": events, "other": other, "event_seconds": t1 - t0, "other_seconds": t2 - t1}))
"""

# The purge as Kite ran it before batching by index (each batch: ids by a fresh scan of the age
# index, then Django's cascading delete, which also reads every event's row), for comparison.
PURGE_PREVIOUS = """
import json, os, time, django
django.setup()
from django.utils import timezone
from federation.models import AuditEvent, Delivery
from ingest.models import Event
days = int(os.environ["KITE_EVENT_RETENTION_DAYS"])
cutoff = timezone.now() - timezone.timedelta(days=days)
def batches(queryset, batch=5000):
    total = 0
    while True:
        ids = list(queryset.order_by().values_list("id", flat=True)[:batch])
        if not ids:
            return total
        total += queryset.model.objects.filter(id__in=ids).delete()[1].get(queryset.model._meta.label, 0)
t0 = time.monotonic()
events = batches(Event.objects.filter(received_at__lt=cutoff))
t1 = time.monotonic()
other = {"audit": batches(AuditEvent.objects.filter(at__lt=cutoff)),
         "deliveries": batches(Delivery.objects.filter(attempted_at__lt=cutoff))}
t2 = time.monotonic()
print(json.dumps({"events": events, "other": other, "event_seconds": t1 - t0, "other_seconds": t2 - t1}))
"""


# The three reads that read whole tables at scale before (outbox counts of every status; federation
# 0014 and ingest 0003, as Kite runs
# them (the SQL captured from the selectors), EXPLAIN ANALYZE'd with and without their new indexes.
EXPLAIN_CAPTURE = """
import json, sys, django
django.setup()
from django.db import connection
from django.test.utils import CaptureQueriesContext
from federation import selectors
from ingest import journey
team, peer = sys.argv[1], int(sys.argv[2])
reads = {}
with CaptureQueriesContext(connection) as c:
    selectors.outbox_depths([peer])
reads["outbox_depths (GET /api/federation/peers)"] = c.captured_queries[-1]["sql"]
with CaptureQueriesContext(connection) as c:
    selectors.audit_events(team, selectors.AuditFilter(outcome="bad_secret"), 50)
reads["GET /api/audit?outcome=bad_secret"] = c.captured_queries[-1]["sql"]
with CaptureQueriesContext(connection) as c:
    try:
        journey.event_find(team_id=team, event_id="evt_no_such_event")
    except Exception:
        pass
reads["GET /api/events/{id}/journey (no ?source=)"] = c.captured_queries[-1]["sql"]
print(json.dumps(reads))
"""
# outbox_depths before: every status, delivered history included.
PREVIOUS_DEPTHS = ('SELECT "federation_outboxentry"."peer_id", "federation_outboxentry"."status", '
                   'COUNT("federation_outboxentry"."id") AS "n" FROM "federation_outboxentry" '
                   'WHERE "federation_outboxentry"."peer_id" IN ({peer}) GROUP BY 1, 2')
NEW_INDEXES = ["audit_team_action", "audit_team_outcome", "audit_team_peer", "event_team_ce_id"]


class LockWaits(threading.Thread):
    """Samples pg_stat_activity every 50 ms while a purge runs: how many times a backend was seen
    waiting for a lock (the webhooks' INSERTs must never wait for the purge)."""

    def __init__(self, database_url: str):
        super().__init__(daemon=True)
        self.url, self.seen, self.samples, self.done = database_url, 0, 0, threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as db:
            while not self.done.wait(0.05):
                waiting = db.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                     " AND datname = current_database()").fetchone()[0]  # fmt: skip
                self.seen += waiting
                self.samples += 1

    def stop(self) -> None:
        self.done.set()
        self.join()


class Retention(common.BulkLoad):
    def __init__(self, args):
        self.args = args
        ingest_argv = [
            "--port", str(args.port), "--pg-port", str(args.pg_port), "--redis-port", str(args.redis_port),
            "--services-dir", args.services_dir, "--database", args.database,
            *(["--keep-services"] if args.keep_services else []), *[f"--env={item}" for item in args.env],
        ]  # fmt: skip
        self.dep = bench.Deployment(bench.build_parser().parse_args(ingest_argv))
        self.loaded_days: list[int] = []
        self.other = 0

    def start(self) -> None:
        """bench/scale.py's set-up: the deployment, one real Stripe webhook through the API (the
        template the bulk rows copy), a revoked peer for the federation history, the `kite` source."""
        self.dep.start()
        self.requests = bench.Requests(self.dep.secret, run_id=datetime.now(timezone.utc).strftime("r%H%M%S"))
        self.seed(bench.SOURCE_NAME)

    def counts(self) -> dict[str, int]:
        return {table: self.one(f"SELECT count(*) FROM {table}") for table in TABLES}

    def load(self) -> None:
        a, s = self.args, self
        started = time.monotonic()
        total = a.days * a.per_day
        log(f"bulk load: {a.days} days × {a.per_day} events")
        txid0 = s.burn_xids(total // ROWS_PER_TXID + 1)
        template_id, _, template_ce_id = s.template
        for day in range(a.days, 0, -1):  # the oldest day first, as they would have arrived
            done = 0
            while done < a.per_day:
                n = min(CHUNK, a.per_day - done)
                s.execute(BULK_SQL, {
                    "template": template_id, "tid": template_ce_id, "stripe": s.stripe_source_id,
                    "kite": s.kite_source_id, "peer": s.peer_id, "peer_name": PEER_NAME,
                    "start": done + 1, "end": done + n, "count": a.per_day, "day": day, "margin": MARGIN_HOURS,
                    "txid0": txid0 + (a.days - day) * a.per_day // ROWS_PER_TXID,
                    "per_txid": ROWS_PER_TXID, "salt": f"day{day}", "types": STRIPE_TYPES,
                })  # fmt: skip
                done += n
            self.loaded_days.append(day)
            log(f"bulk load: day {day} ({a.per_day} events) done, {time.monotonic() - started:.0f} s")
        s.execute("VACUUM ANALYZE")
        s.execute("CHECKPOINT")
        log(f"bulk load: {total} events in {time.monotonic() - started:.0f} s; {self.counts()}")

    def explain(self) -> str:
        """EXPLAIN ANALYZE of the three reads, with the new indexes and without them (dropped in a
        transaction rolled back after), outbox_depths also as it was before."""
        out = bench.run([sys.executable, "-c", EXPLAIN_CAPTURE, self.dep.team_id, str(self.peer_id)],
                        env=self.dep.env, capture=True).stdout  # fmt: skip
        reads = json.loads(out.strip().splitlines()[-1])
        sections = []
        for name, sql in reads.items():
            plans = {"with the new indexes": self.plan(sql)}
            if name.startswith("outbox_depths"):
                plans["as before (every status)"] = self.plan(
                    PREVIOUS_DEPTHS.format(peer=self.peer_id), drop=NEW_INDEXES)
            plans["without the new indexes"] = self.plan(sql, drop=NEW_INDEXES)
            for label, plan in plans.items():
                sections.append(f"### {name}: {label}\n\n    " + "\n    ".join(plan))
        return "\n\n".join(sections)

    def plan(self, sql: str, drop=()) -> list[str]:
        self.one("SELECT 1")  # warm the connection
        with self.db.cursor() as cur:
            cur.execute("BEGIN")
            for index in drop:
                cur.execute(f'DROP INDEX IF EXISTS "{index}"')
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)  # once to warm the cache, then the one shown
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
            rows = [row[0] for row in cur.fetchall()]
            cur.execute("ROLLBACK")
        return rows

    # --- rounds ------------------------------------------------------------

    def load_chunk(self) -> list[float]:
        """One `--chunk`-second open-loop run at `--rate`: the latencies of the 202s, seconds."""
        a = self.args
        raws = bench.signed_requests(self.dep, self.requests, "stripe", int(a.rate * a.chunk))
        latencies, statuses, errors, _, _ = bench.open_loop(self.dep, raws, a.rate)
        self.other += bench.not_accepted(statuses, errors)
        return latencies

    def baseline_round(self) -> dict:
        latencies, chunks = [], max(1, round(self.args.baseline_seconds / self.args.chunk))
        for _ in range(chunks):
            chunk = self.load_chunk()
            latencies += chunk
            log(f"baseline: chunk p50 {pct(chunk, 50):.1f} ms, p99 {pct(chunk, 99):.1f} ms")
        return {"p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "requests": len(latencies)}

    def purge_round(self) -> dict:
        day = self.loaded_days.pop(0)  # the oldest day still stored: retention `day` days expires it alone
        before = self.counts()
        env = dict(self.dep.env, KITE_EVENT_RETENTION_DAYS=str(day), KITE_AUDIT_RETENTION_DAYS=str(day),
                   KITE_LOG_LEVEL="INFO")  # fmt: skip
        code = PURGE_PREVIOUS if self.args.purge_code == "previous" else PURGE_TASKS
        purge_log = (self.dep.work_dir / f"purge-{day}.log").open("w")
        started = time.monotonic()
        purge = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=purge_log, text=True)  # fmt: skip
        latencies, chunks = [], 0
        waits = LockWaits(self.dep.database_url)
        waits.start()
        while purge.poll() is None or chunks == 0:
            chunk = self.load_chunk()
            latencies += chunk
            chunks += 1
            log(f"purge of day {day}: {time.monotonic() - started:.0f} s, chunk p50 {pct(chunk, 50):.1f} ms, "
                f"p99 {pct(chunk, 99):.1f} ms")  # fmt: skip
        out, _ = purge.communicate()
        waits.stop()
        seconds = time.monotonic() - started
        purge_log.close()
        if purge.returncode != 0:
            raise SystemExit(f"purge failed: {(self.dep.work_dir / f'purge-{day}.log').read_text()[-2000:]}")
        result = json.loads(out.strip().splitlines()[-1])
        after = self.counts()
        deleted = {table: before[table] - after[table] for table in TABLES}
        # Rows this run's webhooks added meanwhile are not deletions: only ingest_event grows.
        deleted["ingest_event"] = result["events"]
        purge_seconds = result["event_seconds"] + result["other_seconds"]
        return {
            "day": day, "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "requests": len(latencies),
            "chunks": chunks, "deleted": deleted, "rows": sum(deleted.values()), "purge_seconds": purge_seconds,
            "event_seconds": result["event_seconds"], "other_seconds": result["other_seconds"],
            "rows_per_second": sum(deleted.values()) / purge_seconds if purge_seconds else float("nan"),
            "wall_seconds": seconds, "lock_waits": waits.seen, "lock_samples": waits.samples,
        }  # fmt: skip

    def measure(self) -> list[dict]:
        a = self.args
        self.dep._start_web()
        self.other = 0
        time.sleep(1)
        self.load_chunk()  # warm-up
        self.other = 0
        rounds = []
        for i in range(a.rounds):
            order = ("baseline", "purge") if i % 2 == 0 else ("purge", "baseline")
            result = {kind: self.baseline_round() if kind == "baseline" else self.purge_round() for kind in order}
            rounds.append(result)
            b, p = result["baseline"], result["purge"]
            log(f"round {i + 1}: baseline p99 {b['p99_ms']:.1f} ms, while purging p99 {p['p99_ms']:.1f} ms "
                f"({p['p99_ms'] / b['p99_ms']:.2f}×); purge of day {p['day']}: {p['rows']} rows in "
                f"{p['purge_seconds']:.1f} s ({p['rows_per_second']:.0f} rows/s) {p['deleted']}; backends seen "
                f"waiting for a lock: {p['lock_waits']} in {p['lock_samples']} samples")  # fmt: skip
        self.dep.stop_web()
        return rounds

    def stop(self) -> None:
        if self.db is not None:
            self.db.close()
        self.dep.stop()


def report(args, facts, rounds, other, started, finished) -> str:
    command = common.command("retention.py")
    start = common.markers(args.section)[0]

    def med(kind, key):
        return statistics.median(r[kind][key] for r in rounds)

    ratios = [r["purge"]["p99_ms"] / r["baseline"]["p99_ms"] for r in rounds]
    ratio = statistics.median(ratios)
    purge = [r["purge"] for r in rounds]
    deleted = {t: statistics.median(p["deleted"][t] for p in purge) for t in TABLES}
    quiet = "quiet" if facts["loadavg"] < 0.5 and not facts["pytest"] else "NOT quiet (see load average)"
    lines = [
        start,
        f"## {args.title or 'Retention: webhooks while a day of expired rows is purged'}",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC on {facts['nproc']} CPUs ({facts['cpu']}), PostgreSQL {facts['postgres']}"
        f" (fsync {facts['fsync']}, synchronous_commit {facts['synchronous_commit']}); load average "
        f"{facts['loadavg']:.2f} at the start, {facts['loadavg_end']:.2f} at the end ({quiet}).",
        "",
        f"    {command}",
        "",
        f"{args.days} days of {args.per_day:,} events loaded (with their outbox entries, delivery rows and audit rows);"
        f" verified Stripe webhooks offered at {args.rate:g}/s (open loop); purge code: {args.purge_code}.",
        "",
        "| | baseline (no purge) | while purging | ratio |",
        "|---|---|---|---|",
        f"| webhook p50 ms | {med('baseline', 'p50_ms'):.1f} | {med('purge', 'p50_ms'):.1f} | "
        f"{med('purge', 'p50_ms') / med('baseline', 'p50_ms'):.2f}× |",
        f"| webhook p99 ms | {med('baseline', 'p99_ms'):.1f} | {med('purge', 'p99_ms'):.1f} | "
        f"{ratio:.2f}× (median of the rounds' ratios: {', '.join(f'{x:.2f}' for x in ratios)}) |",
        "",
        f"Purge of one day (median over {len(rounds)} rounds): "
        + ", ".join(f"{deleted[t]:,.0f} {t}" for t in TABLES)
        + f" rows deleted in {statistics.median(p['purge_seconds'] for p in purge):.1f} s "
        f"(events and their dependants {statistics.median(p['event_seconds'] for p in purge):.1f} s, audit and "
        f"delivery retention {statistics.median(p['other_seconds'] for p in purge):.1f} s): "
        f"{statistics.median(p['rows_per_second'] for p in purge):,.0f} rows/s.",
        "",
        f"- Backends seen waiting for a lock while purging (pg_stat_activity every 50 ms): "
        f"{sum(p['lock_waits'] for p in purge)} in {sum(p['lock_samples'] for p in purge)} samples.",
        f"- Target: webhook p99 while purging ≤ 2× the baseline → **{'met' if ratio <= 2 else 'not met'}** "
        f"({ratio:.2f}×).",
        f"- Answers other than 202 (and connection errors): {other}. The run took {(finished - started).seconds} s.",
    ]
    return common.section_text(lines, args.section)


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--per-day", type=lambda v: int(float(v)), default=1_000_000, help="events a day (1e6 works)")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of rounds (baseline, purge); one day each")
    parser.add_argument("--days", type=int, help="days loaded (default: rounds + 1; the newest is never purged)")
    parser.add_argument("--rate", type=float, default=400, help="webhooks offered per second")
    parser.add_argument("--chunk", type=float, default=5, help="seconds per open-loop run")
    parser.add_argument("--baseline-seconds", type=float, default=60,
                        help="webhooks without a purge per round, seconds (a short window misses the checkpoints "
                        "that a purge round, minutes long, sees)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections opened ahead")
    parser.add_argument("--explain", action="store_true",
                        help="after the load, EXPLAIN ANALYZE the reads that scanned before; no rounds")
    parser.add_argument("--purge-code", choices=["tasks", "previous"], default="tasks")
    common.service_arguments(parser, port=18495, pg_port=55545, redis_port=56545,
                             services_dir="/tmp/kite-retention-services", database="kite_retention")  # fmt: skip
    common.output_arguments(parser, bench.QUIET, section="retention")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.days = args.days or args.rounds + 1
    if args.days < args.rounds + 1:
        raise SystemExit("--days must be at least --rounds + 1: each purge round expires one day, the newest stays")
    return bench.run_measured(args, Retention(args), measure, log)


def measure(args, run: Retention, initial: dict) -> int:
    started = datetime.now(timezone.utc)
    run.start()
    facts = bench.machine_facts(run.dep) | initial
    run.dep.stop_web()
    run.load()
    if args.explain:
        print(run.explain())
        return 0
    rounds = run.measure()
    facts["loadavg_end"] = os.getloadavg()[0]
    section = report(args, facts, rounds, run.other, started, datetime.now(timezone.utc))
    return common.publish(section, args.section, not args.no_write, log)


if __name__ == "__main__":
    sys.exit(main())
