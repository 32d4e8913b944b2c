"""The embedded broker: kombu's SQLAlchemy transport on a SQLite file (no REDIS_URL).

That transport hands a message to a worker by marking its row invisible and never deletes it,
not even once the task is acknowledged: the file grew by every task ever sent (beat alone sends
the outbox sweep every second, ~90 MB a day) and each fetch walked past all of them. Nothing
makes an invisible row visible again (a worker that stops gives back what it had not started by
sending it anew), so deleting them loses nothing.
"""

import sqlite3
from contextlib import closing
from pathlib import Path

SQLITE_PREFIX = "sqla+sqlite:///"


def purge_consumed(broker_url: str) -> int:
    """Delete the messages already handed to a worker; the number deleted (0 for another broker)."""
    path = Path(broker_url.removeprefix(SQLITE_PREFIX))
    if not broker_url.startswith(SQLITE_PREFIX) or not path.exists():
        return 0
    with closing(sqlite3.connect(path, timeout=20)) as db, db:
        try:
            return db.execute("DELETE FROM kombu_message WHERE visible = 0").rowcount
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # no worker has connected yet
                return 0
            raise
