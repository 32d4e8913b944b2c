#!/usr/bin/env python3
"""Scale benchmark: what ingest, reads, storage and federation cost as the data grows.

Starts its own PostgreSQL + Redis (scripts/services.sh, ports of its own, fsync
and synchronous_commit on: durable commits), a fresh database and Kite's web
process as bench/ingest.py does (its Deployment: `manage.py runkite --no-worker
--no-beat`, KITE_TLS=off as behind a TLS proxy), creates the Stripe source
through the API, then for each size of `--sizes` (stored events; default
0, 1 M, 10 M), smallest first:

1. bulk load with SQL up to that many events (INSERT … SELECT generate_series,
   chunks of one transaction each, every index in place): copies of a real
   Stripe event Kite stored through its API (own ids, six event types, times
   spread over 90 days, txids spread like separate transactions: a range of
   transaction ids is consumed first so they stay older than any reader's
   snapshot), 30 % federated in through the team's `kite` source with kitefed*
   extensions; for every event of the Stripe source an outbox entry to a
   (revoked) peer, delivered (0.5 % dead) with one delivery row (5 % with a
   failed attempt before); one audit row per 20 events. VACUUM ANALYZE,
   CHECKPOINT; the web process started afresh.
2. ingest: verified Stripe webhooks, closed loop (bench/ingest.py's wrk
   rounds), alternating with the physical ceiling: `pgbench`, one INSERT of
   the same row per transaction, as many clients as wrk has connections, on
   the same PostgreSQL with the same durability.
3. reads: `GET /api/events?limit=100` sequentially on one keep-alive
   connection — the first page, pages after random cursors, the tail (after
   a cursor ~50 events before the head) and pages of one event type after
   random cursors; p50/p99 per kind. Also, fewer times, two reads whose cost
   grows with the tables: `GET /api/federation/peers` (outbox counts by
   status) and `GET /api/audit?outcome=bad_secret` (no row matches).
4. replay: a listener (`WS /ws/events?after=0`, Bearer key) reading the team's
   store from the start: events/s over the first `--replay-events` events.
5. storage: pg_total_relation_size / rows of ingest_event,
   federation_outboxentry, federation_delivery, federation_auditevent; the
   web processes' RSS after start-up and after the measurements.
6. federation (bench/scale_federation.py, reusing bench/federation.py's
   rounds): this instance (A, its data) started as `runkite` with worker and
   beat (TLS on), peered as an operator does with a second instance B (own
   database on the same PostgreSQL, track_commit_timestamp on); A → B latency
   at `--fed-rate` events/s, A's 202 → the event's commit at B, p50/p99.
7. backlog: batched drains of `--batched` entries (the baseline), one of
   `--backlog` entries (written with SQL, not due, released in one UPDATE;
   A's worker RSS every second, EXPLAIN ANALYZE of the claim and the sweeper
   with it due), and catch-up: B stopped, `--catchup` events queued at A, B
   started, time from B healthy to all stored. Then B is deleted as a peer
   (the next size's webhooks take the same path) and what the phase added is
   deleted at A and B.

`--phases` picks among ingest, reads, replay, storage, federation, backlog
(each size is loaded whatever the phases), so a long run can be split. Each
figure is a median over `--rounds` rounds (`--backlog-rounds` for the backlog)
and is reported as a ratio to the first size's (the empty database's) figure
of the same run. The result (exact command, machine facts, load average and
other pytest processes) is printed and written into bench/RESULTS.md between
the `bench:scale` markers.

    .venv/bin/python bench/scale.py --wait-quiet 1500                    # the recorded run (~1 h 45 min, ~30 GB)
    .venv/bin/python bench/scale.py --wait-quiet 1500 --phases ingest,reads,replay,storage   # or in two runs (~1 h)
    .venv/bin/python bench/scale.py --wait-quiet 1500 --phases federation,backlog --section scale-federation  # (~1 h)
    .venv/bin/python bench/scale.py --sizes 0,100000 --rounds 2 --duration 5 --backlog 50000 --catchup 20000 \
        --catchup-rounds 1 --fed-duration 5 --batched 5000 --no-write                     # trial (~9 min)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import json
import os
import random
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import websockets

import common

bench = common.load("ingest")
scale_federation = common.load("scale_federation")

ROOT = bench.ROOT
WEB_PHASES = {"ingest", "reads", "replay"}
FEDERATION_PHASES = {"federation", "backlog"}
PHASES = ["ingest", "reads", "replay", "storage", "federation", "backlog"]
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
PEER_NAME = common.BulkLoad.PEER_NAME
STRIPE_TYPES = [
    "com.stripe.payment_intent.succeeded", "com.stripe.charge.succeeded", "com.stripe.invoice.paid",
    "com.stripe.customer.updated", "com.stripe.checkout.session.completed", "com.stripe.charge.refunded",
]  # fmt: skip
RARE_TYPE = "com.stripe.charge.refunded"  # 1 event in 50 of the bulk: the type-filtered read
ROWS_PER_TXID = 4  # bulk rows share a transaction id this many at a time (batched receipts do)
CHUNK = 200_000


log = common.logger("scale")
med, pct = common.med, common.pct


def human(n: int) -> str:
    if n >= 1_000_000 and n % 100_000 == 0:
        return f"{n / 1_000_000:g} M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000} k"
    return str(n)


def rss_mb(pids) -> float:
    return sum(common.rss_mb(pid) or 0.0 for pid in pids)


# --------------------------------------------------------------------------- the deployment


class Scale(common.BulkLoad):
    def __init__(self, args):
        self.args = args
        self.dep = bench.deployment_for(args)
        if args.phases & FEDERATION_PHASES:  # B's commit timestamps: A's 202 → stored at B
            self.dep.services.env["KITE_PG_OPTIONS"] = "-c track_commit_timestamp=on"
        self.bulk_serial = 0
        self.federation = None

    # --- set-up ------------------------------------------------------------

    def start(self) -> None:
        """bench/ingest.py's deployment, then the template webhook, the revoked peer and the `kite` source."""
        self.dep.start()
        self.team = self.dep.team_id
        self.requests = bench.Requests(self.dep.secret, run_id=datetime.now(timezone.utc).strftime("s%H%M%S"))
        self.seed(bench.SOURCE_NAME)

    def stored(self) -> int:
        return self.one("SELECT count(*) FROM ingest_event")

    # --- bulk load -----------------------------------------------------------

    def load(self, target: int) -> dict:
        """Bulk-load events (and their federation rows) until `target` events are stored."""
        have = self.stored()
        count = target - have
        if count <= 0:
            return {"added": 0, "seconds": 0.0}
        started = time.monotonic()
        log(f"bulk load: {have} → {target} events")
        txid0 = self.burn_xids(count // ROWS_PER_TXID + 1)
        burnt = time.monotonic() - started
        template_id, _, template_ce_id = self.template
        done = 0
        while done < count:
            n = min(CHUNK, count - done)
            self.bulk_serial += 1
            self.execute(BULK_SQL, {
                "template": template_id, "tid": template_ce_id, "stripe": self.stripe_source_id,
                "kite": self.kite_source_id, "peer": self.peer_id, "peer_name": PEER_NAME,
                "start": done + 1, "end": done + n, "count": count, "txid0": txid0, "per_txid": ROWS_PER_TXID,
                "salt": f"{self.bulk_serial}-{have}", "types": STRIPE_TYPES, "rare": RARE_TYPE,
            })  # fmt: skip
            done += n
            if done % (CHUNK * 10) == 0 or done == count:
                log(f"bulk load: {done}/{count} ({done / (time.monotonic() - started):.0f} events/s)")
        self.execute("VACUUM ANALYZE")
        self.execute("CHECKPOINT")
        seconds = time.monotonic() - started
        log(f"bulk load: {count} events in {seconds:.0f} s (xids {burnt:.0f} s), vacuumed, checkpointed")
        return {"added": count, "seconds": seconds}

    def sizes(self) -> dict:
        out = {}
        for table in ("ingest_event", "federation_outboxentry", "federation_delivery", "federation_auditevent"):
            rows, size = self.one(f"SELECT count(*), pg_total_relation_size('{table}') FROM {table}")
            out[table] = {"rows": rows, "bytes": size, "per_row": size / rows if rows else float("nan")}
        out["database"] = self.one("SELECT pg_database_size(current_database())")
        return out

    # --- measurements --------------------------------------------------------

    def web_pids(self) -> set[int]:
        return common.descendants(self.dep.web.pid)

    def ingest_round(self, duration: float) -> dict:
        a = self.args
        return bench.wrk_round(self.dep, self.requests, "stripe", duration, a.connections, a.wrk_threads)

    def pgbench_round(self, duration: float) -> dict:
        script = self.dep.work_dir / "insert.sql"
        if not script.exists():
            _, body = self.requests.batch(1)[0]
            literal = body.decode().replace("'", "''")
            script.write_text(
                "INSERT INTO ingest_event (team_id, source_id, ce_id, ce_source, ce_type, ce_time, ce_subject,"
                " datacontenttype, data, extensions, agent, received_at) VALUES"
                f" ('{self.team}', {self.stripe_source_id}, 'pgb_' || md5(random()::text || clock_timestamp()::text),"
                f" 'pgbench', 'com.stripe.payment_intent.succeeded', now(), '', 'application/json', '{literal}',"
                " '{}'::jsonb, '', now());\n"
            )
        a = self.args
        clients = a.pgbench_clients or a.connections
        argv = [
            a.pgbench, "-n", "-h", "127.0.0.1", "-p", str(a.pg_port), "-U", "postgres", "-c", str(clients),
            "-j", str(a.wrk_threads), "-T", str(max(1, round(duration))), "-f", str(script), a.database,
        ]  # fmt: skip
        before = bench.cpu_snapshot(self.dep)
        out = bench.run(argv, capture=True).stdout
        after = bench.cpu_snapshot(self.dep)
        tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
        done = re.search(r"number of transactions actually processed: (\d+)", out)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        if not tps or not done:
            raise SystemExit(f"pgbench printed no result:\n{out}")
        return {"rate": float(tps[1]), "transactions": int(done[1]), "failed": int(failed[1]) if failed else 0,
                "cpu_us": bench.cpu_per_event(before, after, int(done[1]))}  # fmt: skip

    def cursors(self, count: int) -> list[str]:
        rows = []
        with self.db.cursor() as cur:
            cur.execute(
                "SELECT txid, id FROM ingest_event WHERE team_id = %s AND id IN"
                " (SELECT (random() * (SELECT max(id) FROM ingest_event))::bigint FROM generate_series(1, %s))",
                (self.team, count * 2),
            )
            rows = cur.fetchall()
        random.shuffle(rows)
        return [f"{t}-{i}" for t, i in rows[:count]] or ["0"]

    def tail_cursor(self, behind: int = 50) -> str:
        row = self.one(
            "SELECT txid, id FROM (SELECT txid, id FROM ingest_event WHERE team_id = %s"
            " ORDER BY txid DESC, id DESC LIMIT %s) t ORDER BY txid, id LIMIT 1",
            (self.team, behind),
        )
        return f"{row[0]}-{row[1]}" if row else "0"

    def reads_round(self, count: int, slow_count: int) -> dict:
        """Sequential GETs on one keep-alive connection; latency per request. The /api/events kinds
        `count` times each; two reads whose cost grows with the tables (bench/RESULTS.md) `slow_count`
        times: the peers list (it counts every outbox entry of each peer by status) and the audit
        trail filtered on an outcome no row has (it reads every audit row of the team)."""
        kinds = {
            "first page": lambda i: "/api/events?limit=100",
            "after a random cursor": lambda i: f"/api/events?limit=100&after={randoms[i % len(randoms)]}",
            "tail (50 before the head)": lambda i: f"/api/events?limit=100&after={tail}",
            f"type {RARE_TYPE.rsplit('.', 2)[-2]}.{RARE_TYPE.rsplit('.', 1)[-1]} after a random cursor": lambda i: (
                f"/api/events?limit=100&type={RARE_TYPE}&after={randoms[(i * 7) % len(randoms)]}"
            ),
            "GET /api/federation/peers": lambda i: "/api/federation/peers",
            "GET /api/audit?outcome=bad_secret": lambda i: "/api/audit?outcome=bad_secret",
        }
        randoms = self.cursors(count)
        tail = self.tail_cursor()
        headers = {"Authorization": f"Bearer {self.dep.api_key}"}
        conn = http.client.HTTPConnection("127.0.0.1", self.args.port, timeout=30)
        result = {}
        for kind, path in kinds.items():
            latencies, events, errors = [], 0, collections.Counter()
            n = count if kind[0] != "G" else slow_count
            for i in range(n):
                t0 = time.perf_counter()
                conn.request("GET", path(i), headers=headers)
                answer = conn.getresponse()
                body = answer.read()
                latencies.append((time.perf_counter() - t0) * 1000)
                if answer.status != 200:
                    errors[f"{answer.status} {body[:120].decode(errors='replace')}"] += 1
                    continue
                events += len(json.loads(body)["results"])
            latencies.sort()
            result[kind] = {"p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "max_ms": latencies[-1],
                            "results_per_page": events / n, "errors": sum(errors.values())}  # fmt: skip
            if errors:
                log(f"{kind}: answers other than 200: {dict(errors)}")
        conn.close()
        return result

    def replay_round(self, limit: int, seconds: float) -> dict:
        url = f"ws://127.0.0.1:{self.args.port}/ws/events?after=0"
        headers = {"Authorization": f"Bearer {self.dep.api_key}"}

        async def listen():
            received, first = 0, None
            async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
                opened = time.perf_counter()
                deadline = opened + seconds
                while received < limit and time.perf_counter() < deadline:
                    try:
                        await asyncio.wait_for(ws.recv(), timeout=max(0.01, deadline - time.perf_counter()))
                    except TimeoutError:
                        break
                    received += 1
                    if first is None:
                        first = time.perf_counter() - opened
                elapsed = time.perf_counter() - opened
            return received, elapsed, first

        received, elapsed, first = asyncio.run(listen())
        # The listener pushed the team's listening_until ahead: the next webhooks would broadcast to it.
        self.execute("UPDATE kite_team SET listening_until = NULL WHERE id = %s", (self.team,))
        return {"events": received, "seconds": elapsed, "rate": received / elapsed if elapsed else 0.0,
                "first_ms": (first or 0) * 1000}  # fmt: skip

    def measure(self, size: int) -> dict:
        a = self.args
        dep = self.dep
        phases = a.phases
        result = {"size": size, "rounds": [], "non202": 0}
        if phases & WEB_PHASES:
            dep._start_web()
            time.sleep(1)
            rss = {"start": rss_mb(self.web_pids())}
            if "ingest" in phases:
                self.ingest_round(a.warmup)
                self.pgbench_round(a.warmup)
            rss["warm"] = rss_mb(self.web_pids())
            for i in range(a.rounds):
                result["rounds"].append(self.web_round(i))
            rss["end"] = rss_mb(self.web_pids())
            dep.stop_web()
            result["rss"] = rss
            result["non202"] = sum(r["stripe"]["other"] + r["stripe"]["duplicate"] + r["stripe"]["socket_errors"]
                                   for r in result["rounds"] if "stripe" in r)  # fmt: skip
        if "storage" in phases:
            result["storage"] = self.sizes()
        result["stored"] = self.stored()
        if phases & FEDERATION_PHASES:
            if self.federation is None:
                self.federation = scale_federation.AtScale(a, dep)
            result["federation"] = self.federation.measure(size, phases)
        return result

    def web_round(self, i: int) -> dict:
        a, phases = self.args, self.args.phases
        result = {}
        if "ingest" in phases:
            for name in ("stripe", "pgbench") if i % 2 == 0 else ("pgbench", "stripe"):
                result[name] = self.ingest_round(a.duration) if name == "stripe" else self.pgbench_round(a.duration)
        if "reads" in phases:
            result["reads"] = self.reads_round(a.reads, a.slow_reads)
        if "replay" in phases:
            result["replay"] = self.replay_round(a.replay_events, a.replay_seconds)
        parts = []
        if "stripe" in result:
            parts.append(f"stripe {result['stripe']['rate']:.0f}/s, pgbench {result['pgbench']['rate']:.0f}/s "
                         f"({result['stripe']['rate'] / result['pgbench']['rate']:.0%})")  # fmt: skip
        if "reads" in result:
            parts.append(", ".join(f"{k} p99 {v['p99_ms']:.1f} ms" for k, v in result["reads"].items()))
        if "replay" in result:
            parts.append(f"replay {result['replay']['rate']:.0f} events/s")
        log(f"round {i + 1}: " + "; ".join(parts))
        return result

    def stop(self) -> None:
        if self.federation is not None:
            self.federation.close()
        if self.db is not None:
            self.db.close()
        self.dep.stop()
        if self.dep.services.started and not self.args.keep_services:
            # The stopped PostgreSQL's files: ~25 GB at 10 M events, left in /tmp otherwise.
            shutil.rmtree(self.args.services_dir, ignore_errors=True)


# One chunk of the bulk load (common.BulkLoad's), its events' times spread over 90 days, a rare type
# for one event in 50.
BULK_SQL = common.BulkLoad.bulk_sql(
    ce_type="CASE WHEN g %% 50 = 0 THEN %(rare)s::text ELSE (%(types)s::text[])[1 + (g %% 5)] END",
    received="now() - interval '90 days' * (1 - g::float8 / %(count)s)",
)


# --------------------------------------------------------------------------- report


def report(args, facts, results, loads, started, finished) -> str:
    phases = args.phases
    base = results[0]

    def m(result, pick):
        return med([pick(r) for r in result["rounds"]])

    def ratio(value, ref):
        return f"{value / ref:.0%}" if ref else "–"

    header = "| size (events stored at the end) | " + " | ".join(
        f"{human(r['size'])} ({r['stored']:,})" for r in results) + " |"  # fmt: skip
    rule = "|---|" + "---|" * len(results)
    lines = [
        *common.section_head(args.section, args.title or "Scale: cost as the data grows", started,
                             common.command("scale.py")),
        bench.machine_line(facts, f"durable commits, shared_buffers={facts['shared_buffers']}, "
                                  f"track_commit_timestamp={facts['track_commit_timestamp']}"),
        f"- Phases: {', '.join(p for p in PHASES if p in phases)}.",
        f"- Web: `{facts['web_command']}` with KITE_TLS=off, KITE_WEB_WORKERS={facts['web_workers']}, "
        f"KITE_WSGI_THREADS={facts['wsgi_threads']}, started afresh at each size after the bulk load, VACUUM ANALYZE "
        "and CHECKPOINT; no Celery worker/beat." + (f" Extra environment: {', '.join(args.env)}." if args.env else ""),
        "- Data: bulk-loaded with SQL (bench/scale.py `BULK_SQL`): copies of a Stripe event Kite stored, own ids, "
        f"six types ({RARE_TYPE} 1 in 50), 90 days of times, {ROWS_PER_TXID} rows per transaction id; 30 % "
        "federated in (kitefed* extensions); each Stripe-source event has an outbox entry to a revoked peer "
        "(delivered, 0.5 % dead) and one delivery row (5 % two); one audit row per 20 events. Load times: "
        + ", ".join(f"{human(s)}: +{v['added']:,} in {v['seconds']:.0f} s" for s, v in loads.items() if v["added"])
        + ".",
    ]  # fmt: skip
    if "ingest" in phases:
        lines.append(
            f"- Ingest: `wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration:g}s` of verified Stripe "
            "webhooks (bench/ingest.py's rounds; 202s per second) alternating with "
            f"`pgbench -c{args.pgbench_clients or args.connections} -j{args.wrk_threads} "
            f"-T{max(1, round(args.duration))}`, a custom script of one INSERT of the same 1 kB row into "
            f"ingest_event per transaction (the physical ceiling), {args.rounds} rounds after a {args.warmup:g} s "
            "warm-up."
        )
    if "reads" in phases:
        lines.append(
            f"- Reads: {args.reads} sequential `GET /api/events?limit=100` per kind and round on one keep-alive "
            f"connection (Bearer key), latency per request from this client; {args.slow_reads} per round of "
            "`GET /api/federation/peers` (it counts each peer's outbox entries by status) and "
            "`GET /api/audit?outcome=bad_secret` (no such row: it reads the team's whole audit trail), whose cost "
            "grows with the tables."
        )
    if "replay" in phases:
        lines.append(
            f"- Replay: `WS /ws/events?after=0`, events/s over the first {args.replay_events:,} events (at most "
            f"{args.replay_seconds:g} s)."
        )
    if phases & FEDERATION_PHASES:
        lines.append(federation_method(args))
    lines += ["", header, rule]
    checks = []
    if "ingest" in phases:
        stripe = [m(r, lambda x: x["stripe"]["rate"]) for r in results]
        pgb = [m(r, lambda x: x["pgbench"]["rate"]) for r in results]
        share = [m(r, lambda x: x["stripe"]["rate"] / x["pgbench"]["rate"]) for r in results]
        lines += [
            "| verified Stripe webhooks/s | " + " | ".join(f"{v:.0f} ({ratio(v, stripe[0])})" for v in stripe) + " |",
            "| pgbench INSERTs/s (ceiling) | " + " | ".join(f"{v:.0f} ({ratio(v, pgb[0])})" for v in pgb) + " |",
            "| webhooks / pgbench (same round) | " + " | ".join(f"{v:.0%}" for v in share) + " |",
            "| webhook p99 ms (wrk) | " + " | ".join(
                f"{m(r, lambda x: x['stripe']['p99_ms']):.1f}" for r in results) + " |",
            "| PostgreSQL CPU µs per webhook | " + " | ".join(
                f"{m(r, lambda x: x['stripe']['cpu_us']['postgres']):.0f}" for r in results) + " |",
        ]  # fmt: skip
        worst_ingest = min(v / stripe[0] for v in stripe) if stripe[0] else float("nan")
        checks += [
            (f"ingest at every size ≥ 90 % of empty: lowest {worst_ingest:.0%}", worst_ingest >= 0.9),
            (f"ingest ≥ 60 % of pgbench at every size: lowest {min(share):.0%}", min(share) >= 0.6),
        ]
    errors = 0
    if "reads" in phases:
        kinds = list(base["rounds"][0]["reads"])
        for kind in kinds:
            p99 = [m(r, lambda x, k=kind: x["reads"][k]["p99_ms"]) for r in results]
            p50 = [m(r, lambda x, k=kind: x["reads"][k]["p50_ms"]) for r in results]
            lines.append(
                f"| {kind if kind[0] == 'G' else '/api/events, ' + kind}: p50 / **p99** ms | "
                + " | ".join(f"{a:.1f} / **{b:.1f}** ({ratio(b, p99[0])})" for a, b in zip(p50, p99))
                + " |"
            )
        largest = results[-1]
        read_p99 = max(m(largest, lambda x, k=k: x["reads"][k]["p99_ms"]) for k in kinds[:3])
        errors = sum(x["reads"][k]["errors"] for r in results for x in r["rounds"] for k in kinds)
        checks.append((f"page, after-cursor and tail reads p99 ≤ 20 ms at {human(largest['size'])}: worst "
                       f"{read_p99:.1f} ms", read_p99 <= 20))  # fmt: skip
    if "replay" in phases:
        replay = [m(r, lambda x: x["replay"]["rate"]) for r in results]
        lines.append(
            "| replay from after=0, events/s | "
            + " | ".join(
                f"{v:.0f} ({ratio(v, replay[0])}, {m(r, lambda x: x['replay']['events']):,.0f} events)"
                for v, r in zip(replay, results)
            )
            + " |"
        )
        checks.append((f"replay ≥ 5,000 events/s at every size: lowest {min(replay):.0f}/s", min(replay) >= 5000))
    if "storage" in phases:
        tables = (("ingest_event", "event"), ("federation_outboxentry", "outbox entry"),
                  ("federation_delivery", "delivery row"), ("federation_auditevent", "audit row"))  # fmt: skip
        for table, label in tables:
            values = [r["storage"][table] for r in results]
            cells = [f"{v['per_row']:.0f} ({v['rows']:,} rows)" if v["rows"] else "– (0 rows)" for v in values]
            lines.append(f"| bytes per {label} (table + indexes + TOAST) | " + " | ".join(cells) + " |")
        lines.append(
            "| database size | " + " | ".join(f"{r['storage']['database'] / 2**30:.2f} GiB" for r in results) + " |"
        )
    if phases & WEB_PHASES:
        lines.append(
            "| web RSS MB: started / warm / after | "
            + " | ".join(f"{r['rss']['start']:.0f} / {r['rss']['warm']:.0f} / {r['rss']['end']:.0f}" for r in results)
            + " |"
        )
    problems, notes = [], []
    if phases & FEDERATION_PHASES:
        rows, fed_checks, problems, notes = federation_rows(args, [r["federation"] for r in results])
        lines += rows
        checks += fed_checks
    for note in notes:
        lines += ["", note]
    lines += ["", "Targets:", ""]
    lines += [f"- {text} → **{'met' if ok else 'not met'}**" for text, ok in checks]
    non202 = sum(r["non202"] for r in results)
    lines += [
        "",
        f"Ratios in brackets are to the {human(base['size'])} figure of this run; medians over {args.rounds} rounds"
        + (f" ({args.backlog_rounds} for the backlog)" if "backlog" in phases and args.backlog else "")
        + ". "
        + (f"Non-202 answers to webhooks: {non202}. " if "ingest" in phases else "")
        + (f"Non-200 answers to reads: {errors}. " if "reads" in phases else "")
        + (("Federation checks (B holds exactly the events queued at A, no dead entry at A, the peer deleted "
            "cleanly): " + ("all held. " if not problems else "**problems: " + "; ".join(problems) + "**. "))
           if phases & FEDERATION_PHASES else "")
        + f"The run took {(finished - started).seconds} s.",
    ]
    return common.section_text(lines, args.section)


def federation_method(args) -> str:
    text = (
        "- Federation (bench/scale_federation.py, reusing bench/federation.py's rounds): A = this instance, its "
        "data dir and database, started as `manage.py runkite` (web, Celery worker concurrency 2, beat; KITE_TLS=on, "
        "KITE_PROBE_DOWN_SECONDS=1, KITE_HEARTBEAT_SECONDS=3600) after the phases above; B = a second `runkite`, "
        "its own database on the same PostgreSQL, Redis db 2. At each size peered as an operator does it (B's "
        "token, A adds B with B's pinned TLS fingerprint and scopes [\"*\"], B trusts A), measured, B deleted as a "
        "peer through A's API; the events, outbox entries and delivery rows the phase added are deleted at A and "
        "B's stored events truncated, so the next size starts from the bulk-loaded data alone."
    )
    if "federation" in args.phases:
        text += (
            f" Latency: an open loop of ~0.6 kB events posted to a `none` source on A at {args.fed_rate:g}/s for "
            f"{args.fed_duration:g} s per round over {args.fed_connections} keep-alive TLS connections, after a 3 s "
            "warm-up; A's 202 → the commit of the event at B (B's commit timestamps), and → B's WebSocket listener."
        )
    if "backlog" in args.phases:
        text += (
            f" Batched drain: {args.batched:,} events + outbox entries written into A's database not due, made due "
            "in one UPDATE, one event posted to kick; time from the UPDATE's commit until B stored them all (B's "
            "rows counted by its cursor index, new transactions only), batch_max 500."
        )
        if args.backlog:
            text += (
                f" Backlog: the same with {args.backlog:,} entries ({args.backlog_rounds} round(s)); A's Celery "
                "worker processes' RSS (VmRSS, /proc) every second while it drains."
            )
        if args.catchup:
            text += (
                " Catch-up (bench/federation.py's round): B stopped, events posted to A until A marks B `down`, the "
                f"rest of {args.catchup:,} written into A's database due, B started: time from B answering /healthz "
                f"to all {args.catchup:,} stored at B ({args.catchup_rounds} rounds)."
            )
    return text


def federation_rows(args, feds: list[dict]) -> tuple[list[str], list[tuple[str, bool]], list[str], list[str]]:
    def ratio(value, ref):
        return f"{value / ref:.0%}" if ref else "–"

    def bm(f, key):  # median over a size's backlog rounds
        return med([r[key] for r in f["backlog"]])

    rows, checks, problems, notes = [], [], [], []
    if "latency" in feds[0]:
        stored99 = [med([r.get("stored_p99") for r in f["latency"]]) for f in feds]
        stored50 = [med([r.get("stored_p50") for r in f["latency"]]) for f in feds]
        listen50 = [med([r["p50"] for r in f["latency"]]) for f in feds]
        listen99 = [med([r["p99"] for r in f["latency"]]) for f in feds]
        achieved = [med([r["achieved"] for r in f["latency"]]) for f in feds]
        missing = sum(r["missing"] + r["errors"] for f in feds for r in f["latency"])
        rows += [
            f"| A's 202 → stored at B at {args.fed_rate:g}/s: p50 / **p99** ms | " + " | ".join(
                f"{a:.1f} / **{b:.1f}** ({ratio(b, stored99[0])})" for a, b in zip(stored50, stored99)) + " |",
            "| A's 202 → B's listener: p50 / p99 ms | " + " | ".join(
                f"{a:.1f} / {b:.1f}" for a, b in zip(listen50, listen99)) + " |",
            "| latency rounds: achieved events/s | " + " | ".join(f"{v:.0f}" for v in achieved) + " |",
        ]  # fmt: skip
        worst = max(v / stored99[0] for v in stored99) if stored99[0] else float("nan")
        checks.append((f"A → B p99 (stored at B) ≤ 1.5× the empty database's at every size: worst {worst:.2f}× "
                       f"({max(stored99):.1f} ms vs {stored99[0]:.1f} ms)", worst <= 1.5))  # fmt: skip
        if missing:
            problems.append(f"{missing} latency events not stored/answered")
    if "batched" in feds[0]:
        batched = [med([r["rate"] for r in f["batched"]]) for f in feds]
        rows.append(f"| batched drain of {args.batched:,}, events/s | "
                    + " | ".join(f"{v:.0f} ({ratio(v, batched[0])})" for v in batched) + " |")  # fmt: skip
        if feds[0].get("backlog"):
            backlog = [med([r["rate"] for r in f["backlog"]]) for f in feds]
            rows += [
                f"| backlog of {args.backlog:,}: events/s (vs the empty database's batched) | "
                + " | ".join(f"**{v:.0f}** ({ratio(v, batched[0])})" for v in backlog) + " |",
                "| backlog: release UPDATE s / slowest tenth events/s / A's worker RSS MB before → peak → end | "
                + " | ".join(
                    f"{bm(f, 'update_seconds'):.1f} / {bm(f, 'slowest_tenth'):.0f} / {bm(f, 'rss_before'):.0f} → "
                    f"{bm(f, 'rss_peak'):.0f} → {bm(f, 'rss_end'):.0f}" for f in feds) + " |",
            ]  # fmt: skip
            checks.append((f"backlog of {args.backlog:,} drains at ≥ the empty database's batched rate "
                           f"({batched[0]:.0f}/s) at every size: lowest {min(backlog):.0f}/s",
                           min(backlog) >= batched[0]))  # fmt: skip
            for name in feds[0]["backlog"][0]["plans"]:
                rows.append(f"| backlog due: {name} (EXPLAIN ANALYZE ms / buffers) | " + " | ".join(
                    f"{med([r['plans'][name]['ms'] for r in f['backlog']]):.2f} / "
                    f"{f['backlog'][-1]['plans'][name]['buffers']}" for f in feds) + " |")  # fmt: skip
            notes.append(f"Plans with the backlog of {args.backlog:,} due at {human(args.sizes[-1])} (EXPLAIN ANALYZE, "
                         "first child first): " + "; ".join(f"{name}: {plan['nodes']}" for name, plan in
                                                          feds[-1]["backlog"][-1]["plans"].items()) + ".")  # fmt: skip
            growth = max(r["rss_peak"] - r["rss_before"] for f in feds for r in f["backlog"])
            checks.append((f"A's worker RSS while a backlog drains: peak − before < 20 MB at every size: worst "
                           f"{growth:.1f} MB", growth < 20))  # fmt: skip
        if feds[0].get("catchup"):
            drain = [med([r["drain"] for r in f["catchup"]]) for f in feds]
            rows.append(f"| catch-up of {args.catchup:,}: s from B healthy to all stored (first after s) | "
                        + " | ".join(f"**{v:.2f}** ({med([r['first_after'] for r in f['catchup']]):.2f})"
                                     for v, f in zip(drain, feds)) + " |")  # fmt: skip
            checks.append((f"catch-up of {args.catchup:,} ≤ 30 s at every size: worst {max(drain):.2f} s",
                           max(drain) <= 30))  # fmt: skip
    rows += [
        "| A's Celery worker RSS MB (all its processes): started / after the federation phases | "
        + " | ".join(f"{f['worker_rss']['start']:.0f} / {f['worker_rss']['end']:.0f}" for f in feds) + " |",
        "| A's web RSS MB under runkite: started / after | "
        + " | ".join(f"{f['web_rss']['start']:.0f} / {f['web_rss']['end']:.0f}" for f in feds) + " |",
    ]  # fmt: skip
    spread = max(f["worker_rss"]["end"] for f in feds) - feds[0]["worker_rss"]["end"]
    checks.append((f"A's worker RSS after the federation phases flat across sizes (≤ the empty database's + 20 MB): "
                   f"+{spread:.1f} MB at most", spread <= 20))  # fmt: skip
    for f in feds:
        problems += f["problems"]
    return rows, checks, problems, notes


# --------------------------------------------------------------------------- main


def phase_list(value: str) -> set[str]:
    phases = {p.strip() for p in value.split(",") if p.strip()}
    unknown = phases - set(PHASES)
    if unknown or not phases:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}")
    return phases


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--sizes", type=lambda v: sorted(int(float(x)) for x in v.split(",")),
                        default=[0, 1_000_000, 10_000_000],
                        help="stored events, comma-separated, smallest first (1e6 works)")  # fmt: skip
    common.wrk_arguments(parser, rounds=3, duration=10, warmup=3, duration_help="seconds per wrk / pgbench run")
    parser.add_argument("--pgbench-clients", type=int, help="default: --connections")
    parser.add_argument("--reads", type=int, default=500, help="requests per /api/events kind and round")
    parser.add_argument("--slow-reads", type=int, default=20, help="requests per growing read and round")
    parser.add_argument("--replay-events", type=int, default=100_000)
    parser.add_argument("--replay-seconds", type=float, default=30)
    parser.add_argument("--max-rate", type=float, default=4000, help="webhooks signed per second of a wrk run")
    parser.add_argument("--phases", type=phase_list, default=set(PHASES),
                        help=f"comma-separated, any of {','.join(PHASES)} (default: all)")  # fmt: skip
    parser.add_argument("--fed-rate", type=float, default=200, help="offered events/s of the A → B latency rounds")
    parser.add_argument("--fed-duration", type=float, default=20, help="seconds per A → B latency round")
    parser.add_argument("--fed-connections", type=int, default=16, help="connections of the latency generator")
    parser.add_argument("--batched", type=int, default=10_000, help="events per batched drain round (the baseline)")
    parser.add_argument("--backlog", type=lambda v: int(float(v)), default=1_000_000,
                        help="entries of the backlog round (0: none)")  # fmt: skip
    parser.add_argument("--backlog-rounds", type=int, default=1)
    parser.add_argument("--catchup", type=lambda v: int(float(v)), default=100_000,
                        help="events queued while B is down (0: no catch-up)")  # fmt: skip
    parser.add_argument("--catchup-rounds", type=int, default=3)
    common.service_arguments(parser, port=18490, pg_port=55540, redis_port=56540, port_help="A's port",
                             services_dir="/tmp/kite-scale-services", database="kite_scale")  # fmt: skip
    parser.add_argument("--b-port", type=int, help="B's port (default: --port + 1)")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--pgbench", default=shutil.which("pgbench") or PGBENCH)
    common.output_arguments(parser, bench.QUIET, section="scale")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if "ingest" in args.phases and not Path(args.pgbench).exists():
        raise SystemExit(f"no pgbench at {args.pgbench} (Debian's postgresql-15 ships it)")
    if "ingest" in args.phases and not Path(args.wrk).exists():
        raise SystemExit(f"no wrk at {args.wrk} (apt-get install wrk)")
    return bench.run_measured(args, Scale(args), measure, log)


def measure(args, scale: Scale, initial: dict) -> int:
    started = datetime.now(timezone.utc)
    scale.start()
    facts = bench.machine_facts(scale.dep) | initial
    facts["shared_buffers"] = scale.one("SHOW shared_buffers")
    facts["track_commit_timestamp"] = scale.one("SHOW track_commit_timestamp")
    facts["web_command"] = scale.dep.web_command
    scale.dep.stop_web()
    results, loads = [], {}
    for size in args.sizes:
        loads[size] = scale.load(size)
        results.append(scale.measure(size))
    finished = datetime.now(timezone.utc)
    facts["loadavg_end"] = os.getloadavg()[0]
    section = report(args, facts, results, loads, started, finished)
    return common.publish(section, args.section, not args.no_write, log)


if __name__ == "__main__":
    sys.exit(main())
