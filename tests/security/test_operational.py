"""Attacks on the operational surfaces of live instances (runkite over HTTPS on loopback): /metrics
without its token, /healthz with the database gone, cookies and HSTS, and forged X-Forwarded-For
against a grant restricted to a network.

Two instances for the module, on PostgreSQL + Redis: `plain` (KITE_METRICS_TOKEN and KITE_HSTS_SECONDS set, no
trusted proxy) and `proxied` (KITE_TRUSTED_PROXIES=127.0.0.1/32: the test plays the proxy)."""

import base64
import re
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg
import pytest
import requests

from federation import signing
from tests.e2e.conftest import Instances
from tests.e2e.harness import admin_url, wait_for

pytestmark = pytest.mark.e2e

TOKEN = secrets.token_urlsafe(24)
HSTS_SECONDS = 3600
SOURCE_NAME, PEER_NAME = "acme-payroll-hooks", "acme-payroll-peer"  # what /metrics must not tell an outsider
FLEET_PATH = "/api/federation/fleet/agents"
CLOSED_PEER_URL = "https://127.0.0.1:9/hooks/x/kite"  # a peer we never reach: only its name or secret matters


@pytest.fixture(scope="module")
def kites(tmp_path_factory):
    started = Instances(tmp_path_factory)
    try:
        plain, proxied = started.start_together(
            ("ops-plain", {"extra_env": {"KITE_METRICS_TOKEN": TOKEN, "KITE_HSTS_SECONDS": str(HSTS_SECONDS)}}),
            ("ops-proxied", {"extra_env": {"KITE_TRUSTED_PROXIES": "127.0.0.1/32"}}),
        )
        yield {"plain": plain, "proxied": proxied}
    finally:
        started.close()


def get(kite, path: str, **kwargs) -> requests.Response:
    return requests.get(kite.url + path, verify=str(kite.cert), timeout=10, allow_redirects=False, **kwargs)


def metrics(kite, **headers) -> requests.Response:
    return get(kite, "/metrics", headers=headers)


def ingested(response: requests.Response) -> str:
    found = re.search(rf'^kite_events_ingested_total\{{[^}}]*source="{SOURCE_NAME}"[^}}]*\}} (\S+)$', response.text, re.M)
    return found.group(1) if found else ""


# --- /metrics ----------------------------------------------------------------------------------------


def test_metrics_with_a_token_refuse_a_missing_or_wrong_token_and_name_no_peer_or_source(kites):
    kite = kites["plain"]
    kite.create_source(SOURCE_NAME, "none")
    assert kite.post_plain(kite.team_id(), SOURCE_NAME, "evt-1").status_code == 202
    peer = kite.api("POST", "/api/federation/peers",
                    json={"name": PEER_NAME, "peer_hook_url": CLOSED_PEER_URL, "scopes": []})  # fmt: skip
    assert peer.status_code == 201, peer.text
    right = metrics(kite, Authorization=f"Bearer {TOKEN}")
    assert right.status_code == 200 and right.headers["Content-Type"].startswith("text/plain")
    assert PEER_NAME in right.text and ingested(right) == "1.0"  # what there is to leak

    for authorization in (None, "Bearer not-the-token-0123456789", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN):
        refused = metrics(kite, **({"Authorization": authorization} if authorization else {}))
        assert refused.status_code == 401, (authorization, refused.text)
        assert refused.json() == {"detail": "A valid metrics token is required.", "code": "not_authenticated"}
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="kite-metrics"'
        assert PEER_NAME not in refused.text and SOURCE_NAME not in refused.text and "kite_" not in refused.text

    assert ingested(metrics(kite, Authorization=f"Bearer {TOKEN}")) == "1.0"  # the refusals changed nothing


def test_metrics_without_a_token_answer_loopback_but_not_a_client_a_trusted_proxy_relays(kites):
    kite = kites["proxied"]

    assert metrics(kite).status_code == 200
    relayed = metrics(kite, **{"X-Forwarded-For": "203.0.113.7"})  # we are the proxy: the caller is 203.0.113.7
    assert relayed.status_code == 403 and relayed.json()["code"] == "permission_denied"
    assert "kite_" not in relayed.text and "KITE_METRICS_TOKEN" in relayed.json()["detail"]
    forged = metrics(kite, **{"X-Forwarded-For": "127.0.0.1"})  # a relayed request is not a local one
    assert forged.status_code == 403 and "kite_" not in forged.text
    assert metrics(kite).status_code == 200


# --- cookies and HSTS ----------------------------------------------------------------------------------


def bootstrap_password(kite) -> str:
    found = re.search(r"password: (\S+)", kite.log_path.read_text())
    assert found, f"no bootstrap password in {kite.log_path}"
    return found.group(1)


def set_cookies(response: requests.Response) -> dict[str, str]:
    return {line.split("=", 1)[0]: line for line in response.raw.headers.getlist("Set-Cookie")}


def test_login_over_https_sets_secure_httponly_lax_cookies(kites):
    kite = kites["plain"]
    browser = requests.Session()
    tls = {"verify": str(kite.cert), "timeout": 10}  # per request: a Session's verify loses to REQUESTS_CA_BUNDLE

    form = browser.get(kite.url + "/login/", **tls)
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
    logged_in = browser.post(kite.url + "/login/", **tls, allow_redirects=False,
                             data={"username": "admin", "password": bootstrap_password(kite), "csrfmiddlewaretoken": csrf},
                             headers={"Referer": kite.url + "/login/"})  # fmt: skip

    assert logged_in.status_code == 302 and logged_in.headers["Location"] == "/", logged_in.text
    csrf_cookie, session_cookie = set_cookies(form)["csrftoken"], set_cookies(logged_in)["sessionid"]
    for attribute in ("; Secure", "; SameSite=Lax"):
        assert attribute in csrf_cookie and attribute in session_cookie, (csrf_cookie, session_cookie)
    assert "; HttpOnly" in session_cookie
    assert {cookie.name: cookie.secure for cookie in browser.cookies} == {"csrftoken": True, "sessionid": True}
    assert browser.get(kite.url + "/events/", **tls, allow_redirects=False).status_code == 200


def test_hsts_is_sent_when_set_and_only_then(kites):
    assert get(kites["plain"], "/healthz").headers["Strict-Transport-Security"] == f"max-age={HSTS_SECONDS}"
    assert get(kites["plain"], "/login/").headers["Strict-Transport-Security"] == f"max-age={HSTS_SECONDS}"
    assert "Strict-Transport-Security" not in get(kites["proxied"], "/healthz").headers


# --- X-Forwarded-For and a grant's source_cidrs --------------------------------------------------------


@dataclass
class Caller:
    """A peer of `kite` whose secret we hold, with a fleet.agents grant usable from 10.0.0.0/8 only."""

    peer_id: int
    secret: str
    grant: str
    team: str


def granted_caller(kite) -> Caller:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    peer = kite.api("POST", "/api/federation/peers", json={
        "name": "branch-office", "peer_hook_url": CLOSED_PEER_URL, "inbound_token": secret,
        "scopes": []})  # fmt: skip
    assert peer.status_code == 201, peer.text
    grant = kite.api("POST", f"/api/federation/peers/{peer.json()['id']}/grants",
                     json={"resource_kind": "fleet.agents", "source_cidrs": ["10.0.0.0/8"]})  # fmt: skip
    assert grant.status_code == 201, grant.text
    assert kite.api("POST", "/api/fleet/agents", json={"name": "ops-worker"}).status_code == 201  # something to read
    return Caller(peer.json()["id"], secret, grant.json()["token"], kite.team_id())


def fleet_call(kite, caller: Caller, forwarded_for: str) -> requests.Response:
    url = f"{kite.url}{FLEET_PATH}?team={caller.team}"
    headers = signing.sign_headers(
        secret=caller.secret, msg_id=f"ops-{time.monotonic_ns()}", timestamp=int(time.time()), body=b"",
        sender_id="branch-office", binding=signing.binding_for("GET", url),
    )
    headers |= {"kite-grant": caller.grant, "X-Forwarded-For": forwarded_for}
    return requests.get(url, headers=headers, verify=str(kite.cert), timeout=10)


def refusals_seen_from(kite) -> list[str]:
    """The address each grant refusal was audited with (Federation.AuthFailed, on the fleet endpoint)."""
    body = kite.api("GET", "/api/audit", params={"action": "Federation.AuthFailed", "limit": 500}).json()
    return [row["data"].get("remote_addr") for row in reversed(body["results"]) if row["endpoint"] == FLEET_PATH]


def grants_of(kite, caller: Caller) -> list[dict]:
    return kite.api("GET", f"/api/federation/peers/{caller.peer_id}/grants").json()["results"]


def test_forged_x_forwarded_for_does_not_move_a_caller_into_a_grants_network(kites):
    kite = kites["plain"]  # no KITE_TRUSTED_PROXIES: nobody's proxy headers are believed
    caller = granted_caller(kite)
    grants_before = grants_of(kite, caller)

    refused = fleet_call(kite, caller, forwarded_for="10.1.2.3")

    assert refused.status_code == 403 and refused.json()["code"] == "grant_source", refused.text
    assert refused.json()["detail"].startswith("127.0.0.1 is outside") and "ops-worker" not in refused.text
    assert refusals_seen_from(kite)[-1] == "127.0.0.1"
    assert grants_of(kite, caller) == grants_before


def test_a_trusted_proxys_x_forwarded_for_is_the_address_the_grant_checks(kites):
    kite = kites["proxied"]  # KITE_TRUSTED_PROXIES=127.0.0.1/32: we are that proxy
    caller = granted_caller(kite)
    grants_before = grants_of(kite, caller)

    served = fleet_call(kite, caller, forwarded_for="10.1.2.3")
    outside = fleet_call(kite, caller, forwarded_for="192.168.7.7")
    chained = fleet_call(kite, caller, forwarded_for="10.1.2.3, 192.168.7.8")  # the client forged the first hop

    assert served.status_code == 200, served.text
    assert [row["name"] for row in served.json()["results"]] == ["ops-worker"]
    for response, address in ((outside, "192.168.7.7"), (chained, "192.168.7.8")):
        assert response.status_code == 403 and response.json()["code"] == "grant_source", response.text
        assert response.json()["detail"].startswith(f"{address} is outside") and "ops-worker" not in response.text
    assert refusals_seen_from(kite)[-2:] == ["192.168.7.7", "192.168.7.8"]
    assert grants_of(kite, caller) == grants_before


# --- /healthz with the database gone (last: it takes the plain instance's database away for a while) ----


def test_healthz_with_the_database_gone_says_503_and_reveals_nothing(kites):
    kite = kites["plain"]
    database = urlsplit(kite.database_url).path.lstrip("/")
    assert get(kite, "/healthz").json() == {"ok": True, "instance_id": kite.instance_id}
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))
            down = get(kite, "/healthz")
        finally:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')

    assert down.status_code == 503 and down.headers["Retry-After"] == "5"
    assert down.json() == {"ok": False, "detail": "The database is unavailable.", "code": "unavailable"}
    for internal in (database, str(urlsplit(kite.database_url).port), "postgres", "psycopg", "connection", "accepting"):
        assert internal not in down.text, internal
    assert "health check failed" in kite.log_path.read_text()  # the reason is for the operator's log
    wait_for(lambda: get(kite, "/healthz").status_code == 200, 15, "/healthz to recover with the database")
