"""kite.broker against a real kombu SQLAlchemy broker on SQLite (the embedded default's)."""

import sqlite3

from kombu import Connection

from kite.broker import purge_consumed


def rows_by_visibility(path) -> dict[int, int]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT visible, count(*) FROM kombu_message GROUP BY visible").fetchall())


def test_messages_handed_to_a_worker_are_purged_and_waiting_ones_kept(tmp_path):
    path = tmp_path / "celery-broker.sqlite3"
    url = f"sqla+sqlite:///{path}"
    with Connection(url) as connection:
        queue = connection.SimpleQueue("celery")
        for n in range(5):
            queue.put({"n": n})
        for _ in range(3):
            queue.get(timeout=5).ack()
        assert rows_by_visibility(path) == {0: 3, 1: 2}  # kombu keeps what it handed out, for good

        assert purge_consumed(url) == 3

        assert rows_by_visibility(path) == {1: 2}
        assert [queue.get(timeout=5).payload["n"] for _ in range(2)] == [3, 4]  # still delivered, in order
        queue.close()


def test_nothing_to_purge_before_a_worker_made_the_broker_or_on_another_broker(tmp_path):
    sqlite3.connect(tmp_path / "empty.sqlite3").close()
    assert purge_consumed(f"sqla+sqlite:///{tmp_path / 'empty.sqlite3'}") == 0  # no tables yet
    assert purge_consumed(f"sqla+sqlite:///{tmp_path / 'missing.sqlite3'}") == 0
    assert not (tmp_path / "missing.sqlite3").exists()  # not created by looking
    assert purge_consumed("redis://127.0.0.1:6379/0") == 0
