"""Real Kite processes for end-to-end tests: `manage.py runkite` servers and `kite listen` clients.

Every wait polls with a deadline; nothing here sleeps to make an assertion true.
"""

import atexit
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
import requests

from tests.signing import stripe_signature

REPO = Path(__file__).resolve().parents[2]
KITE_CLI = Path(sys.executable).with_name("kite")  # the console script users run
PG_ADMIN_URL = "postgres://postgres@127.0.0.1:55432/postgres"
START_SECONDS = 60
STOP_SECONDS = 18  # runkite itself SIGKILLs a child after 15 s (STOP_GRACE_SECONDS), and says so in its log
# Variables of the test run that must not leak into a Kite under test.
_SCRUBBED = ("DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR", "SECRET_KEY")


def wait_for(predicate, timeout: float, what, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail with `what` (text, or a function
    giving it, so that it tells the state at the deadline) when `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


# --- backing services ---------------------------------------------------------


def admin_url() -> str:
    # The server of the test run's DATABASE_URL (make test), else the default test server.
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        return PG_ADMIN_URL
    return urlunsplit(urlsplit(url)._replace(path="/postgres"))


def _database_url(name: str) -> str:
    return urlunsplit(urlsplit(admin_url())._replace(path=f"/{name}"))


_template: list[str] = []  # the name of this test run's migrated database, made on first use
_template_lock = threading.Lock()


def migrated_template() -> str:
    """A database `manage.py migrate` ran on once in this test run. Instances' databases are copies
    of it (CREATE DATABASE … TEMPLATE, well under a second): runkite's own migrate then finds nothing
    to apply instead of running every migration at each start (2-3 s). Dropped when the run ends."""
    with _template_lock:
        if not _template:
            _template.append(_migrate_template())
        return _template[0]


def _migrate_template() -> str:
    name = f"kite_e2e_template_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    atexit.register(_drop_template, name)
    env = {key: value for key, value in os.environ.items() if key not in _SCRUBBED and not key.startswith("KITE_")}
    with tempfile.TemporaryDirectory(prefix="kite-template-") as data_dir:
        env.update(DATABASE_URL=_database_url(name), KITE_DATA_DIR=data_dir)
        done = subprocess.run([sys.executable, "manage.py", "migrate", "--no-input", "-v0"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, f"migrate of the template database failed:\n{done.stdout}{done.stderr}"
    with psycopg.connect(admin_url(), autocommit=True) as admin:  # nobody may connect: a copy needs it idle
        admin.execute(f'ALTER DATABASE "{name}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false')
    return name


def _drop_template(name: str) -> None:
    try:
        with psycopg.connect(admin_url(), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" WITH IS_TEMPLATE false')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error:
        pass  # the test server already stopped: its data dir goes with it


class Database:
    """A PostgreSQL database of its own, dropped afterwards: a copy of the migrated template, or
    (migrated=False) an empty one, for the tests of what runkite does to a database it meets first."""

    def __init__(self, label: str, *, migrated: bool = True):
        self.name = f"kite_e2e_{label}_{secrets.token_hex(4)}"
        template = f' TEMPLATE "{migrated_template()}"' if migrated else ""
        with psycopg.connect(admin_url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"{template}')
        self.url = _database_url(self.name)

    def drop(self) -> None:
        with psycopg.connect(admin_url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def open_write_transactions() -> list[tuple]:
    """Transactions holding an xid anywhere on the server: they hold back every stream's horizon."""
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        return admin.execute(
            "SELECT datname, pid, backend_xid::text, now() - xact_start, left(query, 80) FROM pg_stat_activity"
            " WHERE backend_xid IS NOT NULL ORDER BY xact_start"
        ).fetchall()


class RedisDatabase:
    """An empty Redis database number, claimed for the test so parallel runs do not share a broker."""

    CLAIM = "kite-e2e:claim"

    def __init__(self):
        base = os.environ.get("REDIS_URL") or "redis://127.0.0.1:56379/0"
        self.token = secrets.token_hex(8)
        for number in range(15, 0, -1):  # high numbers first: db 0 belongs to the unit tests
            url = urlunsplit(urlsplit(base)._replace(path=f"/{number}"))
            client = redis.Redis.from_url(url)
            if client.dbsize() == 0 and client.set(self.CLAIM, self.token, nx=True, ex=900):
                self.url, self.client = url, client
                return
            client.close()
        raise AssertionError("no free Redis database number for an e2e instance")

    def release(self) -> None:
        self.client.flushdb()  # Celery queues, cache and channel layer keys of this instance
        self.client.close()


# --- a Kite server ------------------------------------------------------------


@dataclass
class Kite:
    """One `manage.py runkite` (uvicorn + celery worker + celery beat) with its own data dir and port."""

    data_dir: Path
    instance_id: str
    database_url: str | None = None
    redis_url: str | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    _stopping: subprocess.Popen | None = None  # signalled by signal_stop(), not yet waited for
    log_path: Path = None
    starts: int = 0
    extra_env: dict = field(default_factory=dict)  # e.g. a shifted clock (LD_PRELOAD libfaketime)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def cert(self) -> Path:
        return self.data_dir / "tls" / "cert.pem"

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin-api-key").read_text().strip()

    def env(self) -> dict:
        env = {key: value for key, value in os.environ.items() if key not in _SCRUBBED and not key.startswith("KITE_")}
        env.update(
            KITE_DATA_DIR=str(self.data_dir),
            KITE_PORT=str(self.port),
            KITE_INSTANCE_ID=self.instance_id,
            KITE_TLS="on",
            KITE_PEER_ALLOWED_NETWORKS="127.0.0.0/8,::1/128",
            PYTHONUNBUFFERED="1",
        )
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        env.update(self.extra_env)
        return env

    def start(self) -> "Kite":
        return self.launch().wait_started()

    def launch(self) -> "Kite":
        """The first half of start(): runkite started, not yet waited for. A test starting several
        instances launches them all, then waits for each (start_together), so their starts overlap."""
        self.starts += 1
        self.log_path = self.data_dir.parent / f"{self.instance_id}-run{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "runkite"],
                cwd=REPO,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a terminal would give it
            )
        return self

    def wait_started(self) -> "Kite":
        wait_for(self._healthy, START_SECONDS, lambda: f"{self.instance_id} to answer /healthz; log:\n{self.log_tail}")
        return self

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"runkite exited with {self.process.returncode}; log:\n{self.log_tail}")
        if not self.cert.exists():
            return False
        try:
            response = requests.get(f"{self.url}/healthz", verify=str(self.cert), timeout=2)
        except requests.RequestException:
            return False
        return response.status_code == 200 and response.json()["instance_id"] == self.instance_id

    @staticmethod
    def start_together(*kites: "Kite") -> tuple["Kite", ...]:
        """Start every one, their starts overlapping (each start is mostly its processes loading
        Django); returns once each answers /healthz, as start() does for one."""
        taken: set[int] = set()
        for kite in kites:  # drawn before any of them listens: two could have drawn the same free port
            while kite.port in taken:
                kite.port = free_port()
            taken.add(kite.port)
        for kite in kites:
            kite.launch()
        for kite in kites:
            kite.wait_started()
        return kites

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the whole process group, as Ctrl-C does; every process must be gone within STOP_SECONDS."""
        self.signal_stop(signum)
        return self.wait_stopped(signum)

    def signal_stop(self, signum: int = signal.SIGTERM) -> None:
        """The first half of stop(): a test stopping several instances signals them all, then waits
        for each, so their shutdowns overlap."""
        self._stopping, self.process = self.process, None
        if self._stopping.poll() is None:
            os.killpg(self._stopping.pid, signum)

    def wait_stopped(self, signum: int = signal.SIGTERM) -> int:
        process, self._stopping = self._stopping, None
        try:
            returncode = process.wait(timeout=STOP_SECONDS)
            wait_for(lambda: group_is_gone(process.pid), 2, f"every process of {self.instance_id} to exit")
        except subprocess.TimeoutExpired:
            raise AssertionError(f"runkite still running {STOP_SECONDS} s after signal {signum}") from None
        finally:
            if not group_is_gone(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        assert "did not stop" not in self.log_tail, f"a process had to be killed:\n{self.log_tail}"
        return returncode

    def kill(self) -> None:
        for process in (self.process, self._stopping):
            if process is not None and not group_is_gone(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.process = self._stopping = None

    @property
    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

    # --- HTTP, as a user and as a provider ---------------------------------

    def api(self, method: str, path: str, api_key: str | None = None, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {api_key or self.admin_key}"}
        return requests.request(method, self.url + path, headers=headers, verify=str(self.cert), timeout=10, **kwargs)

    def team_id(self) -> str:
        return self.api("GET", "/api/me").json()["team"]["id"]

    def create_source(self, name: str, kind: str) -> dict:
        response = self.api("POST", "/api/sources", json={"name": name, "kind": kind})
        assert response.status_code == 201, response.text
        return response.json()

    def post_stripe(self, team_id: str, source: dict, event_id: str, session=None) -> requests.Response:
        body = json.dumps(
            {"id": event_id, "type": "payment_intent.succeeded", "created": int(time.time()),
             "data": {"object": {"id": f"pi_{event_id}", "amount": 4200}}}
        ).encode()  # fmt: skip
        headers = {"Stripe-Signature": stripe_signature(source["secret"], body), "Content-Type": "application/json"}
        url = f"{self.url}/hooks/{team_id}/{source['name']}"
        return (session or requests).post(url, data=body, headers=headers, verify=str(self.cert), timeout=10)

    def post_plain(self, team_id: str, source_name: str, event_id: str) -> requests.Response:
        return requests.post(
            f"{self.url}/hooks/{team_id}/{source_name}",
            json={"id": event_id, "type": "com.example.ping"},
            verify=str(self.cert),
            timeout=10,
        )


# --- a `kite listen` client ---------------------------------------------------


def database_sessions(kite) -> list[tuple]:
    """The instance's database sessions that are not idle: (state, wait event, seconds, query)."""
    if not kite.database_url:
        return []
    try:
        with psycopg.connect(kite.database_url, connect_timeout=5) as db:
            return db.execute(
                "SELECT state, wait_event_type || ':' || wait_event, round(extract(epoch FROM now() - query_start)),"
                " left(query, 120) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND state <> 'idle'"
            ).fetchall()
    except psycopg.Error as exc:
        return [("unreachable", str(exc))]


class Listener:
    """`kite listen` as a user runs it; collects stdout lines (CloudEvents) and stderr lines."""

    def __init__(self, kite: Kite, *args: str, api_key: str | None = None, ca_file: Path | None = None):
        env = {key: value for key, value in os.environ.items() if not key.startswith("KITE_")}
        env["KITE_API_KEY"] = api_key or kite.admin_key
        env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT prints every thread's stack: diagnostics() asks for it
        self.kite = kite
        self.argv = [str(KITE_CLI), "listen", "--instance", kite.url, "--ca-file", str(ca_file or kite.cert), *args]
        self.process = subprocess.Popen(
            self.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self.lines: list[tuple[float, str]] = []  # (monotonic arrival, line)
        self.errors: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self._on_line), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.errors.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _on_line(self, line: str) -> None:
        self.lines.append((time.monotonic(), line))

    @staticmethod
    def _read(stream, sink) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    @property
    def events(self) -> list[dict]:
        return [json.loads(line) for _, line in list(self.lines)]

    def ids(self) -> list[str]:
        return [event["id"] for event in self.events]

    def wait_for_ids(self, expected: list[str], timeout: float = 20) -> list[dict]:
        """Wait until every expected id has been printed; returns the events printed so far."""
        def missing() -> set[str]:
            return set(expected) - set(self.ids())

        wait_for(lambda: not missing(), timeout, lambda: f"{len(missing())} ids {sorted(missing())[:10]}…; {self.diagnostics()}")
        return self.events

    def arrival_of(self, event_id: str, timeout: float = 10) -> float:
        def found():
            return next((at for at, line in list(self.lines) if json.loads(line)["id"] == event_id), None)

        return wait_for(found, timeout, lambda: f"{event_id}; {self.diagnostics()}")

    def wait_for_stderr(self, text: str, timeout: float = 30) -> None:
        wait_for(lambda: any(text in line for line in self.errors), timeout, lambda: f"{text!r}; {self.diagnostics()}")

    def wait_for_exit(self, timeout: float = 15) -> int:
        wait_for(lambda: self.process.poll() is not None, timeout, lambda: f"an exit; {self.diagnostics()}")
        return self.process.returncode

    def diagnostics(self) -> str:
        """The state at a failed wait. A listener still running is stopped with SIGABRT so that it
        prints where each of its threads is (PYTHONFAULTHANDLER); the server's database sessions that
        are not idle are listed with what they wait for."""
        server = [line for line in self.kite.log_tail.splitlines() if "WebSocket" in line or "Error" in line]
        exit_code, stacks, printed = self.process.poll(), "", list(self.errors)
        if exit_code is None:
            self.process.send_signal(signal.SIGABRT)
            self.process.wait(timeout=10)
            self._readers[1].join(timeout=5)
            stacks = "; its threads when stopped:\n" + "\n".join(self.errors[len(printed):])
        return (
            f"`kite listen` printed {len(self.lines)} lines, exit={exit_code}, stderr={printed[-5:]};"
            f" server log: {server[-5:]}; server sessions: {database_sessions(self.kite)}{stacks}"
        )

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        returncode = self.process.wait(timeout=10)
        for reader in self._readers:
            reader.join(timeout=5)
        return returncode


def wait_until_streaming(listener: Listener, post, timeout: float = 20) -> list[str]:
    """Post marker events (post(event_id)) until `kite listen` prints one: it is then live.

    A fresh listener starts at "now", so a marker posted before it connected is
    rightly never printed; the next one is. Returns the markers posted.
    """
    markers: list[str] = []
    last_post = [0.0]

    def printed_a_marker():
        if set(markers) & set(listener.ids()):
            return True
        if time.monotonic() - last_post[0] > 0.5:
            markers.append(f"marker-{secrets.token_hex(4)}")
            response = post(markers[-1])
            assert response.status_code == 202, response.text
            last_post[0] = time.monotonic()
        return False

    wait_for(printed_a_marker, timeout, lambda: f"`kite listen` to stream; {listener.diagnostics()}")
    return markers


def cursor_key(event: dict) -> tuple[int, int]:
    txid, event_id = event["kitecursor"].split("-")
    return int(txid), int(event_id)
