"""Full garbage-collection passes in Kite's processes while federated events flow.

Runs bench/federation.py's latency phase (two instances, A → B at --rate events/s) from a checkout
(--tree, default this one) with a sitecustomize on PYTHONPATH that logs, in every Python process
the instances start, each generation-2 collection: when, how long, how many objects were frozen,
which process, how many objects the pass left in the oldest generation (what the next one walks).
Prints the passes that fell inside the latency rounds (from the first round's start
to the last round's result), by process, and the rounds' latencies as federation.py printed them.

    .venv/bin/python bench/gcpauses.py                      # this checkout
    .venv/bin/python bench/gcpauses.py --tree /tmp/before   # another (git worktree add /tmp/before REV)
"""

import argparse
import collections
import pathlib
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

SITECUSTOMIZE = '''
import gc, os, sys, time
_started = {}
def _pass(phase, info):
    if info["generation"] != 2:
        return
    if phase == "start":
        _started["at"] = time.perf_counter()
        return
    took = (time.perf_counter() - _started.get("at", time.perf_counter())) * 1000
    with open(os.path.join(os.environ["KITE_GCPAUSES_DIR"], f"gc-{os.getpid()}.log"), "a") as log:
        log.write(f"{time.time():.3f} {took:.2f} {gc.get_freeze_count()} {len(gc.get_objects(2))} {os.getpid()}/{os.getppid()} "
                  f"{' '.join(sys.argv[:4])}\\n")
gc.callbacks.append(_pass)
'''

ROUND = re.compile(r"^\[fedbench (\d\d:\d\d:\d\d)\] latency federated r\d+: (.*)$")


def kind(argv: str) -> str:
    if "uvicorn" in argv:
        return "web (uvicorn)"
    if "celery" in argv and " worker" in argv:
        return "worker (celery)"
    if "celery" in argv and " beat" in argv:
        return "beat"
    if "runkite" in argv:
        return "runkite"
    return "other (" + argv[-40:] + ")"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", default=str(pathlib.Path(__file__).resolve().parent.parent))
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--verbose", action="store_true", help="every pass, inside the rounds or not: when, how long, which process")
    args = parser.parse_args(argv)
    tree = pathlib.Path(args.tree)
    with tempfile.TemporaryDirectory(prefix="kite-gcpauses-") as directory:
        (pathlib.Path(directory) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        command = [sys.executable, str(tree / "bench" / "federation.py"), "--phases", "latency", "--rate", str(args.rate),
                   "--rounds", str(args.rounds), "--duration", str(args.duration), "--baseline-duration", "3",
                   "--low-rate", "0", "--no-write", "--env", f"PYTHONPATH={directory}",
                   "--env", f"KITE_GCPAUSES_DIR={directory}"]  # fmt: skip
        print("$", " ".join(command), flush=True)
        output = subprocess.run(command, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                check=False).stdout  # fmt: skip
        day = datetime.now(timezone.utc).date()
        first, end, rounds = None, None, []
        for line in output.splitlines():
            if match := ROUND.match(line):
                first, end = first or match.group(1), match.group(1)
                rounds.append(match.group(2))
        if end is None:
            print(output)
            return 1

        def epoch(clock: str) -> float:
            return datetime.combine(day, datetime.strptime(clock, "%H:%M:%S").time(), timezone.utc).timestamp()

        # From the first round's start (its result's time less its duration) to the last round's result,
        # a second's margin on either side (the log's clock is whole seconds).
        start, stop = epoch(first) - args.duration - 1, epoch(end) + 1
        passes = collections.defaultdict(list)
        for log in pathlib.Path(directory).glob("gc-*.log"):
            for line in log.read_text().splitlines():
                at, took, frozen, walked, pids, process = line.split(" ", 5)
                if args.verbose:  # every pass, start-up's included, timed from the window's start
                    print(f"  pass {float(at) - start:+7.2f} s: {took} ms, frozen {frozen}, walked {walked}, "
                          f"pid/ppid {pids}, {kind(process)}")  # fmt: skip
                if start <= float(at) <= stop:
                    passes[kind(process)].append((float(took), int(frozen), int(walked)))
    print(f"tree {tree}, {args.rounds} rounds × {args.duration:g} s at {args.rate:g} events/s")
    for result in rounds:
        print("  round:", result)
    print(f"full (generation 2) collections during the rounds ({stop - start:.0f} s):")
    for name, found in sorted(passes.items()):
        took = sorted(t for t, _, _ in found)
        print(f"  {name:18s} {len(took):3d} passes, longest {took[-1]:6.1f} ms, median {took[len(took) // 2]:6.1f} ms, "
              f"objects walked up to {max(w for _, _, w in found):,}, frozen {max(f for _, f, _ in found):,}")  # fmt: skip
    if not passes:
        print("  none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
