#!/usr/bin/env python3
"""A/B of serving variants on one deployment: which tuning is worth what.

Starts PostgreSQL + Redis, a fresh database and Kite like bench/ingest.py, then,
round after round, each variant's web server alone (started afresh, warmed up,
measured with the same closed-loop wrk runs, stopped), alternating the order of
variants and endpoints every round. Prints medians of rate, CPU per event and
the real/bare ratio per variant; with --section, writes them into
bench/RESULTS.md.

    .venv/bin/python bench/ab.py --variant prod --variant 'gunicorn:server=gunicorn'
    .venv/bin/python bench/ab.py --variant prod \\
        --variant 'before:app=bench.experiment:application;patch=orm-source,per-event-broadcast'

A variant is `label[:key=value;key=value…]` with keys server (uvicorn|gunicorn),
app (an ASGI app, e.g. bench.experiment:application), patch
(KITE_BENCH_PATCH, see bench/experiment.py), workers, threads, tree (a
checkout of another revision, e.g. from `git worktree add`, whose code the web
server runs: an A/B of two revisions), and env.NAME for any other environment
variable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import common

bench = common.load("ingest")


def parse_variant(text: str) -> dict:
    label, _, rest = text.partition(":")
    variant = {"label": label, "server": "uvicorn", "app": "kite.asgi:application", "env": {}}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        if key.startswith("env."):
            variant["env"][key[4:]] = value
        elif key == "patch":
            variant["env"]["KITE_BENCH_PATCH"] = value
        elif key in ("server", "app", "workers", "threads", "tree"):
            variant[key] = value
        else:
            raise SystemExit(f"unknown key {key!r} in variant {text!r}")
    return variant


def deployment_args(args, variant: dict) -> argparse.Namespace:
    argv = ["--server", variant["server"], "--app", variant["app"], "--port", str(args.port)]
    argv += ["--pg-port", str(args.pg_port), "--redis-port", str(args.redis_port), "--services-dir", args.services_dir]
    for key in ("workers", "threads", "tree"):
        if variant.get(key):
            argv += [f"--{key}", variant[key]]
    for key, value in variant["env"].items():
        argv += ["--env", f"{key}={value}"]
    return bench.build_parser().parse_args(argv)


def main() -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--endpoints", default="stripe,bare", help="comma-separated: stripe, bare, noop")
    common.wrk_arguments(parser, rounds=3, duration=8, warmup=2)
    parser.add_argument("--port", type=int, default=18500)
    parser.add_argument("--pg-port", type=int, default=55532)
    parser.add_argument("--redis-port", type=int, default=56479)
    parser.add_argument("--services-dir", default="/tmp/kite-bench-services")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS")
    parser.add_argument("--section", help="write the table into this section of bench/RESULTS.md")
    parser.add_argument("--title")
    args = parser.parse_args()

    variants = [parse_variant(v) for v in args.variant]
    endpoints = args.endpoints.split(",")
    if args.wait_quiet:
        bench.wait_until_quiet(args.wait_quiet)
    load_before, busy_before = os.getloadavg()[0], bench.others_busy()
    started = datetime.now(timezone.utc)
    deployments = []
    first = None
    try:
        for variant in variants:
            dep = bench.Deployment(deployment_args(args, variant))
            dep.label = variant["label"]
            if first is None:
                dep.start()  # services, database, bootstrap, the Stripe source (through this variant's web)
                dep.stop_web()
                first = dep
            else:  # same services, database, data dir and source as the first
                dep.data_dir.rmdir()
                dep.data_dir = first.data_dir
                dep.env["KITE_DATA_DIR"] = str(first.data_dir)
                for name in ("api_key", "team_id", "secret", "paths"):
                    setattr(dep, name, getattr(first, name))
            deployments.append(dep)
        requests = bench.Requests(first.secret, run_id=started.strftime("ab%H%M%S"))
        results = {(dep.label, name): [] for dep in deployments for name in endpoints}
        for round_ in range(args.rounds):
            order = deployments if round_ % 2 == 0 else deployments[::-1]
            for dep in order:  # one server at a time, started afresh, warmed up, measured, stopped
                dep._start_web()
                try:
                    for name in endpoints:
                        bench.wrk_round(dep, requests, name, args.warmup, args.connections, args.wrk_threads)
                    for name in endpoints if round_ % 2 == 0 else endpoints[::-1]:
                        results[(dep.label, name)].append(
                            bench.wrk_round(dep, requests, name, args.duration, args.connections, args.wrk_threads)
                        )
                finally:
                    dep.stop_web()
            bench.log(
                f"round {round_ + 1}: "
                + "  ".join(f"{d.label}/{n} {results[(d.label, n)][-1]['rate']:.0f}" for d in deployments for n in endpoints)
            )
        load_after = os.getloadavg()[0]
        table = render(args, variants, deployments, endpoints, results, load_before, busy_before, load_after, started)
        print(table)
        if args.section:
            common.write_results(table, args.section)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for dep in deployments[::-1]:
            if dep is not first:
                dep.data_dir = Path("/nonexistent")  # shared with the first: removed once, by it
                dep.services.started = False
            dep.stop()


def render(args, variants, deployments, endpoints, results, load_before, busy_before, load_after, started) -> str:
    med = statistics.median
    start, end = common.markers(args.section or "ab")
    command = common.command("ab.py")
    lines = [
        start,
        f"### {args.title or 'A/B'}: run of {started:%Y-%m-%d %H:%M} UTC",
        "",
        "```",
        command,
        "```",
        "",
        f"1-min load average {load_before:.2f} before ({busy_before} pytest processes elsewhere), "
        f"{load_after:.2f} after. Closed loop `wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration:g}s`, "
        f"{args.rounds} rounds; in each, every variant's server alone, started afresh and warmed up "
        f"{args.warmup:g} s per endpoint; order of variants and endpoints alternating; medians. CPU = µs of CPU per 202 answer "
        "(web processes / PostgreSQL).",
        "",
        "| variant | web command | " + " | ".join(f"{n} /s | {n} CPU web/pg" for n in endpoints)
        + (" | stripe/bare |" if {"stripe", "bare"} <= set(endpoints) else " |"),
        "|---|---|" + "---|---|" * len(endpoints) + ("---|" if {"stripe", "bare"} <= set(endpoints) else ""),
    ]
    for variant, dep in zip(variants, deployments):
        cells = [variant["label"], describe(variant, dep)]
        for name in endpoints:
            runs = results[(dep.label, name)]
            cells.append(f"{med(r['rate'] for r in runs):.0f}")
            cells.append(
                f"{med(r['cpu_us']['web'] for r in runs):.0f} / {med(r['cpu_us']['postgres'] for r in runs):.0f}"
            )
        if {"stripe", "bare"} <= set(endpoints):
            pairs = zip(results[(dep.label, "stripe")], results[(dep.label, "bare")])
            cells.append(f"{med(s['rate'] / b['rate'] for s, b in pairs):.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(end)
    return "\n".join(lines)


def describe(variant: dict, dep) -> str:
    parts = ["gunicorn gthread" if variant["server"] == "gunicorn" else "uvicorn"]
    if variant["app"] != "kite.asgi:application":
        parts.append(variant["app"])
    if variant.get("tree"):
        parts.append(f"code of {variant['tree']}")
    parts.append(f"workers {variant.get('workers') or 'default'}, threads {variant.get('threads') or 'default'}")
    parts += [f"{k}={v}" for k, v in variant["env"].items()]
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
