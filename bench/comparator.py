#!/usr/bin/env python3
"""Delivery against a comparator: Kite vs django-webhook + Celery, to the same receiver.

The comparator is the pattern a Django user reaches for instead of Kite: `django-webhook`
(PyPI, 0.0.15: a post_save signal queues one Celery task per webhook, the task signs and POSTs
the payload with `requests` and records a WebhookEvent row). bench/comparator/ is a minimal
Django project for it; it runs in a venv of its own (--comparator-venv, created with pip when
missing: django-webhook, and the Django and Celery versions Kite runs), on the same PostgreSQL
(a database of its own) and Redis (db 3) as Kite.

Starts, like bench/federation.py (whose classes it uses): PostgreSQL + Redis (scripts/services.sh),
two Kite instances A and B (`manage.py runkite`, TLS on, federated A → B with scopes ["*"]), and
bench/receiver.py: an HTTPS endpoint that answers 200 and counts what arrives (not a Kite). A
gets a second peer `sink` = that receiver (https, 127.0.0.0/8 in KITE_PEER_ALLOWED_NETWORKS as
for B, its certificate pinned by tls_fingerprint; it advertises no batch_max: one event per POST).
The comparator's webhook points at the same receiver (its certificate trusted as a CA would be).

Per round, in an order that rotates, the same number of events (N) each, queued first, then
released; rate = N / (release → the last event's arrival):

- comparator: N orders saved (N fire_webhook tasks in Redis) while the worker consumes another
  queue; release = `add_consumer` (Celery remote control); arrival = the receiver's clock.
- kite-unbatched: N events + outbox entries for `sink` written into A's database not yet due
  (as bench/federation.py does), batch_max NULL; release = made due + one event posted to A
  (its commit kicks delivery); arrival = the receiver's clock.
- kite-batched: the same for peer B (a Kite), batch_max 500; arrival = B's received_at.
- kite-batched-sink (diagnostic): the same for `sink` with batch_max 500, answered as a Kite
  answers a batch: Kite's sending side without B's storing.

Same worker concurrency on both sides: Celery prefork, 2 processes (runkite's default), prefetch 4.
CPU per delivered event per process group from /proc. Medians over rounds; ratios per round.

    .venv/bin/python bench/comparator.py --wait-quiet 1500                      # the recorded run
    .venv/bin/python bench/comparator.py --events 500 --rounds 1 --no-write     # trial (~2 min)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg

import common

ROOT = common.ROOT
sys.path.insert(0, str(ROOT))


fed = common.load("federation")
from kite import tls  # noqa: E402  (after the path: run as a script from anywhere)

SECTION = "comparator"
PROJECT = ROOT / "bench" / "comparator"
DJANGO_WEBHOOK = "django-webhook==0.0.15"
VARIANTS = ("comparator", "kite-unbatched", "kite-batched", "kite-batched-sink")
log = fed.log
med = fed.med


def ensure_venv(path: Path) -> Path:
    """The comparator's own venv (never Kite's): django-webhook with Kite's Django and Celery versions."""
    python = path / "bin" / "python"
    if python.exists():
        return python
    import celery
    import django

    log(f"creating the comparator's venv in {path}")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", DJANGO_WEBHOOK, f"Django=={django.get_version()}",
                    f"celery[redis]=={celery.__version__}", "psycopg[binary]", "requests"], check=True)  # fmt: skip
    return python


class Compare(fed.Bench):
    def __init__(self, args):
        super().__init__(args)
        self.work = Path(tempfile.mkdtemp(prefix="kite-comparator-"))
        self.receiver = common.Receiver(self.work, args.port + 2, "type")
        self.worker: subprocess.Popen | None = None
        self.redis_url = f"redis://127.0.0.1:{args.redis_port}/3"
        self.cmp_database = f"postgres://postgres@127.0.0.1:{args.pg_port}/kite_comparator"

    # --- setup ---------------------------------------------------------------

    def start(self) -> None:
        super().start()  # services, A and B, A → B federated, first event delivered
        self.receiver.start()
        self.cert = self.receiver.cert
        answer = self.a.api("POST", "/api/federation/peers", json={
            "name": "sink", "peer_hook_url": f"{self.receiver_url}/hooks/kite", "scopes": ["*"],
            "tls_fingerprint": tls.fingerprint_of_pem(Path(self.cert).read_bytes()),
        })  # fmt: skip
        assert answer.status_code == 201, answer.text
        self.sink_id, self.b_id = answer.json()["id"], self.peer_id
        self.start_comparator()

    @property
    def receiver_url(self) -> str:
        return self.receiver.url

    def comparator_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in fed._SCRUBBED and not k.startswith("KITE_")}
        env.update(DJANGO_SETTINGS_MODULE="comparator.settings", PYTHONPATH=str(PROJECT), PYTHONUNBUFFERED="1",
                   COMPARATOR_DATABASE_URL=self.cmp_database, COMPARATOR_REDIS_URL=self.redis_url,
                   COMPARATOR_CA_BUNDLE=self.cert)  # fmt: skip
        return env

    def comparator_run(self, *argv: str) -> str:
        done = subprocess.run([str(self.python), *argv], cwd=PROJECT, env=self.comparator_env(), capture_output=True,
                              text=True)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"comparator {argv[:2]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def start_comparator(self) -> None:
        from celery import Celery

        self.python = ensure_venv(Path(self.args.comparator_venv))
        self.services[0].fresh_database("kite_comparator")
        self.services[0].flush_redis(3)
        self.comparator_run("manage.py", "migrate", "-v", "0")
        self.comparator_run("produce.py", "setup", f"{self.receiver_url}/hooks/comparator", "whsec-comparator-bench")
        self.cmp_db = psycopg.connect(self.cmp_database, autocommit=True)
        out = open(self.work / "comparator-worker.log", "wb")
        # Consuming a queue nothing is sent to: the backlog waits in Redis until add_consumer releases it.
        self.worker = subprocess.Popen(
            [str(self.python), "-m", "celery", "-A", "comparator", "worker", "--concurrency", "2", "-Q", "hold",
             "-n", "comparator@bench", "--loglevel", "WARNING"],
            cwd=PROJECT, env=self.comparator_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.control = Celery("control", broker=self.redis_url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.worker.poll() is not None:
                raise SystemExit(f"comparator worker exited:\n{(self.work / 'comparator-worker.log').read_text()}")
            if self.control.control.ping(destination=["comparator@bench"], timeout=1):
                log(f"comparator worker up (pid {self.worker.pid}); receiver on {self.receiver_url}")
                return
        raise SystemExit("comparator worker did not answer a ping within 60 s")

    def stop(self) -> None:
        for process in (self.worker, self.receiver.process):
            common.stop_process(process)
        super().stop()
        if not self.args.keep_data:
            shutil.rmtree(self.work, ignore_errors=True)

    def cpu_snapshot(self) -> dict[str, float]:
        """CPU seconds so far per process group (exited processes included: see cpu_tree)."""
        groups = {"a": self.a.process.pid, "b": self.b.process.pid, "receiver": self.receiver.process.pid,
                  "comparator": self.worker.pid}  # fmt: skip
        snapshot = {name: common.cpu_tree(pid) for name, pid in groups.items()}
        return snapshot | self.services[0].cpu(reaped=True)

    # --- rounds ----------------------------------------------------------------

    def use_peer(self, peer_id: int) -> None:
        self.peer_id = peer_id  # what Bench.queue / set_batch_max / batch_max act on

    def comparator_round(self, count: int, tag: str) -> dict:
        event_type = f"com.bench.cmp.{tag}"
        template = self.work / "payload.json"
        template.write_bytes(fed.payload("<id>", "<type>"))
        self.comparator_run("produce.py", "orders", str(count), event_type, str(template), f"cmp-{tag}")
        queued = int(subprocess.run(["redis-cli", "-p", str(self.args.redis_port), "-n", "3", "llen", "celery"],
                                    capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
        if queued != count:
            self.problems.append(f"comparator {tag}: {queued} tasks queued for {count} orders")
        time.sleep(1)
        before = self.cpu_snapshot()
        released = time.time()
        self.control.control.add_consumer("celery", destination=["comparator@bench"], reply=True)
        result = self.wait_receiver(event_type, count, released, before)
        self.control.control.cancel_consumer("celery", destination=["comparator@bench"], reply=True)
        failed = self.cmp_db.execute(
            "SELECT count(*) FROM django_webhook_webhookevent WHERE status <> 'SUCCESS' AND object->'data'->>'type' = %s",
            (event_type,),
        ).fetchone()[0]  # fmt: skip
        if failed:
            self.problems.append(f"comparator {tag}: {failed} webhook events not SUCCESS")
        return result

    def wait_receiver(self, event_type: str, count: int, released: float, before: dict) -> dict:
        deadline = time.monotonic() + max(120, count / 10)
        while True:
            entry = self.receiver.stats().get(event_type)
            if entry and entry[0] >= count:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out: {entry[0] if entry else 0}/{count} {event_type} at the receiver")
            time.sleep(0.05)
        after = self.cpu_snapshot()
        received, first, last, _ = entry
        if received != count:
            self.problems.append(f"{event_type}: {received} of {count} at the receiver")
        return self.result(count, released, first, last, before, after)

    def result(self, count, released, first, last, before, after) -> dict:
        return {
            "rate": count / (last - released),
            "seconds": last - released,
            "first_after": first - released,
            "steady_rate": (count - 1) / max(last - first, 1e-6),
            "cpu_us": self.cpu_per_event(before, after, count),
        }

    def kite_round(self, count: int, tag: str, *, batched: bool, to_b: bool) -> dict:
        event_type = f"com.bench.{'b' if to_b else 'sink'}{'b' if batched else 'u'}.{tag}"
        self.use_peer(self.b_id if to_b else self.sink_id)
        self.set_batch_max(fed.BATCH_MAX if batched else None)
        self.queue(count, event_type, due=False)
        time.sleep(1)  # let the ANALYZE and the sweeper settle
        after_id = self.b_max_event_id()
        before = self.cpu_snapshot()
        released = self.release(event_type)
        if to_b:
            self.wait_stored([event_type], count, timeout=max(120, count / 20), after_id=after_id)
            after = self.cpu_snapshot()
            stored, first, last = self.stored_at_b(event_type, after_id)
            self.check(f"{event_type}", stored, count)
            result = self.result(count, released, first.timestamp(), last.timestamp(), before, after)
        else:
            result = self.wait_receiver(event_type, count, released, before)
        result["batch_max_after"] = self.batch_max()
        if not batched and result["batch_max_after"] is not None:
            self.problems.append(f"{event_type}: batch_max became {result['batch_max_after']} during the round")
        dead = self.outbox_depth().get("dead", 0)
        if dead:
            self.problems.append(f"{event_type}: {dead} dead entries at A")
        return result

    def round(self, variant: str, count: int, tag: str) -> dict:
        if variant == "comparator":
            return self.comparator_round(count, tag)
        if variant == "kite-unbatched":
            return self.kite_round(count, tag, batched=False, to_b=False)
        if variant == "kite-batched":
            return self.kite_round(count, tag, batched=True, to_b=True)
        return self.kite_round(count, tag, batched=True, to_b=False)


# --------------------------------------------------------------------------- report


def report(args, facts, rounds: list[dict], variants, problems, started, finished) -> str:
    quiet = facts["loadavg"] < args.quiet_load and not facts["busy"]
    rate = {v: med([r[v]["rate"] for r in rounds]) for v in variants}
    ratio = {v: med([r[v]["rate"] / r["comparator"]["rate"] for r in rounds]) for v in variants}
    lines = [
        *common.section_head(SECTION, "Delivery: Kite against django-webhook + Celery", started,
                             common.command("comparator.py")),
        f"- Machine: {facts['nproc']} CPUs ({facts['cpu']}); 1-min load average {facts['loadavg']:.2f} at the start, "
        f"{facts['loadavg_end']:.2f} at the end; pytest / benchmark processes at the start: {len(facts['busy'])} → "
        f"{'quiet' if quiet else '**NOT quiet**'}. Python {facts['python']}, Django {facts['django']}, Celery "
        f"{facts['celery']}, PostgreSQL {facts['postgres']} (fsync={facts['fsync']}, synchronous_commit="
        f"{facts['synchronous_commit']}), Redis; everything shares these CPUs on loopback.",
        f"- Comparator: `{DJANGO_WEBHOOK}` in a minimal Django project (`bench/comparator/`, a venv of its own): "
        "saving an `Order` queues one `fire_webhook` Celery task per webhook (post_save), which reads the webhook "
        "and its secrets, stores a WebhookEvent row, POSTs the HMAC-signed JSON with a new `requests.Session` "
        "(a new TLS connection per delivery: the package's code) and marks the row SUCCESS. Celery prefork, "
        "**2 worker processes**, prefetch 4, JSON, results ignored, database connections kept between tasks as "
        "Kite keeps them (CONN_MAX_AGE 60 and CELERY_DB_REUSE_MAX 1000: Celery's default closes them after every "
        "task); its own database on the same PostgreSQL, Redis db 3.",
        "- Kite: A and B as in bench/federation.py (`manage.py runkite`: uvicorn, Celery worker with "
        "**2 prefork processes** (runkite's default), beat; TLS on; defaults otherwise: an unbatched drain keeps "
        f"KITE_OUTBOX_IN_FLIGHT={facts['in_flight']} calls in flight to its peer, and the web process's courier "
        f"(KITE_WEB_DELIVERY={facts['web_delivery']}) starts what the release's commit kicks and hands a backlog to "
        "the worker), A → B federated with scopes [\"*\"]. A has a "
        "second peer `sink`: the receiver below (https, its certificate pinned with tls_fingerprint, "
        "127.0.0.0/8 allowed by KITE_PEER_ALLOWED_NETWORKS; not a Kite: it advertises no batch_max).",
        "- Receiver (`bench/receiver.py`): one asyncio process (uvloop), HTTPS keep-alive, answers 200 and "
        "counts events by type with their arrival time; it checks no signature and stores nothing. The "
        "comparator and Kite's `sink` deliver to it; Kite batched also to B, a Kite that stores every event.",
        f"- Each round: the same {args.events:,} events (~0.6 kB JSON data) per variant, queued first (comparator: "
        "orders saved while the worker consumes another queue, then `add_consumer`; Kite: events + outbox "
        "entries written into A's database not yet due, then made due and one event posted to A, whose commit "
        "kicks delivery). Rate = events / (release → the last event's arrival: the receiver's clock, or B's "
        f"received_at). {args.rounds} rounds, the order of the variants rotating.",
        "",
        "| round | " + " | ".join(f"{v} events/s (first arrival after s)" for v in variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for i, r in enumerate(rounds):
        lines.append(f"| {i + 1} | " + " | ".join(f"{r[v]['rate']:.0f} ({r[v]['first_after']:.2f})" for v in variants)
                     + " |")  # fmt: skip
    lines += [
        "| **median** | " + " | ".join(f"**{rate[v]:.0f}**" for v in variants) + " |",
        "| **× comparator** (median of per-round ratios) | " + " | ".join(f"**{ratio[v]:.1f}×**" for v in variants)
        + " |",
        "",
        "CPU per delivered event, µs (median over rounds; a = Kite A's web + worker + beat, b = Kite B's, "
        "comparator = its Celery worker's processes, postgres = all its processes, one server for all). Total = "
        "the groups on the variant's path; the others (idle, or beat's once-a-second sweeps) in parentheses:",
        "",
        "| variant | " + " | ".join(CPU_GROUPS) + " | total |",
        "|---|" + "---|" * (len(CPU_GROUPS) + 1),
    ]
    for v in variants:
        cells = [med([r[v]["cpu_us"][g] for r in rounds]) for g in CPU_GROUPS]
        total = med([sum(r[v]["cpu_us"][g] for g in PATH_GROUPS[v]) for r in rounds])
        shown = [f"{c:.0f}" if g in PATH_GROUPS[v] else f"({c:.0f})" for g, c in zip(CPU_GROUPS, cells)]
        lines.append(f"| {v} | " + " | ".join(shown) + f" | **{total:.0f}** |")
    lines += [
        "",
        "Targets: " + "; ".join(
            f"{name} ≥ {goal:g}× the comparator: {ratio[v]:.1f}× → {fed.verdict(ratio[v] >= goal)}"
            for v, name, goal in (("kite-batched", "Kite batched", 10), ("kite-unbatched", "Kite unbatched", 1.5))
            if v in ratio
        ) + ".",
        "",
        f"Run took {(finished - started).seconds} s. Checked every round: the receiver (or B) got exactly the "
        "events queued, none twice; no dead entry at A; every comparator WebhookEvent SUCCESS; the unbatched "
        "rounds stayed unbatched (batch_max NULL after) — "
        + common.held(problems),
    ]
    return common.section_text(lines, SECTION)


CPU_GROUPS = ("a", "b", "comparator", "receiver", "postgres", "redis")
PATH_GROUPS = {  # the process groups each variant's deliveries run through
    "comparator": ("comparator", "receiver", "postgres", "redis"),
    "kite-unbatched": ("a", "receiver", "postgres", "redis"),
    "kite-batched": ("a", "b", "postgres", "redis"),
    "kite-batched-sink": ("a", "receiver", "postgres", "redis"),
}


def kite_settings(bench: Compare) -> dict:
    in_flight, web_delivery = common.kite_settings(bench.a.env, "s.KITE_OUTBOX_IN_FLIGHT", "s.KITE_WEB_DELIVERY")[-2:]
    return {"in_flight": in_flight, "web_delivery": "on" if web_delivery == "True" else "off"}


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--events", type=int, default=3000, help="events per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated, from " + ", ".join(VARIANTS) + " (comparator and kite-* needed "
                        "for the ratios)")  # fmt: skip
    parser.add_argument("--comparator-venv", default="/tmp/kite-comparator-venv",
                        help="the comparator's venv; created with pip when missing")  # fmt: skip
    common.service_arguments(parser, port=18630, pg_port=25652, redis_port=26652, env="extra environment for A and B",
                             services_dir="/tmp/kite-comparator-services",
                             port_help="A's port; B's is the next, the receiver's the one after")  # fmt: skip
    parser.add_argument("--keep-data", action="store_true")
    common.output_arguments(parser, quiet_load=1.0)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.separate_services = False  # what fed.Bench reads
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown or "comparator" not in variants:
        raise SystemExit(f"--variants: unknown {sorted(unknown)} or no comparator")
    initial = fed.at_start(args)
    bench = Compare(args)
    return common.run_main(lambda: measure(args, bench, variants, initial), bench.stop, log,
                           "stopping the comparator, the receiver, A, B and the services")


def measure(args, bench: Compare, variants: list[str], initial: dict) -> int:
    started = datetime.now(timezone.utc)
    rounds = []
    bench.start()
    facts = fed.machine_facts(bench) | initial | kite_settings(bench)
    for v in variants:  # warm-up, discarded: connections, caches, the worker's first tasks
        bench.round(v, min(100, args.events), f"warm{v.replace('-', '')}")
    for i in range(args.rounds):
        order = variants[i % len(variants):] + variants[: i % len(variants)]
        results = {}
        for v in order:
            results[v] = r = bench.round(v, args.events, f"r{i + 1}{v.replace('-', '')}")
            log(f"r{i + 1} {v}: {args.events} in {r['seconds']:.2f} s = {r['rate']:.0f}/s (steady "
                f"{r['steady_rate']:.0f}/s, first after {r['first_after']:.2f} s); CPU µs/event "
                + " ".join(f"{k} {x:.0f}" for k, x in r["cpu_us"].items()))  # fmt: skip
        rounds.append(results)
    facts["loadavg_end"] = os.getloadavg()[0]
    section = report(args, facts, rounds, variants, bench.problems, started, datetime.now(timezone.utc))
    return common.publish(section, SECTION, not args.no_write, log)


if __name__ == "__main__":
    sys.exit(main())
