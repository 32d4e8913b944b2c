"""What each pytest-xdist worker keeps to itself (`make test` runs the in-process tests on two).

Each worker has PostgreSQL and Redis servers of its own (scripts/test.sh starts a second pair and
names it in KITE_TEST_GW1_DATABASE_URL and KITE_TEST_GW1_REDIS_URL) and a data directory of its own.
One server per worker, not one database each: a stream reads only below the oldest transaction
still writing anywhere on its PostgreSQL server (docs/architecture.md), so another worker's open
test transaction would hide this worker's new events; and the cache, rate limits and channel layer
name their keys by team and peer ids, which two test databases hand out alike.

Loaded with `-p tests.workers` (pyproject.toml), before pytest-django imports the settings.
"""

import os

_worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, … (set by xdist before the worker's plugins load)
if _worker and _worker != "gw0":  # gw0 keeps the run's own servers
    for _name in ("DATABASE_URL", "REDIS_URL"):
        _value = os.environ.get(f"KITE_TEST_{_worker.upper()}_{_name}")
        if not _value:
            raise RuntimeError(f"xdist worker {_worker} has no servers of its own: KITE_TEST_{_worker.upper()}_{_name} "
                               "is not set (scripts/test.sh sets it for -n 2)")  # fmt: skip
        os.environ[_name] = _value
if _worker and os.environ.get("KITE_DATA_DIR"):
    os.environ["KITE_DATA_DIR"] = os.path.join(os.environ["KITE_DATA_DIR"], _worker)
