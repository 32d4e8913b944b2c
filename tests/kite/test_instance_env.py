"""`manage.py --data-dir DIR <command>` acts on the instance that runs from DIR, whatever the shell's
Kite variables say; runkite's record of its variables (DIR/instance.env) never holds the keys."""

import os
import stat
import subprocess
import sys
from pathlib import Path

from kite import instance_env

REPO = Path(__file__).resolve().parents[2]
PROBE = ("from django.conf import settings as s; print(s.KITE_DATA_DIR, s.KITE_PORT, s.KITE_INSTANCE_ID, "
         "s.KITE_PUBLIC_URL, s.DATABASES['default']['NAME'], s.KITE_PEER_ALLOWED_NETWORKS)")  # fmt: skip


def manage(*argv: str, **variables) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not instance_env.is_kite_variable(key)}
    env.update(variables)
    return subprocess.run([sys.executable, "manage.py", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_the_record_holds_the_kite_variables_but_never_the_keys(tmp_path):
    environ = {"KITE_PORT": "9444", "KITE_INSTANCE_ID": "kite-b", "DATABASE_URL": "sqlite:////x.db", "PATH": "/bin",
               "KITE_ENCRYPTION_KEYS": "k1,k2", "SECRET_KEY": "s", "KITE_METRICS_TOKEN": "t" * 16}  # fmt: skip

    path = instance_env.record(tmp_path, environ)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert instance_env.read(path) == {"KITE_PORT": "9444", "KITE_INSTANCE_ID": "kite-b",
                                       "DATABASE_URL": "sqlite:////x.db", "KITE_DATA_DIR": str(tmp_path)}  # fmt: skip


def test_a_database_url_with_a_password_is_named_not_recorded_and_taken_from_the_callers_environment(tmp_path):
    secret_url = "postgres://kite:hunter2@db.internal/kite"
    path = instance_env.record(tmp_path, {"DATABASE_URL": secret_url, "REDIS_URL": "redis://127.0.0.1:6379/0"})

    assert "hunter2" not in path.read_text() and "# DATABASE_URL: not recorded" in path.read_text()
    environ = {"DATABASE_URL": secret_url, "REDIS_URL": "redis://other:6379/1", "KITE_PORT": "1"}
    argv = instance_env.apply_data_dir_option(["manage.py", "--data-dir", str(tmp_path), "peers"], environ)
    assert argv == ["manage.py", "peers"]
    assert environ == {"DATABASE_URL": secret_url, "REDIS_URL": "redis://127.0.0.1:6379/0",
                       "KITE_DATA_DIR": str(tmp_path)}  # fmt: skip


def test_data_dir_replaces_the_shells_kite_variables_with_the_instances(tmp_path):
    first, second = tmp_path / "var", tmp_path / "var-b"
    first.mkdir()
    second.mkdir()
    instance_env.record(second, {"KITE_PORT": "9444", "KITE_INSTANCE_ID": "kite-b",
                                 "KITE_PEER_ALLOWED_NETWORKS": "127.0.0.0/8"})  # fmt: skip
    shell = {"KITE_DATA_DIR": str(first), "KITE_PORT": "8443", "KITE_INSTANCE_ID": "kite-a",
             "KITE_PUBLIC_URL": "https://a.example", "DATABASE_URL": f"sqlite:///{first}/kite.sqlite3"}  # fmt: skip

    as_first = manage("shell", "-v", "0", "-c", PROBE, **shell)
    as_second = manage("--data-dir", str(second), "shell", "-v", "0", "-c", PROBE, **shell)

    assert as_first.returncode == 0, as_first.stderr
    assert as_first.stdout.split()[:4] == [str(first), "8443", "kite-a", "https://a.example"]
    assert as_second.returncode == 0, as_second.stderr
    data_dir, port, instance_id, public_url, database, networks = as_second.stdout.split(maxsplit=5)
    assert (data_dir, port, instance_id, public_url) == (str(second), "9444", "kite-b", "https://127.0.0.1:9444")
    assert database == str(second / "kite.sqlite3") and "127.0.0.0/8" in networks


def test_data_dir_without_a_record_is_that_data_dir_with_defaults(tmp_path):
    (tmp_path / "var-c").mkdir()

    result = manage(f"--data-dir={tmp_path / 'var-c'}", "shell", "-v", "0", "-c", PROBE, KITE_PORT="8443",
                    KITE_INSTANCE_ID="kite-a")  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == [str(tmp_path / "var-c"), "8443", (tmp_path / "var-c" / "instance-id")
                                         .read_text().strip()]  # fmt: skip


def test_a_data_dir_that_does_not_exist_is_one_line(tmp_path):
    result = manage("--data-dir", str(tmp_path / "nope"), "peers")

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"kite: --data-dir: {tmp_path / 'nope'} is not a directory"]
