#!/usr/bin/env python3
"""What the trust model costs deliveries: A/B of this tree against a baseline revision, one run.

The baseline (default: the last revision before bound signatures, the control-call replay
store and the outbound destination policy) is checked out with `git worktree` and run from
there with the same virtualenv; this tree is the candidate. Two federated pairs A → B, set up
as in bench/federation.py (its own PostgreSQL + Redis, `manage.py runkite` with TLS, A → B by
hand with B's TLS fingerprint pinned), one pair per revision, on one PostgreSQL and Redis.
Rounds alternate between the pairs (the order flips each round); each round queues N entries
at A while nothing is due, releases them and times until B has stored all N. Unbatched (one
signed POST per event: the worst case) and batched (500 per POST, the default between Kite
instances). Reported: events/s per round, medians, and the median of the per-round ratios
candidate/baseline (rounds run back to back, so the ratio within a round is the steadier figure).

Targets: ≤ 5 % slower unbatched, ≤ 2 % batched.

    .venv/bin/python bench/security.py --rounds 8 --wait-quiet 600
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
fb = common.load("federation")
log, med = fb.log, fb.med

BASELINE = "7b15c96"  # before bound signatures, the replay store and the destination policy


class TreeInstance(fb.Instance):
    """An instance run from another checkout (`runkite` and its children import from their cwd first)."""

    root = ROOT

    def start(self) -> float:
        saved, fb.ROOT = fb.ROOT, self.root
        try:
            return super().start()
        finally:
            fb.ROOT = saved


def pair(args, label: str, root: Path, port: int, redis_dbs: tuple[int, int]) -> "fb.Bench":
    bench = fb.Bench(args)
    for replaced in (bench.a, bench.b):  # Bench's own instances, never started: their data dirs go
        shutil.rmtree(replaced.data_dir, ignore_errors=True)
    fast = {"KITE_PROBE_DOWN_SECONDS": "1"}
    bench.a = TreeInstance(args, f"a_{label}", port, bench.services[0], redis_dbs[0],
                           {**fast, "KITE_HEARTBEAT_SECONDS": "3600"})  # fmt: skip
    bench.b = TreeInstance(args, f"b_{label}", port + 1, bench.services[0], redis_dbs[1], fast)
    bench.a.root = bench.b.root = root
    bench.label = label
    return bench


CPU: dict[tuple[str, str], dict[str, list[float]]] = {}  # (mode, pair) → {"sender"|"receiver": [µs per event]}


def alternate(pairs: list, rounds: int, batched: bool, events: int) -> dict[str, list[float]]:
    kind = "batched" if batched else "unbatched"
    rates = {bench.label: [] for bench in pairs}
    for r in range(rounds):
        for bench in pairs if r % 2 == 0 else list(reversed(pairs)):
            result = fb.throughput_round(bench, batched, events, f"sec{kind[0]}{r}{bench.label[0]}")
            rates[bench.label].append(result["steady_rate"])
            cpu = CPU.setdefault((kind, bench.label), {"sender": [], "receiver": []})
            cpu["sender"].append(result["cpu_us"][bench.a.label])
            cpu["receiver"].append(result["cpu_us"][bench.b.label])
            log(f"{kind} round {r + 1} {bench.label}: {rates[bench.label][-1]:.0f} events/s, CPU µs/event "
                f"sender {cpu['sender'][-1]:.0f}, receiver {cpu['receiver'][-1]:.0f}")  # fmt: skip
    return rates


def cpu_lines() -> list[str]:
    lines = ["| delivery | pair | sender (A) CPU µs/event, median | receiver (B) CPU µs/event, median |", "|---|---|---|---|"]
    for (kind, label), cpu in sorted(CPU.items()):
        lines.append(f"| {kind} | {label} | {med(cpu['sender']):.0f} | {med(cpu['receiver']):.0f} |")
    return lines


def table(kind: str, rates: dict[str, list[float]], baseline: str, candidate: str) -> tuple[list[str], float]:
    ratio = med([c / b for b, c in zip(rates[baseline], rates[candidate], strict=True)])
    lines = [
        f"| {kind} | {', '.join(f'{x:.0f}' for x in rates[baseline])} | {med(rates[baseline]):.0f} "
        f"| {', '.join(f'{x:.0f}' for x in rates[candidate])} | {med(rates[candidate]):.0f} | {100 * (ratio - 1):+.1f} % |"
    ]
    return lines, ratio


def main(argv=None) -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per variant and mode")
    parser.add_argument("--events", type=int, default=1000, help="events per unbatched round")
    parser.add_argument("--batched-events", type=int, default=5000, help="events per batched round")
    own, args = fb.pair_arguments(parser, argv)
    tree = Path(tempfile.mkdtemp(prefix="kite-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), own.baseline], check=True,
                   capture_output=True)  # fmt: skip
    revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
    baseline = pair(args, "baseline", tree, args.port + 2, (3, 4))
    candidate = pair(args, "candidate", ROOT, args.port, (1, 2))
    pairs = [baseline, candidate]
    try:
        for bench in pairs:
            bench.start()
        for bench in pairs:  # unmeasured: every process builds its pools, signer and caches once
            fb.throughput_round(bench, False, 50, f"secwu{bench.label[0]}")
            fb.throughput_round(bench, True, 200, f"secwb{bench.label[0]}")
        unbatched = alternate(pairs, own.rounds, False, own.events)
        batched = alternate(pairs, own.rounds, True, own.batched_events)
        problems = [p for bench in pairs for p in bench.problems]
    finally:
        for bench in pairs:
            for kite in (bench.b, bench.a):
                kite.close()
        baseline.services[0].stop()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)
    u_lines, u_ratio = table("unbatched", unbatched, "baseline", "candidate")
    b_lines, b_ratio = table("batched", batched, "baseline", "candidate")
    lines = [
        "<!-- bench:security:start -->",
        f"### What the trust model costs deliveries: run of {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC",
        "",
        f"Command: `cd {ROOT} && .venv/bin/python bench/security.py {' '.join(argv or sys.argv[1:])}` — "
        f"revision {revision} (candidate) against {own.baseline} (baseline: plain `{{id}}.{{ts}}.{{body}}` "
        "signatures, no replay store, no destination policy), each as a federated pair A → B set up as in "
        "bench/federation.py, one PostgreSQL and Redis, rounds alternating between the pairs. "
        f"{own.events} events per unbatched round, {own.batched_events} per batched round, {own.rounds} rounds each.",
        "",
        "| delivery | baseline events/s per round | median | candidate events/s per round | median | "
        "candidate vs baseline (median of per-round ratios) |",
        "|---|---|---|---|---|---|",
        *u_lines,
        *b_lines,
        "",
        "CPU per delivered event in the same rounds (each instance's processes; PostgreSQL is shared by both pairs):",
        "",
        *cpu_lines(),
        "",
        f"Targets: unbatched ≥ −5 %: {fb.verdict(u_ratio >= 0.95)}; batched ≥ −2 %: {fb.verdict(b_ratio >= 0.98)}."
        + (f" Problems: {'; '.join(problems)}." if problems else " Every round delivered every event; none dead."),
        "<!-- bench:security:end -->",
    ]
    report = "\n".join(lines)
    print(report)
    if not own.no_write:
        common.write_results(report, "security")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
