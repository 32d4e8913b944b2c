import secrets
import signal
from collections.abc import Callable

import pytest

from tests.e2e.harness import Database, Kite, Listener, RedisDatabase


class Instances:
    """Starts Kite instances, each with its own data dir, port, instance id, database and Redis db."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.started: list[tuple[Kite, Database | None, RedisDatabase | None]] = []

    def start(self, label: str, **options) -> Kite:
        """One instance, started (options: those of _made)."""
        (kite,) = self.start_together((label, options))
        return kite

    def start_together(self, *instances: str | tuple[str, dict]) -> tuple[Kite, ...]:
        """Instances started at once, their starts overlapping (Kite.start_together): each a label, or
        (label, options of start())."""
        kites = [self._made(spec) if isinstance(spec, str) else self._made(spec[0], **spec[1]) for spec in instances]
        return Kite.start_together(*kites)

    def _made(self, label: str, *, embedded: bool = False, extra_env: dict | None = None,
              database_via: Callable[[str], str] | None = None, empty_database: bool = False) -> Kite:  # fmt: skip
        """embedded: no DATABASE_URL / REDIS_URL, i.e. SQLite, in-memory channel layer, SQLAlchemy broker.
        extra_env: set for this instance's processes, over everything else.
        database_via: the DATABASE_URL Kite is given, from its database's own URL (e.g. through PgBouncer).
        empty_database: runkite meets an empty database and runs every migration (otherwise the
        database is a copy of the migrated template, harness.migrated_template)."""
        database = None if embedded else Database(label, migrated=not empty_database)
        try:
            redis_db = None if embedded else RedisDatabase()
        except BaseException:
            database.drop()
            raise
        kite = Kite(
            data_dir=self.tmp_path_factory.mktemp(label) / "data",
            instance_id=f"e2e-{label}-{secrets.token_hex(3)}",
            database_url=(database_via or str)(database.url) if database else None,
            redis_url=redis_db.url if redis_db else None,
            extra_env=extra_env or {},
        )
        self.started.append((kite, database, redis_db))
        return kite

    def close(self) -> None:
        """SIGTERM each running instance's process group: it must exit 0, all processes gone."""
        failures = []
        running = [kite for kite, _, _ in self.started if kite.process is not None]
        for kite in running:  # all at once: their shutdowns overlap
            kite.signal_stop(signal.SIGTERM)
        for kite, database, redis_db in reversed(self.started):
            try:
                if any(kite is other for other in running):
                    returncode = kite.wait_stopped(signal.SIGTERM)
                    if returncode != 0:
                        failures.append(f"{kite.instance_id} exited {returncode} on SIGTERM:\n{kite.log_tail}")
            except AssertionError as exc:
                failures.append(str(exc))
            finally:
                kite.kill()
                if database:
                    database.drop()
                if redis_db:
                    redis_db.release()
        assert not failures, failures


@pytest.fixture
def instances(tmp_path_factory):
    started = Instances(tmp_path_factory)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="session")
def shared_kite(tmp_path_factory):
    """One PostgreSQL + Redis backed instance for the tests that only need one; each uses sources of its own."""
    started = Instances(tmp_path_factory)
    try:
        yield started.start("shared")
    finally:  # also when it failed to start: its database and Redis db are dropped all the same
        started.close()


@pytest.fixture
def listen():
    """listen(kite, *args, api_key=None, ca_file=None) → a running `kite listen`; stopped at teardown."""
    running: list[Listener] = []

    def start(kite: Kite, *args: str, **options) -> Listener:
        listener = Listener(kite, *args, **options)
        running.append(listener)
        return listener

    yield start
    for listener in running:
        listener.stop()
