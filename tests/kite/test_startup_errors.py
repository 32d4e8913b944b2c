"""Kite refuses to start on a bad setting with one line that names it, never a traceback:
`manage.py runkite` as `make run` starts it, in a fresh process with a data dir of its own.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from kite import tls

REPO = Path(__file__).resolve().parents[2]


def run(tmp_path, *argv: str, data_dir: Path | None = None, **variables) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KITE_")}
    for name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY"):
        env.pop(name, None)  # the embedded defaults, as `make run` on a fresh clone
    env.update(KITE_DATA_DIR=str(data_dir or tmp_path / "data"), **variables)
    return subprocess.run([sys.executable, "manage.py", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def one_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    """The refusal: exit status 1, nothing but one line on stderr that says each expected text."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"KITE_PORT": "abc"}, ["KITE_PORT", "'abc'"]),
        ({"KITE_PORT": "70000"}, ["KITE_PORT", "1-65535"]),
        ({"KITE_PORT": "-1"}, ["KITE_PORT"]),
        ({"KITE_ENCRYPTION_KEYS": "not-a-key"}, ["KITE_ENCRYPTION_KEYS", "key #1"]),
        ({"KITE_ENCRYPTION_KEYS": f"{Fernet.generate_key().decode()},short"}, ["KITE_ENCRYPTION_KEYS", "key #2"]),
    ],
)
def test_a_bad_variable_stops_runkite_with_one_line_naming_it(tmp_path, variables, expected):
    line = one_line(run(tmp_path, "runkite", **variables), *expected)

    assert line.startswith("kite: ")
    assert not (tmp_path / "data" / "kite.sqlite3").exists()  # stopped before anything was set up


def test_a_broken_key_file_is_named_with_the_variable(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "encryption-keys").write_text("garbage\n")

    one_line(run(tmp_path, "runkite"), "KITE_ENCRYPTION_KEYS", str(tmp_path / "data" / "encryption-keys"))


def test_any_command_reports_a_bad_setting_in_one_line(tmp_path):
    one_line(run(tmp_path, "peers", KITE_PORT="eighty"), "KITE_PORT")


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> Path:
    """A data dir set up once (migrated and bootstrapped) for the cases that get past the settings."""
    data_dir = tmp_path_factory.mktemp("migrated") / "data"
    done = run(data_dir.parent, "migrate", "-v0", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    return data_dir


def test_an_unusable_tls_key_stops_runkite_with_one_line(tmp_path, migrated):
    tls_dir = migrated / "tls"
    tls.ensure_server_certificate(tls_dir, ["127.0.0.1"])
    good_key = (tls_dir / "key.pem").read_bytes()
    (tls_dir / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    try:
        line = one_line(run(tmp_path, "runkite", "--no-setup", data_dir=migrated, KITE_PORT=str(free_port())),
                        "KITE_TLS", str(tls_dir))  # fmt: skip
    finally:
        (tls_dir / "key.pem").write_bytes(good_key)
    assert "key.pem" in line


def test_a_port_in_use_stops_runkite_with_one_line_instead_of_restarting_web_forever(tmp_path, migrated):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(tmp_path, "runkite", "--no-setup", data_dir=migrated, KITE_PORT=str(port))

    one_line(result, "KITE_PORT", f"127.0.0.1:{port}")
