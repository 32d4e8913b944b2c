"""deploy/systemd: units that systemd accepts without a warning, restart what exits, and sandbox Kite
(systemd-analyze from Debian's systemd package; no running systemd needed)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
INSTALL_DIR = "/opt/kite"  # where the units expect the checkout (its virtualenv in .venv)
DATA_DIR = "/var/lib/kite"
NAMES = ["kite-web.service", "kite-worker@.service", "kite-beat.service"]


def systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing: apt-get install systemd"
    return subprocess.run(["systemd-analyze", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def installed(tmp_path) -> Path:
    """The units as installed from this checkout: verify checks that every ExecStart= program exists."""
    for name in NAMES:
        (tmp_path / name).write_text((UNITS / name).read_text().replace(INSTALL_DIR, str(ROOT)))
    return tmp_path


def settings_of(name: str) -> dict[str, list[str]]:
    """`Section.Key` → values, in order (systemd allows a key more than once)."""
    found, section = {}, ""
    for line in (UNITS / name).read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(f"{section}.{key}", []).append(value)
    return found


def test_deploy_holds_exactly_the_three_units():
    assert sorted(path.name for path in UNITS.iterdir()) == sorted(NAMES)


def test_systemd_verifies_every_unit_without_a_warning(installed):
    result = systemd_analyze("verify", "kite-web.service", "kite-worker@1.service", "kite-beat.service", cwd=installed)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""  # an unknown or misspelt key is only a warning


def test_verify_would_catch_a_misspelt_key_and_a_missing_program(installed):
    unit = (installed / "kite-beat.service").read_text()
    broken = unit.replace("NoNewPrivileges=", "NoNewPrivilege=")
    broken = broken.replace(f"{ROOT}/.venv/bin/celery", "/nonexistent/celery")
    (installed / "kite-broken.service").write_text(broken)
    result = systemd_analyze("verify", "kite-broken.service", cwd=installed)
    assert result.returncode != 0 and "NoNewPrivilege" in result.stderr and "/nonexistent/celery" in result.stderr


@pytest.mark.parametrize("name", NAMES)
def test_every_unit_restarts_its_process_for_good_with_settings_from_an_environment_file(name):
    unit = settings_of(name)
    assert unit["Service.Restart"] == ["always"]
    assert re.fullmatch(r"\d+s", unit["Service.RestartSec"][0])
    assert unit["Unit.StartLimitIntervalSec"] == ["0"]  # systemd would otherwise stop after 5 quick failures
    assert unit["Service.EnvironmentFile"] == ["/etc/kite/kite.env"]
    assert unit["Service.Environment"] == [f"KITE_DATA_DIR={DATA_DIR}"]
    assert unit["Service.User"] == ["kite"]


@pytest.mark.parametrize("name", NAMES)
def test_every_unit_is_sandboxed_and_may_write_its_data_dir_only(name, installed):
    unit = settings_of(name)
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "ReadWritePaths": DATA_DIR}.items():  # fmt: skip
        assert unit[f"Service.{key}"] == [value], key
    instance = name.replace("@.", "@1.")
    result = systemd_analyze("security", "--offline=true", instance, cwd=installed)
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout).group(1))
    assert exposure <= 4.0, result.stdout  # systemd's scale: 10 is an unsandboxed root service


def test_the_units_run_what_compose_and_the_readme_run():
    def command(name):
        return settings_of(name)["Service.ExecStart"][0].split()

    assert command("kite-web.service")[:2] == [f"{INSTALL_DIR}/.venv/bin/python", "manage.py"]
    assert command("kite-web.service")[2:] == ["runkite", "--no-worker", "--no-beat"]
    assert command("kite-worker@.service")[:4] == [f"{INSTALL_DIR}/.venv/bin/celery", "-A", "kite", "worker"]
    assert "worker%i@%%h" in command("kite-worker@.service")  # one Celery node name per instance and host
    assert command("kite-beat.service")[:4] == [f"{INSTALL_DIR}/.venv/bin/celery", "-A", "kite", "beat"]
