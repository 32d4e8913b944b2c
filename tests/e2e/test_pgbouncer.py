"""Kite behind PgBouncer in transaction pooling mode (scripts/services.sh starts one for the test run).

Each transaction of a Kite connection may run in another PostgreSQL session. What Kite needs of a
session: nothing beyond the transaction, except psycopg's prepared statements (off with
KITE_DB_PREPARE_THRESHOLD=0, or checked at start) and the TimeZone Django sets on connecting, which
PgBouncer tracks per client. The outbox claims and lease renewals are single statements with FOR
UPDATE SKIP LOCKED; there are no advisory locks, LISTEN/NOTIFY, temporary tables or cursors held
across transactions. docs/scaling.md says what to configure.
"""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from kite import pooling
from tests.e2e.harness import REPO, Database, Kite, cursor_key, free_port, wait_for, wait_until_streaming

pytestmark = pytest.mark.e2e

FAST = {"KITE_PROBE_DOWN_SECONDS": "1", "KITE_OUTBOX_LEASE_SECONDS": "3", "KITE_HEARTBEAT_SECONDS": "2"}
POOLED = {**FAST, "KITE_DB_PREPARE_THRESHOLD": "0"}


class PgBouncer:
    """A PgBouncer in front of the test PostgreSQL, and its admin console (SHOW …)."""

    def __init__(self, url: str):
        self.url = url

    def via(self, database_url: str) -> str:
        """The same database, reached through this PgBouncer."""
        return urlunsplit(urlsplit(database_url)._replace(netloc=urlsplit(self.url).netloc))

    def show(self, what: str, database: str | None = None) -> list[dict]:
        # The admin console speaks the simple query protocol only: a client-side-binding cursor sends it.
        with psycopg.connect(self.via("postgres:///pgbouncer"), autocommit=True, cursor_factory=psycopg.ClientCursor,
                             row_factory=psycopg.rows.dict_row) as console:  # fmt: skip
            rows = console.execute(f"SHOW {what}").fetchall()
        return [row for row in rows if database is None or row.get("database") == database]


@pytest.fixture(scope="module")
def pgbouncer() -> PgBouncer:
    url = os.environ.get("KITE_TEST_PGBOUNCER_URL")
    assert url, "KITE_TEST_PGBOUNCER_URL is unset: run the tests with scripts/test.sh (services.sh starts PgBouncer)"
    bouncer = PgBouncer(url)
    config = {row["key"]: row["value"] for row in bouncer.show("CONFIG")}
    assert config["pool_mode"] == "transaction", config["pool_mode"]
    return bouncer


def post_concurrently(post, event_ids: list[str]) -> None:
    """Webhooks at once, so that PgBouncer hands its server sessions from one client to another."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(post, event_ids))
    assert [response.status_code for response in responses] == [202] * len(event_ids), [
        response.text for response in responses if response.status_code != 202
    ]


def federate(sender: Kite, receiver: Kite, name: str) -> dict:
    """The getting-started flow: B's inbound token, A's peer for B with it, B trusting A."""
    token = receiver.api("POST", "/api/federation/tokens", json={"label": f"from-{name}"}).json()["token"]
    identity = receiver.api("GET", "/api/federation/identity").json()
    peer = sender.api("POST", "/api/federation/peers", json={
        "name": name, "peer_hook_url": identity["hook_url"], "tls_fingerprint": identity["tls_fingerprint"],
        "scopes": ["stripe.*"], "outbound_token": token})  # fmt: skip
    assert peer.status_code == 201, peer.text
    trusted = receiver.api("POST", "/api/federation/trusted-senders",
                           json={"name": f"{name}-sender", "inbound_token": token})  # fmt: skip
    assert trusted.status_code == 201, trusted.text
    return peer.json()


def stored_ids(kite: Kite, **filters) -> list[str]:
    found, after = [], "0-0"
    while True:
        page = kite.api("GET", "/api/events", params={**filters, "after": after, "limit": 1000}).json()
        found += [event["id"] for event in page["results"]]
        if not page["results"]:
            return found
        after = page["next"]


def database_of(kite: Kite) -> str:
    return urlsplit(kite.database_url).path.lstrip("/")


def direct_sessions(database: str) -> set[int]:
    """Backend pids of every session open on `database`, as PostgreSQL itself sees them."""
    admin = urlunsplit(urlsplit(os.environ["DATABASE_URL"])._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as connection:
        rows = connection.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", [database]).fetchall()
    return {pid for (pid,) in rows}


def test_kite_behind_transaction_pooling_ingests_streams_resumes_and_federates(instances, listen, pgbouncer):
    # runkite migrates through it too: every migration, on an empty database
    a = instances.start("pgb-a", database_via=pgbouncer.via, extra_env=POOLED, empty_database=True)
    b = instances.start("pgb-b", database_via=pgbouncer.via, extra_env=POOLED)
    peer = federate(a, b, "b")
    source, team_id = a.create_source("stripe", "stripe"), a.team_id()

    def post(event_id):
        return a.post_stripe(team_id, source, event_id)

    live = listen(a, "--source", "stripe")
    markers = wait_until_streaming(live, post)
    sent = [f"live-{n}-{secrets.token_hex(3)}" for n in range(40)]
    post_concurrently(post, sent)
    live.wait_for_ids(sent)
    live.stop(signal.SIGKILL)
    printed = live.ids()
    keys = [cursor_key(event) for event in live.events]
    assert keys == sorted(set(keys))  # in cursor order, each once
    assert sorted(set(printed) - set(markers)) == sorted(sent)

    missed = [f"missed-{n}-{secrets.token_hex(3)}" for n in range(20)]
    post_concurrently(post, missed)
    resumed = listen(a, "--source", "stripe", "--after", live.events[-1]["kitecursor"])
    resumed.wait_for_ids(missed)
    assert sorted(resumed.ids()) == sorted(missed)  # exactly the ones posted meanwhile, each once
    resumed_keys = [cursor_key(event) for event in resumed.events]
    assert resumed_keys == sorted(set(resumed_keys)) and resumed_keys[0] > keys[-1]

    everything = set(markers) | set(sent) | set(missed)
    wait_for(lambda: everything <= set(stored_ids(b, source="kite")), 30, lambda: f"every event at B; {a.log_tail}")
    at_b = [event_id for event_id in stored_ids(b, source="kite") if event_id in everything]
    assert sorted(at_b) == sorted(everything)  # each delivered once

    def undelivered() -> dict[str, int]:  # A records an outcome once B has answered: a moment after B stored it
        path = f"/api/federation/peers/{peer['id']}/outbox"
        return {status: len(a.api("GET", path, params={"status": status}).json()["results"])
                for status in ("pending", "in_flight", "dead")}  # fmt: skip

    wait_for(lambda: not any(undelivered().values()), 10, lambda: f"A's outbox all delivered: {undelivered()}")

    # The one server-side cursor Kite opens (reencryptsecrets walks rows with .iterator()) lives inside
    # its transaction, so it works through PgBouncer too.
    rotated = subprocess.run([sys.executable, "manage.py", "reencryptsecrets"], cwd=REPO, env=a.env(),
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert rotated.returncode == 0 and "Done:" in rotated.stdout, rotated.stdout + rotated.stderr
    assert "federation.Peer: 1 row(s) re-encrypted" in rotated.stdout, rotated.stdout

    for kite in (a, b):  # every PostgreSQL session on Kite's database is one of PgBouncer's
        sessions, servers = direct_sessions(database_of(kite)), pgbouncer.show("SERVERS", database_of(kite))
        assert sessions and sessions <= {server["remote_pid"] for server in servers}, (sessions, servers)
        log = kite.log_path.read_text(errors="replace")
        assert "prepared statement" not in log and "Traceback" not in log, log[-4000:]
    # A's 16 webhooks at a time held more connections than the pool's 10 server sessions (scripts/services.sh).
    clients, servers = pgbouncer.show("CLIENTS", database_of(a)), pgbouncer.show("SERVERS", database_of(a))
    assert len(clients) > len(servers), (len(clients), len(servers))
    assert_fully_migrated(database_of(a))


def assert_fully_migrated(database: str) -> None:
    from django.db.migrations.loader import MigrationLoader

    known = {key for key in MigrationLoader(None, ignore_no_migrations=True).disk_migrations}
    direct = urlunsplit(urlsplit(os.environ["DATABASE_URL"])._replace(path=f"/{database}"))
    with psycopg.connect(direct) as connection:
        applied = set(connection.execute("SELECT app, name FROM django_migrations").fetchall())
    assert known <= applied, known - applied


def start_alone(command: list[str], data_dir: Path, database_url: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KITE_")}  # the default threshold
    env.update(DATABASE_URL=database_url, KITE_DATA_DIR=str(data_dir), KITE_TLS="on", PYTHONUNBUFFERED="1")
    env.pop("REDIS_URL", None)  # the worker stops before it would take a task from any broker
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_default_prepare_threshold_behind_transaction_pooling_stops_at_start_naming_the_setting(tmp_path, pgbouncer):
    database = Database("pgb-default", migrated=False)
    try:
        pooled = pgbouncer.via(database.url)
        started = time.monotonic()
        web = start_alone([sys.executable, "manage.py", "runkite"], tmp_path / "web", pooled)
        worker = start_alone([sys.executable, "-m", "celery", "-A", "kite", "worker", "--concurrency", "1"],
                             tmp_path / "worker", pooled)  # fmt: skip
        assert time.monotonic() - started < 30

        assert web.returncode == 1, web.stdout + web.stderr
        (line,) = [line for line in web.stderr.splitlines() if "KITE_DB_PREPARE_THRESHOLD" in line]
        assert "KITE_DB_PREPARE_THRESHOLD=0" in line and "max_prepared_statements" in line, line
        assert "Traceback" not in web.stderr, web.stderr
        assert worker.returncode == 1, worker.stdout + worker.stderr
        assert "kite: worker: KITE_DB_PREPARE_THRESHOLD: " in worker.stderr, worker.stderr
        with psycopg.connect(database.url) as direct:  # nothing started: not even migrate ran
            tables = direct.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
        assert tables == 0
    finally:
        database.drop()


# --- the start-time probe against each kind of server -------------------------------------


class PrivatePgBouncer:
    """A PgBouncer of the test's own, with the pool mode and size it is given."""

    def __init__(self, target: str, *, mode: str, pool_size: int):
        self.dir = Path(tempfile.mkdtemp(prefix="kite-pgbouncer-"))
        self.port = free_port()
        server = urlsplit(target)
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\n* = host={server.hostname} port={server.port}\n[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\nauth_type = trust\n"
            f"auth_file = {self.dir}/users.txt\npool_mode = {mode}\ndefault_pool_size = {pool_size}\n"
            f"logfile = {self.dir}/pgbouncer.log\n"
        )
        runner = []
        if os.getuid() == 0:  # PgBouncer refuses to run as root
            shutil.chown(self.dir, "postgres")
            runner = ["runuser", "-u", "postgres", "--"]
        self.process = subprocess.Popen([*runner, "/usr/sbin/pgbouncer", "-q", str(self.dir / "pgbouncer.ini")],
                                        start_new_session=True)  # fmt: skip
        self.url = urlunsplit(server._replace(netloc=f"postgres@127.0.0.1:{self.port}", path="/postgres"))
        try:
            wait_for(self._ready, 10, lambda: f"PgBouncer on {self.port}: {self._log()}")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self.process.poll() is None, self._log()
        try:
            psycopg.connect(self.url, connect_timeout=1).close()
        except psycopg.OperationalError:
            return False
        return True

    def _log(self) -> str:
        log = self.dir / "pgbouncer.log"
        return log.read_text()[-2000:] if log.exists() else ""

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGINT)  # runuser does not pass it on: the group has PgBouncer
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def probe(url: str) -> tuple[str | None, float]:
    """What the start-time check says of a server, with Kite's own connection settings, and how long it took."""
    started = time.monotonic()
    problem = pooling.problem_at({"conninfo": url, "prepare_threshold": 5})
    return problem, time.monotonic() - started


def test_start_check_passes_behind_session_pooling_where_prepared_statements_keep_working(pgbouncer):
    bouncer = PrivatePgBouncer(os.environ["DATABASE_URL"], mode="session", pool_size=20)
    try:
        assert probe(bouncer.url)[0] is None
        for _ in range(3):  # one client after another, each preparing its _pg3_0: session mode resets the session
            with psycopg.connect(bouncer.url, autocommit=True) as client:
                assert client.execute("SELECT 1", prepare=True).fetchone() == (1,)
                assert client.execute("SELECT 1", prepare=True).fetchone() == (1,)
    finally:
        bouncer.stop()


def test_start_check_names_the_setting_behind_a_transaction_pool_of_one_server_without_waiting_for_ever(pgbouncer):
    bouncer = PrivatePgBouncer(os.environ["DATABASE_URL"], mode="transaction", pool_size=1)
    try:
        problem, took = probe(bouncer.url)
        # The probe's second transaction waits for the first (one server session) and then runs where
        # its statement is; the next client meets the statement the probe left in that session.
        assert problem.startswith("KITE_DB_PREPARE_THRESHOLD: ") and "already exists" in problem, problem
        assert took < pooling.WAIT_SECONDS + 2
    finally:
        bouncer.stop()


def test_start_check_is_silent_directly_and_names_the_setting_behind_transaction_pooling(pgbouncer):
    direct = urlunsplit(urlsplit(os.environ["DATABASE_URL"])._replace(path="/postgres"))
    assert probe(direct)[0] is None
    problem, took = probe(pgbouncer.via(direct))
    assert problem.startswith("KITE_DB_PREPARE_THRESHOLD: ") and "KITE_DB_PREPARE_THRESHOLD=0" in problem
    assert took < 1.0
    # What the check foresees is what happens to a client preparing statements: its next transaction
    # runs in a server session without the statement, or in one where another client left one of
    # the same name.
    pooled = pgbouncer.via(direct)
    with psycopg.connect(pooled, autocommit=True) as session, psycopg.connect(pooled) as other:
        with pytest.raises((psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement)):
            session.execute("SELECT 1", prepare=True)
            other.execute("SELECT 1")
            session.execute("SELECT 1", prepare=True)
        other.rollback()
