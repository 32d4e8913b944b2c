"""Operational surfaces: /healthz says ok or not and nothing more, /metrics needs a token or a caller on
this machine, cookies and HSTS follow HTTPS, and proxy headers are believed from KITE_TRUSTED_PROXIES only."""

import asyncio
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families
from uvicorn import Config
from uvicorn.main import main as uvicorn_cli

from federation import metrics as federation_metrics
from kite import metrics, services
from kite.management.commands.runkite import Command, proxy_header_args
from kite.models import Membership

REPO = Path(__file__).resolve().parents[2]
TOKEN = "metrics-token-0123456789abcdef"
PEER_NAME, SOURCE_NAME = "acme-payroll-peer", "acme-payroll-hooks"  # what an outsider must not learn


# --- /healthz -----------------------------------------------------------------------------


def test_healthz_says_ok(client, db):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"ok": True, "instance_id": django_settings.KITE_INSTANCE_ID}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


def test_healthz_with_the_database_gone_says_503_and_keeps_the_reason_in_the_log(transactional_db, client, caplog):
    port = str(_closed_port())
    original = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = port
    try:
        with caplog.at_level(logging.ERROR, logger="kite.api.views"):
            response = client.get("/healthz")
    finally:
        connection.settings_dict["PORT"] = original
        connection.close()

    assert response.status_code == 503 and response["Retry-After"] == "5"
    assert response.json() == {"ok": False, "detail": "The database is unavailable.", "code": "unavailable"}
    logged = caplog.text
    assert "health check failed" in logged and port in logged  # psycopg's own words, for the operator
    for internal in (port, "127.0.0.1", "psycopg", "Operational", "connection", "refused"):
        assert internal not in response.content.decode()
    assert client.get("/healthz").status_code == 200  # back once the database is


# --- /metrics -------------------------------------------------------------------------------


@pytest.fixture
def named_series(db):
    """Series whose label values name a team's peer and source, as real traffic leaves them."""
    metrics.EVENTS_INGESTED.labels(SOURCE_NAME, "accepted").inc()
    federation_metrics.CALLS.labels(PEER_NAME, "inbound", "ok").inc()


def _kite_samples(response) -> dict:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
        if sample.name.startswith("kite_")
    }


def _reveals_nothing(response) -> bool:
    body = response.content.decode()
    return PEER_NAME not in body and SOURCE_NAME not in body and "kite_" not in body


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token-0123456789", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer", ""],
)
def test_metrics_with_a_token_set_refuses_a_missing_or_wrong_one_from_anywhere(named_series, settings, authorization):
    settings.KITE_METRICS_TOKEN = TOKEN
    headers = {} if authorization is None else {"HTTP_AUTHORIZATION": authorization}
    before = _kite_samples(Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}"))

    refused = Client(REMOTE_ADDR="127.0.0.1").get("/metrics", **headers)

    assert refused.status_code == 401 and refused["WWW-Authenticate"] == 'Bearer realm="kite-metrics"'
    assert refused.json() == {"detail": "A valid metrics token is required.", "code": "not_authenticated"}
    assert _reveals_nothing(refused)
    assert _kite_samples(Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")) == before


def test_metrics_with_the_right_token_are_served_to_any_address(named_series, settings):
    settings.KITE_METRICS_TOKEN = TOKEN

    response = Client(REMOTE_ADDR="203.0.113.7").get("/metrics", HTTP_AUTHORIZATION=f"bearer {TOKEN}")

    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    samples = _kite_samples(response)
    assert samples[("kite_events_ingested_total", (("outcome", "accepted"), ("source", SOURCE_NAME)))] >= 1
    assert samples[("kite_federation_calls_total", (("direction", "inbound"), ("outcome", "ok"), ("peer", PEER_NAME)))] >= 1


@pytest.mark.parametrize("remote_addr", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_metrics_without_a_token_are_served_to_loopback_callers(named_series, settings, remote_addr):
    settings.KITE_METRICS_TOKEN = ""

    response = Client(REMOTE_ADDR=remote_addr).get("/metrics")

    assert response.status_code == 200 and SOURCE_NAME in response.content.decode()


@pytest.mark.parametrize(
    "remote_addr, headers",
    [
        ("203.0.113.7", {}),
        ("10.0.0.5", {}),
        ("::ffff:198.51.100.1", {}),
        ("", {}),
        ("not-an-address", {}),
        # A proxy on this machine relays someone else: its request comes from loopback, with these.
        ("127.0.0.1", {"HTTP_X_FORWARDED_FOR": "203.0.113.7"}),
        ("127.0.0.1", {"HTTP_FORWARDED": "for=203.0.113.7"}),
        ("127.0.0.1", {"HTTP_X_REAL_IP": "203.0.113.7"}),
        ("::1", {"HTTP_X_FORWARDED_FOR": "127.0.0.1"}),
    ],
)
def test_metrics_without_a_token_are_refused_to_everyone_else(named_series, settings, remote_addr, headers):
    settings.KITE_METRICS_TOKEN = ""
    before = _kite_samples(Client().get("/metrics"))

    refused = Client(REMOTE_ADDR=remote_addr).get("/metrics", **headers)

    assert refused.status_code == 403 and refused.json()["code"] == "permission_denied"
    assert "KITE_METRICS_TOKEN" in refused.json()["detail"] and _reveals_nothing(refused)
    assert _kite_samples(Client().get("/metrics")) == before


# --- cookies and HSTS ------------------------------------------------------------------------


def test_login_cookies_are_secure_httponly_and_lax_over_https(team, settings):
    assert settings.SESSION_COOKIE_SECURE and settings.CSRF_COOKIE_SECURE  # KITE_TLS=on, the default
    user = get_user_model().objects.create_user("ada", password="correct horse")
    services.membership_add(team=team, user=user, role=Membership.Role.ADMIN)
    browser = Client(enforce_csrf_checks=True)

    form = browser.get("/login/", secure=True)
    csrf = form.cookies["csrftoken"]
    logged_in = browser.post("/login/", {"username": "ada", "password": "correct horse",
                                         "csrfmiddlewaretoken": csrf.value}, secure=True,
                             HTTP_REFERER="https://testserver/login/")  # fmt: skip

    assert logged_in.status_code == 302, logged_in.content
    session = logged_in.cookies["sessionid"]
    assert (session["secure"], session["httponly"], session["samesite"]) == (True, True, "Lax")
    assert (csrf["secure"], csrf["samesite"]) == (True, "Lax")


def test_hsts_is_sent_over_https_when_set_and_a_client_cannot_claim_https(client, db, settings):
    settings.SECURE_HSTS_SECONDS = 31536000
    assert "django.middleware.security.SecurityMiddleware" in settings.MIDDLEWARE

    assert client.get("/healthz", secure=True)["Strict-Transport-Security"] == "max-age=31536000"
    assert "Strict-Transport-Security" not in client.get("/healthz")
    # No SECURE_PROXY_SSL_HEADER: the scheme is uvicorn's, which believes X-Forwarded-Proto from trusted proxies only.
    assert "Strict-Transport-Security" not in client.get("/healthz", HTTP_X_FORWARDED_PROTO="https")


def test_hsts_is_off_by_default(client, db, settings):
    assert settings.SECURE_HSTS_SECONDS == 0
    assert "Strict-Transport-Security" not in client.get("/healthz", secure=True)


# --- settings from the environment --------------------------------------------------------------

PROBE = (
    "import django; django.setup(); from django.conf import settings as s; "
    "print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS, ','.join(s.KITE_TRUSTED_PROXIES) or '-',"
    " bool(s.KITE_METRICS_TOKEN), s.SESSION_COOKIE_HTTPONLY, s.SESSION_COOKIE_SAMESITE)"
)


def _start(tmp_path, **variables) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KITE_")}
    env.update(DJANGO_SETTINGS_MODULE="kite.settings", KITE_DATA_DIR=str(tmp_path / "data"), **variables)
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "variables, expected",
    [
        ({}, "True True 0 - False True Lax"),
        ({"KITE_TLS": "off"}, "False False 0 - False True Lax"),
        ({"KITE_TLS": "off", "KITE_PUBLIC_URL": "https://kite.example.com"}, "True True 0 - False True Lax"),
        ({"KITE_HSTS_SECONDS": "31536000"}, "True True 31536000 - False True Lax"),
        ({"KITE_TRUSTED_PROXIES": " 10.0.0.1, 192.168.0.0/16,,::1 "},
         "True True 0 10.0.0.1/32,192.168.0.0/16,::1/128 False True Lax"),
        ({"KITE_METRICS_TOKEN": TOKEN}, "True True 0 - True True Lax"),
        ({"KITE_METRICS_TOKEN": "  "}, "True True 0 - False True Lax"),
    ],
)
def test_operational_settings_are_read(tmp_path, variables, expected):
    started = _start(tmp_path, **variables)

    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == expected


@pytest.mark.parametrize(
    "variable, value",
    [
        ("KITE_HSTS_SECONDS", "a year"),
        ("KITE_HSTS_SECONDS", "-1"),
        ("KITE_TRUSTED_PROXIES", "*"),
        ("KITE_TRUSTED_PROXIES", "proxy.internal"),
        ("KITE_TRUSTED_PROXIES", "10.0.0.1/8"),  # host bits set: 10.0.0.0/8 or 10.0.0.1/32?
        ("KITE_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("KITE_TRUSTED_PROXIES", "127.0.0.1;10.0.0.1"),
        ("KITE_METRICS_TOKEN", "too-short"),
        ("KITE_METRICS_TOKEN", "has a space in it, long enough"),
    ],
)
def test_bad_operational_values_stop_kite_naming_the_variable(tmp_path, variable, value):
    started = _start(tmp_path, **{variable: value})

    assert started.returncode != 0
    assert "ImproperlyConfigured" in started.stderr and variable in started.stderr.splitlines()[-1]
    if variable == "KITE_METRICS_TOKEN":
        assert value not in started.stderr  # a near-miss token is still a secret


# --- proxy headers: what uvicorn makes of runkite's arguments -------------------------------------


def _uvicorn_view(trusted: list[str], client: str, headers: list[tuple[bytes, bytes]], settings) -> tuple[str, str]:
    """(client address, scheme) the app sees behind uvicorn started with runkite's web command."""
    settings.KITE_TRUSTED_PROXIES, settings.KITE_TLS = trusted, False
    argv = Command()._web_command()
    params = uvicorn_cli.make_context("uvicorn", argv[3:]).params
    seen = {}

    async def app(scope, receive, send):
        seen.update(client=scope["client"][0], scheme=scope["scheme"])

    config = Config(app, proxy_headers=params["proxy_headers"], forwarded_allow_ips=params["forwarded_allow_ips"],
                    log_config=None)  # fmt: skip
    config.load()
    scope = {"type": "http", "scheme": "http", "client": (client, 50000), "headers": headers, "method": "GET",
             "path": "/", "http_version": "1.1", "query_string": b"", "asgi": {"version": "3.0"}}  # fmt: skip
    asyncio.run(config.loaded_app(scope, None, None))
    return seen["client"], seen["scheme"]


FORWARDED = [(b"x-forwarded-for", b"10.1.2.3"), (b"x-forwarded-proto", b"https")]


def test_runkite_passes_the_trusted_proxies_to_uvicorn():
    assert proxy_header_args([]) == ["--no-proxy-headers"]
    assert proxy_header_args(["127.0.0.1/32", "10.0.0.0/8"]) == [
        "--proxy-headers", "--forwarded-allow-ips", "127.0.0.1/32,10.0.0.0/8"]  # fmt: skip


def test_without_trusted_proxies_no_client_sets_its_address_or_scheme_not_even_loopback(settings, monkeypatch):
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")  # uvicorn's own knobs must not reopen it
    monkeypatch.setenv("UVICORN_PROXY_HEADERS", "true")

    assert _uvicorn_view([], "127.0.0.1", FORWARDED, settings) == ("127.0.0.1", "http")
    assert _uvicorn_view([], "203.0.113.7", FORWARDED, settings) == ("203.0.113.7", "http")


def test_a_trusted_proxy_sets_the_real_client_and_scheme(settings):
    assert _uvicorn_view(["127.0.0.1/32"], "127.0.0.1", FORWARDED, settings) == ("10.1.2.3", "https")
    # A CIDR: the rightmost address no trusted proxy owns is the client (one it appended, not a forged one).
    chain = [(b"x-forwarded-for", b"198.51.100.9, 203.0.113.7, 10.0.0.5")]
    assert _uvicorn_view(["10.0.0.0/8"], "10.20.30.40", chain, settings) == ("203.0.113.7", "http")


def test_an_untrusted_client_behind_trusted_proxies_cannot_set_its_address_or_scheme(settings):
    assert _uvicorn_view(["127.0.0.1/32"], "203.0.113.7", FORWARDED, settings) == ("203.0.113.7", "http")
    assert _uvicorn_view(["10.0.0.0/8"], "192.168.1.1", FORWARDED, settings) == ("192.168.1.1", "http")
