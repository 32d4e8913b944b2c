"""Webhooks stored on the event loop (ingest.edge), in a real runkite on PostgreSQL over HTTPS.

The edge answers only 202 for an event it stored; everything else goes to Django's view, which
answers as it always has. These tests tell which of the two served a request by the edge's own
database connections (application_name `kite-loop-ingest`, one web process): a request the edge
stored moved their `query_start`. They attack the edge as a sender would — forged, replayed,
stale, cross-source, wrong team, oversized, deeply nested, a source changed behind its copy, its
connections killed — and check the answer, that nothing else was stored, and that the edge's own
answer is the one Django gives.
"""

import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests

from tests.e2e.harness import wait_for
from tests.signing import stripe_signature

pytestmark = pytest.mark.e2e
APP = "kite-loop-ingest"


@pytest.fixture(scope="module")
def kite(tmp_path_factory):
    from tests.e2e.conftest import Instances

    started = Instances(tmp_path_factory)
    try:  # one web process: its copy of a source is the one every request meets
        yield started.start("loop", extra_env={"KITE_WEB_WORKERS": "1"})
    finally:
        started.close()


def _db(kite):
    return psycopg.connect(kite.database_url, autocommit=True)


def edge_activity(kite) -> tuple[int, object]:
    """(connections the edge holds, the latest statement start among them)."""
    with _db(kite) as conn:
        return conn.execute(
            "SELECT count(*), max(query_start) FROM pg_stat_activity WHERE application_name = %s AND datname = "
            "current_database()", [APP]
        ).fetchone()  # fmt: skip


def stored(kite, source_name: str) -> list[str]:
    with _db(kite) as conn:
        rows = conn.execute(
            "SELECT e.ce_id FROM ingest_event e JOIN ingest_source s ON s.id = e.source_id WHERE s.name = %s"
            " ORDER BY e.id", [source_name]
        ).fetchall()  # fmt: skip
    return [row[0] for row in rows]


def stripe_body(event_id: str, **extra) -> bytes:
    return json.dumps({"id": event_id, "type": "payment_intent.succeeded", "created": int(time.time()),
                       "data": {"object": {"id": f"pi_{event_id}"}}, **extra}).encode()  # fmt: skip


def post(kite, team_id, name, body: bytes, signature: str | None, session=None, **headers) -> requests.Response:
    sent = {"Content-Type": "application/json", **headers}
    if signature is not None:
        sent["Stripe-Signature"] = signature
    return (session or requests).post(f"{kite.url}/hooks/{team_id}/{name}", data=body, headers=sent, verify=str(kite.cert),
                         timeout=10)  # fmt: skip


class Sender:
    """A Stripe source of its own, known to the web process (its first webhook went through Django)."""

    def __init__(self, kite, **options):
        self.kite, self.team = kite, kite.team_id()
        self.name = f"edge-{secrets.token_hex(3)}"
        created = kite.api("POST", "/api/sources", json={"name": self.name, "kind": "stripe", **options})
        assert created.status_code == 201, created.text
        self.secret = created.json()["secret"]
        assert self.send(f"warm-{self.name}").status_code == 202

    def send(self, event_id: str, body: bytes | None = None, secret: str | None = None, session=None, **headers):
        body = stripe_body(event_id) if body is None else body
        signature = stripe_signature(secret or self.secret, body)
        return post(self.kite, self.team, self.name, body, signature, session=session, **headers)

    def served_by_edge(self, request) -> bool:
        """Runs request(); True if the edge ran a statement meanwhile (the only process serving is this one)."""
        _, before = edge_activity(self.kite)
        self.response = request()
        _, after = edge_activity(self.kite)
        return after is not None and (before is None or after > before)


def test_a_verified_webhook_is_stored_on_the_loop_with_the_answer_django_gives(kite):
    sender = Sender(kite)
    assert sender.served_by_edge(lambda: sender.send("evt_loop_1"))
    loop_answer = sender.response
    assert loop_answer.status_code == 202
    assert loop_answer.json() == {"id": "evt_loop_1", "duplicate": False}
    # the same webhook to a source with a rate limit: the edge leaves those to Django
    limited = Sender(kite, rate_limit_per_second=1000)
    assert not limited.served_by_edge(lambda: limited.send("evt_django_1"))
    django_answer = limited.response
    assert django_answer.status_code == 202 and django_answer.json() == {"id": "evt_django_1", "duplicate": False}
    ignored = {"date", "content-length", "server"}

    def shown(response):
        return {name.lower(): value for name, value in response.headers.items() if name.lower() not in ignored}

    assert shown(loop_answer) == shown(django_answer)
    assert loop_answer.headers["kite-instance"] == kite.instance_id
    assert stored(kite, sender.name) == [f"warm-{sender.name}", "evt_loop_1"]
    # and it is an event like any other: listed, with its CloudEvent attributes
    listed = kite.api("GET", "/api/events", params={"source": sender.name}).json()["results"]
    assert [event["id"] for event in listed if event["id"] == "evt_loop_1"] == ["evt_loop_1"]
    assert {event["type"] for event in listed} == {"com.stripe.payment_intent.succeeded"}


def test_refused_webhooks_get_djangos_answers_and_store_nothing(kite):
    sender = Sender(kite)
    other = Sender(kite)
    body = stripe_body("evt_forged")
    attempts = {
        "forged": (lambda: post(kite, sender.team, sender.name, body, stripe_signature("whsec_" + "x" * 32, body)),
                   401, "bad_signature"),
        "unsigned": (lambda: post(kite, sender.team, sender.name, body, None), 401, "missing_signature"),
        "stale": (lambda: post(kite, sender.team, sender.name, body,
                               stripe_signature(sender.secret, body, int(time.time()) - 3600)), 401, "stale_timestamp"),
        "tampered": (lambda: post(kite, sender.team, sender.name, body.replace(b"pi_", b"px_"),
                                  stripe_signature(sender.secret, body)), 401, "bad_signature"),
        # signed for another source of the same team: its secret is not this one's
        "cross-source": (lambda: post(kite, sender.team, sender.name, body, stripe_signature(other.secret, body)),
                         401, "bad_signature"),
        "wrong team": (lambda: post(kite, "tm_" + "0" * 16, sender.name, body, stripe_signature(sender.secret, body)),
                       404, "unknown_team"),
        "not json": (lambda: post(kite, sender.team, sender.name, b"{not json",
                                  stripe_signature(sender.secret, b"{not json")), 400, "malformed_json"),
        "deeply nested": (lambda: post(kite, sender.team, sender.name, b'{"type": "x", "d": ' + b"[" * 100_000
                                       + b"]" * 100_000 + b"}", None), 401, "missing_signature"),
    }  # fmt: skip
    nested = b'{"id": "evt_nested", "type": "x", "d": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    attempts["deeply nested, signed"] = (
        lambda: post(kite, sender.team, sender.name, nested, stripe_signature(sender.secret, nested)), 400, "malformed_json")
    oversized = stripe_body("evt_big", padding="x" * (1024 * 1024))
    attempts["oversized"] = (
        lambda: post(kite, sender.team, sender.name, oversized, stripe_signature(sender.secret, oversized)), 413,
        "payload_too_large")  # fmt: skip
    before = stored(kite, sender.name)
    for what, (request, status, code) in attempts.items():
        assert not sender.served_by_edge(request), what
        response = sender.response
        assert (response.status_code, response.json()["code"]) == (status, code), (what, response.text)
        assert "Traceback" not in response.text
    assert stored(kite, sender.name) == before
    assert stored(kite, other.name) == [f"warm-{other.name}"]


def test_a_replayed_webhook_is_answered_as_a_duplicate_and_stored_once(kite):
    sender = Sender(kite)
    body = stripe_body("evt_replayed")
    signature = stripe_signature(sender.secret, body)
    assert sender.served_by_edge(lambda: post(kite, sender.team, sender.name, body, signature))
    assert sender.response.status_code == 202
    for _ in range(3):  # the same request again: the edge meets the stored event and lets Django answer
        again = post(kite, sender.team, sender.name, body, signature)
        assert (again.status_code, again.json()) == (200, {"id": "evt_replayed", "duplicate": True})
    assert stored(kite, sender.name).count("evt_replayed") == 1


def test_a_body_whose_length_is_not_declared_goes_to_django(kite):
    sender = Sender(kite)
    body = stripe_body("evt_chunked")
    signature = stripe_signature(sender.secret, body)

    def chunked():
        return requests.post(f"{kite.url}/hooks/{sender.team}/{sender.name}", data=iter([body[:10], body[10:]]),
                             headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
                             verify=str(kite.cert), timeout=10)  # fmt: skip

    assert not sender.served_by_edge(chunked)
    assert sender.response.status_code == 202  # Django reads the chunked body itself
    assert stored(kite, sender.name)[-1] == "evt_chunked"


def test_a_secret_changed_behind_the_copy_is_honoured_at_once(kite):
    sender, donor = Sender(kite), Sender(kite)
    assert sender.served_by_edge(lambda: sender.send("evt_before"))
    # the secret changes in the database only (as another web process or the admin would change it)
    with _db(kite) as conn:
        conn.execute("UPDATE ingest_source SET secret_encrypted = (SELECT secret_encrypted FROM ingest_source"
                     " WHERE name = %s) WHERE name = %s", [donor.name, sender.name])  # fmt: skip
    old = sender.send("evt_old_secret")
    assert (old.status_code, old.json()["code"]) == (401, "bad_signature")
    assert sender.send("evt_new_secret", secret=donor.secret).status_code == 202
    assert sender.served_by_edge(lambda: sender.send("evt_new_again", secret=donor.secret))  # the new copy
    assert sender.response.status_code == 202
    assert stored(kite, sender.name) == [f"warm-{sender.name}", "evt_before", "evt_new_secret", "evt_new_again"]


def test_a_rate_limit_set_behind_the_copy_is_honoured_at_once(kite):
    sender = Sender(kite)
    with _db(kite) as conn:
        conn.execute("UPDATE ingest_source SET rate_limit_per_second = 1 WHERE name = %s", [sender.name])
    answers = [sender.send(f"evt_limited_{n}").status_code for n in range(4)]
    assert answers.count(429) >= 2 and set(answers) <= {202, 429}, answers
    assert len(stored(kite, sender.name)) == 1 + answers.count(202)


def test_the_edge_reconnects_after_its_connections_are_killed_and_loses_nothing(kite):
    sender = Sender(kite)
    assert sender.served_by_edge(lambda: sender.send("evt_first"))
    with _db(kite) as conn:
        killed = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name"
                              " = %s AND datname = current_database()", [APP]).fetchone()[0]  # fmt: skip
    assert killed >= 1
    answers = [sender.send(f"evt_after_{n}").status_code for n in range(3)]
    assert answers == [202, 202, 202]  # the one on a dead connection went to Django, the next ones reconnected
    assert sender.served_by_edge(lambda: sender.send("evt_reconnected"))
    assert stored(kite, sender.name) == [f"warm-{sender.name}", "evt_first", "evt_after_0", "evt_after_1",
                                         "evt_after_2", "evt_reconnected"]  # fmt: skip
    assert "Traceback" not in kite.log_tail


def test_a_flood_of_forged_webhooks_stores_nothing_and_leaves_the_edge_idle(kite):
    sender = Sender(kite)
    count, before = edge_activity(kite)
    session = requests.Session()
    url = f"{kite.url}/hooks/{sender.team}/{sender.name}"
    for n in range(300):
        body = stripe_body(f"evt_flood_{n}")
        answer = session.post(url, data=body, headers={"Stripe-Signature": stripe_signature("whsec_forged", body)},
                              verify=str(kite.cert), timeout=10)  # fmt: skip
        assert answer.status_code == 401
    assert edge_activity(kite) == (count, before)  # not one statement
    assert stored(kite, sender.name) == [f"warm-{sender.name}"]


def test_webhooks_that_arrive_together_are_stored_together_each_once(kite):
    """While the edge's statements wait (a lock held on the events table), webhooks of one source
    queue; they go in together, one statement and one transaction per batch, each answered 202 once
    stored, and the same webhook twice in one batch is stored once and answered as a duplicate."""
    sender = Sender(kite)
    ids = [f"evt_together_{n}" for n in range(12)]
    sessions = [requests.Session() for _ in range(2 * len(ids))]
    for n, session in enumerate(sessions):  # connections open and the edge's 4 connections too
        assert sender.send(f"evt_warm_{n}", session=session).status_code == 202
    started = threading.Barrier(len(sessions) + 1)

    def send(n: int) -> requests.Response:
        started.wait()
        return sender.send(ids[n % len(ids)], session=sessions[n])

    with _db(kite) as lock, ThreadPoolExecutor(len(sessions)) as pool:
        lock.execute("BEGIN")
        lock.execute("LOCK TABLE ingest_event IN SHARE MODE")  # INSERTs wait; reads go on
        answers = [pool.submit(send, n) for n in range(len(sessions))]
        started.wait()
        wait_for(lambda: lock.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND"
                                      " wait_event_type = 'Lock'", [APP]).fetchone()[0] > 0,  # fmt: skip
                 10, "the edge's first statement to wait for the lock")
        time.sleep(0.5)  # for the other requests to reach the web process and queue behind them
        lock.execute("COMMIT")
        answers = [answer.result(timeout=20) for answer in answers]
    by_id: dict[str, list] = {}
    for n, answer in enumerate(answers):
        by_id.setdefault(ids[n % len(ids)], []).append((answer.status_code, answer.json()["duplicate"]))
    assert all(sorted(got) == [(200, True), (202, False)] for got in by_id.values()), by_id
    with _db(kite) as conn:
        txids = conn.execute("SELECT ce_id, txid FROM ingest_event WHERE ce_id LIKE 'evt_together_%%' AND"
                             " source_id = (SELECT id FROM ingest_source WHERE name = %s)", [sender.name]).fetchall()
    assert sorted(ce_id for ce_id, _ in txids) == sorted(ids)  # each once
    assert len({txid for _, txid in txids}) < len(ids), txids  # some went in together


# --- a peer's event deliveries (the kite source) ------------------------------------------------


class PeerSender:
    """A trusted sender of this instance, delivering to its `kite` source signed as a peer signs."""

    def __init__(self, kite):
        from federation import signing

        self.signing, self.kite, self.team = signing, kite, kite.team_id()
        self.instance = f"kite-e2e-{secrets.token_hex(3)}"
        self.token = kite.api("POST", "/api/federation/tokens", json={"label": self.instance}).json()["token"]
        trusted = kite.api("POST", "/api/federation/trusted-senders",
                           json={"name": self.instance, "inbound_token": self.token})  # fmt: skip
        assert trusted.status_code == 201, trusted.text

    def body(self, event_id: str, **fields) -> bytes:
        return json.dumps({"specversion": "1.0", "id": event_id, "source": "kite://elsewhere/tm/stripe",
                           "type": "com.example.moved", "data": {"n": 1}, **fields}).encode()  # fmt: skip

    def deliver(self, event_id: str = "", *, body: bytes | None = None, signed: bytes | None = None, secret=None,
                sender=None, timestamp=None, team=None, headers=None) -> requests.Response:  # fmt: skip
        """A delivery of `body` (an event with `event_id`), signed over `signed` (the body unless tampered)."""
        body = self.body(event_id) if body is None else body
        headers = headers or self.signing.sign_headers(
            secret=secret or self.token, msg_id=f"msg-{secrets.token_hex(6)}", timestamp=timestamp or int(time.time()),
            body=body if signed is None else signed, sender_id=sender or self.instance,
            binding=self.signing.delivery_binding(self.team),
        )
        self.headers = headers
        return requests.post(f"{self.kite.url}/hooks/{team or self.team}/kite", data=body, verify=str(self.kite.cert),
                             headers={"Content-Type": "application/cloudevents+json", **headers}, timeout=10)  # fmt: skip

    def served_by_edge(self, request) -> bool:
        return Sender.served_by_edge(self, request)


def delivered(kite) -> list[str]:
    return [event_id for event_id in stored(kite, "kite") if event_id.startswith("fed-")]


def auth_failures(kite) -> int:
    with _db(kite) as conn:
        return conn.execute("SELECT count(*) FROM federation_auditevent WHERE action = 'Federation.AuthFailed'"
                            ).fetchone()[0]  # fmt: skip


def test_a_peers_deliveries_are_stored_on_the_loop_once_its_rows_are_copied(kite):
    peer = PeerSender(kite)
    for n in range(3):  # the first learns its instance ID, the next reads its rows again and copies them
        assert peer.deliver(f"fed-warm-{n}").status_code == 202
    served = []
    for n in range(10):
        served.append(peer.served_by_edge(lambda n=n: peer.deliver(f"fed-loop-{n}")))
        assert (peer.response.status_code, peer.response.json()) == (202, {"id": f"fed-loop-{n}", "duplicate": False})
    # Django serves the one a second that records the contact (last_inbound_at); the loop the rest
    assert sum(served) >= 5, served
    assert delivered(kite) == [f"fed-warm-{n}" for n in range(3)] + [f"fed-loop-{n}" for n in range(10)]
    with _db(kite) as conn:
        extensions = conn.execute("SELECT DISTINCT extensions::text FROM ingest_event WHERE ce_id LIKE 'fed-%%'"
                                  ).fetchall()  # fmt: skip
    assert len(extensions) == 1, extensions  # the same provenance whichever part of the process stored it
    assert json.loads(extensions[0][0])["kitefedpeer"] == peer.instance
    assert "Traceback" not in kite.log_tail


def test_refused_deliveries_get_djangos_answers_are_audited_once_and_store_nothing(kite):
    peer = PeerSender(kite)
    for n in range(3):
        assert peer.deliver(f"fed-ok-{n}").status_code == 202
    replayed = peer.deliver("fed-replayed")
    assert replayed.status_code == 202
    replay_headers = dict(peer.headers)
    body = peer.body("fed-attack")
    nested = b'{"specversion": "1.0", "id": "fed-nested", "source": "x", "type": "t", "data": ' + b"[" * 100_000 + \
        b"]" * 100_000 + b"}"  # fmt: skip
    local = peer.body("fed-local", source=f"kite://{kite.instance_id}/{peer.team}/stripe")
    attempts = {
        "forged": (lambda: peer.deliver(body=body, secret="whsec_" + "x" * 43), 401, "bad_secret"),
        "unknown sender": (lambda: peer.deliver(body=body, sender="mallory"), 401, "unknown_peer"),
        "stale": (lambda: peer.deliver(body=body, timestamp=int(time.time()) - 3600), 401, "stale_timestamp"),
        "tampered": (lambda: peer.deliver(body=body, signed=peer.body("fed-other")), 401, "bad_secret"),
        "unsigned": (lambda: peer.deliver(body=body, headers={"X-None": "1"}), 401, "missing_signature"),
        "wrong team": (lambda: peer.deliver(body=body, team="tm_" + "0" * 16), 404, "unknown_team"),
        "deeply nested, signed": (lambda: peer.deliver(body=nested), 400, "malformed_json"),
        "naming this instance": (lambda: peer.deliver(body=local), 400, "local_source"),
    }
    refusals = sum(1 for _, status, _ in attempts.values() if status == 401)
    before, audited = delivered(kite), auth_failures(kite)
    for what, (request, status, code) in attempts.items():
        assert not peer.served_by_edge(request), what
        response = peer.response
        assert (response.status_code, response.json()["code"]) == (status, code), (what, response.text)
    for _ in range(2):  # the same request again: answered as a duplicate, stored once
        again = peer.deliver("fed-replayed", headers=replay_headers)
        assert (again.status_code, again.json()) == (200, {"id": "fed-replayed", "duplicate": True})
    assert delivered(kite) == before
    assert auth_failures(kite) == audited + refusals  # each refusal audited once, by Django
