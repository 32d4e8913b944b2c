"""What the benchmark scripts share.

Where results go (bench/RESULTS.md, one section between markers per script), PostgreSQL + Redis of a
script's own (scripts/services.sh), processes and their CPU and memory read from /proc, waiting for a
quiet machine, medians and percentiles, an open-loop HTTP client on keep-alive connections,
bench/receiver.py, and the bulk loads' set-up of bench/scale.py and bench/retention.py.

A script imports it as `common`: run as `.venv/bin/python bench/x.py` (from any working directory,
from any checkout), Python puts the script's own folder first on sys.path. Only the standard library
and what Kite's virtualenv holds (psycopg, requests); nothing here imports Kite, but for the receiver's
certificate (kite.tls).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import requests

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"


def logger(tag: str) -> Callable[[str], None]:
    def log(message: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


def load(script: str):
    """Another script of bench/ as a module, once per process. Not a plain import: `ingest` and
    `federation` are also the names of Kite's apps."""
    name = f"bench_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run(argv, env=None, capture=False, check=True, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=cwd, check=check, text=True, capture_output=capture)


def run_main(measure: Callable[[], int], stop: Callable[[], None], log, stopping: str) -> int:
    """`measure()`'s exit code, SIGTERM taken as Ctrl-C (130), and `stop()` whatever happened."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return measure()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        log(stopping)
        stop()


# --------------------------------------------------------------------------- command line


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A script's argument parser, its docstring as the --help text."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def wrk_arguments(parser, *, rounds: int, duration: float, warmup: float, rounds_help=None, duration_help=None,
                  warmup_help=None) -> None:  # fmt: skip
    """The closed loop's flags (bench/ingest.py's wrk rounds), with a script's own defaults."""
    parser.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    parser.add_argument("--duration", type=float, default=duration, help=duration_help)
    parser.add_argument("--warmup", type=float, default=warmup, help=warmup_help)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=2)


def service_arguments(parser, *, port: int, pg_port: int, redis_port: int, services_dir: str,
                      database: str | None = None, env: str | None = "extra environment for Kite",
                      port_help: str | None = None, pg_port_help: str | None = None) -> None:  # fmt: skip
    """The flags every script that starts its own services takes (with its own defaults)."""
    if env:
        parser.add_argument("--env", action="append", default=[], metavar="K=V", help=env)
    parser.add_argument("--port", type=int, default=port, help=port_help)
    parser.add_argument("--pg-port", type=int, default=pg_port, help=pg_port_help)
    parser.add_argument("--redis-port", type=int, default=redis_port)
    parser.add_argument("--services-dir", default=services_dir)
    if database:
        parser.add_argument("--database", default=database)
    parser.add_argument("--keep-services", action="store_true", help="leave PostgreSQL and Redis running")


def output_arguments(parser, quiet: str = "first wait up to this long for a quiet machine",
                     quiet_load: float | None = None, section: str | None = None) -> None:  # fmt: skip
    """--no-write and --wait-quiet (and --quiet-load, the load average counted as quiet; --section and
    --title, where the script's section may be named)."""
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS", help=quiet)
    if quiet_load is not None:
        parser.add_argument("--quiet-load", type=float, default=quiet_load, help="1-min load average counted as quiet")
    if section is not None:
        parser.add_argument("--section", default=section, help="name of the section of bench/RESULTS.md to replace")
        parser.add_argument("--title", help="heading of that section")


# --------------------------------------------------------------------------- figures


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


# --------------------------------------------------------------------------- bench/RESULTS.md


def markers(section: str) -> tuple[str, str]:
    return f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"


def write_results(text: str, section: str) -> None:
    """Put `text` (its markers included) in place of the section's in bench/RESULTS.md (appended the first time)."""
    start, end = markers(section)
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        current = before + text + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.write_text(current)


def publish(text: str, section: str, write: bool, log) -> int:
    """Print a generated section and, if `write`, put it into bench/RESULTS.md; the exit code (0)."""
    print(text)
    if write:
        write_results(text, section)
        log(f"written to {RESULTS}")
    return 0


def command(script: str, argv=None) -> str:
    """The command as run, to repeat it: `cd <repo> && .venv/bin/python bench/<script> <arguments>`."""
    arguments = sys.argv[1:] if argv is None else argv
    return "cd " + str(ROOT) + " && " + shlex.join([".venv/bin/python", f"bench/{script}", *arguments])


def section_text(lines: list[str], section: str) -> str:
    """A generated section: its lines and its end marker."""
    return "\n".join([*lines, markers(section)[1]])


def held(problems: list[str]) -> str:
    """The end of a report's sentence on what was checked."""
    return "all held." if not problems else "**problems: " + "; ".join(problems) + "**"


def section_head(section: str, title: str, started, command_line: str) -> list[str]:
    """A generated section's first lines: its start marker, heading and the exact command."""
    return [
        markers(section)[0],
        f"### {title}: run of {started:%Y-%m-%d %H:%M} UTC",
        "",
        "Command (exactly as run):",
        "",
        "```",
        command_line,
        "```",
        "",
    ]


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def versions(*packages: str) -> list[str]:
    """Installed versions of these distributions (Kite's virtualenv: the one the servers run)."""
    found = []
    for name in packages:
        try:
            found.append(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            found.append("?")
    return found


def kite_settings(env: dict, *expressions: str) -> list[str]:
    """Kite's settings as a process with `env` reads them: each expression (of `s`, the settings) printed,
    the output split."""
    code = "import django; django.setup(); from django.conf import settings as s; print(" + ", ".join(expressions) + ")"
    env = {**env, "DJANGO_SETTINGS_MODULE": env.get("DJANGO_SETTINGS_MODULE", "kite.settings")}
    return run([sys.executable, "-c", code], env=env, capture=True).stdout.split()


def others_busy(patterns=("pytest",)) -> list[str]:
    """Other processes whose command line matches one of `patterns` (pgrep -f): not a quiet machine."""
    found = []
    for pattern in patterns:
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        found += [pid for pid in out if int(pid) != os.getpid()]
    return found


def wait_until_quiet(limit: float, log, threshold: float = 0.5, patterns=("pytest",)) -> None:
    """Wait (up to `limit` s) for a 1-min load average below `threshold` and none of `patterns` running."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        load, busy = os.getloadavg()[0], others_busy(patterns)
        if load < threshold and not busy:
            log(f"quiet: load {load:.2f}, no {' / '.join(patterns)} running")
            return
        log(f"waiting for a quiet machine: load {load:.2f}, {len(busy)} {' / '.join(patterns)} processes")
        time.sleep(min(30, max(1, deadline - time.monotonic())))
    log("the machine did not get quiet; measuring anyway (the report says so)")


# --------------------------------------------------------------------------- processes (/proc)

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name: [state, ppid, …] (utime is [11], stime [12])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> set[int]:
    """`root` and every process below it."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            parents[int(entry)] = int(fields[1])
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    return found


def cpu_seconds(pids, reaped: bool = False) -> float:
    """CPU seconds (user + system) of these processes so far; with `reaped`, also of their children that
    exited and were waited for (PostgreSQL's backends of closed connections)."""
    total = 0.0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += sum(int(value) for value in fields[11 : 15 if reaped else 13]) / TICK
    return total


def cpu_tree(root: int) -> float:
    """CPU seconds of a process tree, exited processes included (see cpu_seconds)."""
    return cpu_seconds(descendants(root), reaped=True)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_process(process: subprocess.Popen | None, group: bool = True, timeout: float = 20) -> None:
    """SIGTERM (to its process group, or to it alone: `runkite` stops its children itself), then SIGKILL
    to the group after `timeout` s. The process was started with start_new_session=True."""
    if process is None or process.poll() is not None:
        return
    if group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_healthy(label: str, url: str, process: subprocess.Popen, timeout: float, interval: float,
                 log_tail: Callable[[], str], verify: str | None = None) -> float:  # fmt: skip
    """Poll `url` (a /healthz) until it answers 200; time.time() then. With `verify` (a certificate file
    the server writes at start), once that file exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{label} exited with {process.returncode}:\n{log_tail()}")
        if verify is None or os.path.exists(verify):
            try:
                if requests.get(url, verify=verify or True, timeout=2).status_code == 200:
                    return time.time()
            except requests.RequestException:
                pass
        time.sleep(interval)
    raise SystemExit(f"{label}: no answer from {url} within {timeout:g} s:\n{log_tail()}")


# --------------------------------------------------------------------------- PostgreSQL + Redis


class Services:
    """One PostgreSQL + Redis pair started by scripts/services.sh on ports of its own."""

    def __init__(self, pg_port: int, redis_port: int, directory: str, log, *, pg_options: str = "",
                 attempts: int = 6, pause: float = 15):  # fmt: skip
        self.pg_port, self.redis_port, self.directory, self.log = pg_port, redis_port, directory, log
        self.attempts, self.pause = attempts, pause
        self.env = dict(os.environ, KITE_TEST_PG_PORT=str(pg_port), KITE_TEST_REDIS_PORT=str(redis_port),
                        KITE_SERVICES_DIR=directory)  # fmt: skip
        if pg_options:
            self.env["KITE_PG_OPTIONS"] = pg_options
        self.started = False

    def start(self) -> None:
        self.log(f"services: PostgreSQL :{self.pg_port}, Redis :{self.redis_port} in {self.directory}")
        self.started = True
        for attempt in range(self.attempts):
            done = run(["scripts/services.sh", "start"], env=self.env, capture=True, check=False)
            if done.returncode == 0:
                return
            # The ports may lie in the ephemeral range: a client socket in TIME_WAIT on one of them
            # (some other program's connection) blocks the bind for up to a minute.
            self.log(f"services did not start (attempt {attempt + 1}): {done.stdout.strip()} "
                     f"{done.stderr.strip()[-200:]}; retrying in {self.pause:g} s")  # fmt: skip
            time.sleep(self.pause)
        raise SystemExit(f"services on :{self.pg_port}/:{self.redis_port} did not start")

    def stop(self, remove: bool = False) -> None:
        """Stop what start() started; with `remove`, delete the services' files too."""
        if self.started:
            run(["scripts/services.sh", "stop"], env=self.env, capture=True, check=False)
            if remove:
                shutil.rmtree(self.directory, ignore_errors=True)

    def flush_redis(self, number: int | None = None) -> None:
        """Empty one Redis database, or all of them."""
        command = ["-n", str(number), "flushdb"] if number is not None else ["flushall"]
        run(["redis-cli", "-p", str(self.redis_port), *command], capture=True)

    def fresh_database(self, name: str) -> None:
        url = f"postgres://postgres@127.0.0.1:{self.pg_port}/postgres"
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}"')

    def pid(self, server: str) -> int | None:
        """The PostgreSQL postmaster's or the Redis server's process id ("postgres", "redis")."""
        path = Path(self.directory, "pg", "postmaster.pid") if server == "postgres" else Path(self.directory, "redis.pid")
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu(self, reaped: bool = False) -> dict[str, float]:
        """CPU seconds so far of the PostgreSQL server (all its processes) and the Redis server."""
        out = {}
        for server in ("postgres", "redis"):
            pid = self.pid(server)
            out[server] = cpu_seconds(descendants(pid), reaped) if pid is not None else 0.0
        return out


# --------------------------------------------------------------------------- open loop over keep-alive connections

KEEPALIVE_SECONDS = 4.0  # idle connections are dropped after this long: uvicorn closes them at 5 s


def raw_post(path: str, port: int, body: bytes, headers: dict[str, str]) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body  # fmt: skip


class KeepAlive:
    """Connections to one server, reused while they were idle less than KEEPALIVE_SECONDS."""

    def __init__(self, host: str, port: int, ssl=None):
        self.host, self.port, self.ssl = host, port, ssl
        self.idle: collections.deque = collections.deque()  # (reader, writer, idle since), most recent last
        self.opened = 0

    async def connect(self):
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port, ssl=self.ssl)

    async def open(self, count: int) -> None:
        for _ in range(count):
            self.checkin(*await self.connect())

    def checkout(self):
        """The most recently used idle connection, or None."""
        while self.idle:
            reader, writer, since = self.idle.pop()
            if time.perf_counter() - since < KEEPALIVE_SECONDS and not reader.at_eof():
                return reader, writer
            writer.close()  # the server may be closing it right now
        return None

    def checkin(self, reader, writer) -> None:
        self.idle.append((reader, writer, time.perf_counter()))

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()


async def exchange(reader, writer, raw: bytes) -> int:
    """One request, its whole answer read; the status code."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if length is None:
        raise RuntimeError("response without Content-Length")
    await reader.readexactly(int(length[1]))
    return int(head[9:12])


async def at_rate(count: int, rate: float, send) -> float:
    """Start `send(i, intended)` at intended = start + i/rate whatever happened before (an open loop);
    the seconds from the start until every one has finished."""
    tasks = []
    start = time.perf_counter() + 0.05  # not loop.time(): uvloop's clock has 1 ms steps
    for i in range(count):
        intended = start + i / rate
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(send(i, intended)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - start


def run_async(coroutine):
    """asyncio.run, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


# --------------------------------------------------------------------------- bench/receiver.py


class Receiver:
    """bench/receiver.py (HTTPS, answers 200, counts what arrives) on `port`, its files in `work`."""

    def __init__(self, work: Path, port: int, key_by: str):
        self.work, self.port, self.key_by = work, port, key_by
        self.url = f"https://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        from kite import tls

        cert, key = tls.ensure_server_certificate(self.work / "tls", ["127.0.0.1"])
        self.cert = str(cert)
        with open(self.work / "receiver.log", "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "receiver.py"), "--port", str(self.port), "--cert", str(cert),
                 "--key", str(key), "--key-by", self.key_by],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.session = requests.Session()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self.stats()
                return
            except requests.RequestException:
                time.sleep(0.1)
        raise SystemExit(f"receiver did not start: {(self.work / 'receiver.log').read_text()}")

    def stats(self) -> dict:
        """{key: [count, first arrival, last arrival, distinct paths]} (receiver.py's GET /_stats)."""
        return self.session.get(f"{self.url}/_stats", verify=self.cert, timeout=5).json()["keys"]


# --------------------------------------------------------------------------- bulk-loaded history (scale, retention)


class BulkLoad:
    """What bench/scale.py and bench/retention.py set up on a started bench/ingest.py Deployment (`self.dep`,
    `self.requests`, `self.args.port`): one real Stripe webhook through the API (the template the bulk rows
    copy), a revoked peer for the federation history and the team's `kite` source; and their database
    session (`self.db`)."""

    PEER_NAME = "archive"
    KITE_SOURCE = "kite"
    db: psycopg.Connection | None = None

    # One chunk of a bulk load: events (70 % from the Stripe source, 30 % federated in), an outbox entry
    # and one or two deliveries for each Stripe one (0.5 % dead, those `{pending}` still pending: no
    # delivery row), an audit row for one event in 20. `{ce_type}` and `{received}` are SQL of `g`, the
    # row's number in the load.
    BULK_SQL = """
WITH t AS (SELECT * FROM ingest_event WHERE id = %(template)s::bigint),
ev AS (
  INSERT INTO ingest_event (team_id, source_id, ce_id, ce_source, ce_type, ce_time, ce_subject, datacontenttype,
                            data, extensions, agent, received_at, txid)
  SELECT t.team_id,
         CASE WHEN g %% 10 < 7 THEN %(stripe)s::bigint ELSE %(kite)s::bigint END,
         'evt_' || substr(md5(%(salt)s::text || '-' || g), 1, 24),
         t.ce_source,
         {ce_type},
         at, '', t.datacontenttype,
         replace(t.data, %(tid)s::text, 'evt_' || substr(md5(%(salt)s::text || '-' || g), 1, 24)),
         CASE WHEN g %% 10 < 7 THEN t.extensions
              ELSE t.extensions || jsonb_build_object('kitefedorigin', 'kite-origin-' || (g %% 3),
                     'kitefedchain', '["kite-origin-' || (g %% 3) || '"]', 'kitefedhops', 1,
                     'kitefedpeer', %(peer_name)s::text) END,
         '', at + interval '40 ms',
         %(txid0)s::bigint + (g - 1) / %(per_txid)s
  FROM t, generate_series(%(start)s::int, %(end)s::int) g,
       LATERAL (SELECT {received} AS at) s
  RETURNING id, team_id, source_id, received_at
),
ob AS (
  INSERT INTO federation_outboxentry (msg_id, team_id, peer_id, event_id, provenance, status, attempts,
                                      next_attempt_at, leased_until, last_error, created_at, delivered_at)
  SELECT gen_random_uuid(), team_id, %(peer)s::bigint, id,
         jsonb_build_object('kitefedorigin', 'kite-self', 'kitefedchain', '["kite-self"]', 'kitefedhops', 1),
         CASE WHEN h %% 200 = 0 THEN 'dead' WHEN {pending} THEN 'pending' ELSE 'delivered' END,
         CASE WHEN h %% 20 = 1 THEN 2 ELSE 1 END, received_at, NULL,
         CASE WHEN h %% 200 = 0 THEN 'HTTP 410 from the peer' ELSE '' END, received_at,
         CASE WHEN h %% 200 = 0 OR {pending} THEN NULL ELSE received_at + interval '80 ms' END
  FROM ev, LATERAL (SELECT hashint8(ev.id)::bigint + 2147483648 AS h) x WHERE source_id = %(stripe)s::bigint
  RETURNING id, created_at, attempts, status
),
dl AS (
  INSERT INTO federation_delivery (peer_id, entry_id, attempted_at, status_code, outcome, latency_ms, error)
  SELECT %(peer)s::bigint, id, created_at + interval '60 ms',
         CASE WHEN status = 'dead' THEN 410 ELSE 202 END,
         CASE WHEN status = 'dead' THEN 'permanent' ELSE 'delivered' END, 38, ''
  FROM ob WHERE status <> 'pending'
  UNION ALL
  SELECT %(peer)s::bigint, id, created_at + interval '10 ms', 503, 'transient', 1200, 'HTTP 503 from the peer'
  FROM ob WHERE attempts = 2
  RETURNING 1
)
INSERT INTO federation_auditevent (team_id, at, action, peer_id, peer_name, actor, endpoint, outcome, detail, data)
SELECT team_id, received_at, 'Federation.PeerCalled', %(peer)s::bigint, %(peer_name)s::text, 'kite-archive',
       '/federation/ping', 'ok', '', jsonb_build_object('method', 'POST', 'latency_ms', 12)
FROM ev WHERE id %% 20 = 0
"""

    @classmethod
    def bulk_sql(cls, ce_type: str, received: str, pending: str = "false") -> str:
        return cls.BULK_SQL.format(ce_type=ce_type, received=received, pending=pending)

    def seed(self, source_name: str) -> None:
        dep = self.dep
        self.db = psycopg.connect(dep.database_url, autocommit=True)
        signature, body = self.requests.batch(1)[0]
        answer = requests.post(f"http://127.0.0.1:{self.args.port}{dep.paths['stripe']}", data=body, timeout=10,
                               headers={"Content-Type": "application/json", "Stripe-Signature": signature})  # fmt: skip
        assert answer.status_code == 202, answer.status_code
        self.template = self.one(
            "SELECT e.id, e.source_id, e.ce_id FROM ingest_event e JOIN ingest_source s ON s.id = e.source_id"
            " WHERE s.team_id = %s AND s.name = %s ORDER BY e.id DESC LIMIT 1",
            (dep.team_id, source_name),
        )
        # Made by the ORM: revoked, so nothing new is routed to it and a webhook takes the same path at every size.
        code = (
            "import django, sys; django.setup()\n"
            "from federation.models import Peer\nfrom ingest.models import Source\n"
            "team = sys.argv[1]\n"
            f"peer = Peer.objects.create(team_id=team, name={self.PEER_NAME!r}, role='peer', status='revoked',"
            " peer_hook_url='https://archive.example/hooks/t/kite', remote_instance_id='kite-archive', scopes=['*'])\n"
            f"source, _ = Source.objects.get_or_create(team_id=team, name={self.KITE_SOURCE!r},"
            " defaults={'kind': 'kite'})\n"
            "print(peer.pk, source.pk)"
        )
        out = run([sys.executable, "-c", code, dep.team_id], env=dep.env, capture=True).stdout.split()
        self.peer_id, self.kite_source_id = int(out[-2]), int(out[-1])
        self.stripe_source_id = self.template[1]

    def one(self, query: str, params=()):
        with self.db.cursor() as cur:
            cur.execute(query, params)
            row = cur.fetchone()
        return row if row is None or len(row) > 1 else row[0]

    def execute(self, query: str, params=()) -> None:
        with self.db.cursor() as cur:
            cur.execute(query, params)

    def burn_xids(self, count: int) -> int:
        """Consume `count` transaction ids (one tiny committed transaction each, asynchronous commit in
        this session only); returns the first of them. The bulk rows' txids are taken from this range,
        so they are older than every running transaction, like real ones."""
        first = self.one("SELECT pg_current_xact_id()::text::bigint")
        self.execute("SET synchronous_commit = off")
        self.execute(
            "CREATE OR REPLACE PROCEDURE pg_temp.burn(n int) LANGUAGE plpgsql AS $$"
            " BEGIN FOR i IN 1..n LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
        )
        done = 0
        while done < count:
            step = min(500_000, count - done)
            self.execute("CALL pg_temp.burn(%s)", (step,))
            done += step
        self.execute("RESET synchronous_commit")
        return first + 1
