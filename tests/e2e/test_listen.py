"""A provider's webhook reaches a live `kite listen` over HTTPS, on PostgreSQL + Redis and on embedded defaults."""

import json
import signal
import time

import pytest
from cloudevents.core.formats.json import JSONFormat

from tests.e2e.harness import Kite, wait_for, wait_until_streaming

pytestmark = pytest.mark.e2e
PUSH_SECONDS = 1.0


@pytest.fixture(scope="module")
def stripe_source(shared_kite):
    return shared_kite.create_source("stripe", "stripe")


def assert_pushed_within_a_second(kite: Kite, listener, source: dict, event_id: str) -> dict:
    team_id = kite.team_id()
    response = kite.post_stripe(team_id, source, event_id)
    posted_at = time.monotonic()
    assert (response.status_code, response.json()) == (202, {"id": event_id, "duplicate": False})

    printed_at = listener.arrival_of(event_id, timeout=10)

    assert printed_at - posted_at < PUSH_SECONDS
    (line,) = [line for _, line in listener.lines if json.loads(line)["id"] == event_id]
    return json.loads(line)


def assert_valid_stripe_cloudevent(line: dict, kite: Kite, event_id: str) -> None:
    event = JSONFormat().read(None, json.dumps(line))
    assert event.get_specversion() == "1.0"
    assert event.get_id() == event_id
    assert event.get_type() == "com.stripe.payment_intent.succeeded"
    assert event.get_source() == f"kite://{kite.instance_id}/{kite.team_id()}/stripe"
    assert event.get_data()["data"]["object"] == {"id": f"pi_{event_id}", "amount": 4200}
    assert event.get_time() is not None
    assert line["kitecursor"]


def test_stripe_webhook_is_printed_by_kite_listen_within_a_second(shared_kite, stripe_source, listen):
    listener = listen(shared_kite, "--source", "stripe")
    team_id = shared_kite.team_id()
    wait_until_streaming(listener, lambda marker: shared_kite.post_stripe(team_id, stripe_source, marker))

    line = assert_pushed_within_a_second(shared_kite, listener, stripe_source, "evt_e2e_live")

    assert_valid_stripe_cloudevent(line, shared_kite, "evt_e2e_live")
    assert listener.process.poll() is None


def test_embedded_defaults_push_a_webhook_to_a_live_listener(instances, listen):
    kite = instances.start("embedded", embedded=True)
    source = kite.create_source("stripe", "stripe")
    listener = listen(kite, "--source", "stripe")
    team_id = kite.team_id()
    wait_until_streaming(listener, lambda marker: kite.post_stripe(team_id, source, marker))

    line = assert_pushed_within_a_second(kite, listener, source, "evt_embedded")

    assert_valid_stripe_cloudevent(line, kite, "evt_embedded")
    assert (kite.data_dir / "kite.sqlite3").exists()
    wait_for(lambda: (kite.data_dir / "celery-broker.sqlite3").exists(), 10, "the SQLAlchemy broker database")
    assert kite.stop(signal.SIGINT) == 0  # Ctrl-C stops web, worker and beat


def test_listen_stops_with_the_servers_reason_when_the_stream_is_refused(shared_kite, listen):
    bad_cursor = listen(shared_kite, "--after", "banana")
    bad_key = listen(shared_kite, "--after", "0-0", api_key="kite_ak_not-a-key")

    for listener, status, code in [(bad_cursor, 400, "bad_cursor"), (bad_key, 401, "not_authenticated")]:
        assert listener.wait_for_exit() == 2
        assert any(f"HTTP {status}" in line and code in line for line in listener.errors), listener.errors
