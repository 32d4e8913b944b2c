#!/usr/bin/env python3
"""Overview and peer screen at a million delivery attempts: server time per page.

Runs tests/federation/test_overview.py's timed test (its loader and its assertion: ≤ 100 ms median
server time for each page) with 20,000 events sent to 50 peers — 1,000,000 outbox entries and
1,000,000 delivery attempts, all in the Overview's last hour — instead of the test's default
2,000. PostgreSQL and Redis of its own (scripts/test.sh on the ports below), the rows bulk-loaded
with INSERT … SELECT and ANALYZEd, Django's test client measuring the whole request in-process.

Each round prints the load time, the first request of each page (a cold cache: every bucket
counted) and the medians of 7 warm requests, with the peers list (the same 50 peers, no chart)
measured in the same round as the yardstick; the summary is the median over rounds.

    .venv/bin/python bench/overview.py                 # 1 M attempts, 3 rounds (~10 min on 2 busy cores)
    .venv/bin/python bench/overview.py --events 2000 --rounds 1    # the test's size: a trial
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"OVERVIEW-BENCH ([\d,]+) attempts loaded in ([\d.]+) s; cold cache: overview (\d+) ms, peer screen "
                  r"(\d+) ms; median warm: overview ([\d.]+) ms, peer screen ([\d.]+) ms, peers list \(no chart\) "
                  r"([\d.]+) ms; of which charts \(queries and SVG\): overview ([\d.]+) ms, peer screen ([\d.]+) ms")
FIELDS = ["load_s", "cold_overview_ms", "cold_peer_ms", "overview_ms", "peer_ms", "peers_list_ms",
          "overview_charts_ms", "peer_charts_ms"]


def one_round(events: int, pg_port: int, redis_port: int) -> dict:
    env = {**os.environ, "KITE_OVERVIEW_EVENTS": str(events), "KITE_TEST_PG_PORT": str(pg_port),
           "KITE_TEST_REDIS_PORT": str(redis_port)}  # fmt: skip
    command = ["scripts/test.sh", "tests/federation/test_overview.py", "-k", "at_most_100_ms", "-s", "-q",
               "-p", "no:cacheprovider"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    found = LINE.search(done.stdout)
    if not found:
        sys.exit(f"no figures in the test's output:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    values = [float(v) for v in found.groups()[1:]]
    return {"attempts": found.group(1), "passed": done.returncode == 0, **dict(zip(FIELDS, values, strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events, each sent to 50 peers (default 20,000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg-port", type=int, default=55691)
    parser.add_argument("--redis-port", type=int, default=56691)
    args = parser.parse_args()
    rounds = []
    for number in range(1, args.rounds + 1):
        result = one_round(args.events, args.pg_port, args.redis_port)
        rounds.append(result)
        print(f"round {number}: {result}", flush=True)
    summary = {field: statistics.median(r[field] for r in rounds) for field in FIELDS}
    print(f"{rounds[0]['attempts']} attempts, median over {len(rounds)} rounds: "
          + ", ".join(f"{field} {value:.1f}" for field, value in summary.items())
          + f"; overview / peers list {summary['overview_ms'] / summary['peers_list_ms']:.2f}, "
            f"peer screen / peers list {summary['peer_ms'] / summary['peers_list_ms']:.2f}; "
          + f"test assertion passed in {sum(r['passed'] for r in rounds)}/{len(rounds)} rounds")  # fmt: skip


if __name__ == "__main__":
    main()
