"""docker/compose.yaml must match what settings read and what the code runs."""

import re
from pathlib import Path

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
