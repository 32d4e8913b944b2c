"""docker/compose.yaml must match what settings read and what the code runs."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
SETTINGS_SOURCE = (ROOT / "kite" / "settings.py").read_text()


def test_compose_runs_postgres_redis_web_worker_beat():
    assert set(COMPOSE["services"]) == {"postgres", "redis", "web", "worker", "beat"}
    assert COMPOSE["services"]["worker"]["command"][:4] == ["celery", "-A", "kite", "worker"]
    assert COMPOSE["services"]["beat"]["command"][:4] == ["celery", "-A", "kite", "beat"]
    assert COMPOSE["services"]["web"]["command"][2] == "runkite"


def test_every_kite_variable_in_compose_is_read_by_settings():
    for name, service in COMPOSE["services"].items():
        for variable in (service.get("environment") or {}):
            if variable.startswith("POSTGRES_"):
                continue
            assert re.search(rf'"{variable}"', SETTINGS_SOURCE), f"{name}: {variable} is not read by settings"


def test_dockerfile_copies_every_app():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    for app in ("kite", "ingest", "federation", "fleet", "templates", "static"):
        assert f"COPY {app} ./{app}" in dockerfile


def _default(value: str) -> str:
    """What compose makes of `${NAME:-default}` when NAME is not set."""
    found = re.fullmatch(r"\$\{\w+:-(.*)\}", value)
    return found.group(1) if found else value


def test_plain_http_is_published_on_the_hosts_loopback_only():
    published = {name: service.get("ports", []) for name, service in COMPOSE["services"].items()}
    assert published.pop("web") == ["127.0.0.1:8000:8000"]  # the TLS proxy on the host is the way in
    assert not any(published.values()), published


def test_web_trusts_proxy_headers_from_the_gateway_its_proxy_comes_from_only():
    import ipaddress

    (network,) = COMPOSE["networks"]["default"]["ipam"]["config"]
    subnet, gateway = ipaddress.ip_network(_default(network["subnet"])), ipaddress.ip_address(_default(network["gateway"]))
    assert gateway in subnet
    web = COMPOSE["services"]["web"]["environment"]
    assert _default(web["KITE_TRUSTED_PROXIES"]) == str(gateway)
    assert web["KITE_TRUSTED_PROXIES"] == network["gateway"]  # one variable moves both
    for name in ("worker", "beat"):
        assert "KITE_TRUSTED_PROXIES" not in (COMPOSE["services"][name].get("environment") or {})


# --- supervision: restart policies and health checks ------------------------------------------------


def test_every_service_is_started_again_when_it_exits():
    for name, service in COMPOSE["services"].items():
        assert service.get("restart") in ("always", "unless-stopped"), f"{name} has no restart policy"


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _liveness_files() -> dict[str, str]:
    """The file each Celery service's health check reads, as the service's command makes it write it."""
    services = COMPOSE["services"]
    return {
        "worker": _option(services["worker"]["command"], "--liveness-file"),
        "beat": _option(services["beat"]["command"], "--schedule") + ".alive",  # kite.celery: <schedule>.alive
    }


def _check(service: str, liveness_file: Path) -> int:
    """Run the service's health check here, on `liveness_file` instead of the container's path."""
    import subprocess
    import sys

    kind, *argv = COMPOSE["services"][service]["healthcheck"]["test"]
    assert kind == "CMD" and argv[:2] == ["python", "-c"]
    code = argv[2]
    assert _liveness_files()[service] in code  # it reads the very file the service writes
    code = code.replace(_liveness_files()[service], str(liveness_file))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=10).returncode


@pytest.mark.parametrize("service", ["worker", "beat"])
def test_a_celery_service_is_healthy_while_its_liveness_file_is_fresh_only(service, tmp_path):
    import os
    import time

    alive = tmp_path / "alive"
    assert _check(service, alive) != 0  # never touched: not started, or never reached the broker
    alive.touch()
    assert _check(service, alive) == 0
    stale = time.time() - 45  # the worker touches it every 10 s, beat every second, while they work
    os.utime(alive, (stale, stale))
    assert _check(service, alive) != 0

