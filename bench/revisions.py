#!/usr/bin/env python3
"""The per-event path A → B: one revision of Kite against another, in one run.

Each revision is checked out as a git worktree of this repository (`/tmp/kite-rev-<commit>`, its
`.venv` a link to this checkout's). Round by round, alternating which goes first, a child of this
script runs in each checkout with that checkout's bench/federation.py — its `Bench`: PostgreSQL and
Redis of their own, two Kite instances (runkite: web, Celery worker, beat; TLS) federated A → B —
so the Kite code measured is the revision's, and measures:

1. unbatched delivery: `--unbatched` entries released at once to B with A's peer row batch_max NULL
   (one event per POST), events/s until B stored them all, and CPU µs per event of A, B and
   PostgreSQL (bench/federation.py's throughput round);
2. latency, A's 202 → the event's commit at B, p50/p99 at `--rate` and `--low-rate` events/s
   (batched, as A learns B's batch_max; bench/federation.py's latency round, after a 2 s warm-up).

Medians over `--rounds`; ratios of the medians. Printed, and written into bench/RESULTS.md between
the `bench:revisions` markers unless --no-write.

`--paired N` measures the latencies alone, for a machine whose speed drifts from minute to minute:
both revisions' instances are started once, side by side (the new one on the next ports), and N
pairs of rounds alternate between them (which goes first alternating too), each pair seconds
apart; the report gives each revision's medians and the median of the pairs' ratios.

    .venv/bin/python bench/revisions.py --old aed631f --new HEAD --wait-quiet 1500   # ~12 min
    .venv/bin/python bench/revisions.py --old HEAD~1 --new HEAD --rounds 1 --no-write  # trial
    .venv/bin/python bench/revisions.py --old HEAD~1 --new HEAD --paired 12 --duration 5  # ~6 min
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import common

log = common.logger("revisions")
MARK = "REVISION-ROUND "


def _federation_bench():
    """This checkout's bench/federation.py (and its bench/common.py), not the parent's: their ROOT
    is where runkite runs."""
    bench_dir = str(Path.cwd() / "bench")
    sys.modules.pop("common", None)
    sys.path.insert(0, bench_dir)
    spec = importlib.util.spec_from_file_location("rev_federation", Path(bench_dir, "federation.py"))
    fb = importlib.util.module_from_spec(spec)
    sys.modules["rev_federation"] = fb
    spec.loader.exec_module(fb)
    assert Path(fb.ROOT) == Path.cwd(), (fb.ROOT, Path.cwd())
    return fb


def _bench_args(fb, args):
    return fb.build_parser().parse_args(["--no-write", "--port", str(args.port), "--pg-port", str(args.pg_port),
                                         "--redis-port", str(args.redis_port),
                                         "--services-dir", f"/tmp/kite-revisions-{args.pg_port}"])  # fmt: skip


def child(tag: str, args) -> int:
    """One round in the current directory's checkout; one JSON line on stdout."""
    fb = _federation_bench()
    bench = fb.Bench(_bench_args(fb, args))
    out: dict = {"tag": tag}
    try:
        bench.start()
        r = fb.throughput_round(bench, False, args.unbatched, f"u{tag}")
        out["unbatched"] = {"rate": r["rate"], "cpu": r["cpu_us"]}
        fb.latency_round(bench, "federated", args.rate, 2, f"w{tag}")  # warm-up, discarded
        for name, rate in (("high", args.rate), ("low", args.low_rate)):
            r = fb.latency_round(bench, "federated", rate, args.duration, f"{name}{tag}")
            out[name] = {"p50": r["stored_p50"], "p99": r["stored_p99"], "missing": r["missing"]}
    finally:
        bench.stop()
    print(MARK + json.dumps(out), flush=True)
    return 0


def serve(args) -> int:
    """`--paired`: the current checkout's Bench started once; then one latency round per line of
    stdin (`<high|low> <tag>`), each after a 1 s warm-up (discarded: the other revision's round ran
    meanwhile, and the drain that listened for kicks has ended), answered by one JSON line on
    stdout, until stdin closes."""
    fb = _federation_bench()
    bench = fb.Bench(_bench_args(fb, args))
    try:
        bench.start()
        fb.latency_round(bench, "federated", args.rate, 2, "warm")  # warm-up, discarded
        print(MARK + json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            name, tag = line.split()
            fb.latency_round(bench, "federated", args.low_rate, 1, f"warm{tag}")  # the other revision ran meanwhile
            r = fb.latency_round(bench, "federated", args.rate if name == "high" else args.low_rate, args.duration,
                                 f"{name}{tag}")  # fmt: skip
            print(MARK + json.dumps({"p50": r["stored_p50"], "p99": r["stored_p99"], "missing": r["missing"]}),
                  flush=True)  # fmt: skip
    finally:
        bench.stop()
    return 0


def checkout(ref: str) -> tuple[str, Path]:
    commit = common.run(["git", "rev-parse", "--short=12", ref], capture=True).stdout.strip()
    path = Path(f"/tmp/kite-rev-{commit}")
    if not (path / "manage.py").exists():
        common.run(["git", "worktree", "add", "--detach", str(path), commit], capture=True)
    if not (path / ".venv").exists():
        (path / ".venv").symlink_to(common.ROOT / ".venv")
    return commit, path


def round_in(path: Path, tag: str, args) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", tag, "--unbatched", str(args.unbatched),
            "--rate", str(args.rate), "--low-rate", str(args.low_rate), "--duration", str(args.duration),
            "--port", str(args.port), "--pg-port", str(args.pg_port), "--redis-port", str(args.redis_port)]  # fmt: skip
    done = subprocess.run(argv, cwd=path, capture_output=True, text=True, timeout=900)
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise SystemExit(f"round {tag} in {path} gave no result (exit {done.returncode}):\n{done.stderr[-3000:]}")


class Server:
    """A `--serve` child in one checkout: its instances up until closed."""

    def __init__(self, path: Path, args, shift: int):
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve", "--rate", str(args.rate), "--low-rate",
                str(args.low_rate), "--duration", str(args.duration), "--port", str(args.port + shift), "--pg-port",
                str(args.pg_port + shift), "--redis-port", str(args.redis_port + shift)]  # fmt: skip
        self.path = path
        self.process = subprocess.Popen(argv, cwd=path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.answer()  # ready

    def answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        raise SystemExit(f"the bench in {self.path} ended (exit {self.process.wait()}); its log is above")

    def round(self, name: str, tag: str) -> dict:
        self.process.stdin.write(f"{name} {tag}\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def paired(args, revisions) -> dict:
    """Both revisions up side by side (the new one 2 ports further), `--paired` pairs of rounds at
    each rate, alternating which goes first."""
    servers = {}
    try:
        for shift, (label, path) in zip((0, 2), revisions, strict=True):
            servers[label] = Server(path, args, shift)
        rows: dict = {label: {"high": [], "low": []} for label, _path in revisions}
        labels = [label for label, _path in revisions]
        for i in range(args.paired):
            for name in ("high", "low"):
                for label in labels if i % 2 == 0 else labels[::-1]:
                    rows[label][name].append(servers[label].round(name, f"{i}{label[:6]}"))
            log(f"pair {i + 1}: " + "; ".join(
                f"{label} {args.rate:g}/s p50 {rows[label]['high'][-1]['p50']:.1f} ms, {args.low_rate:g}/s p50 "
                f"{rows[label]['low'][-1]['p50']:.1f} ms" for label in labels))  # fmt: skip
        return rows
    finally:
        for server in servers.values():
            server.close()


def paired_report(args, commits, rows, facts, started) -> str:
    old, new = commits
    lines = [*common.section_head("revisions", f"Per-event path A → B, {old} against {new}, paired rounds", started,
                                  common.command("revisions.py")),
             f"- Machine: {facts}. Each revision in a git worktree of its own, its instances (that checkout's "
             "bench/federation.py: runkite with web, Celery worker and beat, TLS; PostgreSQL and Redis of their own) "
             f"started once and kept up side by side; {args.paired} pairs of {args.duration:g} s latency rounds at "
             "each rate, the two revisions seconds apart, alternating which goes first. Ratio: the median of the "
             "pairs' ratios (new / old).", "",
             f"| measure | {old} per pair | {old} median | {new} per pair | {new} median | median of {new} / {old} "
             "per pair | pairs where new is lower |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rate in (("high", args.rate), ("low", args.low_rate)):
        for key in ("p50", "p99"):
            a, b = ([row[key] for row in rows[label][name]] for label in (old, new))
            ratios = [y / x for x, y in zip(a, b, strict=True) if x]
            lines.append(f"| {rate:g}/s: A's 202 → stored at B, {key} ms | {', '.join(f'{v:.1f}' for v in a)} | "
                         f"**{statistics.median(a):.1f}** | {', '.join(f'{v:.1f}' for v in b)} | "
                         f"**{statistics.median(b):.1f}** | {statistics.median(ratios):.2f}× | "
                         f"{sum(y < x for x, y in zip(a, b, strict=True))} of {len(a)} |")  # fmt: skip
    high = [statistics.median(row[k] for row in rows[new]["high"]) for k in ("p50", "p99")]
    missing = sum(row["missing"] for label in rows for name in rows[label] for row in rows[label][name])
    lines += ["", f"Target with {new}: at {args.rate:g}/s p50 ≤ 6 ms and p99 ≤ 25 ms: "
              f"{'met' if high[0] <= 6 and high[1] <= 25 else 'not met'} ({high[0]:.1f} / {high[1]:.1f} ms). "
              f"Events posted but never stored at B: {missing}.", common.markers("revisions")[1]]  # fmt: skip
    return "\n".join(lines)


def report(args, commits, rows, facts, started) -> str:
    old, new = commits

    def values(label, path):
        found = rows[label]
        for key in path:
            found = [value[key] for value in found]
        return found

    def med(label, path):
        return statistics.median(values(label, path))

    def each(label, path, spec):
        return ", ".join(format(value, spec) for value in values(label, path))

    lines = [*common.section_head("revisions", f"Per-event path A → B, {old} against {new}", started,
                                  common.command("revisions.py")),
             f"- Machine: {facts}. Each revision in a git worktree of its own, measured by a child of this script "
             "with that checkout's bench/federation.py (two instances as there: runkite with web, Celery worker and "
             "beat, TLS, one PostgreSQL and Redis), started afresh for every round; revisions alternate which goes "
             f"first; medians over {args.rounds} rounds.", "",
             f"| measure | {old} per round | {old} median | {new} per round | {new} median | {new} / {old} |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    measures = [
        (f"unbatched delivery, events/s ({args.unbatched} released at once)", ("unbatched", "rate"), ".0f"),
        ("unbatched, CPU µs per event: A", ("unbatched", "cpu", "a"), ".0f"),
        ("unbatched, CPU µs per event: B", ("unbatched", "cpu", "b"), ".0f"),
        ("unbatched, CPU µs per event: PostgreSQL", ("unbatched", "cpu", "postgres"), ".0f"),
        (f"{args.rate:g}/s: A's 202 → stored at B, p50 ms", ("high", "p50"), ".1f"),
        (f"{args.rate:g}/s: A's 202 → stored at B, p99 ms", ("high", "p99"), ".1f"),
        (f"{args.low_rate:g}/s: A's 202 → stored at B, p50 ms", ("low", "p50"), ".1f"),
        (f"{args.low_rate:g}/s: A's 202 → stored at B, p99 ms", ("low", "p99"), ".1f"),
    ]
    for title, path, spec in measures:
        a, b = med(old, path), med(new, path)
        lines.append(f"| {title} | {each(old, path, spec)} | **{format(a, spec)}** | {each(new, path, spec)} | "
                     f"**{format(b, spec)}** | {b / a:.2f}× |")  # fmt: skip
    missing = sum(r[k]["missing"] for label in rows for r in rows[label] for k in ("high", "low"))
    unbatched, high = med(new, ("unbatched", "rate")), (med(new, ("high", "p50")), med(new, ("high", "p99")))
    lines += ["", f"Targets with {new}: unbatched ≥ 600 events/s: {'met' if unbatched >= 600 else 'not met'} "
              f"({unbatched:.0f}/s); at {args.rate:g}/s p50 ≤ 6 ms and p99 ≤ 25 ms: "
              f"{'met' if high[0] <= 6 and high[1] <= 25 else 'not met'} ({high[0]:.1f} / {high[1]:.1f} ms). "
              f"Events posted but never stored at B: {missing}.", common.markers("revisions")[1]]  # fmt: skip
    return "\n".join(lines)


def facts(load_before: float, busy: list) -> str:
    return (f"{os.cpu_count()} CPUs ({common.cpu_model()}), 1-min load average {load_before:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end; pytest processes at the start: {len(busy)}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="HEAD~1", help="the revision measured against (any git commit-ish)")
    parser.add_argument("--new", default="HEAD")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unbatched", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--low-rate", type=float, default=20)
    parser.add_argument("--duration", type=float, default=10, help="seconds per latency round")
    parser.add_argument("--port", type=int, default=18790)
    parser.add_argument("--pg-port", type=int, default=25790,
                        help="PgBouncer's is 1000 lower; all below the ephemeral range (32768+)")
    parser.add_argument("--redis-port", type=int, default=26790)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--wait-quiet", type=float, default=0)
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="latencies only: both revisions started once, N pairs of rounds alternating")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args)
    if args.child:
        return child(args.child, args)
    if args.wait_quiet:
        common.wait_until_quiet(args.wait_quiet, log)
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()[0]
    busy = common.others_busy()
    (old, old_path), (new, new_path) = checkout(args.old), checkout(args.new)
    if args.paired:
        rows = paired(args, ((old, old_path), (new, new_path)))
        return common.publish(paired_report(args, (old, new), rows, facts(load_before, busy), started), "revisions",
                              not args.no_write, log)  # fmt: skip
    rows: dict[str, list] = {old: [], new: []}
    for i in range(args.rounds):
        order = [(old, old_path), (new, new_path)] if i % 2 == 0 else [(new, new_path), (old, old_path)]
        for label, path in order:
            row = round_in(path, f"{i}{label[:6]}", args)
            rows[label].append(row)
            log(f"r{i + 1} {label}: unbatched {row['unbatched']['rate']:.0f}/s, {args.rate:g}/s p50 "
                f"{row['high']['p50']:.1f} p99 {row['high']['p99']:.1f} ms, {args.low_rate:g}/s p50 "
                f"{row['low']['p50']:.1f} ms")  # fmt: skip
    return common.publish(report(args, (old, new), rows, facts(load_before, busy), started), "revisions",
                          not args.no_write, log)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
