"""The benchmark baselines (kite/bench_endpoints.py): unauthenticated, so off unless KITE_BENCH_ENDPOINTS
is on, and loud at every start when it is.

The URLconf reads the setting once per process: the cases with it on start a fresh Python process, as
a real start does (tests/kite/test_settings.py does the same for bad values).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import RequestFactory

from ingest.models import Event
from kite import bench_endpoints
from tests.factories import SourceFactory

REPO = Path(__file__).resolve().parents[2]
PROBE = (
    "import django; django.setup(); from django.urls import Resolver404, resolve\n"
    "for path in ('/bench/noop', '/bench/bare/tm_x/stripe'):\n"
    "    try:\n"
    "        print(path, resolve(path).func.__module__)\n"
    "    except Resolver404:\n"
    "        print(path, 'not mounted')\n"
)
WARNING = "KITE_BENCH_ENDPOINTS is on"


def start(tmp_path, **variables) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KITE_")}
    env.update(DJANGO_SETTINGS_MODULE="kite.settings", KITE_DATA_DIR=str(tmp_path / "data"), **variables)
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_off_by_default_nothing_mounted_and_no_warning(tmp_path):
    started = start(tmp_path)

    assert started.returncode == 0, started.stderr
    assert started.stdout.splitlines() == ["/bench/noop not mounted", "/bench/bare/tm_x/stripe not mounted"]
    assert WARNING not in started.stderr


def test_on_mounts_the_plain_views_and_warns_at_start(tmp_path):
    started = start(tmp_path, KITE_BENCH_ENDPOINTS="on")

    assert started.returncode == 0, started.stderr
    assert started.stdout.splitlines() == [
        "/bench/noop kite.bench_endpoints",
        "/bench/bare/tm_x/stripe kite.bench_endpoints",
    ]
    assert WARNING in started.stderr
    assert "no signature check" in started.stderr


@pytest.mark.parametrize("path", ["/bench/noop", "/bench/bare/{team}/{source}"])
def test_off_a_post_is_404_and_stores_nothing(db, client, path):
    source = SourceFactory()

    answer = client.post(path.format(team=source.team_id, source=source.name), b"{}", content_type="application/json")

    assert answer.status_code == 404
    assert not Event.objects.exists()


@pytest.mark.django_db(transaction=True)  # the view INSERTs in autocommit, as served
def test_bare_stores_one_event_of_the_named_source():
    source = SourceFactory()
    request = RequestFactory().post("/bench/bare/x/y", b'{"id": "evt_1"}', content_type="application/json")

    answer = bench_endpoints.bare(request, source.team_id, source.name)

    assert answer.status_code == 202
    stored = Event.objects.get()
    assert (stored.team_id, stored.source_id, stored.data) == (source.team_id, source.pk, '{"id": "evt_1"}')


@pytest.mark.django_db(transaction=True)
def test_bare_refuses_other_methods_and_unknown_sources():
    source = SourceFactory()
    factory = RequestFactory()

    assert bench_endpoints.bare(factory.get("/"), source.team_id, source.name).status_code == 405
    assert bench_endpoints.bare(factory.post("/", b"{}", content_type="application/json"), source.team_id,
                                "no-such-source").status_code == 404  # fmt: skip
    assert not Event.objects.exists()
