"""The fleet's settings fail at start naming the variable (README "Configuration")."""

import pytest

from tests.kite.test_settings import start

BAD_VALUES = [
    ({"KITE_AGENT_OFFLINE_SECONDS": "soon"}, "KITE_AGENT_OFFLINE_SECONDS"),
    ({"KITE_AGENT_OFFLINE_SECONDS": "10"}, "KITE_AGENT_OFFLINE_SECONDS"),  # below a listener's re-announcement
    ({"KITE_FLEET_PEER_TIMEOUT_SECONDS": "0"}, "KITE_FLEET_PEER_TIMEOUT_SECONDS"),
    ({"KITE_FLEET_PEER_TIMEOUT_SECONDS": "2s"}, "KITE_FLEET_PEER_TIMEOUT_SECONDS"),
    ({"KITE_FLEET_PEER_TIMEOUT_SECONDS": "5", "KITE_FLEET_DEADLINE_SECONDS": "4"}, "KITE_FLEET_DEADLINE_SECONDS"),
    ({"KITE_FLEET_REFRESH_SECONDS": "0"}, "KITE_FLEET_REFRESH_SECONDS"),
]


@pytest.mark.parametrize(("variables", "name"), BAD_VALUES, ids=[name for _, name in BAD_VALUES])
def test_a_bad_fleet_setting_fails_at_start_naming_the_variable(tmp_path, variables, name):
    started = start(tmp_path, **variables)

    assert started.returncode != 0
    last_line = started.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured:") and name in last_line, started.stderr


def test_the_fleet_defaults_start(tmp_path):
    started = start(tmp_path, KITE_AGENT_OFFLINE_SECONDS="120", KITE_FLEET_PEER_TIMEOUT_SECONDS="1.5")

    assert started.returncode == 0, started.stderr
