"""Prepared statements behind a connection pooler, checked once as a process starts.

psycopg prepares a statement that a connection runs KITE_DB_PREPARE_THRESHOLD times (kite.settings):
the prepared statement lives in one PostgreSQL session. Behind a pooler in transaction mode
(PgBouncer `pool_mode = transaction`) a client's next transaction may run in another session.
PgBouncer 1.21 and later, with `max_prepared_statements` above 0, prepares the statement there
again; older PgBouncers (Debian 12 ships 1.18) and `max_prepared_statements = 0` do not, and a
query then fails with `prepared statement "_pg3_0" does not exist` — only under concurrency,
minutes into a run. So each process finds out at start, in a few milliseconds, and a broken
combination stops it with one line naming the variable to set.

The probe: session S prepares a statement; a second connection opens a transaction, which pins
the server session S ran on (a pooler hands out its most recently used idle server first); S
runs the prepared statement again. Directly on PostgreSQL, or behind a pooler in session mode,
S is still the same server session. Behind transaction pooling it lands on another one, where
the statement exists only if the pooler keeps prepared statements. Then a new connection
prepares a statement under the same name (psycopg names them _pg3_0, _pg3_1 … per connection):
a server session S left behind still holds it unless the session ended, was reset (session
mode's DISCARD ALL), or the pooler renames statements (1.21+).
"""

import threading

from django.conf import settings

PROBE = "SELECT pg_backend_pid()"
WAIT_SECONDS = 5.0  # a pool of one server session: S waits for the other transaction to end


def prepared_statements_problem() -> str | None:
    """What to set, in one line, when DATABASE_URL leads to a pooler that loses prepared statements;
    None when they work, are off (KITE_DB_PREPARE_THRESHOLD=0), or the database cannot be reached
    (the processes start and wait for it, as in any outage)."""
    from django.db import connection

    if not settings.IS_POSTGRES or connection.settings_dict["OPTIONS"].get("prepare_threshold") is None:
        return None
    return problem_at(connection.get_connection_params())


def problem_at(params: dict) -> str | None:
    """The probe, on connections made with psycopg.connect(**params)."""
    import psycopg

    try:
        with psycopg.connect(**params, autocommit=True) as session, psycopg.connect(**params) as other:
            _probe(session, other)
        with psycopg.connect(**params, autocommit=True) as later:  # the same name, in a session another left
            later.execute(PROBE, prepare=True)
    except (psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement) as exc:
        # Does not exist: the next transaction ran in another server session. Already exists: a
        # server session still holds the statement another client prepared there under that name.
        return (
            "KITE_DB_PREPARE_THRESHOLD: DATABASE_URL leads to a connection pooler in transaction mode that does "
            f"not keep prepared statements ({exc.sqlstate}: {str(exc).strip()}). Set KITE_DB_PREPARE_THRESHOLD=0, "
            "or use PgBouncer 1.21 or later with max_prepared_statements above 0."
        )
    except psycopg.Error:  # unreachable, or refused: the processes' own queries say so as they always do
        return None
    return None


def _probe(session, other) -> None:
    """Raises what a prepared statement meets on `session` when `other` holds a server session."""
    session.execute(PROBE, prepare=True)
    other.execute(PROBE)  # a transaction is open: its server session is held until the rollback
    outcome: list = []
    again = threading.Thread(target=_run_prepared, args=(session, outcome), daemon=True)
    again.start()
    again.join(WAIT_SECONDS)
    other.rollback()  # lets a session that had to wait for a server go on
    again.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]


def _run_prepared(session, outcome: list) -> None:
    try:
        outcome.append(session.execute(PROBE, prepare=True).fetchone())
    except Exception as exc:  # handed to the caller's thread
        outcome.append(exc)


def exit_if_prepared_statements_break(process: str) -> None:
    """For a process started on its own (a Celery worker): one line on stderr, exit status 1."""
    import sys

    problem = prepared_statements_problem()
    if problem:
        print(f"kite: {process}: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(1)
