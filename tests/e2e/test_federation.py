"""Federation between real Kite processes: separate PostgreSQL databases, HTTPS on loopback,
real Celery workers and beat (docs/architecture.md "The federation protocol")."""

import json
import secrets
import signal
import time
from dataclasses import dataclass, field

import psycopg
import pytest
import requests

from tests.e2e.harness import Database, Kite, RedisDatabase, open_write_transactions, wait_for

pytestmark = pytest.mark.e2e

FAST = {
    "KITE_PROBE_DOWN_SECONDS": "1",  # a down peer is re-probed every second
    "KITE_OUTBOX_LEASE_SECONDS": "3",  # a killed worker's entries come back after 3 s
    "KITE_HEARTBEAT_SECONDS": "2",
}


@dataclass
class FedKite(Kite):
    extra_env: dict = field(default_factory=dict)

    def env(self) -> dict:
        return {**super().env(), **self.extra_env}

    # --- federation as an operator does it ------------------------------------

    def identity(self) -> dict:
        return self.api("GET", "/api/federation/identity").json()

    def token(self, label: str) -> str:
        response = self.api("POST", "/api/federation/tokens", json={"label": label})
        assert response.status_code == 201, response.text
        return response.json()["token"]

    def add_peer(self, other: "FedKite", name: str, **fields) -> dict:
        identity = other.identity()
        body = {"name": name, "peer_hook_url": identity["hook_url"], "tls_fingerprint": identity["tls_fingerprint"],
                "scopes": ["*"], **fields}  # fmt: skip
        response = self.api("POST", "/api/federation/peers", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def trust(self, name: str, token: str) -> dict:
        response = self.api("POST", "/api/federation/trusted-senders", json={"name": name, "inbound_token": token})
        assert response.status_code == 201, response.text
        return response.json()

    def peer(self, peer_id: int) -> dict:
        return self.api("GET", f"/api/federation/peers/{peer_id}").json()

    def outbox(self, peer_id: int, status: str | None = None) -> list[dict]:
        query = f"?status={status}" if status else ""
        return self.api("GET", f"/api/federation/peers/{peer_id}/outbox{query}").json()["results"]

    def events(self, **filters) -> list[dict]:
        found, after = [], "0-0"
        while True:
            page = self.api("GET", "/api/events", params={**filters, "after": after, "limit": 1000}).json()
            found += page["results"]
            if not page["results"]:
                return found
            after = page["next"]

    def state(self) -> str:
        """What an operator would look at when events do not arrive: for the failure message."""
        lines = [f"--- {self.instance_id}"]
        for peer in self.api("GET", "/api/federation/peers").json().get("results", []):
            depth = {status: len(self.outbox(peer["id"], status)) for status in ("pending", "in_flight", "dead")}
            lines.append(f"peer {peer['name']}: status={peer.get('status')} paused={peer.get('paused')!r} "
                         f"last_error={peer.get('last_error')!r} outbox={depth}")  # fmt: skip
        lines.append(f"stored: {sorted(e['id'] for e in self.events())[-20:]}")
        lines.append(f"open write transactions: {open_write_transactions()}")
        lines.append(self.log_tail[-1500:])
        return "\n".join(lines)

    def post_event(self, source: str, event_id: str, event_type: str = "com.stripe.charge.succeeded"):
        response = requests.post(
            f"{self.url}/hooks/{self.team_id()}/{source}", json={"id": event_id, "type": event_type},
            verify=str(self.cert), timeout=10,
        )  # fmt: skip
        assert response.status_code == 202, response.text
        return response


class Cluster:
    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.started: list[tuple[FedKite, Database, RedisDatabase]] = []

    def start(self, label: str, **env: str) -> FedKite:
        (kite,) = self.start_together(label, **env)
        return kite

    def start_together(self, *labels: str, **env: str) -> tuple[FedKite, ...]:
        """Instances of the same variables started at once (their starts overlap: Kite.start_together)."""
        kites = []
        for label in labels:
            database, redis_db = Database(label), RedisDatabase()
            kite = FedKite(
                data_dir=self.tmp.mktemp(label) / "data",
                instance_id=f"fed-{label}-{secrets.token_hex(3)}",
                database_url=database.url,
                redis_url=redis_db.url,
                extra_env=dict(FAST, **env),
            )
            self.started.append((kite, database, redis_db))
            kites.append(kite)
        Kite.start_together(*kites)
        for kite in kites:
            assert kite.api("POST", "/api/sources", json={"name": "plain", "kind": "none"}).status_code == 201
        return tuple(kites)

    def close(self):
        running = [kite for kite, _, _ in self.started if kite.process is not None]
        for kite in running:  # all at once: their shutdowns overlap
            kite.signal_stop(signal.SIGTERM)
        failures = []
        for kite, database, redis_db in reversed(self.started):  # every one stopped, even after a failure
            try:
                if any(kite is other for other in running):
                    kite.wait_stopped(signal.SIGTERM)
            except AssertionError as exc:
                failures.append(str(exc))
            finally:
                kite.kill()
                database.drop()
                redis_db.release()
        assert not failures, failures


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The pair A, B that the shorter tests share (each uses event types only its own peer matches)."""
    started = Cluster(tmp_path_factory)
    yield started
    started.close()


@pytest.fixture
def cluster(tmp_path_factory):
    """Instances of one test only, stopped when it ends: a dozen idle instances heartbeating and
    sweeping on two cores would slow every later test down."""
    started = Cluster(tmp_path_factory)
    yield started
    started.close()


@pytest.fixture(scope="module")
def a(shared):
    return shared.start("a")


@pytest.fixture(scope="module")
def b(shared):
    return shared.start("b")


def federate(sender: FedKite, receiver: FedKite, name: str, **fields) -> dict:
    """The getting-started flow: the receiver generates the token it will check inbound,
    the sender registers the receiver as a peer with it, the receiver trusts the sender."""
    token = receiver.token(f"from-{name}")
    peer = sender.add_peer(receiver, name, outbound_token=token, **fields)
    receiver.trust(f"{name}-sender-{secrets.token_hex(2)}", token)
    return peer


def stored_ids(kite: FedKite, **filters) -> list[str]:
    return [event["id"] for event in kite.events(**filters)]


def test_getting_started_flow_reaches_bs_listener_within_a_second(a, b, listen):
    peer = federate(a, b, "b-start", scopes=["stripe.*", "com.kite.agent.message"])
    head = b.api("GET", "/api/events/head").json()["cursor"]
    listener = listen(b, "--source", "kite", "--after", head)
    event_id = f"evt_{secrets.token_hex(4)}"
    accepted_at = time.monotonic()
    a.post_event("plain", event_id)
    arrived_at = listener.arrival_of(event_id, timeout=10)

    event = next(e for e in listener.events if e["id"] == event_id)
    assert arrived_at - accepted_at < 1.0, f"took {arrived_at - accepted_at:.3f} s"
    assert event["kitefedorigin"] == a.instance_id
    assert json.loads(event["kitefedchain"]) == [a.instance_id]
    assert event["kitefedhops"] == 1
    assert event["source"].startswith(f"kite://{a.instance_id}/")
    assert wait_for(lambda: a.outbox(peer["id"], "delivered"), 5, "A's outbox to show the delivery")
    # Heartbeats: A pinged B successfully, and B has received from A: enrolled, then active.
    wait_for(lambda: a.peer(peer["id"])["status"] in ("enrolled", "active"), 10, "A's peer row to enrol")
    assert a.peer(peer["id"])["reachability"] in ("Reachable", "Slow")
    assert a.peer(peer["id"])["remote_instance_id"] == b.instance_id


def test_scope_mismatch_stays_local(a, b):
    peer = federate(a, b, "b-scoped", scopes=["scoped.*"])
    event_id = f"gh_{secrets.token_hex(4)}"
    a.post_event("plain", event_id, event_type="com.github.push")
    marker = f"evt_{secrets.token_hex(4)}"
    a.post_event("plain", marker, event_type="com.scoped.x")  # in scope: once it is at B, the other would be too
    wait_for(lambda: marker in stored_ids(b, source="kite"), 10, "the in-scope marker at B")
    assert event_id not in stored_ids(b, source="kite")
    assert {entry["event_id"] for entry in a.outbox(peer["id"])} == {marker}


def test_wrong_secret_is_refused_at_b_and_a_shows_why_until_fixed(a, b):
    b.trust("a-real", "whsec_" + secrets.token_urlsafe(32))
    # Each test on the shared pair uses event types only its own peer's scopes match.
    peer = a.add_peer(b, "b-wrong", outbound_token="whsec_" + secrets.token_urlsafe(32), scopes=["wrongsecret.*"])
    event_id = f"evt_{secrets.token_hex(4)}"
    a.post_event("plain", event_id, event_type="com.wrongsecret.x")
    wait_for(lambda: a.peer(peer["id"])["paused"] == "auth_failed", 10, "A to pause the peer as auth_failed")
    shown = a.peer(peer["id"])
    assert "401" in shown["last_error"] and ("unknown_peer" in shown["last_error"] or "bad_secret" in shown["last_error"]
                                             or "match" in shown["last_error"])  # fmt: skip
    assert event_id not in stored_ids(b, source="kite")
    assert a.outbox(peer["id"], "dead") == []  # paused, not dead-lettered
    # The operator pastes the right token: the queue resumes and drains.
    token = b.token("fixed")
    b.trust("a-fixed", token)
    assert a.api("PATCH", f"/api/federation/peers/{peer['id']}", json={"outbound_token": token}).status_code == 200
    wait_for(lambda: event_id in stored_ids(b, source="kite"), 15, "the event at B after the fix")


def test_dead_letters_and_replay(a, b):
    wrong_url = b.identity()["hook_url"].replace(b.team_id(), "tm_nobody")
    token = b.token("dead")
    b.trust("a-dead", token)
    peer = a.add_peer(b, "b-dead", outbound_token=token, scopes=["deadletter.*"], peer_hook_url=wrong_url)
    event_id = f"evt_{secrets.token_hex(4)}"
    a.post_event("plain", event_id, event_type="com.deadletter.x")
    dead = wait_for(lambda: a.outbox(peer["id"], "dead"), 10, "the entry to be dead-lettered (404 is permanent)")
    assert dead[0]["event_id"] == event_id and "404" in dead[0]["last_error"]
    deliveries = a.api("GET", f"/api/federation/peers/{peer['id']}/deliveries").json()["results"]
    assert deliveries and deliveries[0]["status_code"] == 404
    fixed = a.api("PATCH", f"/api/federation/peers/{peer['id']}", json={"peer_hook_url": b.identity()["hook_url"]})
    assert fixed.status_code == 200
    replay = a.api("POST", f"/api/federation/peers/{peer['id']}/replay-dead", json={"limit": 10})
    assert replay.json() == {"requeued": 1}
    wait_for(lambda: event_id in stored_ids(b, source="kite"), 10, "the replayed event at B")
    assert a.outbox(peer["id"], "dead") == []


def test_b_down_for_a_while_loses_nothing_and_dead_letters_nothing(cluster):
    a, b = cluster.start_together("down-a", "down-b")
    peer = federate(a, b, "b", scopes=["stripe.*"])
    warm = f"warm_{secrets.token_hex(3)}"
    a.post_event("plain", warm)
    wait_for(lambda: warm in stored_ids(b, source="kite"), 10, "a first delivery")

    b.stop(signal.SIGTERM)
    sent = [f"evt_{i}_{secrets.token_hex(3)}" for i in range(40)]
    for event_id in sent:
        a.post_event("plain", event_id)
    wait_for(lambda: a.peer(peer["id"])["paused"] == "down", 30, "A to mark B down and pause its queue")
    time.sleep(3)  # the queue stays paused: no attempts are burnt while B is away
    attempts = [entry["attempts"] for entry in a.outbox(peer["id"], "pending")]
    assert max(attempts) <= 5 and a.outbox(peer["id"], "dead") == []

    b.start()
    wait_for(lambda: set(sent) <= set(stored_ids(b, source="kite")), 30, "every queued event at B")
    ids = stored_ids(b, source="kite")
    assert sorted(i for i in ids if i in sent) == sorted(sent)  # each exactly once
    assert a.outbox(peer["id"], "dead") == []
    wait_for(lambda: not a.outbox(peer["id"], "pending"), 10, "A's queue to be empty")


def test_the_web_process_delivers_what_it_stored_while_the_worker_is_frozen(cluster):
    """KITE_WEB_DELIVERY=on (the courier): with A's Celery worker stopped (SIGSTOP), an event posted
    to A still reaches B promptly — the web process that stored it sent it. Thawed, the worker finds
    nothing left to do. (With it off, the default, the event waits for the worker: checked.)"""
    import os

    from tests.chaos.procs import runkite_children

    a, b = cluster.start("courier-a", KITE_WEB_DELIVERY="on"), cluster.start("courier-b")
    peer = federate(a, b, "b", scopes=["stripe.*"])
    worker = runkite_children(a.process.pid)["worker"]
    os.kill(worker, signal.SIGSTOP)
    try:
        event_id = f"evt_{secrets.token_hex(4)}"
        a.post_event("plain", event_id)
        wait_for(lambda: event_id in stored_ids(b, source="kite"), 10, "the event at B, sent by A's web process")
        wait_for(lambda: [e for e in a.outbox(peer["id"]) if e["event_id"] and e["status"] == "delivered"], 5,
                 "A to record the delivery")  # fmt: skip
    finally:
        os.kill(worker, signal.SIGCONT)
    time.sleep(2)
    assert stored_ids(b, source="kite").count(event_id) == 1
    deliveries = a.api("GET", f"/api/federation/peers/{peer['id']}/deliveries").json()["results"]
    assert [d["outcome"] for d in deliveries] == ["delivered"] * len(deliveries) and len(deliveries) >= 1


def test_worker_killed_mid_delivery_still_delivers(cluster):
    a, b = cluster.start_together("crash-a", "crash-b")
    token = b.token("crash")
    b.trust("a", token)
    # A black hole: accepts TCP and never answers, so the worker is stuck mid-delivery.
    import socket
    import threading

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(hole.accept()) for _ in range(16)], daemon=True).start()
    port = hole.getsockname()[1]
    peer = a.add_peer(b, "b", outbound_token=token, scopes=["stripe.*"],
                      peer_hook_url=f"https://127.0.0.1:{port}/hooks/{b.team_id()}/kite")  # fmt: skip
    event_id = f"evt_{secrets.token_hex(4)}"
    a.post_event("plain", event_id)
    wait_for(lambda: [e for e in a.outbox(peer["id"]) if e["status"] == "in_flight"], 10, "the entry to be in flight")
    a.kill()  # SIGKILL the whole process group: worker, beat and web die mid-delivery
    with psycopg.connect(a.database_url) as connection:
        # While A is down, point the peer at the real B, as an operator would fix a URL.
        connection.execute(
            "UPDATE federation_peer SET peer_hook_url = %s WHERE id = %s", (b.identity()["hook_url"], peer["id"])
        )
    a.start()
    wait_for(lambda: event_id in stored_ids(b, source="kite"), 30, "the event after the lease expired")
    assert stored_ids(b, source="kite").count(event_id) == 1
    hole.close()


def test_a_and_b_federating_both_ways_do_not_amplify(cluster):
    a, b = cluster.start_together("loop-a", "loop-b")
    federate(a, b, "b")
    federate(b, a, "a")
    ids_a = [f"from_a_{i}" for i in range(5)]
    ids_b = [f"from_b_{i}" for i in range(5)]
    for event_id in ids_a:
        a.post_event("plain", event_id)
    for event_id in ids_b:
        b.post_event("plain", event_id)
    everything = set(ids_a) | set(ids_b)
    for kite in (a, b):
        wait_for(lambda kite=kite: everything <= {e["id"] for e in kite.events()}, 20,
                 lambda kite=kite: f"all events at {kite.instance_id}\n{a.state()}\n{b.state()}")  # fmt: skip
    time.sleep(2)  # anything that would bounce back has had time to
    for kite in (a, b):
        ids = [e["id"] for e in kite.events()]
        assert sorted(i for i in ids if i in everything) == sorted(everything), kite.instance_id


def test_a_b_c_ring_does_not_amplify_and_hop_limit_emits_the_internal_event(cluster):
    a, b, c = cluster.start_together("ring-a", "ring-b", "ring-c")
    federate(a, b, "b")
    federate(b, c, "c")
    federate(c, a, "a")
    ids = [f"ring_{i}" for i in range(5)]
    for event_id in ids:
        a.post_event("plain", event_id)
    for kite in (a, b, c):
        wait_for(lambda kite=kite: set(ids) <= {e["id"] for e in kite.events()}, 20,
                 lambda kite=kite: f"ring events at {kite.instance_id}\n" + "\n".join(k.state() for k in (a, b, c)))
    time.sleep(2)
    for kite in (a, b, c):
        stored = [e["id"] for e in kite.events()]
        assert sorted(i for i in stored if i in ids) == sorted(ids), kite.instance_id
    at_c = next(e for e in c.events(source="kite") if e["id"] == ids[0])
    assert json.loads(at_c["kitefedchain"]) == [a.instance_id, b.instance_id] and at_c["kitefedhops"] == 2

    # C forwarding to D would be a third hop, over D's max_hops of 2: C drops it and says so locally.
    d = cluster.start("ring-d")
    federate(c, d, "d", max_hops=2)
    late = "ring_late"
    a.post_event("plain", late)
    failed = wait_for(
        lambda: [e for e in c.events(type="kite.federation.delivery_failed") if e["data"]["event"]["id"] == late],
        20, "the hop-limit drop at C",
    )  # fmt: skip
    assert failed[0]["data"]["peer"] == "d" and failed[0]["data"]["reason"] == "max_hops"
    assert late not in stored_ids(d)
    # Internal events never leave the instance.
    assert not [e for e in d.events() if e["type"].startswith("kite.")]


def _manage(kite: FedKite, *args: str) -> str:
    import subprocess
    import sys

    from tests.e2e.harness import REPO

    done = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=kite.env(), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_agent_messages_reach_only_the_named_agent_on_the_other_side(a, b, listen):
    federate(a, b, "b-agents", scopes=["com.kite.agent.message"])
    head = b.api("GET", "/api/events/head").json()["cursor"]
    executor = listen(b, "--source", "kite", "--agent", "executor", "--after", head)
    other = listen(b, "--source", "kite", "--agent", "auditor", "--after", head)
    message_id = f"msg_{secrets.token_hex(4)}"
    response = requests.post(
        f"{a.url}/hooks/{a.team_id()}/plain", verify=str(a.cert), timeout=10,
        json={"id": message_id, "type": "com.kite.agent.message",
              "to": f"{b.url}/agents/executor", "payload": {"task": "process_invoice"}},
    )  # fmt: skip
    assert response.status_code == 202, response.text
    executor.arrival_of(message_id, timeout=15)
    sentinel = f"evt_{secrets.token_hex(4)}"
    federate(a, b, "b-sentinel", scopes=["sentinel.*"])
    a.post_event("plain", sentinel, event_type="com.sentinel.x")
    other.arrival_of(sentinel, timeout=15)  # everyone gets untargeted events …
    assert message_id not in other.ids()  # … but not another agent's messages


def test_teams_stay_apart_across_instances(a, b):
    other_team = _manage(b, "createteam", f"ops-{secrets.token_hex(2)}")
    other_key = _manage(b, "createapikey", "--team", other_team)
    federate(a, b, "b-teams", scopes=["teams.*"])
    event_id = f"evt_{secrets.token_hex(4)}"
    a.post_event("plain", event_id, event_type="com.teams.x")
    wait_for(lambda: event_id in stored_ids(b, source="kite"), 15, "the event in B's default team")
    seen_by_other = b.api("GET", "/api/events", api_key=other_key, params={"after": "0"}).json()["results"]
    assert seen_by_other == []
    # A's sender credentials are the default team's: the other team's kite hook refuses them.
    assert b.api("GET", "/api/federation/trusted-senders", api_key=other_key).json()["results"] == []


def test_identity_certificates_pinned_on_both_sides_and_a_missing_one_is_named(cluster):
    """Issue 4: both factors between real instances; Ping names the certificate factor."""
    a, b = cluster.start_together("cert-a", "cert-b")
    cert_a = a.api("POST", "/api/federation/certificates", json={"subject": "kite a"}).json()
    cert_b = b.api("POST", "/api/federation/certificates", json={"subject": "kite b"}).json()
    token = b.token("from-a")
    peer = a.add_peer(b, "b", outbound_token=token, scopes=["stripe.*"], certificate_pem=cert_b["pem"])
    sender = b.api("POST", "/api/federation/trusted-senders",
                   json={"name": "a", "inbound_token": token, "certificate_pem": cert_a["pem"]})  # fmt: skip
    assert sender.status_code == 201, sender.text
    pinged = a.api("POST", f"/api/federation/peers/{peer['id']}/ping").json()
    assert pinged["ok"] and pinged["factors"]["certificate"] == "ok", pinged
    first = f"evt_{secrets.token_hex(4)}"
    a.post_event("plain", first)
    wait_for(lambda: first in stored_ids(b, source="kite"), 10, lambda: f"the signed event at B\n{a.state()}")

    # A loses its certificate: B refuses (both factors are required of a pinned sender) and says why.
    assert a.api("DELETE", f"/api/federation/certificates/{cert_a['id']}").status_code == 204
    pinged = a.api("POST", f"/api/federation/peers/{peer['id']}/ping").json()
    assert not pinged["ok"] and pinged["status_code"] == 401 and pinged["factors"]["certificate"] == "failed", pinged
    assert "missing_certificate" in pinged["error"] or "v1a" in pinged["error"]
    second = f"evt_{secrets.token_hex(4)}"
    a.post_event("plain", second)
    wait_for(lambda: a.peer(peer["id"])["paused"] == "auth_failed", 10, lambda: f"auth_failed\n{a.state()}")
    assert second not in stored_ids(b, source="kite")


def test_rotating_the_secret_while_events_flow_fails_no_delivery(cluster):
    """Issue 4: B rotates what it checks (the old secret stays valid 24 h), A switches to the
    new one, events flowing the whole time: every event arrives, no attempt is refused."""
    import threading

    a, b = cluster.start_together("rot-a", "rot-b")
    token = b.token("from-a")
    peer = a.add_peer(b, "b", outbound_token=token, scopes=["stripe.*"])
    sender = b.trust("a", token)
    sent, stop = [], threading.Event()

    def flow():
        while not stop.is_set():
            event_id = f"rot_{len(sent)}_{secrets.token_hex(2)}"
            a.post_event("plain", event_id)
            sent.append(event_id)
            time.sleep(0.05)

    flowing = threading.Thread(target=flow)
    flowing.start()
    try:
        time.sleep(1)
        rotated = b.api("POST", f"/api/federation/peers/{sender['id']}/rotate-secret", json={"direction": "inbound"})
        assert rotated.status_code == 200, rotated.text
        time.sleep(1)
        switched = a.api("POST", f"/api/federation/peers/{peer['id']}/rotate-secret",
                         json={"direction": "outbound", "secret": rotated.json()["secret"]})  # fmt: skip
        assert switched.status_code == 200, switched.text
        assert switched.json()["fingerprint"] == rotated.json()["fingerprint"]  # what B checks is what A signs with
        time.sleep(1)
    finally:
        stop.set()
        flowing.join()
    wait_for(lambda: set(sent) <= set(stored_ids(b, source="kite")), 20, lambda: f"every event at B\n{a.state()}")
    deliveries = a.api("GET", f"/api/federation/peers/{peer['id']}/deliveries").json()["results"]
    assert deliveries and {d["outcome"] for d in deliveries} == {"delivered"}, deliveries[:3]
    assert a.peer(peer["id"])["paused"] == "" and a.outbox(peer["id"], "dead") == []


def test_deleting_a_peer_terminates_it_on_the_other_side_and_both_can_peer_again(cluster):
    a, b = cluster.start_together("term-a", "term-b")
    first = federate(a, b, "b", scopes=["stripe.*"])
    senders = b.api("GET", "/api/federation/trusted-senders").json()["results"]
    assert a.api("DELETE", f"/api/federation/peers/{first['id']}").status_code == 204
    wait_for(lambda: {s["status"] for s in b.api("GET", "/api/federation/trusted-senders").json()["results"]}
             == {"revoked"}, 10, "B to mark A revoked")  # fmt: skip
    assert len(senders) == 1
    # A fresh peering with the same names works.
    again = federate(a, b, "b", scopes=["stripe.*"])
    assert again["id"] != first["id"]
    event_id = f"evt_{secrets.token_hex(4)}"
    a.post_event("plain", event_id)
    wait_for(lambda: event_id in stored_ids(b, source="kite"), 10, lambda: f"the event after re-peering\n{a.state()}")


def test_one_paste_invitation_reaches_active_on_both_sides_and_events_flow_both_ways(cluster):
    """Issue 4: A invites, B pastes; no secret is copied by hand; both sides active in seconds."""
    import base64

    a, b = cluster.start_together("inv-a", "inv-b")
    created = a.api("POST", "/api/federation/invitations", json={"name": "b", "scopes": ["stripe.*"]})
    assert created.status_code == 201, created.text
    invitation = created.json()["invitation"]
    assert invitation.startswith("kite-invite-v1.") and a.peer(created.json()["peer_id"])["status"] == "proposed"
    started = time.monotonic()
    accepted = b.api("POST", "/api/federation/invitations/accept",
                     json={"invitation": invitation, "name": "a", "scopes": ["stripe.*"]})  # fmt: skip
    assert accepted.status_code == 201, accepted.text
    a_side, b_side = created.json()["peer_id"], accepted.json()["id"]
    wait_for(lambda: a.peer(a_side)["status"] == "active" and b.peer(b_side)["status"] == "active", 15,
             lambda: f"both sides active\n{a.state()}\n{b.state()}")  # fmt: skip
    assert time.monotonic() - started < 15
    assert a.peer(a_side)["inbound_fingerprint"] == b.peer(b_side)["outbound_fingerprint"]
    assert b.peer(b_side)["inbound_fingerprint"] == a.peer(a_side)["outbound_fingerprint"]
    assert a.peer(a_side)["certificate_thumbprint"] and b.peer(b_side)["certificate_thumbprint"]
    # Each side granted the other the default, revocable fleet.agents read, and holds the other's token.
    for kite, side in ((a, a_side), (b, b_side)):
        granted = kite.api("GET", f"/api/federation/peers/{side}/grants").json()["results"]
        assert [g["resource_kind"] for g in granted] == ["fleet.agents"], granted
        assert kite.peer(side)["has_remote_grant"] is True
    to_b, to_a = f"evt_{secrets.token_hex(4)}", f"evt_{secrets.token_hex(4)}"
    a.post_event("plain", to_b)
    b.post_event("plain", to_a)
    wait_for(lambda: to_b in stored_ids(b, source="kite") and to_a in stored_ids(a, source="kite"), 10,
             "events both ways")  # fmt: skip

    # The same invitation again: B already peers with that instance (409, A is not even called).
    peers_at_b = len(b.api("GET", "/api/federation/peers").json()["results"])
    again = b.api("POST", "/api/federation/invitations/accept", json={"invitation": invitation, "name": "a2"})
    assert again.status_code == 409 and again.json()["code"] == "instance_id_taken", again.text

    def altered(text: str, **changes) -> str:
        """The invitation with fields changed (an instance ID B does not know yet: A must refuse it)."""
        payload = json.loads(base64.urlsafe_b64decode(text.split(".", 1)[1] + "=="))
        payload.update(changes)
        return "kite-invite-v1." + base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")

    # The same code under another name, or a tampered one: A refuses (401), nothing is created at B.
    reused = b.api("POST", "/api/federation/invitations/accept",
                   json={"invitation": altered(invitation, instance_id="not-a"), "name": "a2"})  # fmt: skip
    assert reused.status_code == 401 and reused.json()["code"] == "unknown_invitation", reused.text
    fresh = a.api("POST", "/api/federation/invitations", json={"name": "b3"}).json()["invitation"]
    forged = altered(fresh, instance_id="not-a", code=base64.b64encode(b"x" * 32).decode())
    refused = b.api("POST", "/api/federation/invitations/accept", json={"invitation": forged, "name": "a3"})
    assert refused.status_code == 401, refused.text
    too_new = b.api("POST", "/api/federation/invitations/accept",
                    json={"invitation": altered(invitation, contract_version=2), "name": "a4"})  # fmt: skip
    assert too_new.status_code == 422, too_new.text
    assert len(b.api("GET", "/api/federation/peers").json()["results"]) == peers_at_b

    # Expired: the code is known but past its time.
    late = a.api("POST", "/api/federation/invitations", json={"name": "b5"}).json()
    with psycopg.connect(a.database_url) as connection:
        connection.execute("UPDATE federation_peer SET invitation_expires_at = now() - interval '1 second' WHERE id = %s",
                           (late["peer_id"],))  # fmt: skip
    expired = b.api("POST", "/api/federation/invitations/accept",
                    json={"invitation": altered(late["invitation"], instance_id="not-a"), "name": "a5"})  # fmt: skip
    assert expired.status_code == 401 and expired.json()["code"] == "unknown_invitation", expired.text


def test_ping_names_the_failing_factor_wrong_secret_wrong_pem_wrong_tls_pin(cluster):
    """Issue 4, manual peering: each broken factor is named by Ping, and fixing it shows ok."""
    a, b = cluster.start_together("pingf-a", "pingf-b")
    a.api("POST", "/api/federation/certificates", json={"subject": "kite a"})
    stranger = b.api("POST", "/api/federation/certificates", json={"subject": "not a"}).json()  # some other PEM
    token = b.token("from-a")
    peer = a.add_peer(b, "b", outbound_token=token, scopes=["nothing.*"])
    sender = b.trust("a", token)

    def ping():
        return a.api("POST", f"/api/federation/peers/{peer['id']}/ping").json()

    assert ping()["ok"]
    # Wrong secret on A's side.
    a.api("PATCH", f"/api/federation/peers/{peer['id']}", json={"outbound_token": "whsec_" + "A" * 43})
    wrong = ping()
    assert not wrong["ok"] and wrong["factors"]["secret"] == "mismatch", wrong
    a.api("PATCH", f"/api/federation/peers/{peer['id']}", json={"outbound_token": token})
    assert ping()["ok"]
    # B pinned the wrong certificate for A.
    b.api("DELETE", f"/api/federation/trusted-senders/{sender['id']}")
    b.api("POST", "/api/federation/trusted-senders", json={"name": "a2", "inbound_token": token,
                                                           "certificate_pem": stranger["pem"]})  # fmt: skip
    pem = ping()
    assert not pem["ok"] and pem["factors"]["certificate"] == "failed" and pem["factors"]["secret"] == "ok", pem
    # A pinned the wrong TLS certificate for B.
    a.api("PATCH", f"/api/federation/peers/{peer['id']}", json={"tls_fingerprint": "sha256:" + "0" * 64})
    tls = ping()
    assert not tls["ok"] and tls["factors"]["tls"] == "failed", tls


def invite(a: FedKite, b: FedKite) -> tuple[int, int]:
    """A invites, B accepts, both active: (A's peer id, B's peer id)."""
    a.api("POST", "/api/federation/certificates", json={"subject": f"kite {a.instance_id}"})
    b.api("POST", "/api/federation/certificates", json={"subject": f"kite {b.instance_id}"})
    created = a.api("POST", "/api/federation/invitations", json={"name": "b", "scopes": ["stripe.*"]}).json()
    accepted = b.api("POST", "/api/federation/invitations/accept",
                     json={"invitation": created["invitation"], "name": "a", "scopes": ["stripe.*"]})  # fmt: skip
    assert accepted.status_code == 201, accepted.text
    a_side, b_side = created["peer_id"], accepted.json()["id"]
    wait_for(lambda: a.peer(a_side)["status"] == "active" and b.peer(b_side)["status"] == "active", 15,
             lambda: f"both sides active\n{a.state()}\n{b.state()}")  # fmt: skip
    return a_side, b_side


def test_invitation_peers_rotate_secrets_and_certificates_over_the_channel_without_a_failed_delivery(cluster):
    """Issue 4: for invitation peers a rotation is carried to the other side over the signed
    channel — no secret or PEM is shown or pasted — while events flow both ways."""
    import threading

    a, b = cluster.start_together("chan-a", "chan-b")
    a_side, b_side = invite(a, b)
    sent_to_b, sent_to_a, stop = [], [], threading.Event()

    def flow():
        while not stop.is_set():
            for kite, sent in ((a, sent_to_b), (b, sent_to_a)):
                event_id = f"chan_{kite.instance_id}_{len(sent)}_{secrets.token_hex(2)}"
                kite.post_event("plain", event_id)
                sent.append(event_id)
            time.sleep(0.05)

    flowing = threading.Thread(target=flow)
    flowing.start()
    try:
        time.sleep(0.5)
        for direction in ("inbound", "outbound"):
            rotated = a.api("POST", f"/api/federation/peers/{a_side}/rotate-secret", json={"direction": direction})
            assert rotated.status_code == 200, rotated.text
            assert rotated.json()["propagated"] is True and "secret" not in rotated.json(), rotated.json()
            time.sleep(0.5)
        # A new identity certificate: B pins it at once, then A deletes the old one.
        old = a.api("GET", "/api/federation/certificates").json()["results"]
        issued = a.api("POST", "/api/federation/certificates", json={"subject": "kite chan-a, rotated"})
        assert issued.status_code == 201, issued.text
        assert issued.json()["announced"] == [{"peer": "b", "ok": True, "pinned": True}], issued.json()
        assert b.peer(b_side)["certificate_thumbprint"] == issued.json()["thumbprint"]
        time.sleep(0.5)
        for row in old:
            assert a.api("DELETE", f"/api/federation/certificates/{row['id']}").status_code == 204
        time.sleep(0.5)
    finally:
        stop.set()
        flowing.join()
    # What each side checks is what the other signs with, after both rotations.
    assert a.peer(a_side)["inbound_fingerprint"] == b.peer(b_side)["outbound_fingerprint"]
    assert a.peer(a_side)["outbound_fingerprint"] == b.peer(b_side)["inbound_fingerprint"]
    pinged = a.api("POST", f"/api/federation/peers/{a_side}/ping").json()
    assert pinged["ok"] and pinged["factors"] == {"tls": "ok", "certificate": "ok", "secret": "ok", "clock": "ok"}, pinged
    wait_for(lambda: set(sent_to_b) <= set(stored_ids(b, source="kite"))
             and set(sent_to_a) <= set(stored_ids(a, source="kite")), 20,
             lambda: f"every event on both sides\n{a.state()}\n{b.state()}")  # fmt: skip
    for kite, side in ((a, a_side), (b, b_side)):
        deliveries = kite.api("GET", f"/api/federation/peers/{side}/deliveries").json()["results"]
        assert deliveries and {d["outcome"] for d in deliveries} == {"delivered"}, deliveries[:3]
        assert kite.peer(side)["paused"] == "" and kite.outbox(side, "dead") == []


def test_a_rotation_the_peer_cannot_be_told_changes_nothing_or_hands_over_the_secret(cluster):
    """Outbound: the peer must learn the new secret first, so a peer that is down → 502, nothing
    changed. Inbound: the new secret is in force here (the old one still valid), and shown once
    with the reason, to be pasted on the other side."""
    a, b = cluster.start_together("chanf-a", "chanf-b")
    a_side, _ = invite(a, b)
    before = a.peer(a_side)
    b.stop()
    refused = a.api("POST", f"/api/federation/peers/{a_side}/rotate-secret", json={"direction": "outbound"})
    assert refused.status_code == 502 and refused.json()["code"] == "peer_unreachable", refused.text
    assert a.peer(a_side)["outbound_fingerprint"] == before["outbound_fingerprint"]
    handed = a.api("POST", f"/api/federation/peers/{a_side}/rotate-secret", json={"direction": "inbound"})
    assert handed.status_code == 200, handed.text
    body = handed.json()
    assert body["propagated"] is False and body["secret"].startswith("whsec_") and body["propagation_error"], body
    assert a.peer(a_side)["inbound_fingerprint"] == body["fingerprint"] != before["inbound_fingerprint"]
