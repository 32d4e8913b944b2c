#!/usr/bin/env python3
"""The per-event path A → B, each change against the way it replaced, in one run.

Two live instances as bench/federation.py starts and peers them (its `Bench`: runkite with web,
worker and beat, TLS, one PostgreSQL and Redis), then, alternating the variants round by round
(A restarted with the variant's setting before each round):

1. latency at `--rate` events/s (and at `--low-rate`): A's 202 → event stored at B (B's commit
   timestamp, as bench/federation.py reads it), p50/p99 per round — KITE_WEB_DELIVERY=on (the
   web process that stored the event delivers it) against off (a worker's task, as before);
2. unbatched throughput (A's peer row batch_max NULL, as bench/federation.py's unbatched rounds):
   `--unbatched` entries released at once, events/s until B has stored them all —
   KITE_OUTBOX_IN_FLIGHT=4 against 1 (one call at a time, as before).

Medians over `--rounds`; ratios of the medians. The section is printed (and written into
bench/RESULTS.md between the `bench:perevent` markers unless --no-write).

    .venv/bin/python bench/perevent.py --wait-quiet 1500        # the recorded run (~10 min)
    .venv/bin/python bench/perevent.py --rounds 1 --no-write    # trial
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import datetime, timezone

import common

fb = common.load("federation")

LATENCY = ("KITE_WEB_DELIVERY", ["on", "off"])
THROUGHPUT = ("KITE_OUTBOX_IN_FLIGHT", ["4", "1"])


log = common.logger("perevent")


def with_setting(bench, name: str, value: str) -> None:
    bench.a.env[name] = value
    bench.a.stop()
    bench.a.start()


def latency(bench, args) -> dict:
    name, values = LATENCY
    out = {value: {"high": [], "low": []} for value in values}
    for i in range(args.rounds):
        for value in values if i % 2 == 0 else list(reversed(values)):
            with_setting(bench, name, value)
            fb.latency_round(bench, "federated", args.rate, 2, f"w{i}{value}")  # warm-up, discarded
            for kind, rate, duration in (("high", args.rate, args.duration), ("low", args.low_rate, args.duration)):
                r = fb.latency_round(bench, "federated", rate, duration, f"{kind}{i}{value}")
                out[value][kind].append(r)
                log(f"latency {name}={value} {rate:g}/s r{i + 1}: stored at B p50 {r['stored_p50']:.1f} p99 "
                    f"{r['stored_p99']:.1f} ms, listener p50 {r['p50']:.1f} ms, missing {r['missing']}")  # fmt: skip
    return out


def throughput(bench, args) -> dict:
    name, values = THROUGHPUT
    out = {value: [] for value in values}
    for i in range(args.rounds):
        for value in values if i % 2 == 0 else list(reversed(values)):
            with_setting(bench, name, value)
            r = fb.throughput_round(bench, False, args.unbatched, f"u{i}v{value}")
            out[value].append(r)
            log(f"unbatched {name}={value} r{i + 1}: {r['rate']:.0f}/s (steady {r['steady_rate']:.0f}/s), CPU µs/event "
                + " ".join(f"{k} {v:.0f}" for k, v in r["cpu_us"].items()))  # fmt: skip
    return out


def each(rows, key, spec=".1f") -> str:
    return ", ".join(format(r[key], spec) for r in rows)


def med(rows, key):
    return statistics.median(r[key] for r in rows)


def report(args, facts, lat, tput, started) -> str:
    lines = [f"### Per-event path A → B: run of {started:%Y-%m-%d %H:%M} UTC", "",
             "Command (exactly as run):", "", "```", f"cd {fb.ROOT} && {' '.join([sys.executable, *sys.argv])}",
             "```", "",
             f"- Machine: {facts}. Two instances as in bench/federation.py (runkite: web, worker, beat; TLS; one "
             "PostgreSQL and Redis); A restarted with the variant's setting before each round; variants alternate "
             "round by round; medians over rounds.", ""]  # fmt: skip
    if lat:
        name, (new, old) = LATENCY
        lines += [f"**Latency, A's 202 → stored at B** (B's commit timestamp), {name}={new} (the web process that "
                  f"stored the event delivers it) against {old} (a worker's task):", "",
                  "| offered | variant | stored p50 ms per round | median p50 | p99 per round | median p99 |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for kind, rate in (("high", args.rate), ("low", args.low_rate)):
            for value in (new, old):
                rows = lat[value][kind]
                lines.append(f"| {rate:g}/s | {name}={value} | {each(rows, 'stored_p50')} | "
                             f"**{med(rows, 'stored_p50'):.1f}** | {each(rows, 'stored_p99')} | "
                             f"**{med(rows, 'stored_p99'):.1f}** |")  # fmt: skip
        high_new, high_old = lat[new]["high"], lat[old]["high"]
        lines += ["", f"At {args.rate:g}/s: p50 {med(high_old, 'stored_p50'):.1f} → {med(high_new, 'stored_p50'):.1f} ms "
                  f"({med(high_new, 'stored_p50') / med(high_old, 'stored_p50'):.2f}×), p99 "
                  f"{med(high_old, 'stored_p99'):.1f} → {med(high_new, 'stored_p99'):.1f} ms "
                  f"({med(high_new, 'stored_p99') / med(high_old, 'stored_p99'):.2f}×). Targets p50 ≤ 6 ms: "
                  f"{'met' if med(high_new, 'stored_p50') <= 6 else 'not met'}; p99 ≤ 25 ms: "
                  f"{'met' if med(high_new, 'stored_p99') <= 25 else 'not met'}.", ""]  # fmt: skip
    if tput:
        name, (new, old) = THROUGHPUT
        lines += [f"**Unbatched delivery** ({args.unbatched} entries released at once, one event per POST), "
                  f"{name}={new} against {old}:", "",
                  "| variant | events/s per round | median | CPU µs/event (median): A, B, PostgreSQL |", "|---|---|---|---|"]
        for value in (new, old):
            rows = tput[value]
            cpu = {k: statistics.median(r["cpu_us"][k] for r in rows) for k in ("a", "b", "postgres")}
            lines.append(f"| {name}={value} | {each(rows, 'rate', '.0f')} | **{med(rows, 'rate'):.0f}** | "
                         f"{cpu['a']:.0f}, {cpu['b']:.0f}, {cpu['postgres']:.0f} |")  # fmt: skip
        ratio = med(tput[new], "rate") / med(tput[old], "rate")
        lines += ["", f"{ratio:.2f}× with {new} in flight; target ≥ 600 events/s: "
                  f"{'met' if med(tput[new], 'rate') >= 600 else 'not met'} ({med(tput[new], 'rate'):.0f}/s).", ""]
    return "\n".join(lines)


def write(section: str) -> None:
    start, end = common.markers("perevent")
    common.write_results(f"{start}\n{section}\n{end}", "perevent")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--low-rate", type=float, default=20)
    parser.add_argument("--duration", type=float, default=10, help="seconds per latency round")
    parser.add_argument("--unbatched", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phases", default="latency,throughput")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--wait-quiet", type=float, default=0)
    parser.add_argument("--port", type=int, default=18720)
    parser.add_argument("--pg-port", type=int, default=55720)
    parser.add_argument("--redis-port", type=int, default=56720)
    args = parser.parse_args(argv)
    if args.wait_quiet:
        fb.wait_until_quiet(args.wait_quiet, 0.5)
    bench_args = fb.build_parser().parse_args(["--no-write", "--port", str(args.port), "--pg-port", str(args.pg_port),
                                               "--redis-port", str(args.redis_port),
                                               "--services-dir", f"/tmp/kite-perevent-{args.pg_port}"])  # fmt: skip
    started = datetime.now(timezone.utc)
    bench = fb.Bench(bench_args)
    phases = set(args.phases.split(","))
    load_before = os.getloadavg()[0]
    try:
        bench.start()
        lat = latency(bench, args) if "latency" in phases else None
        tput = throughput(bench, args) if "throughput" in phases else None
    finally:
        bench.stop()
    facts = (f"{os.cpu_count()} CPUs, 1-min load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} "
             f"at the end; pytest processes at the start: {fb.others_busy()}")  # fmt: skip
    section = report(args, facts, lat, tput, started)
    print(section)
    if not args.no_write:
        write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
