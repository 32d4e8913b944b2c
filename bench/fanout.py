#!/usr/bin/env python3
"""Fan-out: one event matching 200 peers.

Starts, as bench/ingest.py does (whose Deployment and wrk rounds it uses): PostgreSQL + Redis
(scripts/services.sh), a fresh database, Kite's web process (`runkite --no-worker --no-beat`,
KITE_TLS=off as behind a TLS proxy) and a Stripe source; and bench/receiver.py, an HTTPS
endpoint that answers 200 and counts what arrives per path. 200 peers are made through the API
(`POST /api/federation/peers`, as an operator does): `fan-000` … `fan-199`, each with its own
hook URL on the receiver (`/p/000` … `/p/199`: a peer row is one destination, named uniquely
per team; URLs need not differ, they do here so that the receiver can tell deliveries apart),
its own generated token, the receiver's certificate pinned (tls_fingerprint), scopes
["stripe.*"] (KITE_PEER_ALLOWED_NETWORKS lets 127.0.0.0/8 through; the receiver is not a Kite:
one event per POST).

1. ingest: verified Stripe webhooks in a closed loop (wrk, bench/ingest.py's rounds), the team
   having 0 peers (the rows made senders), 200 peers none of which matches (scopes elsewhere:
   routing alone) and 200 matching peers (200 outbox entries and 200 kicks per event),
   alternating in the same run. Web alone, as bench/ingest.py measures it: no worker runs (with
   200 peers each accepted event owes 200 deliveries; delivering them is phase 3's concern);
   the web process's courier delivers for the few peers it takes when KITE_WEB_DELIVERY=on (off
   by default: then nothing is delivered during the rounds). After each round the outbox is
   checked (200 entries per stored event) and emptied.
2. profile: the same webhook path in one process (`ingest.services.webhook_receive`), wall time
   per event with 0 / 200 non-matching / 200 matching peers, and a cProfile of the 200-peer case:
   where an event's time goes (routing, the outbox INSERT, the kicks after commit).
3. delivery: Celery worker (concurrency 2, runkite's default) and beat started; one webhook at a
   time; time from its 202 until the receiver has it on all 200 paths, and until A has marked
   all 200 delivered; alternating with the same for one matching peer (the rest scoped away).

    .venv/bin/python bench/fanout.py --wait-quiet 1500                            # the recorded run
    .venv/bin/python bench/fanout.py --rounds 2 --duration 5 --latency-rounds 3 --no-write   # trial
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import requests

import common

ROOT = common.ROOT
sys.path.insert(0, str(ROOT))

ing = common.load("ingest")
fed = common.load("federation")
from kite import tls  # noqa: E402

SECTION = "fanout"
PEER_PREFIX = "fan-"
SCOPES = ["stripe.*"]
NOT_MATCHING = ["nothing.here.*"]
INGEST_VARIANTS = ("0 peers", "200 peers, none matching", "200 matching peers")
log = fed.log
med = fed.med


class Fanout:
    def __init__(self, args):
        self.args = args
        args.env = [*args.env, "KITE_PEER_ALLOWED_NETWORKS=127.0.0.0/8,::1/128",
                    # no 200 pings every 30 s in the middle of a round (phase 3 measures deliveries alone)
                    "KITE_HEARTBEAT_SECONDS=3600"]  # fmt: skip
        # bench/ingest.py's own defaults for whatever its Deployment reads, with this run's ports and paths
        dep_args = ing.build_parser().parse_args([])
        for name in ("port", "pg_port", "redis_port", "services_dir", "database", "keep_services", "wrk", "max_rate",
                     "env"):  # fmt: skip
            setattr(dep_args, name, getattr(args, name))
        self.dep = ing.Deployment(dep_args)
        self.receiver = common.Receiver(self.dep.work_dir, args.receiver_port, "id")
        self.celery: dict[str, subprocess.Popen] = {}
        self.problems: list[str] = []

    # --- setup -----------------------------------------------------------------

    def start(self) -> None:
        self.dep.start()
        self.db = psycopg.connect(self.dep.database_url, autocommit=True)
        self.receiver.start()
        self.cert, self.receiver_url = self.receiver.cert, self.receiver.url
        fingerprint = tls.fingerprint_of_pem(Path(self.cert).read_bytes())
        started = time.monotonic()
        for i in range(self.args.peers):
            status, body = ing.http_json("POST", f"{self.dep.base}/api/federation/peers", {
                "name": f"{PEER_PREFIX}{i:03d}", "peer_hook_url": f"{self.receiver_url}/p/{i:03d}", "scopes": SCOPES,
                "tls_fingerprint": fingerprint,
            }, token=self.dep.api_key)  # fmt: skip
            assert status == 201, body
        self.peers_seconds = time.monotonic() - started
        log(f"{self.args.peers} peers made through the API in {self.peers_seconds:.1f} s")

    def stats(self) -> dict:
        return self.receiver.stats()

    def start_celery(self) -> None:
        env = {**self.dep.env, "PROMETHEUS_MULTIPROC_DIR": str(self.dep.data_dir / "metrics")}
        Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir(exist_ok=True)
        base = [sys.executable, "-m", "celery", "-A", "kite"]
        commands = {  # as runkite starts them
            "worker": [*base, "worker", "--concurrency", str(self.args.concurrency), "--loglevel", "WARNING"],
            "beat": [*base, "beat", "--schedule", str(self.dep.data_dir / "celerybeat-schedule"), "--loglevel",
                     "WARNING"],
        }  # fmt: skip
        for name, argv in commands.items():
            out = open(self.dep.work_dir / f"{name}.log", "wb")
            self.celery[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True)  # fmt: skip
        from celery import Celery

        control = Celery("control", broker=self.dep.env["REDIS_URL"])
        deadline = time.monotonic() + 60
        while not control.control.ping(timeout=1):
            if time.monotonic() > deadline or self.celery["worker"].poll() is not None:
                raise SystemExit(f"worker did not start:\n{(self.dep.work_dir / 'worker.log').read_text()[-3000:]}")
        log(f"worker (concurrency {self.args.concurrency}) and beat up")

    def stop(self) -> None:
        for process in [*self.celery.values(), self.receiver.process]:
            common.stop_process(process)
        self.dep.stop()

    # --- helpers -------------------------------------------------------------------

    def one(self, query: str, params=()):
        return self.db.execute(query, params).fetchone()[0]

    def set_peers(self, variant: str) -> None:
        """0 peers: the rows are made senders (routing reads peers only); otherwise peers whose
        scopes match every Stripe event, or none, or (`1 matching peer`) only fan-000's."""
        role = "sender" if variant == "0 peers" else "peer"
        scopes = NOT_MATCHING if variant == "200 peers, none matching" else SCOPES
        self.db.execute("UPDATE federation_peer SET role = %s, scopes = %s WHERE name LIKE %s",
                        (role, json.dumps(scopes), PEER_PREFIX + "%"))  # fmt: skip
        if variant == "1 matching peer":
            self.db.execute("UPDATE federation_peer SET scopes = %s WHERE name LIKE %s AND name <> %s",
                            (json.dumps(NOT_MATCHING), PEER_PREFIX + "%", f"{PEER_PREFIX}000"))  # fmt: skip
        self.db.execute("UPDATE kite_team SET routes_version = routes_version + 1")  # every process re-reads routes

    def empty_outbox(self) -> int:
        """Entries written since the last call; the outbox (and queued kicks) emptied."""
        entries = self.one("SELECT count(*) FROM federation_outboxentry")
        self.db.execute("TRUNCATE federation_outboxentry CASCADE")
        subprocess.run(["redis-cli", "-p", str(self.args.redis_port), "-n", "0", "del", "celery"],
                       capture_output=True, check=True)  # fmt: skip
        return entries

    def cpu(self) -> dict[str, float]:
        groups = {"web": self.dep.web.pid, "receiver": self.receiver.process.pid,
                  **{name: p.pid for name, p in self.celery.items()}}  # fmt: skip
        snapshot = {name: common.cpu_tree(pid) for name, pid in groups.items()}
        return snapshot | self.dep.services.cpu(reaped=True)

    # --- 1. ingest ---------------------------------------------------------------------

    def events_stored(self) -> int:
        return self.one("SELECT coalesce(max(id), 0) FROM ingest_event")

    def settled_events(self) -> int:
        """The newest event id once requests still in flight when wrk stopped have been answered:
        none stored for 2 s (with 200 matching peers a request takes seconds under a closed loop)."""
        last, quiet_since = self.events_stored(), time.monotonic()
        while time.monotonic() - quiet_since < 2:
            time.sleep(0.25)
            now = self.events_stored()
            if now != last:
                last, quiet_since = now, time.monotonic()
        return last

    def ingest_round(self, variant: str, requests_: "ing.Requests", duration: float) -> dict:
        self.set_peers(variant)
        time.sleep(0.5)
        before = self.settled_events()
        result = ing.wrk_round(self.dep, requests_, "stripe", duration, self.args.connections, self.args.wrk_threads)
        self.settled_events()
        stored = self.one("SELECT count(*) FROM ingest_event WHERE id > %s", (before,))
        entries = self.empty_outbox()
        expected = self.args.peers * stored if variant == "200 matching peers" else 0
        # wrk counts the answers within its run; requests in flight when it stopped are stored too.
        if entries != expected or not result["accepted"] <= stored <= result["accepted"] + self.args.connections:
            self.problems.append(f"ingest, {variant}: {entries} outbox entries for {stored} events stored, "
                                 f"{result['accepted']} answered 202")  # fmt: skip
        if result["other"] or result["socket_errors"]:
            self.problems.append(f"ingest, {variant}: {result['other']} answers not 202, "
                                 f"{result['socket_errors']} socket errors")  # fmt: skip
        result["entries"], result["stored"] = entries, stored
        return result

    # --- 2. profile ----------------------------------------------------------------------

    def profile(self) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", PROFILE, self.dep.team_id, ing.SOURCE_NAME, self.dep.secret,
             str(self.args.profile_events)],
            cwd=ROOT, env=self.dep.env, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"profile failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    # --- 3. delivery latency -------------------------------------------------------------

    def latency_round(self, variant: str, requests_: "ing.Requests", tag: str) -> dict:
        self.set_peers(variant)
        time.sleep(1)
        expected = self.args.peers if variant == "200 matching peers" else 1
        signature, body = requests_.batch(1)[0]
        event_id = json.loads(body)["id"]
        before = self.cpu()
        sent = time.time()
        answer = requests.post(f"{self.dep.base}{self.dep.paths['stripe']}", data=body, timeout=30,
                               headers={"Content-Type": "application/json", "Stripe-Signature": signature})  # fmt: skip
        accepted = time.time()
        assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + 120
        while True:
            entry = self.stats().get(event_id)
            if entry and entry[3] >= expected:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{tag}: {entry} of {expected} deliveries within 120 s")
            time.sleep(0.02)
        marked = self._all_marked(event_id, expected)
        after = self.cpu()
        count, first, last, paths = entry
        if count != expected or paths != expected:
            self.problems.append(f"delivery {tag}: {count} deliveries on {paths} paths, {expected} expected")
        received_at, delivered_last, dead = self.db.execute(
            "SELECT extract(epoch FROM e.received_at), extract(epoch FROM max(o.delivered_at)),"
            " count(*) FILTER (WHERE o.status <> 'delivered') FROM ingest_event e"
            " JOIN federation_outboxentry o ON o.event_id = e.id WHERE e.ce_id = %s GROUP BY e.id",
            (event_id,),
        ).fetchone()  # fmt: skip
        if dead:
            self.problems.append(f"delivery {tag}: {dead} entries not delivered")
        return {
            "answer_ms": (accepted - sent) * 1000,
            "first_s": first - accepted,
            "all_s": last - accepted,
            "all_from_sent_s": last - sent,
            "marked_s": float(delivered_last) - accepted if marked else float("nan"),
            "kite_s": float(delivered_last) - float(received_at),
            "cpu_us": {k: 1e6 * (after[k] - before[k]) / expected for k in before},
        }

    def _all_marked(self, event_id: str, expected: int) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = self.one("SELECT count(*) FROM federation_outboxentry o JOIN ingest_event e ON e.id = o.event_id"
                            " WHERE e.ce_id = %s AND o.status = 'delivered'", (event_id,))  # fmt: skip
            if done >= expected:
                return True
            time.sleep(0.02)
        return False


PROFILE = r"""
import cProfile, hashlib, hmac, json, os, pstats, sys, time
import django
django.setup()
from django.db import connection
from federation import outbox
from ingest import selectors, services
from kite import fastsql
team_id, source_name, secret, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
serial = [0]
def webhook():
    serial[0] += 1
    now = int(time.time())
    body = json.dumps({"id": f"evt_profile_{os.getpid()}_{serial[0]:07d}", "object": "event", "created": now,
                       "type": "payment_intent.succeeded", "data": {"object": {"id": "pi_1", "amount": 2000}}}).encode()
    digest = hmac.new(secret.encode(), f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    return {"stripe-signature": f"t={now},v1={digest}", "content-type": "application/json"}, body
def receive(n):
    source = selectors.source_for_hook(team_id, source_name)
    started = time.perf_counter()
    for _ in range(n):
        headers, body = webhook()
        services.webhook_receive(source=source, headers=headers, body=body)
    return (time.perf_counter() - started) * 1000 / n
def set_peers(role, scopes):
    with connection.cursor() as c:
        c.execute("UPDATE federation_peer SET role = %s, scopes = %s WHERE name LIKE 'fan-%%'", (role, json.dumps(scopes)))
        c.execute("UPDATE kite_team SET routes_version = routes_version + 1")
out = {"wall_ms": {}}
for rnd in range(3):
    for name, role, scopes in (("0 peers", "sender", ["stripe.*"]), ("200 peers, none matching", "peer", ["nothing.here.*"]),
                               ("200 matching peers", "peer", ["stripe.*"])):
        set_peers(role, scopes)
        receive(5)
        out["wall_ms"].setdefault(name, []).append(receive(count))
out["wall_ms"] = {k: sorted(v)[len(v) // 2] for k, v in out["wall_ms"].items()}
def profiled(role, scopes):
    set_peers(role, scopes)
    receive(5)
    profiler = cProfile.Profile()
    profiler.enable()
    receive(count)
    profiler.disable()
    return pstats.Stats(profiler)
stats = profiled("peer", ["stripe.*"])
def cum(name, file_part, caller=None):
    total = 0.0
    for (path, line, func), (cc, nc, tt, ct, callers) in stats.stats.items():
        if func == name and file_part in path:
            if caller is None:
                total += ct
            else:
                total += sum(v[3] for (cp, cl, cf), v in callers.items() if cf == caller)
    return total * 1000 / count
out["per_event_ms"] = {
    "webhook_receive (profiled)": cum("webhook_receive", "ingest/services.py"),
    "route_event": cum("route_event", "federation/enqueue.py"),
    "routing decisions (_decide)": cum("_decide", "federation/enqueue.py"),
    "outbox INSERT (enqueue.entries_write)": cum("entries_write", "federation/enqueue.py"),
    "kicks after commit (dispatch.kick_all)": cum("kick_all", "federation/dispatch.py"),
    "of which Redis SET NX (dispatch.first_kicks)": cum("first_kicks", "federation/dispatch.py"),
    "of which Celery publish (Task.delay)": cum("delay", "celery/app/task.py"),
}
rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])
out["top"] = [f"{ct * 1000 / count:8.2f} ms  {nc / count:6.0f} calls  {os.path.relpath(path) if path.startswith('/') else path}:{line} {func}"
              for (path, line, func), (cc, nc, tt, ct, callers) in rows[:30]]
# Routing alone: the 200-peer loop when no scope matches (every peer dropped and counted).
stats = profiled("peer", ["nothing.here.*"])
out["none_matching_ms"] = {
    "webhook_receive (profiled)": cum("webhook_receive", "ingest/services.py"),
    "route_event": cum("route_event", "federation/enqueue.py"),
    "routing decisions (_decide)": cum("_decide", "federation/enqueue.py"),
    "drop counter (labels + inc)": cum("labels", "prometheus_client/metrics.py", "route_event")
                                   + cum("inc", "prometheus_client/metrics.py", "route_event"),
}
# The parts of a 200-peer event on their own, without a profiler (median of 15, ms): the outbox
# INSERT as route_event writes it and as one multi-row VALUES of every column of every entry (how
# it was written before), both rolled back; route_event whole (rolled back); the kicks' Redis flags
# one by one and in one pipeline, the tasks published one by one (Task.delay) and over one producer.
from django.db import transaction
from federation import enqueue, routing, tasks
from federation.models import OutboxEntry, Peer
from ingest.models import Event
from kite.celery import app
from kite.ratelimit import redis_client
set_peers("peer", ["stripe.*"])
event = (Event.objects.filter(team_id=team_id).exclude(ce_type__startswith=routing.INTERNAL_PREFIX)
         .order_by("-id").first())
peer_ids = list(Peer.objects.filter(name__startswith="fan-").values_list("pk", flat=True))
forward = routing.next_hop(routing.provenance_of(event.extensions or {}), "fanout-bench")
provenance = forward.extensions()
def median_ms(fn, n=15):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return sorted(times)[n // 2]
def rolled_back(fn):
    def run():
        with transaction.atomic():
            fn()
            transaction.set_rollback(True)
    return run
insert = rolled_back(lambda: enqueue.entries_write(event, forward, peer_ids))
insert_values = rolled_back(lambda: fastsql.insert([OutboxEntry(team_id=event.team_id, peer_id=p, event=event,
                                                                provenance=forward.extensions()) for p in peer_ids]))
route = rolled_back(lambda: enqueue.route_event(event, None))
redis = redis_client()
def flags_one_by_one():
    for p in peer_ids:
        redis.set(f"kite:fanout-bench:{p}", 1, nx=True, ex=1)
def flags_pipelined():
    pipe = redis.pipeline(transaction=False)
    for p in peer_ids:
        pipe.set(f"kite:fanout-bench:{p}", 1, nx=True, ex=1)
    pipe.execute()
def publish_one_by_one():
    for p in peer_ids:
        tasks.deliver_peer.delay(p)
def publish_one_producer():
    with app.producer_or_acquire() as producer:
        for p in peer_ids:
            tasks.deliver_peer.apply_async((p,), producer=producer)
def flags_pipelined_one_task():  # what a kick of all the event's peers at once would cost the request
    flags_pipelined()
    app.send_task("federation.tasks.deliver_peer", args=(peer_ids[0],), kwargs={"also": peer_ids})
out["parts_ms"] = {
    "outbox INSERT of 200 entries (route_event's: INSERT … SELECT … FROM unnest)": median_ms(insert),
    "the same as one multi-row VALUES of every column of every entry": median_ms(insert_values),
    "route_event, 200 matching peers (routing + INSERT, rolled back)": median_ms(route),
    "200 Redis SET NX, one by one (as kicks do)": median_ms(flags_one_by_one),
    "200 Redis SET NX, one pipeline": median_ms(flags_pipelined),
    "200 tasks published, Task.delay each (as kicks do)": median_ms(publish_one_by_one, 5),
    "200 tasks published over one producer": median_ms(publish_one_producer, 5),
    "200 flags in one pipeline + one task naming the 200 peers published": median_ms(flags_pipelined_one_task),
}
# The worker's side: one event to 200 peers, each peer's deliver_peer run here one after another
# (as one worker process runs the 200 tasks), profiled, with its database statements counted.
from django.db import connection as db
set_peers("peer", ["stripe.*"])
with db.cursor() as c:
    c.execute("TRUNCATE federation_outboxentry CASCADE")  # only this event's entries are due
receive(1)
queries = [0]
def counting(execute, sql, params, many, context):
    queries[0] += 1
    return execute(sql, params, many, context)
profiler = cProfile.Profile()
with db.execute_wrapper(counting):
    started = time.perf_counter()
    profiler.enable()
    delivered = sum(outbox.deliver_peer(p) for p in peer_ids)
    profiler.disable()
    wall = time.perf_counter() - started
stats = pstats.Stats(profiler)
rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])
out["worker"] = {"delivered": delivered, "ms_per_delivery (profiled)": wall * 1000 / len(peer_ids),
                 "queries_per_delivery": queries[0] / len(peer_ids)}
out["worker_top"] = [f"{ct * 1000 / len(peer_ids):8.3f} ms  {nc / len(peer_ids):6.1f} calls  {os.path.relpath(path) if path.startswith('/') else path}:{line} {func}"
                     for (path, line, func), (cc, nc, tt, ct, callers) in rows[:40]]
print(json.dumps(out))
"""


# --------------------------------------------------------------------------- report


def report(args, facts, bench: Fanout, ingest: list[dict], profile: dict | None, latency: list[dict],
           started, finished) -> str:  # fmt: skip
    quiet = facts["loadavg"] < args.quiet_load and not facts["busy"]
    lines = [
        *common.section_head(SECTION, "Fan-out: one event to 200 peers", started, common.command("fanout.py")),
        f"- Machine: {facts['nproc']} CPUs ({facts['cpu']}); 1-min load average {facts['loadavg']:.2f} at the start, "
        f"{facts['loadavg_end']:.2f} at the end; pytest / benchmark processes at the start: {len(facts['busy'])} → "
        f"{'quiet' if quiet else '**NOT quiet**'}. PostgreSQL {facts['postgres']} (fsync={facts['fsync']}, "
        f"synchronous_commit={facts['synchronous_commit']}); everything shares these CPUs on loopback.",
        f"- Kite's web process as bench/ingest.py runs it (`runkite --no-worker --no-beat`, KITE_TLS=off, "
        f"KITE_WEB_WORKERS={facts['web_workers']}, KITE_WSGI_THREADS={facts['wsgi_threads']}), a Stripe source; "
        f"{args.peers} peers made through `POST /api/federation/peers` ({bench.peers_seconds:.1f} s for all), each its "
        "own row, token and hook URL (`/p/000` … on one receiver, `bench/receiver.py`: HTTPS, answers 200, counts "
        "per path; not a Kite, so one event per POST), the receiver's certificate pinned, scopes [\"stripe.*\"]. "
        "Peers must differ by name only; their URLs may be the same.",
        "",
        f"**1. Ingest** — verified Stripe webhooks (~1.3 kB, fresh signature each), closed loop: `wrk "
        f"-t{args.wrk_threads} -c{args.connections}`, {args.duration:g} s per run, {args.rounds} rounds, the three "
        "cases alternating: the team with 0 peers (the 200 rows made senders), 200 peers none of whose scopes match "
        "(routing alone), 200 matching peers (each event: 200 outbox entries in its transaction, 200 kicks after "
        f"commit). Web alone, no worker: KITE_WEB_DELIVERY={facts['web_delivery']}"
        + (" (the web process's courier delivers for the few peers it takes at a time)"
           if facts["web_delivery"] == "on" else " (no delivery during the runs)")
        + "; the outbox is counted and emptied after each run.",
        "",
        "| round | " + " | ".join(f"{v} events/s (p50 / p99 ms)" for v in INGEST_VARIANTS) + " |",
        "|---|" + "---|" * len(INGEST_VARIANTS),
    ]
    for i, r in enumerate(ingest):
        lines.append(f"| {i + 1} | " + " | ".join(
            f"{r[v]['rate']:.0f} ({r[v]['p50_ms']:.1f} / {r[v]['p99_ms']:.1f})" for v in INGEST_VARIANTS) + " |")  # fmt: skip
    rate = {v: med([r[v]["rate"] for r in ingest]) for v in INGEST_VARIANTS}
    ratio = {v: med([r[v]["rate"] / r["0 peers"]["rate"] for r in ingest]) for v in INGEST_VARIANTS}
    lines += [
        "| **median** | " + " | ".join(f"**{rate[v]:.0f}** ({med([r[v]['p50_ms'] for r in ingest]):.1f} / "
                                       f"{med([r[v]['p99_ms'] for r in ingest]):.1f})" for v in INGEST_VARIANTS) + " |",
        "| **÷ 0 peers** | " + " | ".join(f"**{ratio[v]:.0%}**" for v in INGEST_VARIANTS) + " |",
        "",
        "CPU per accepted event, µs (median): " + "; ".join(
            f"{v}: " + ", ".join(f"{g} {med([r[v]['cpu_us'][g] for r in ingest]):.0f}" for g in ("web", "postgres", "redis"))
            for v in INGEST_VARIANTS) + ". Outbox entries written per stored event with 200 matching peers: "
        + f"{med([r['200 matching peers']['entries'] / max(r['200 matching peers']['stored'], 1) for r in ingest]):.0f}.",
        "",
    ]  # fmt: skip
    if profile:
        wall = profile["wall_ms"]
        lines += [
            f"**2. Where a fanned-out event's time goes** — the webhook path in one process "
            f"(`ingest.services.webhook_receive`: verify, convert, store, route, commit, kicks), {args.profile_events} "
            "events one after another per case, median of 3 alternating runs: "
            + ", ".join(f"{v} {wall[v]:.2f} ms" for v in INGEST_VARIANTS)
            + " per event. cProfile of the 200-matching case, per event (profiler overhead included):",
            "",
            "| part | ms per event |",
            "|---|---|",
            *(f"| {name} | {ms:.2f} |" for name, ms in profile["per_event_ms"].items()),
            "",
            "The same profile with 200 peers none of which matches (routing alone): "
            + ", ".join(f"{name} {ms:.2f} ms" for name, ms in profile["none_matching_ms"].items()) + ".",
            "",
            "The parts on their own, no profiler (median of 15, or 5 for the publishes, ms for 200 peers): "
            + "; ".join(f"{name} **{ms:.1f}**" for name, ms in profile["parts_ms"].items()) + ".",
            "",
            f"The worker's side, the same way: one event to {args.peers} peers, each peer's `deliver_peer` run "
            "in one process one after another (as one worker process runs the tasks), profiled: "
            f"{profile['worker']['ms_per_delivery (profiled)']:.1f} ms and "
            f"{profile['worker']['queries_per_delivery']:.1f} database statements per delivery "
            f"({profile['worker']['delivered']} delivered).",
            "",
        ]
    if latency:
        one = [r for r in latency if r["variant"] == "1 matching peer"]
        many = [r for r in latency if r["variant"] == "200 matching peers"]
        lines += [
            f"**3. Delivery of one event to {args.peers} peers** — Celery worker (concurrency {args.concurrency}, "
            "runkite's default) and beat started; one verified webhook at a time; from its 202 to its arrival on all "
            f"{args.peers} paths of the receiver (receiver's clock) and to A's last `delivered_at`; alternating with "
            f"the same event to 1 matching peer (the other 199 scoped away). {len(many)} rounds each.",
            "",
            "| case | 202 answer ms | first delivery s after the 202 | **all delivered** (receiver) s after the 202 "
            "| all delivered s after the request was sent | all marked delivered at A s after the 202 | "
            "CPU µs per delivery (worker / web / postgres / redis / receiver) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, rows in (("200 matching peers", many), ("1 matching peer", one)):
            if rows:
                cpu = (" / ".join(f"{med([r['cpu_us'].get(g, 0) for r in rows]):.0f}"
                                  for g in ("worker", "web", "postgres", "redis", "receiver"))
                       if name != "1 matching peer" else "(one delivery: below /proc's 10 ms tick)")  # fmt: skip
                lines.append(
                    f"| {name} | {med([r['answer_ms'] for r in rows]):.1f} | {med([r['first_s'] for r in rows]):.3f} | "
                    f"**{med([r['all_s'] for r in rows]):.3f}** | {med([r['all_from_sent_s'] for r in rows]):.3f} | "
                    f"{med([r['marked_s'] for r in rows]):.3f} | {cpu} |"
                )  # fmt: skip
        lines += [
            "",
            "Per round, 200 peers, all delivered s: " + ", ".join(f"{r['all_s']:.3f}" for r in many) + ".",
            "",
        ]
    lines += [
        f"Run took {(finished - started).seconds} s. Checked: every answer 202; 200 outbox entries per accepted "
        "event with 200 matching peers, none otherwise; every delivery arrived once on its own path; every entry "
        "delivered — " + common.held(bench.problems),
    ]
    return common.section_text(lines, SECTION)


def machine_facts(bench: Fanout) -> dict:
    dep = bench.dep
    return {
        "nproc": os.cpu_count(), "cpu": common.cpu_model(), "web_workers": dep.setting("KITE_WEB_WORKERS"),
        "wsgi_threads": dep.setting("KITE_WSGI_THREADS"), "postgres": bench.one("SHOW server_version"),
        "web_delivery": "on" if dep.setting("KITE_WEB_DELIVERY") == "True" else "off",
        "fsync": bench.one("SHOW fsync"), "synchronous_commit": bench.one("SHOW synchronous_commit"),
    }  # fmt: skip


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--peers", type=int, default=200)
    common.wrk_arguments(parser, rounds=3, duration=10, warmup=3, rounds_help="ingest rounds (each: the three cases)",
                         duration_help="seconds per wrk run")
    parser.add_argument("--max-rate", type=float, default=4000, help="requests signed per second of a wrk run")
    parser.add_argument("--profile-events", type=int, default=50, help="events per case of the profile (0: skip)")
    parser.add_argument("--latency-rounds", type=int, default=10, help="delivery rounds per case (0: skip)")
    parser.add_argument("--concurrency", type=int, default=2, help="Celery worker concurrency (runkite's default)")
    common.service_arguments(parser, port=18640, pg_port=25662, redis_port=26662,
                             services_dir="/tmp/kite-fanout-services", database="kite_fanout")  # fmt: skip
    parser.add_argument("--receiver-port", type=int, default=18641)
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    common.output_arguments(parser, quiet_load=1.0)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    initial = fed.at_start(args)
    bench = Fanout(args)
    return common.run_main(lambda: measure(args, bench, initial), bench.stop, log,
                           "stopping the worker, beat, the receiver, web and the services")


def measure(args, bench: Fanout, initial: dict) -> int:
    started = datetime.now(timezone.utc)
    ingest, profile, latency = [], None, []
    bench.start()
    facts = machine_facts(bench) | initial
    requests_ = ing.Requests(bench.dep.secret, run_id=started.strftime("%H%M%S"))
    for variant in INGEST_VARIANTS:  # warm-up, discarded
        bench.ingest_round(variant, requests_, args.warmup)
    for i in range(args.rounds):
        order = INGEST_VARIANTS[i % 3:] + INGEST_VARIANTS[: i % 3]
        results = {v: bench.ingest_round(v, requests_, args.duration) for v in order}
        ingest.append(results)
        log(f"ingest r{i + 1}: " + "; ".join(
            f"{v} {r['rate']:.0f}/s p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms web {r['cpu_us']['web']:.0f} µs"
            for v, r in results.items()))  # fmt: skip
    if args.profile_events:
        profile = bench.profile()
        bench.empty_outbox()
        log("profile, ms per event: " + json.dumps(profile["wall_ms"]) + " " + json.dumps(profile["per_event_ms"]))
        log("profile, top by cumulative time (200 matching peers):\n" + "\n".join(profile["top"]))
        log("profile, none matching: " + json.dumps(profile["none_matching_ms"]) + "; parts: "
            + json.dumps(profile["parts_ms"]))
        log("profile, worker side: " + json.dumps(profile["worker"]) + "\n" + "\n".join(profile["worker_top"]))
    if args.latency_rounds:
        bench.start_celery()
        time.sleep(2)
        for variant in ("200 matching peers", "1 matching peer"):  # warm-up: connections, caches
            bench.latency_round(variant, requests_, f"warm {variant}")
        for i in range(args.latency_rounds):
            for variant in ("200 matching peers", "1 matching peer")[:: 1 if i % 2 == 0 else -1]:
                r = bench.latency_round(variant, requests_, f"r{i + 1} {variant}")
                r["variant"] = variant
                latency.append(r)
                log(f"delivery r{i + 1} {variant}: 202 in {r['answer_ms']:.1f} ms; first {r['first_s']:.3f} s, "
                    f"all {r['all_s']:.3f} s, marked {r['marked_s']:.3f} s; CPU µs/delivery "
                    + " ".join(f"{k} {v:.0f}" for k, v in r["cpu_us"].items()))  # fmt: skip
    facts["loadavg_end"] = os.getloadavg()[0]
    section = report(args, facts, bench, ingest, profile, latency, started, datetime.now(timezone.utc))
    return common.publish(section, SECTION, not args.no_write and bool(ingest), log)


if __name__ == "__main__":
    sys.exit(main())
