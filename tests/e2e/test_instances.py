"""Two Kite instances side by side: each serves on its own port, data dir, database and identity; nothing crosses."""

import secrets

import pytest

pytestmark = pytest.mark.e2e


def test_two_instances_serve_side_by_side_and_stay_isolated(shared_kite, instances, listen):
    first, second = shared_kite, instances.start("second")
    source = f"iso-{secrets.token_hex(3)}"
    for kite in (first, second):
        kite.create_source(source, "none")
    first_team, second_team = first.team_id(), second.team_id()
    first_listener = listen(first, "--source", source, "--from-start")
    second_listener = listen(second, "--source", source, "--from-start")

    assert first.api("GET", "/api/me").json()["instance_id"] == first.instance_id
    assert second.api("GET", "/api/me").json()["instance_id"] == second.instance_id
    assert first.instance_id != second.instance_id and first.port != second.port
    assert first.cert.read_bytes() != second.cert.read_bytes()
    for kite, team_id, event_id in [(first, first_team, "a-1"), (second, second_team, "b-1")]:
        assert kite.post_plain(team_id, source, event_id).status_code == 202
    # The later events are sentinels: had the other instance's event leaked in, it would be printed first.
    for kite, team_id, event_id in [(second, second_team, "b-2"), (first, first_team, "a-2")]:
        assert kite.post_plain(team_id, source, event_id).status_code == 202
    first_listener.wait_for_ids(["a-2"])
    second_listener.wait_for_ids(["b-2"])

    assert first_listener.ids() == ["a-1", "a-2"]
    assert second_listener.ids() == ["b-1", "b-2"]
    assert all(e["source"].startswith(f"kite://{first.instance_id}/") for e in first_listener.events)
    assert all(e["source"].startswith(f"kite://{second.instance_id}/") for e in second_listener.events)


def test_one_instances_key_team_and_certificate_are_refused_by_the_other(shared_kite, instances, listen):
    first, second = shared_kite, instances.start("stranger")

    assert second.api("GET", "/api/me", api_key=first.admin_key).status_code == 401
    assert second.post_plain(first.team_id(), "kite", "lost").status_code == 404
    stranger = listen(second, "--after", "0-0", api_key=first.admin_key)
    impostor = listen(second, ca_file=first.cert)  # the other instance's self-signed certificate

    for listener, reason in [(stranger, "HTTP 401"), (impostor, "TLS")]:
        assert listener.wait_for_exit() == 2
        assert any(reason in line for line in listener.errors), listener.errors
