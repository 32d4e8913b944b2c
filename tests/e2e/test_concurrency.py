"""Concurrent webhooks commit out of id order on PostgreSQL; the (txid, id) cursor still streams each once."""

import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.e2e.harness import cursor_key, open_write_transactions

pytestmark = pytest.mark.e2e
WEBHOOKS = 320
THREADS = 32


def test_concurrently_posted_webhooks_are_each_printed_exactly_once(shared_kite, listen):
    name = f"burst-{secrets.token_hex(3)}"
    source = shared_kite.create_source(name, "stripe")
    team_id = shared_kite.team_id()
    listener = listen(shared_kite, "--source", name, "--from-start")
    sessions = threading.local()

    def post(n: int) -> int:
        if not hasattr(sessions, "session"):
            sessions.session = requests.Session()
        return shared_kite.post_stripe(team_id, source, f"burst-{n}", session=sessions.session).status_code

    with ThreadPoolExecutor(THREADS) as pool:
        statuses = list(pool.map(post, range(WEBHOOKS)))
    assert statuses == [202] * WEBHOOKS
    assert shared_kite.post_stripe(team_id, source, "last").status_code == 202
    try:
        listener.wait_for_ids([f"burst-{n}" for n in range(WEBHOOKS)] + ["last"], timeout=30)
    except AssertionError as exc:  # lost, or held back behind someone's long transaction?
        stored = shared_kite.api("GET", "/api/events", params={"source": name, "limit": 1000}).json()["results"]
        raise AssertionError(f"{exc}; readable now: {len(stored)}; open: {open_write_transactions()}") from None

    printed = listener.ids()
    assert len(printed) == WEBHOOKS + 1 and len(set(printed)) == WEBHOOKS + 1
    assert printed[-1] == "last"
    keys = [cursor_key(event) for event in listener.events]
    assert keys == sorted(set(keys))
