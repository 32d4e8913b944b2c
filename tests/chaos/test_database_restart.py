"""PostgreSQL restarted under a live instance (runkite, HTTPS, PostgreSQL + Redis) while webhooks
and API calls flow: `pg_ctl restart -m fast` on the test run's own cluster, as an operator or a
failover would.

Every answer meanwhile is 202/200, or 503 {detail, code: database_unavailable} with Retry-After,
never a 500; every event answered 202 is stored exactly once, and a provider retrying what was
answered 503 ends with each event stored exactly once; the web answers again within 15 s of
PostgreSQL being back (a dead connection is replaced, not reused).
"""

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
import requests

from tests.e2e.conftest import instances  # noqa: F401  (fixture)
from tests.e2e.harness import wait_for

pytestmark = pytest.mark.e2e

PG_BIN = "/usr/lib/postgresql/15/bin"
BACK_WITHIN_SECONDS = 15


def cluster_dir() -> str:
    """The data directory of the test run's PostgreSQL (scripts/services.sh), found by its port."""
    url = os.environ.get("DATABASE_URL", "")
    assert url.startswith("postgres"), "run with scripts/test.sh: this test restarts the run's own PostgreSQL"
    port = urlsplit(url).port
    directory = os.environ.get("KITE_SERVICES_DIR", f"/tmp/kite-services-{port}")
    assert os.path.exists(f"{directory}/pg/PG_VERSION"), f"no cluster of scripts/services.sh in {directory}"
    return directory


def restart_postgres() -> None:
    directory = cluster_dir()
    # -l as scripts/services.sh starts it: without it the server would log to (and hold) our pipe.
    command = [f"{PG_BIN}/pg_ctl", "-D", f"{directory}/pg", "-l", f"{directory}/pg.log", "-m", "fast", "-w",
               "-t", "60", "restart"]  # fmt: skip
    if os.getuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, check=True, capture_output=True, timeout=90)


@dataclass
class Answer:
    what: str  # "hook" or the API path
    event_id: str | None
    at: float
    status: int | None
    body: dict | str | None
    retry_after: str | None
    error: str = ""


class Traffic:
    """Webhooks (one thread) and API reads (another) sent back to back until stopped."""

    def __init__(self, kite, team_id: str):
        self.kite, self.team_id = kite, team_id
        self.answers: list[Answer] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._webhooks, daemon=True),
                        threading.Thread(target=self._reads, daemon=True)]  # fmt: skip

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _send(self, session, what, event_id, method, url, **kwargs) -> None:
        try:
            response = session.request(method, url, verify=str(self.kite.cert), timeout=20, **kwargs)
        except requests.RequestException as exc:
            self.answers.append(Answer(what, event_id, time.monotonic(), None, None, None, repr(exc)))
            return
        try:
            body = response.json()
        except ValueError:
            body = response.text[:300]
        self.answers.append(Answer(what, event_id, time.monotonic(), response.status_code, body,
                                   response.headers.get("Retry-After")))  # fmt: skip

    def _webhooks(self) -> None:
        session, number = requests.Session(), 0
        while not self.stopping.is_set():
            event_id = f"pg_{number}"
            number += 1
            self._send(session, "hook", event_id, "POST", f"{self.kite.url}/hooks/{self.team_id}/plain",
                       json={"id": event_id, "type": "com.example.restart"})  # fmt: skip
            time.sleep(0.02)

    def _reads(self) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.kite.admin_key}"
        while not self.stopping.is_set():
            for path in ("/api/events?source=plain&limit=5", "/api/me"):
                self._send(session, path, None, "GET", f"{self.kite.url}{path}")
            time.sleep(0.05)

    def accepted_since(self, moment: float) -> bool:
        return any(a.what == "hook" and a.status == 202 and a.at > moment for a in list(self.answers))


def stored_ids(kite) -> list[str]:
    found, after = [], "0-0"
    while True:
        page = kite.api("GET", "/api/events", params={"source": "plain", "after": after, "limit": 1000}).json()
        if not page["results"]:
            return found
        found += [event["id"] for event in page["results"]]
        after = page["next"]


def test_postgres_restarting_under_traffic_is_503_with_retry_after_never_500_and_nothing_half_stored(instances):  # noqa: F811
    kite = instances.start("pgrestart")
    kite.create_source("plain", "none")
    with Traffic(kite, kite.team_id()) as traffic:
        wait_for(lambda: traffic.accepted_since(0), 15, "webhooks to flow")
        restart_started = time.monotonic()
        restart_postgres()
        back_at = time.monotonic()
        wait_for(lambda: traffic.accepted_since(back_at), BACK_WITHIN_SECONDS,
                 lambda: f"a webhook accepted after PostgreSQL came back; last answers {traffic.answers[-5:]}")  # fmt: skip
        answering_again = time.monotonic() - back_at
        time.sleep(1)  # a little traffic after, on the new connections

    answers = traffic.answers
    assert [a for a in answers if a.status is None] == [], "a request got no answer at all"
    refused = [a for a in answers if a.status not in (200, 202, 503)]
    assert refused == [], f"answers other than 200/202/503: {refused[:5]}"
    unavailable = [a for a in answers if a.status == 503]
    assert unavailable, "no request met the restart: the test did not test anything"
    for answer in unavailable:
        assert isinstance(answer.body, dict) and answer.body.get("code") == "database_unavailable", answer
        assert answer.body.get("detail") and answer.retry_after and int(answer.retry_after) > 0, answer
    during = [a for a in answers if restart_started <= a.at <= back_at]
    print(f"{len(answers)} answers, {len(during)} during the restart ({back_at - restart_started:.1f} s), "
          f"{len(unavailable)} × 503; answering again {answering_again:.1f} s after PostgreSQL was back")

    hooks = [a for a in answers if a.what == "hook"]
    stored = stored_ids(kite)
    accepted = [a.event_id for a in hooks if a.status == 202]
    assert all(stored.count(event_id) == 1 for event_id in accepted), "an event answered 202 is not stored once"
    # The provider retries what was answered 503: stored now, or found stored already (the commit
    # landed as the connection died), never twice.
    for answer in (a for a in hooks if a.status == 503):
        again = kite.api("POST", f"/hooks/{kite.team_id()}/plain", json={"id": answer.event_id,
                                                                          "type": "com.example.restart"})  # fmt: skip
        assert again.status_code in (200, 202), again.text
    stored = stored_ids(kite)
    assert sorted(stored) == sorted(a.event_id for a in hooks), "each event posted stored exactly once"
