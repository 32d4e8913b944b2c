"""Bad environment values stop Kite at start, naming the variable (README "Configuration").

Each case starts a fresh Python process, as a real start does: settings are read once per process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parents[2]
PROBE = (
    "import django; django.setup(); from django.conf import settings; "
    "print(settings.KITE_PORT, settings.KITE_TLS, settings.DEBUG, settings.KITE_PUBLIC_URL)"
)


def start(tmp_path, remove=(), **variables) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KITE_") and key not in remove}
    data_dir = tmp_path / "data"  # fresh per test: nothing generated earlier can mask the failure
    env.update(DJANGO_SETTINGS_MODULE="kite.settings", KITE_DATA_DIR=str(data_dir), **variables)
    return subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_defaults_start_cleanly(tmp_path):
    started = start(tmp_path, remove=("DATABASE_URL", "REDIS_URL"))

    assert started.returncode == 0, started.stderr
    assert started.stdout.split() == ["8443", "True", "False", "https://127.0.0.1:8443"]
    assert (tmp_path / "data" / "instance-id").exists()


def test_valid_values_are_read(tmp_path):
    started = start(tmp_path, KITE_PORT="9000", KITE_TLS="OFF", KITE_DEBUG="yes", KITE_HOST="kite.local")

    assert started.returncode == 0, started.stderr
    assert started.stdout.split() == ["9000", "False", "True", "http://kite.local:9000"]


_KEY = Fernet.generate_key().decode()  # a good key beside a bad one (named <key> in the test ids)

BAD_VALUES = [
    ({"KITE_PORT": "abc"}, "KITE_PORT"),
    ({"KITE_PORT": "0"}, "KITE_PORT"),
    ({"KITE_PORT": "70000"}, "KITE_PORT"),
    ({"KITE_TLS": "maybe"}, "KITE_TLS"),
    ({"KITE_DEBUG": "maybe"}, "KITE_DEBUG"),
    ({"KITE_BENCH_ENDPOINTS": "sure"}, "KITE_BENCH_ENDPOINTS"),
    ({"DATABASE_URL": "mysql://kite:pw@127.0.0.1/kite"}, "DATABASE_URL"),
    ({"DATABASE_URL": "no-scheme-at-all"}, "DATABASE_URL"),
    ({"DATABASE_URL": "postgres://kite@127.0.0.1:port/kite"}, "DATABASE_URL"),
    ({"KITE_INSTANCE_ID": "bad id"}, "KITE_INSTANCE_ID"),
    ({"KITE_INSTANCE_ID": "x" * 64}, "KITE_INSTANCE_ID"),
    ({"REDIS_URL": "http://x"}, "REDIS_URL"),
    ({"KITE_PUBLIC_URL": "ftp://kite.example.com"}, "KITE_PUBLIC_URL"),
    ({"KITE_PUBLIC_URL": "kite.example.com"}, "KITE_PUBLIC_URL"),
    ({"KITE_MAX_BODY_BYTES": "0"}, "KITE_MAX_BODY_BYTES"),
    ({"KITE_MAX_BODY_BYTES": "1MB"}, "KITE_MAX_BODY_BYTES"),
    ({"KITE_WEB_WORKERS": "0"}, "KITE_WEB_WORKERS"),
    ({"KITE_WSGI_THREADS": "many"}, "KITE_WSGI_THREADS"),
    ({"KITE_EVENT_RETENTION_DAYS": "-1"}, "KITE_EVENT_RETENTION_DAYS"),
    ({"KITE_EVENT_RETENTION_DAYS": "week"}, "KITE_EVENT_RETENTION_DAYS"),
    ({"KITE_DB_CONN_MAX_AGE": "forever"}, "KITE_DB_CONN_MAX_AGE"),
    ({"KITE_DB_PREPARE_THRESHOLD": "-1"}, "KITE_DB_PREPARE_THRESHOLD"),
    ({"KITE_DB_PREPARE_THRESHOLD": "soon"}, "KITE_DB_PREPARE_THRESHOLD"),
    ({"KITE_ENCRYPTION_KEYS": "not-a-fernet-key"}, "KITE_ENCRYPTION_KEYS"),
    ({"KITE_ENCRYPTION_KEYS": f"{_KEY},short"}, "KITE_ENCRYPTION_KEYS"),
    ({"KITE_ENCRYPTION_KEYS": " , "}, "KITE_ENCRYPTION_KEYS"),
    ({"KITE_LOG_LEVEL": "LOUD"}, "KITE_LOG_LEVEL"),
]


@pytest.mark.parametrize(("variables", "name"), BAD_VALUES, ids=[f"{n}={list(v.values())[0]}".replace(_KEY, "<key>") for v, n in BAD_VALUES])
def test_bad_value_fails_at_start_naming_the_variable(tmp_path, variables, name):
    started = start(tmp_path, **variables)

    assert started.returncode != 0
    last_line = started.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured:"), started.stderr
    assert name in last_line


def test_several_web_workers_without_redis_fail_at_start(tmp_path):
    started = start(tmp_path, remove=("REDIS_URL",), KITE_WEB_WORKERS="2")

    assert started.returncode != 0
    assert "ImproperlyConfigured" in started.stderr and "KITE_WEB_WORKERS" in started.stderr
    assert "REDIS_URL" in started.stderr.strip().splitlines()[-1]


def test_several_web_workers_with_redis_start(tmp_path):
    started = start(tmp_path, KITE_WEB_WORKERS="2", REDIS_URL="redis://127.0.0.1:6379/0")

    assert started.returncode == 0, started.stderr


def test_bad_encryption_key_error_does_not_print_the_key(tmp_path):
    good = Fernet.generate_key().decode()
    started = start(tmp_path, KITE_ENCRYPTION_KEYS=f"{good},wrong-key-value")

    assert started.returncode != 0
    assert good not in started.stderr and "wrong-key-value" not in started.stderr
