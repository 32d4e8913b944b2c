#!/usr/bin/env python3
"""Fleet benchmark: A's aggregated fleet over 10 peers of 100 agents each.

Real processes, as bench/federation.py starts them (its own PostgreSQL + Redis on
ports of its own, `manage.py runkite` per instance: uvicorn, Celery worker, beat,
TLS on, default settings): A, and P — one more Kite instance holding 10 teams of
100 agents each. Each of P's teams is one of A's peers ("peers may be processes of
one test instance set"): P's team i has a peer row for A checking a secret of its
own inbound and a `fleet.agents` grant for it; A has peer `p<i>` (P's hook URL of
team i, P's pinned TLS fingerprint, that secret outbound) and stores the grant with
`PUT /api/fleet/peers/{id}/remote-grant`. Every fleet call is signed, TLS-pinned,
authenticated, grant-checked and audited on both sides, as between two sites.

Measured from this process, `GET /api/fleet/agents?federation=true` on A over one
keep-alive TLS connection, one request at a time, rounds of N:

1. all healthy: 10 peers answer (1,000 remote rows). Target p50 ≤ 60 ms.
2. one black-holed: an 11th peer points at a socket here that accepts TCP and never
   answers. Target p99 ≤ per-peer timeout (KITE_FLEET_PEER_TIMEOUT_SECONDS, 2 s) + 150 ms.
3. snapshot-only read (`&snapshot=true`: no peer asked, every peer's last snapshot).
   Target p50 ≤ 15 ms.

Each answer is checked (every healthy peer `ok` with its 100 rows, the black hole
`timeout` with none). The numbers and the exact command go into bench/RESULTS.md
between the `bench:fleet` markers.

    .venv/bin/python bench/fleet.py --wait-quiet 900        # the recorded run
    .venv/bin/python bench/fleet.py --quick --no-write      # trial (~2 min)
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import requests

import common

ROOT = Path(__file__).resolve().parent.parent
fb = common.load("federation")
log, med, pct, verdict = fb.log, fb.med, fb.pct, fb.verdict

PEERS, AGENTS = 10, 100
SECTION = "fleet"

# Run inside P (`manage.py shell -c`): the teams, their agents, their rows for A and grants.
SETUP_P = """
import json
from django.utils import timezone
from federation import grants, services as federation_services
from fleet.models import Agent
from kite import crypto, services as kite_services

made = []
now = timezone.now()
for i in range({peers}):
    team = kite_services.team_create(name=f"fleet-peer-{{i:02}}")
    secret = crypto.new_webhook_secret()
    row = federation_services.peer_create(team=team, name="a", peer_hook_url={a_hook!r}, inbound_token=secret).row
    _, token = grants.create(peer=row, resource_kind="fleet.agents")
    Agent.objects.bulk_create(
        Agent(team=team, name=f"agent-{{i:02}}-{{n:03}}", version="2.4.1", host=f"host-{{n % 17}}.p{{i}}.example",
              labels={{"region": "eu" if n % 2 else "us", "rack": f"r{{n % 8}}"}}, first_seen=now, last_seen=now)
        for n in range({agents}))
    made.append({{"team_id": team.id, "secret": secret, "token": token}})
print("SETUP " + json.dumps(made))
"""


class BlackHole:
    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.socket.getsockname()[1]
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.socket.accept()[0])
            except OSError:
                return

    def close(self):
        self.socket.close()
        for connection in self.held:
            connection.close()


class FleetBench:
    def __init__(self, args):
        self.args = args
        self.services = [fb.Services(args, args.pg_port, args.redis_port, args.services_dir)]
        self.a = fb.Instance(args, "fleet-a", args.port, self.services[0], 1, {})
        self.p = fb.Instance(args, "fleet-p", args.port + 1, self.services[0], 2, {})
        self.hole = BlackHole()
        self.problems: list[str] = []

    def start(self) -> None:
        self.services[0].start()
        for kite, number in ((self.a, 1), (self.p, 2)):
            self.services[0].flush_redis(number)
            kite.create_database()
            kite.start()
            log(f"{kite.label}: {kite.instance_id} on {kite.url}")
        a_identity = self.a.api("GET", "/api/federation/identity").json()
        p_identity = self.p.api("GET", "/api/federation/identity").json()
        code = SETUP_P.format(peers=PEERS, agents=AGENTS, a_hook=a_identity["hook_url"])
        done = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=self.p.env,
                              capture_output=True, text=True)  # fmt: skip
        line = next((line for line in done.stdout.splitlines() if line.startswith("SETUP ")), None)
        if done.returncode != 0 or line is None:
            raise SystemExit(f"setting up P failed:\n{done.stdout}\n{done.stderr}")
        for i, made in enumerate(json.loads(line[6:])):
            body = {"name": f"p{i:02}", "peer_hook_url": f"{self.p.url}/hooks/{made['team_id']}/kite",
                    "outbound_token": made["secret"], "tls_fingerprint": p_identity["tls_fingerprint"], "scopes": []}  # fmt: skip
            peer = self.a.api("POST", "/api/federation/peers", json=body)
            assert peer.status_code == 201, peer.text
            stored = self.a.api("PUT", f"/api/fleet/peers/{peer.json()['id']}/remote-grant", json={"token": made["token"]})
            assert stored.status_code == 200, stored.text
        log(f"A has {PEERS} peers on P, {AGENTS} agents each")

    def add_black_hole(self) -> None:
        body = {"name": "hole", "peer_hook_url": f"https://127.0.0.1:{self.hole.port}/hooks/tm_x/kite", "scopes": []}
        peer = self.a.api("POST", "/api/federation/peers", json=body)
        assert peer.status_code == 201, peer.text
        assert self.a.api("PUT", f"/api/fleet/peers/{peer.json()['id']}/remote-grant",
                          json={"token": "fg-1." + "h" * 43}).status_code == 200  # fmt: skip
        log(f"A's peer `hole` → 127.0.0.1:{self.hole.port} (accepts, never answers)")

    def stop(self) -> None:
        self.hole.close()
        for kite in (self.p, self.a):
            kite.close()
        for services in self.services:
            services.stop()


def timed_lists(session: requests.Session, bench: FleetBench, count: int, *, snapshot: bool, hole: bool) -> list[float]:
    """`count` sequential lists; ms each. Every answer is checked."""
    url = f"{bench.a.url}/api/fleet/agents"
    params = {"federation": "true", **({"snapshot": "true"} if snapshot else {})}
    took = []
    for _ in range(count):
        started = time.perf_counter()
        answer = session.get(url, params=params, verify=bench.a.cert, timeout=30)
        took.append((time.perf_counter() - started) * 1000)
        check(bench, answer, snapshot=snapshot, hole=hole)
    return took


def check(bench: FleetBench, answer: requests.Response, *, snapshot: bool, hole: bool) -> None:
    if answer.status_code != 200:
        bench.problems.append(f"HTTP {answer.status_code}: {answer.text[:200]}")
        return
    body = answer.json()
    outcomes = {entry["name"]: entry["outcome"] for entry in body["peers"]}
    healthy = [name for name in outcomes if name != "hole"]
    bad = {name: outcomes[name] for name in healthy if outcomes[name] != "ok"}
    if len(healthy) != PEERS or bad or len(body["results"]) != PEERS * AGENTS:
        bench.problems.append(f"{'snapshot' if snapshot else 'live'}: {len(body['results'])} rows, not ok: {bad}")
    if hole and not snapshot and outcomes.get("hole") != "timeout":
        bench.problems.append(f"hole answered {outcomes.get('hole')!r}")


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"n": len(samples), "p50": med(samples), "p95": pct(ordered, 95), "p99": pct(ordered, 99),
            "max": ordered[-1] if ordered else float("nan")}  # fmt: skip


def phase(session, bench, name: str, rounds: int, count: int, **kind) -> dict:
    per_round = []
    for r in range(rounds):
        samples = timed_lists(session, bench, count, **kind)
        per_round.append(summary(samples))
        s = per_round[-1]
        log(f"{name} round {r + 1}: n {s['n']}, p50 {s['p50']:.1f}, p95 {s['p95']:.1f}, p99 {s['p99']:.1f}, "
            f"max {s['max']:.1f} ms")  # fmt: skip
    return {"rounds": per_round}


def pooled(result: dict, key: str) -> float:
    return med([r[key] for r in result["rounds"]])


def report(args, argv, facts, healthy, holed, snap, problems, started) -> str:
    quiet = facts["loadavg"] < args.quiet_load and not facts["busy"]

    def rows(result):
        return [f"| {i + 1} | {r['n']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['max']:.1f} |"
                for i, r in enumerate(result["rounds"])]  # fmt: skip

    hole_p99 = max(r["p99"] for r in holed["rounds"])
    budget = args.peer_timeout * 1000 + 150
    lines = [
        *common.section_head(SECTION, "Fleet", started, common.command("fleet.py", argv)),
        f"- Machine: {facts['nproc']} CPUs ({facts['cpu']}); 1-min load average {facts['loadavg']:.2f} at the start, "
        f"{facts['loadavg_end']:.2f} at the end; pytest / benchmark processes at the start: {len(facts['busy'])} → "
        f"{'quiet' if quiet else '**NOT quiet**'}. Python {facts['python']}, Django {facts['django']}, uvicorn "
        f"{facts['uvicorn']}, PostgreSQL {facts['postgres']} (fsync={facts['fsync']}, synchronous_commit="
        f"{facts['synchronous_commit']}), Redis; everything (both instances, PostgreSQL, Redis, this client) on "
        "these CPUs, loopback.",
        f"- Two `manage.py runkite` instances with default settings (KITE_WEB_WORKERS={facts['web_workers']}, "
        f"KITE_WSGI_THREADS={facts['wsgi_threads']}; heartbeats every 30 s — P's 10 peer rows ping A at the same "
        "instant — and the snapshot refresh, which skips peers a list asked in the last 15 s), "
        "TLS on: **A**, and **P** holding 10 teams of 100 agents; each of P's teams is one of A's peers (own secret, "
        "pinned TLS certificate, `fleet.agents` grant stored on A with `PUT /api/fleet/peers/{id}/remote-grant`). "
        "Every fleet call is signed, authenticated, grant-checked and audited on both sides.",
        f"- Client: this script, `GET /api/fleet/agents?federation=true` on A, one request at a time over one "
        f"keep-alive TLS connection; {args.rounds} rounds per figure; every answer checked (10 peers `ok`, "
        f"1,000 remote rows; the black hole `timeout`, no rows). Problems: {problems or 'none'}.",
        "",
        "**1. All healthy** (10 peers × 100 agents, each asked live, in parallel):",
        "",
        "| round | requests | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
        *rows(healthy),
        "",
        f"Median of the round p50s **{pooled(healthy, 'p50'):.1f} ms**; target p50 ≤ 60 ms: "
        f"{verdict(pooled(healthy, 'p50') <= 60)}.",
        "",
        f"**2. One black-holed** (an 11th peer accepts TCP and never answers; per-peer timeout "
        f"{args.peer_timeout:g} s):",
        "",
        "| round | requests | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
        *rows(holed),
        "",
        f"Worst round p99 **{hole_p99:.0f} ms**; target p99 ≤ {budget:.0f} ms (timeout + 150 ms): "
        f"{verdict(hole_p99 <= budget)}.",
        "",
        "**3. Snapshot-only read** (`&snapshot=true`: no peer asked; every peer's last snapshot, 1,000 rows):",
        "",
        "| round | requests | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
        *rows(snap),
        "",
        f"Median of the round p50s **{pooled(snap, 'p50'):.1f} ms**; target p50 ≤ 15 ms: "
        f"{verdict(pooled(snap, 'p50') <= 15)}.",
    ]
    return common.section_text(lines, SECTION)


def build_parser() -> argparse.ArgumentParser:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--healthy", type=int, default=100, help="requests per all-healthy round")
    parser.add_argument("--holed", type=int, default=25, help="requests per black-holed round (~2 s each)")
    parser.add_argument("--snapshot", type=int, default=200, help="requests per snapshot-only round")
    parser.add_argument("--peer-timeout", type=float, default=2.0, help="A's KITE_FLEET_PEER_TIMEOUT_SECONDS")
    parser.add_argument("--quick", action="store_true", help="trial: 1 round of each, fewer requests")
    common.service_arguments(parser, port=18640, pg_port=25652, redis_port=26599, env="extra environment for A and P",
                             services_dir="/tmp/kite-fleetbench-services", port_help="A's port; P's is the next",
                             pg_port_help=fb.BELOW_EPHEMERAL)  # fmt: skip
    parser.add_argument("--keep-data", action="store_true")
    common.output_arguments(parser, quiet_load=1.0)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.quick:
        args.rounds, args.healthy, args.holed, args.snapshot = 1, 30, 5, 50
    if args.peer_timeout != 2.0:
        args.env.append(f"KITE_FLEET_PEER_TIMEOUT_SECONDS={args.peer_timeout}")
    initial = fb.at_start(args)
    bench = FleetBench(args)
    return common.run_main(lambda: measure(args, argv, bench, initial), bench.stop, log, "stopping A, P and the services")


def measure(args, argv, bench: FleetBench, initial: dict) -> int:
    started = datetime.now(timezone.utc)
    bench.start()
    facts = fb.machine_facts(bench) | initial
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {bench.a.admin_key}"
    timed_lists(session, bench, 10, snapshot=False, hole=False)  # warm-up: connections, caches
    healthy = phase(session, bench, "all healthy", args.rounds, args.healthy, snapshot=False, hole=False)
    bench.add_black_hole()
    holed = phase(session, bench, "one black-holed", args.rounds, args.holed, snapshot=False, hole=True)
    timed_lists(session, bench, 10, snapshot=True, hole=True)
    snap = phase(session, bench, "snapshot-only", args.rounds, args.snapshot, snapshot=True, hole=True)
    facts["loadavg_end"] = os.getloadavg()[0]
    section = report(args, argv, facts, healthy, holed, snap, sorted(set(bench.problems))[:5], started)
    return common.publish(section, SECTION, not args.no_write, log)


if __name__ == "__main__":
    sys.exit(main())
