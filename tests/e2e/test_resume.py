"""`kite listen` resumes after the last event it printed: across a server restart, and when itself restarted."""

import signal

import pytest
import requests

from tests.e2e.harness import cursor_key

pytestmark = pytest.mark.e2e


def post_all(kite, team_id, source, event_ids):
    for event_id in event_ids:
        response = kite.post_stripe(team_id, source, event_id)
        assert response.status_code == 202, response.text


def test_listener_reconnects_across_a_server_restart_and_prints_each_event_once_in_order(instances, listen):
    kite = instances.start("restart")
    source = kite.create_source("stripe", "stripe")
    team_id = kite.team_id()
    listener = listen(kite, "--source", "stripe", "--from-start")
    before = [f"before-{n}" for n in range(3)]
    during = [f"during-{n}" for n in range(3)]
    after = [f"after-{n}" for n in range(3)]

    post_all(kite, team_id, source, before)
    listener.wait_for_ids(before)
    assert kite.stop(signal.SIGINT) == 0  # Ctrl-C
    with pytest.raises(requests.ConnectionError):
        kite.post_stripe(team_id, source, during[0])  # down: the provider will retry later
    kite.start()
    post_all(kite, team_id, source, during)  # the provider's retries, while the listener is still away
    listener.wait_for_stderr("reconnected")
    post_all(kite, team_id, source, after)
    listener.wait_for_ids(after)

    assert listener.ids() == before + during + after
    keys = [cursor_key(event) for event in listener.events]
    assert keys == sorted(set(keys))
    assert listener.process.poll() is None


def test_restarted_listener_resumes_after_its_last_printed_cursor(instances, listen):
    kite = instances.start("relisten")
    source = kite.create_source("stripe", "stripe")
    team_id = kite.team_id()
    first = listen(kite, "--source", "stripe", "--from-start")
    seen = [f"seen-{n}" for n in range(3)]
    missed = [f"missed-{n}" for n in range(3)]
    live = [f"live-{n}" for n in range(2)]

    post_all(kite, team_id, source, seen)
    first.wait_for_ids(seen)
    first.stop(signal.SIGKILL)
    last_cursor = first.events[-1]["kitecursor"]
    post_all(kite, team_id, source, missed)
    second = listen(kite, "--source", "stripe", "--after", last_cursor)
    second.wait_for_ids(missed)
    post_all(kite, team_id, source, live)
    second.wait_for_ids(live)

    assert first.ids() == seen
    assert second.ids() == missed + live
    assert cursor_key(second.events[0]) > cursor_key(first.events[-1])
