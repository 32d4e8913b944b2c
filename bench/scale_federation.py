"""Federation at scale: the part of bench/scale.py that federates its instance.

A is the scale run's instance — its data dir and its database with the bulk-loaded
events — started as `manage.py runkite` with web, Celery worker and beat (TLS on,
as bench/federation.py runs its instances) for these measurements only; B is a
second live instance with a database of its own on the same PostgreSQL (Redis db
2). At each size A is peered with B as an operator does it (B makes a token, A adds
B as a peer with B's pinned TLS fingerprint, B trusts A), measured, then B is
deleted as a peer through A's API (B is told), so that the scale run's webhooks
take the same path at every size (a team without live peers). What the
measurements added is deleted again: A's events after the phase's first id with
their outbox entries and delivery rows, and B's stored events.

The measurements reuse bench/federation.py's (imported, not copied): its latency
round (open loop on A, B's commit timestamps), its batched throughput round and
its catch-up round. The backlog round is its section 2 at the size of
`--backlog`. Three things differ from bench/federation.py, all because A holds
millions of rows that bench/federation.py's empty database does not:

- B's stored events are counted from B's `event_team_cursor` index, only the rows
  of transactions that finished since the previous poll (a count over every new
  row each poll would cost B's PostgreSQL more the longer the backlog);
- A's outbox is read for B's peer row only (`outbox_due`), never by a scan of
  every peer's entries (the bulk-loaded history);
- a release's drain time counts from the commit of the UPDATE that makes the
  entries due (a real backlog is due already); the UPDATE's own time is reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import psycopg

import common

fed = common.load("federation")

SOURCE = fed.SOURCE
# Prints the claim's SQL and the sweeper's (captured as it runs; datetimes marked) as JSON.
SQL_PROBE = r"""
import json
import django
django.setup()
from django.db import connection
from federation import outbox
captured = []
def capture(execute, sql, params, many, context):
    captured.append((sql, params))
    return execute(sql, params, many, context)
with connection.execute_wrapper(capture):
    outbox.due_peer_ids()
sql, params = captured[-1]
marked = [{"now": True} if hasattr(v, "isoformat") else v for v in params]
print(json.dumps({"claim": outbox.claim_sql()[0][0], "sweep": [sql, marked]}))
"""


log = common.logger("scale")
med = common.med


def plan_nodes(node: dict) -> str:
    """`Limit → LockRows → Index Scan outbox_due` — the path of a plan, first child first."""
    label = node["Node Type"] + (f" {node['Index Name']}" if "Index Name" in node else "")
    label += f" {node['Relation Name']}" if "Relation Name" in node and "Index Name" not in node else ""
    children = node.get("Plans", [])
    if not children:
        return label
    inner = plan_nodes(children[0]) if len(children) == 1 else "(" + " | ".join(plan_nodes(c) for c in children) + ")"
    return f"{label} → {inner}"


class AtScale(fed.Bench):
    """bench/federation.py's Bench on the scale run's instance (A) and a second one (B)."""

    def __init__(self, args, dep):
        self.scale_args = args
        self.args = argparse.Namespace(env=args.env, keep_data=False, keep_services=True,
                                       connections=args.fed_connections)  # fmt: skip
        # The scale run started PostgreSQL and Redis; this object never stops them.
        services = fed.Services(self.args, args.pg_port, args.redis_port, args.services_dir)
        self.services = [services]
        fast = {"KITE_PROBE_DOWN_SECONDS": "1"}
        # As in bench/federation.py: A's heartbeat would set batch_max back to what B advertises.
        self.a = fed.Instance(self.args, "a", args.port, services, 0, {**fast, "KITE_HEARTBEAT_SECONDS": "3600"})
        shutil.rmtree(self.a.data_dir, ignore_errors=True)
        self.a.data_dir, self.a.db_name, self.a.database_url = dep.data_dir, args.database, dep.database_url
        self.a.env.update(KITE_DATA_DIR=str(dep.data_dir), DATABASE_URL=dep.database_url)
        self.a.env.pop("KITE_INSTANCE_ID")  # A keeps the instance id its data dir holds
        self.b = fed.Instance(self.args, "b", args.b_port or args.port + 1, services, 2, fast)
        self.b.db_name = f"{args.database}_b"
        self.b.database_url = f"postgres://postgres@127.0.0.1:{args.pg_port}/{self.b.db_name}"
        self.b.env["DATABASE_URL"] = self.b.database_url
        self.serial = 0
        self.problems: list[str] = []
        self.horizons: dict[int, int] = {}  # B's max event id → the transaction horizon read with it
        self.b_running = False
        self.source_made = False
        self._production_sql: dict | None = None

    # --- per size: peer, measure, unpeer, clean up ----------------------------------

    def begin(self, size: int) -> None:
        a, b = self.a, self.b
        if not self.b_running:
            self.services[0].flush_redis(2)
            b.create_database()
            b.start()
            self.team_b = b.api("GET", "/api/me").json()["team"]["id"]
            self.b_running = True
        self.mark = self.a_one("SELECT coalesce(max(id), 0) FROM ingest_event")
        a.start()
        log(f"federation {size}: A (runkite: web, worker, beat) on {a.url}, B on {b.url}")
        self.team_a = a.api("GET", "/api/me").json()["team"]["id"]
        if not self.source_made:
            answer = a.api("POST", "/api/sources", json={"name": SOURCE, "kind": "none"})
            assert answer.status_code == 201, answer.text
            self.source_made = True
        self.federate(f"from-a-{size}", f"a-{size}")
        warm = f"com.bench.warm.{size}"
        after = self.b_max_event_id()
        self.post(a, self.hook_a, self.next_id("warm"), warm)
        self.wait_stored([warm], 1, timeout=60, after_id=after)
        # The template the SQL backlogs copy: found by id above the mark, not by type (no index on it).
        self.template = a.one(
            "SELECT e.id, o.provenance::text FROM ingest_event e JOIN federation_outboxentry o ON o.event_id = e.id"
            " WHERE e.id > %s AND e.ce_type = %s ORDER BY e.id DESC LIMIT 1",
            (self.mark, warm),
        )
        log(f"federation {size}: A → B peered (peer {self.peer_id}), first event delivered")

    def a_one(self, query: str, params=()):
        with psycopg.connect(self.a.database_url, autocommit=True) as conn:
            return conn.execute(query, params).fetchone()[0]

    def end(self, size: int) -> dict:
        """Delete B as a peer through A's API (B is told), stop A, delete what the phase added."""
        answer = self.a.api("DELETE", f"/api/federation/peers/{self.peer_id}")
        if answer.status_code not in (200, 204):
            self.problems.append(f"{size}: deleting the peer answered {answer.status_code} {answer.text[:200]}")
        self.a.stop()
        started = time.monotonic()
        peer, mark = self.peer_id, self.mark
        self.a.sql("DELETE FROM federation_delivery WHERE peer_id = %s", (peer,))
        self.a.sql("DELETE FROM federation_outboxentry WHERE peer_id = %s", (peer,))
        deleted = self.a.db.execute("DELETE FROM ingest_event WHERE id > %s", (mark,)).rowcount
        self.b.sql("TRUNCATE ingest_event CASCADE")  # B only receives: no other table holds its events
        self.horizons.clear()
        seconds = time.monotonic() - started
        log(f"federation {size}: peer deleted, A stopped; {deleted:,} events of the phase deleted in {seconds:.0f} s")
        return {"deleted": deleted, "cleanup_seconds": seconds}

    def close(self) -> None:
        self.a.stop()
        if self.a.db is not None:
            self.a.db.close()
        self.b.close()  # its data dir; its database goes with the scale run's PostgreSQL

    # --- overrides: what bench/federation.py reads by scanning, read by index --------

    def outbox_depth(self) -> dict:
        return dict(self.a.sql("SELECT status, count(*) FROM federation_outboxentry WHERE peer_id = %s"
                               " GROUP BY status", (self.peer_id,)))  # fmt: skip

    def b_max_event_id(self) -> int:
        max_id, horizon = self.b.one(
            "SELECT coalesce(max(id), 0), pg_snapshot_xmin(pg_current_snapshot())::text::bigint FROM ingest_event"
        )
        # Rows with a larger id belong to transactions not finished when this was read: their
        # txid is at least this snapshot's xmin, so counting can start there.
        self.horizons[max_id] = horizon
        return max_id

    def counter(self, types: list[str], after_id: int):
        """A function returning how many events of `types` with id > after_id B has stored: each
        call counts only the rows of transactions that finished since the previous call (B's
        event_team_cursor index), so a poll costs the rows that arrived, not the whole backlog."""
        state = {"low": self.horizons.get(after_id, 0), "total": 0}

        def poll() -> int:
            high = self.b.one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            state["total"] += self.b.one(
                "SELECT count(*) FROM ingest_event WHERE team_id = %s AND txid >= %s AND txid < %s AND id > %s"
                " AND ce_type = ANY(%s)",
                (self.team_b, state["low"], high, after_id, list(types)),
            )
            state["low"] = high
            return state["total"]

        return poll

    def wait_stored(self, types, count, timeout, interval=0.05, after_id=0, on_poll=None):
        poll = self.counter(types, after_id)
        deadline = time.monotonic() + timeout
        while True:
            have = poll()
            if have >= count:
                return time.time()
            if on_poll is not None:
                on_poll(have)
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out: {have}/{count} {types} stored at B; A outbox: {self.outbox_depth()}")
            time.sleep(interval)

    def release(self, event_type: str) -> float:
        """Make the queued entries of B's peer row due in one UPDATE, then post one event to A (its
        commit kicks delivery). Returns time.time() of the UPDATE's commit; its duration is kept."""
        started = time.time()
        self.a.sql(
            "UPDATE federation_outboxentry o SET next_attempt_at = now() FROM ingest_event e"
            " WHERE o.peer_id = %s AND o.status = 'pending' AND o.event_id = e.id AND e.ce_type = %s",
            (self.peer_id, event_type),
        )
        released = time.time()
        self.update_seconds = released - started
        self.post(self.a, self.hook_a, self.next_id("kick"), "com.bench.kick")
        return released

    # --- memory ---------------------------------------------------------------------

    def worker_rss(self) -> float:
        return sum(common.rss_mb(pid) or 0.0 for pid in self.a.worker_pids())

    def web_rss(self) -> float:
        """uvicorn and its workers: runkite's processes but itself and Celery's (worker, beat)."""
        pids = common.descendants(self.a.process.pid) - {self.a.process.pid}
        return sum(common.rss_mb(pid) or 0.0 for pid in pids if "celery" not in common.cmdline(pid))

    # --- query plans -----------------------------------------------------------------

    def production_sql(self) -> dict:
        """The claim and the sweeper's query exactly as federation/outbox.py issues them (read from
        Django in a subprocess with A's settings; the sweeper's captured while it runs)."""
        if self._production_sql is None:
            done = subprocess.run([sys.executable, "-c", SQL_PROBE], cwd=fed.ROOT, capture_output=True, text=True,
                                  env={**self.a.env, "DJANGO_SETTINGS_MODULE": "kite.settings"})  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"SQL probe failed:\n{done.stderr[-3000:]}")
            self._production_sql = json.loads(done.stdout.strip().splitlines()[-1])
        return self._production_sql

    def plans(self, repeat: int = 3) -> dict:
        """EXPLAIN ANALYZE of the delivery's claim (500 entries; in a transaction rolled back) and of
        the sweeper's query with the backlog queued, `now` 90 minutes ahead so that every queued
        entry counts as due. Median ms, buffers of the last run, the plan's nodes."""
        sql = self.production_sql()
        at = datetime.now(timezone.utc) + timedelta(minutes=90)
        claim = {"now": at, "peer": self.peer_id, "limit": fed.BATCH_MAX, "lease": at + timedelta(seconds=5)}
        sweep = [at if isinstance(v, dict) else v for v in sql["sweep"][1]]
        out = {}
        for name, query, params in (("claim of 500", sql["claim"], claim), ("sweeper", sql["sweep"][0], sweep)):
            runs = []
            for _ in range(repeat):
                with self.a.db.transaction():
                    plan = self.a.sql("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + query, params)[0][0][0]
                    raise psycopg.Rollback()  # the claim's UPDATE leases nothing for good
                top = plan["Plan"]
                runs.append((plan["Execution Time"], top["Shared Hit Blocks"] + top["Shared Read Blocks"],
                             plan_nodes(top)))  # fmt: skip
            out[name] = {"ms": med([r[0] for r in runs]), "buffers": runs[-1][1], "nodes": runs[-1][2]}
        return out

    # --- the backlog ------------------------------------------------------------------

    def backlog_round(self, count: int, tag: str) -> dict:
        """`count` events + entries for B written into A's database, not due; released in one
        UPDATE; time from its commit until B has stored them all; A's worker RSS every second."""
        event_type = f"com.bench.backlog.{tag}"
        self.set_batch_max(fed.BATCH_MAX)
        started = time.monotonic()
        self.queue(count, event_type, due=False)
        queue_seconds = time.monotonic() - started
        log(f"backlog {tag}: {count:,} entries queued in {queue_seconds:.0f} s")
        plans = self.plans()
        log(f"backlog {tag}: " + "; ".join(f"{k} {v['ms']:.2f} ms, {v['buffers']} buffers ({v['nodes']})"
                                           for k, v in plans.items()))  # fmt: skip
        time.sleep(1)
        after = self.b_max_event_id()
        before = self.worker_rss()
        samples: list[tuple[float, int, float]] = []
        cpu_before = self.cpu_snapshot()
        released = self.release(event_type)

        def on_poll(have: int) -> None:
            if not samples or time.time() - samples[-1][0] >= 1:
                samples.append((time.time(), have, self.worker_rss()))

        done = self.wait_stored([event_type], count, timeout=max(300, count / 200), interval=0.2,
                                after_id=after, on_poll=on_poll)  # fmt: skip
        cpu_after = self.cpu_snapshot()
        end = self.worker_rss()
        stored, first, last = self.stored_at_b(event_type, after)
        self.check(f"backlog {tag}", stored, count)
        tenths = self.b.sql(
            "SELECT k, count(*), max(received_at) FROM (SELECT received_at, ntile(10) OVER (ORDER BY received_at) k"
            " FROM ingest_event WHERE id > %s AND ce_type = %s) t GROUP BY k ORDER BY k",
            (after, event_type),
        )
        tenth_rates = [n / max((at - previous).total_seconds(), 1e-6)
                       for (_, n, at), (_, _, previous) in zip(tenths[1:], tenths[:-1])]  # fmt: skip
        rss = [s[2] for s in samples] + [before, end]
        return {
            "count": count,
            "stored": stored,
            "queue_seconds": queue_seconds,
            "update_seconds": self.update_seconds,
            "seconds": done - released,
            "rate": count / (done - released),
            "rate_with_update": count / (done - released + self.update_seconds),
            "first_after": first.timestamp() - released,
            "steady_rate": (stored - 1) / max((last - first).total_seconds(), 1e-6),
            "tenth_rates": tenth_rates,
            "slowest_tenth": min(tenth_rates or [float("nan")]),
            "cpu_us": self.cpu_per_event(cpu_before, cpu_after, count),
            "rss_before": before,
            "rss_peak": max(rss),
            "rss_end": end,
            "dead": self.outbox_depth().get("dead", 0),
            "plans": plans,
        }

    # --- one size ---------------------------------------------------------------------

    def measure(self, size: int, phases: set[str]) -> dict:
        a = self.scale_args
        known = len(self.problems)
        self.begin(size)
        out: dict = {"worker_rss": {"start": self.worker_rss()}, "web_rss": {"start": self.web_rss()}}
        if "federation" in phases:
            fed.latency_round(self, "federated", a.fed_rate, 3, f"warm{size}")  # warm-up, discarded
            out["latency"] = []
            for i in range(a.rounds):
                r = fed.latency_round(self, "federated", a.fed_rate, a.fed_duration, f"s{size}r{i + 1}")
                out["latency"].append(r)
                log(f"{size} latency r{i + 1}: A's 202 → stored at B p50 {r.get('stored_p50', float('nan')):.1f} "
                    f"p99 {r.get('stored_p99', float('nan')):.1f} ms (listener p50 {r['p50']:.1f} p99 {r['p99']:.1f}); "
                    f"achieved {r['achieved']:.0f}/s, missing {r['missing']}, errors {r['errors']}")  # fmt: skip
        if "backlog" in phases:
            out["batched"] = []
            for i in range(a.rounds):
                r = fed.throughput_round(self, True, a.batched, f"s{size}b{i + 1}")
                out["batched"].append(r)
                log(f"{size} batched r{i + 1}: {a.batched:,} in {r['seconds']:.2f} s = {r['rate']:.0f}/s "
                    f"(steady {r['steady_rate']:.0f}/s)")  # fmt: skip
            out["backlog"] = []
            for i in range(a.backlog_rounds if a.backlog else 0):
                r = self.backlog_round(a.backlog, f"s{size}q{i + 1}")
                out["backlog"].append(r)
                tenths = [round(x) for x in r["tenth_rates"]]
                log(f"{size} backlog r{i + 1}: {a.backlog:,} in {r['seconds']:.1f} s = {r['rate']:.0f}/s after the "
                    f"release UPDATE ({r['update_seconds']:.1f} s); per tenth {tenths}; worker RSS "
                    f"{r['rss_before']:.0f} → peak {r['rss_peak']:.0f} → {r['rss_end']:.0f} MB")  # fmt: skip
            out["catchup"] = []
            for i in range(a.catchup_rounds if a.catchup else 0):
                r = fed.catchup_round(self, a.catchup, f"s{size}c{i + 1}")
                out["catchup"].append(r)
                log(f"{size} catch-up r{i + 1}: {r['stored']:,} stored {r['drain']:.2f} s after B answered "
                    f"(first after {r['first_after']:.2f} s)")  # fmt: skip
        out["worker_rss"]["end"] = self.worker_rss()
        out["web_rss"]["end"] = self.web_rss()
        out["worker_pids"] = len(self.a.worker_pids())
        out |= self.end(size)
        out["problems"] = self.problems[known:]
        return out
