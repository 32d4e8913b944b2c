"""Attacks on a live instance (runkite over HTTPS on loopback, PostgreSQL + Redis): a team member who
is not a team admin opening an unauthenticated endpoint, a stream that outlives its revoked API key
or its user's membership, and a flood of refused peer requests against the audit trail.

Users, memberships and revocations are made as an operator makes them: `manage.py` against the
instance's own environment."""

import json
import secrets
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import psycopg
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.e2e.conftest import Instances, listen  # noqa: F401  (fixture)
from tests.e2e.harness import REPO, wait_for, wait_until_streaming
from tests.signing import standard_webhook_headers

pytestmark = pytest.mark.e2e

CLOSED_WITHIN_SECONDS = 5.0
FLOOD = 2000
FACTOR_PER_SECOND, TEAM_PER_SECOND = 5, 10  # federation.audit's defaults


@pytest.fixture(scope="module")
def kite(tmp_path_factory):
    started = Instances(tmp_path_factory)
    try:
        yield started.start("members")
    finally:
        started.close()


def manage(kite, *args: str) -> str:
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=kite.env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def add_user(kite, role: str) -> tuple[str, str]:
    username, password = f"{role}-{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    manage(kite, "shell", "-c", (
        "from django.contrib.auth import get_user_model; from kite import services; from kite.models import Team; "
        f"user = get_user_model().objects.create_user({username!r}, password={password!r}); "
        f"services.membership_add(team=Team.objects.get(name='default'), user=user, role={role!r})"
    ))  # fmt: skip
    return username, password


def revoke_at(kite, code: str) -> float:
    """Run `code` in `manage.py shell`; the wall-clock time just after it committed."""
    return float(manage(kite, "shell", "-c", f"{code}; import time; print(time.time())").splitlines()[-1])


def browser(kite, role: str) -> tuple[requests.Session, str]:
    """A logged-in browser of a new user with `role` in team default, and the username."""
    username, password = add_user(kite, role)
    session = requests.Session()
    session.trust_env = False  # a CA bundle from the environment would win over session.verify
    session.verify = str(kite.cert)
    session.get(f"{kite.url}/login/", timeout=10)
    answer = session.post(f"{kite.url}/login/", timeout=10, allow_redirects=False,
                          data={"username": username, "password": password,
                                "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                          headers={"Referer": f"{kite.url}/login/", "Origin": kite.url})  # fmt: skip
    assert answer.status_code == 302, answer.text
    return session, username


def browser_post(kite, session: requests.Session, path: str, body: dict) -> requests.Response:
    """What the browser's page sends: the session cookie, the CSRF token, Kite's own Origin."""
    headers = {"X-CSRFToken": session.cookies["csrftoken"], "Origin": kite.url, "Referer": f"{kite.url}/events/"}
    return session.post(kite.url + path, json=body, headers=headers, timeout=10)


def source_rows(kite) -> list[tuple]:
    listed = kite.api("GET", "/api/sources")
    assert listed.status_code == 200, listed.text
    return sorted((s["name"], s["kind"], s["verified"], s["secret_fingerprint"]) for s in listed.json()["results"])


class Flow:
    """A provider posting one webhook to a `none` source every `every` seconds, in a thread."""

    def __init__(self, kite, team_id: str, source: str, every: float = 0.1):
        self.kite, self.team_id, self.source, self.every = kite, team_id, source, every
        self.posted: list[tuple[float, str]] = []  # (wall time the 202 came back, event id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self):
        while not self._stop.is_set():
            event_id = f"flow-{secrets.token_hex(4)}"
            response = self.kite.post_plain(self.team_id, self.source, event_id)
            assert response.status_code == 202, response.text
            self.posted.append((time.time(), event_id))
            self._stop.wait(self.every)

    def ids_between(self, start: float, end: float) -> list[str]:
        return [event_id for at, event_id in list(self.posted) if start <= at <= end]


# --- a member may not open an unauthenticated endpoint ------------------------------------------


def test_a_member_cannot_create_a_none_source_and_nothing_opens(kite):
    team_id = kite.team_id()
    member, _ = browser(kite, "member")
    before = source_rows(kite)
    name = f"open-{secrets.token_hex(3)}"

    refused = browser_post(kite, member, "/api/sources", {"name": name, "kind": "none"})

    assert refused.status_code == 403, refused.text
    assert refused.json()["code"] == "permission_denied" and "ingest.manage_source" in refused.json()["detail"]
    assert source_rows(kite) == before
    assert kite.post_plain(team_id, name, "probe").json()["code"] == "unknown_source"  # no endpoint opened
    listed = member.get(f"{kite.url}/api/sources", timeout=10)
    assert listed.status_code == 200 and name not in listed.text  # members still read the list

    # The same request from a team admin's browser passes: the refusal above was the permission,
    # not the CSRF check or the session. The source it opens is marked unverified for everyone.
    admin, _ = browser(kite, "admin")
    created = browser_post(kite, admin, "/api/sources", {"name": name, "kind": "none"})
    assert created.status_code == 201, created.text
    assert created.json()["verified"] is False
    mine = [s for s in member.get(f"{kite.url}/api/sources", timeout=10).json()["results"] if s["name"] == name]
    assert [s["verified"] for s in mine] == [False]
    assert f'<option value="{name}">{name} (unverified)</option>' in member.get(f"{kite.url}/events/", timeout=10).text


# --- streams end within seconds on revocation ---------------------------------------------------


def test_revoking_the_key_ends_kite_listen_within_seconds_while_webhooks_flow(kite, listen):
    team_id = kite.team_id()
    name = f"flow-{secrets.token_hex(3)}"
    kite.create_source(name, "none")
    raw_key = manage(kite, "createapikey", "--team", "default", "--label", "revoked while listening")
    listener = listen(kite, "--source", name, api_key=raw_key)
    markers = wait_until_streaming(listener, lambda event_id: kite.post_plain(team_id, name, event_id))

    with Flow(kite, team_id, name) as flow:
        wait_for(lambda: len(flow.posted) > 2, 10, "three webhooks posted")
        listener.wait_for_ids([flow.posted[2][1]])
        revoked_at = revoke_at(kite, (
            "from kite import selectors, services; "
            f"services.apikey_revoke(api_key=selectors.apikey_by_raw({raw_key!r}))"
        ))  # fmt: skip
        assert listener.wait_for_exit(timeout=15) == 2
        exited_at = time.time()
        time.sleep(1)  # webhooks go on after the close
    stderr = "\n".join(listener.errors)
    print(f"kite listen exited {exited_at - revoked_at:.2f} s after the revocation")
    assert "4401 API key revoked" in stderr, stderr
    assert exited_at - revoked_at <= CLOSED_WITHIN_SECONDS, (exited_at - revoked_at, stderr)
    printed = set(listener.ids())
    assert printed & set(flow.ids_between(0, revoked_at))  # it was streaming the flow when the key went
    assert not printed & set(flow.ids_between(exited_at, float("inf")))  # no later event arrived
    assert flow.ids_between(exited_at, float("inf"))  # ...though they kept coming
    assert printed <= set(markers) | set(flow.ids_between(0, exited_at))

    again = listen(kite, "--source", name, api_key=raw_key)  # and the key opens no new stream
    assert again.wait_for_exit(timeout=30) == 2 and "401" in "\n".join(again.errors)


def test_removing_the_membership_ends_the_browsers_stream_with_4403(kite):
    from django.conf import settings

    team_id = kite.team_id()
    name = f"flow-{secrets.token_hex(3)}"
    kite.create_source(name, "none")
    session, username = browser(kite, "member")
    cookie = f"{settings.SESSION_COOKIE_NAME}={session.cookies[settings.SESSION_COOKIE_NAME]}"
    context = ssl.create_default_context(cafile=str(kite.cert))
    url = f"wss://{urlsplit(kite.url).netloc}/ws/events?source={name}"
    received: list[dict] = []

    with connect(url, ssl=context, additional_headers={"Cookie": cookie}, open_timeout=10) as websocket, \
            Flow(kite, team_id, name) as flow:  # fmt: skip
        received.append(json.loads(websocket.recv(timeout=10)))  # live: the flow reaches the browser
        removed_at = revoke_at(kite, (
            "from kite.models import Membership; "
            f"Membership.objects.filter(user__username={username!r}).delete()"
        ))  # fmt: skip
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                received.append(json.loads(websocket.recv(timeout=15)))
        closed_at = time.time()
    print(f"the browser's stream closed {closed_at - removed_at:.2f} s after the membership went")
    assert closed.value.rcvd is not None, closed.value
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4403, "no longer a member of the team")
    assert closed_at - removed_at <= CLOSED_WITHIN_SECONDS
    assert {event["id"] for event in received} <= set(flow.ids_between(0, closed_at))


# --- a refusal flood against the audit trail ----------------------------------------------------


def scrape(kite) -> dict[tuple, float]:
    response = requests.get(f"{kite.url}/metrics", verify=str(kite.cert), timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def suppressed(scraped: dict) -> dict[str, float]:
    return {dict(labels)["reason"]: value for (name, labels), value in scraped.items()
            if name == "kite_audit_refusals_suppressed_total"}  # fmt: skip


def refused_calls(scraped: dict, outcomes: set[str]) -> float:
    return sum(value for (name, labels), value in scraped.items()
               if name == "kite_federation_calls_total" and dict(labels).get("outcome") in outcomes
               and dict(labels).get("direction") == "inbound")  # fmt: skip


def audit_rows(kite, team_id: str) -> dict[str, int]:
    with psycopg.connect(kite.database_url) as db:
        return dict(db.execute("SELECT outcome, count(*) FROM federation_auditevent"
                               " WHERE team_id = %s AND action = 'Federation.AuthFailed' GROUP BY outcome",
                               [team_id]).fetchall())  # fmt: skip


def forged_delivery(kite, team_id: str, n: int, session: requests.Session) -> str:
    """One of three refusals by turns: unsigned, signed by nobody known here, an hour stale."""
    body = f'{{"specversion":"1.0","id":"flood-{n}","source":"kite://x/t/s","type":"com.x.y"}}'.encode()
    headers = {"Content-Type": "application/cloudevents+json"}
    if n % 3:
        timestamp = int(time.time()) - (3600 if n % 3 == 2 else 0)
        headers |= standard_webhook_headers("whsec_" + "A" * 43, f"m-{n}", body, timestamp)
        headers["kite-peer"] = "nobody-known"
    response = session.post(f"{kite.url}/hooks/{team_id}/kite", data=body, headers=headers, timeout=10)
    assert response.status_code == 401, response.text
    return response.json()["code"]


def test_a_refusal_flood_writes_at_most_the_cap_and_counts_the_rest(kite):
    team_id = kite.team_id()
    rows_before, metrics_before = audit_rows(kite, team_id), scrape(kite)
    sessions = threading.local()

    def send(n: int) -> str:
        if not hasattr(sessions, "session"):
            sessions.session = requests.Session()
            sessions.session.trust_env = False
            sessions.session.verify = str(kite.cert)
        return forged_delivery(kite, team_id, n, sessions.session)

    started = time.time()
    with ThreadPoolExecutor(max_workers=4) as pool:
        codes = list(pool.map(send, range(FLOOD)))
    ended = time.time()
    seconds = int(ended) - int(started) + 1  # the one-second windows the flood touched

    outcomes = set(codes)
    assert len(outcomes) == 3, outcomes  # three factors: more than one factor's share fits a team's cap
    rows = {outcome: count - rows_before.get(outcome, 0) for outcome, count in audit_rows(kite, team_id).items()}
    written = sum(rows.values())
    assert set(rows) == outcomes and all(count >= 1 for count in rows.values()), rows
    assert all(count <= FACTOR_PER_SECOND * seconds for count in rows.values()), (rows, seconds)
    assert written <= TEAM_PER_SECOND * seconds, (written, seconds)
    metrics_after = scrape(kite)
    held_back = {reason: count - suppressed(metrics_before).get(reason, 0)
                 for reason, count in suppressed(metrics_after).items()}  # fmt: skip
    print(f"{FLOOD} refusals in {ended - started:.1f} s: {written} rows {rows}, suppressed {held_back}")
    assert sum(held_back.values()) == FLOOD - written, (held_back, written)
    assert held_back.get("factor_rate", 0) > 0 and held_back.get("team_rate", 0) > 0, held_back
    assert refused_calls(metrics_after, outcomes) - refused_calls(metrics_before, outcomes) == FLOOD
