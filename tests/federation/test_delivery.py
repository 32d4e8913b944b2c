"""The outbox state machine against a real HTTPS endpoint on loopback that answers
what each test needs (503, 429, 401, 410, 400 …): real TLS pinning, signing,
claims and database rows; only the far side's answers are chosen."""

import contextlib
import json
import re
import ssl
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from unittest.mock import ANY
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from federation import backoff, certificates, client, dispatch, outbox, peers, services
from federation.models import Delivery, IdentityCertificate, OutboxEntry, Peer, PeerHealth
from ingest import services as ingest_services
from ingest.cloudevent import Draft
from ingest.models import Source
from kite import fastsql, tls

SECRET = "whsec_c2hhcmVkLXNlY3JldC1mb3ItZmVkZXJhdGlvbi10ZXN0cyE="


class Endpoint:
    """HTTPS server answering from a script of (status, headers, body); records requests."""

    def __init__(self, tmp_path):
        cert, key = tls.ensure_server_certificate(tmp_path / "tls", ["127.0.0.1"])
        self.fingerprint = tls.fingerprint_of_pem(cert.read_bytes())
        self.answers: list[tuple[int, dict, object]] = []
        self.default = (202, {}, {"id": "x", "duplicate": False})
        self.requests: list[tuple[dict, bytes]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                endpoint.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status, headers, answer = endpoint.answers.pop(0) if endpoint.answers else endpoint.default
                if callable(answer):
                    answer = answer(body)
                payload = json.dumps(answer).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):  # the peer's /api/federation/ping
                endpoint.requests.append(({k.lower(): v for k, v in self.headers.items()}, b""))
                payload = json.dumps({"instance_id": "kite-b", "time": timezone.now().isoformat(),
                                      "capabilities": {"batch_max": 100}}).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/hooks/tm_remote/kite"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def endpoint(tmp_path):
    started = Endpoint(tmp_path)
    yield started
    started.close()


@pytest.fixture
def peer(team, endpoint):
    return services.peer_create(
        team=team, name="b", peer_hook_url=endpoint.url, outbound_token=SECRET, scopes=["*"],
        tls_fingerprint=endpoint.fingerprint,
    ).row  # fmt: skip


def make_event(team, event_id="e1"):
    source = Source.objects.get(team=team, name="kite")
    draft = Draft(id=event_id, type="com.stripe.charge.succeeded", time=timezone.now(), data_json='{"n": 1}',
                  source="kite://here/tm/stripe")  # fmt: skip
    return ingest_services.event_store(source=source, draft=draft).event


def make_entry(event_id="e1"):
    return OutboxEntry.objects.get(event__ce_id=event_id)


def make_due():
    OutboxEntry.objects.filter(status="pending").update(next_attempt_at=timezone.now())


def test_a_deliverys_outcome_is_recorded_in_the_health_row_and_never_updates_the_peer_row(team, peer, endpoint):
    """A failure and the success after it move the peer's health (PeerHealth): the row an operator
    configures (federation_peer) gets no UPDATE from either."""
    rewrites = re.compile(r'UPDATE\s+"?federation_peer"?\s+SET', re.IGNORECASE)
    make_event(team)
    endpoint.answers = [(503, {}, {"detail": "busy"})]
    with CaptureQueriesContext(connection) as failed:
        assert outbox.deliver_peer(peer.pk) == 0
    health = PeerHealth.objects.get(peer=peer)
    assert (health.consecutive_failures, health.last_error) == (1, ANY) and health.last_error
    make_due()
    with CaptureQueriesContext(connection) as delivered:
        assert outbox.deliver_peer(peer.pk) == 1
    health.refresh_from_db()
    assert (health.consecutive_failures, health.last_error) == (0, "")
    assert make_entry().status == "delivered"
    written = [query["sql"] for query in [*failed.captured_queries, *delivered.captured_queries]]
    assert any("federation_peerhealth" in sql for sql in written)  # the captures did see the writes
    assert not [sql for sql in written if rewrites.search(sql)]


def test_delivery_is_signed_so_any_standard_webhooks_library_verifies_it(team, peer, endpoint):
    make_event(team)
    assert outbox.deliver_peer(peer.pk) == 1
    headers, body = endpoint.requests[0]
    assert Webhook(SECRET).verify(body, headers)["id"] == "e1"
    assert headers["webhook-id"] == str(make_entry().msg_id) and headers["kite-peer"]
    assert headers["content-type"] == "application/cloudevents+json"
    sent = json.loads(body)
    assert sent["kitefedhops"] == 1 and "kitecursor" not in sent
    entry = make_entry()
    assert (entry.status, entry.attempts) == ("delivered", 1)
    assert Delivery.objects.get().outcome == "delivered"


def test_transient_failure_backs_off_and_retries_with_the_same_webhook_id(team, peer, endpoint):
    endpoint.answers = [(503, {}, {"detail": "busy", "code": "x"})]
    make_event(team)
    before = timezone.now()
    assert outbox.deliver_peer(peer.pk) == 0
    entry = make_entry()
    assert (entry.status, entry.attempts) == ("pending", 1) and "503" in entry.last_error
    assert before + timedelta(seconds=0.7) <= entry.next_attempt_at <= timezone.now() + timedelta(seconds=1.3)
    make_due()
    assert outbox.deliver_peer(peer.pk) == 1
    first, second = (headers["webhook-id"] for headers, _ in endpoint.requests)
    assert first == second == str(entry.msg_id)


def test_retry_after_is_honoured(team, peer, endpoint):
    endpoint.answers = [(429, {"Retry-After": "40"}, {"detail": "slow down"})]
    make_event(team)
    outbox.deliver_peer(peer.pk)
    wait = (make_entry().next_attempt_at - timezone.now()).total_seconds()
    assert 38 <= wait <= 40


def test_dead_after_ten_attempts_then_replayed(team, peer, endpoint):
    make_event(team)
    OutboxEntry.objects.update(attempts=backoff.MAX_ATTEMPTS - 1)
    endpoint.answers = [(500, {}, {"detail": "boom"})]
    outbox.deliver_peer(peer.pk)
    assert (make_entry().status, make_entry().attempts) == ("dead", 10)
    assert outbox.replay_dead(peer=peer, limit=10) == 1
    assert (make_entry().status, make_entry().attempts) == ("pending", 0)
    assert outbox.deliver_peer(peer.pk) == 1 and make_entry().status == "delivered"


def test_other_4xx_is_dead_at_once_with_the_reason(team, peer, endpoint):
    endpoint.answers = [(422, {}, {"detail": "unsupported contract", "code": "x"})]
    make_event(team)
    outbox.deliver_peer(peer.pk)
    assert make_entry().status == "dead" and "unsupported contract" in make_entry().last_error


def test_401_pauses_the_peer_as_auth_failed_without_dead_lettering(team, peer, endpoint):
    endpoint.answers = [(401, {}, {"detail": "bad", "code": "bad_secret"})]
    make_event(team)
    make_event(team, "e2")
    outbox.deliver_peer(peer.pk)
    peer.refresh_from_db()
    assert peer.paused == "auth_failed" and "401" in peer.last_error
    assert set(OutboxEntry.objects.values_list("status", flat=True)) == {"pending"}
    make_due()
    assert outbox.deliver_peer(peer.pk) == 0 and len(endpoint.requests) == 1  # paused: nothing sent
    services.peer_update(peer=peer, outbound_token=SECRET)  # the operator fixes the token
    assert outbox.deliver_peer(peer.pk) == 2


def test_a_401_for_clock_skew_is_retried_like_an_outage_and_a_heartbeat_resumes_the_queue(team, peer, endpoint):
    """stale_timestamp is the clocks disagreeing, not a wrong credential: nothing for the operator to
    paste. The queue goes down after five refusals and drains once a signed ping passes again."""
    from federation import heartbeat

    endpoint.default = (401, {}, {"detail": "webhook-timestamp is -600 s from this server's clock", "code": "stale_timestamp"})
    make_event(team)
    for _ in range(5):
        make_due()
        outbox.deliver_peer(peer.pk)
    peer.refresh_from_db()
    assert peer.paused == "down" and peer.consecutive_failures == 5 and "clock" in peer.last_error
    assert make_entry().status == "pending"
    # The clock is fixed: its ping passes (and advertises batches).
    endpoint.default = (200, {}, lambda body: [{"id": e["id"], "result": "accepted"} for e in json.loads(body)]
                        if body.startswith(b"[") else {"id": json.loads(body or b"{}").get("id")})  # fmt: skip
    assert heartbeat.heartbeat(peer).ok  # and kicks the queue: the task it queues does this
    peer.refresh_from_db()
    assert peer.paused == ""
    make_due()  # its backoff has run out: the next heartbeat is 30 s away
    assert outbox.deliver_peer(peer.pk) == 1 and make_entry().status == "delivered"


def test_410_revokes_the_peer(team, peer, endpoint):
    endpoint.answers = [(410, {}, {"detail": "terminated"})]
    make_event(team)
    outbox.deliver_peer(peer.pk)
    assert Peer.objects.get(pk=peer.pk).status == "revoked" and make_entry().status == "dead"


def test_five_failures_in_a_row_mark_the_peer_down_and_stop_burning_attempts(team, peer, endpoint):
    endpoint.default = (503, {}, {"detail": "down"})
    for n in range(3):
        make_event(team, f"e{n}")
    for _ in range(5):
        make_due()
        outbox.deliver_peer(peer.pk)
    peer.refresh_from_db()
    assert peer.paused == "down" and peer.consecutive_failures == 5
    sent = len(endpoint.requests)
    make_due()
    outbox.deliver_peer(peer.pk)
    assert len(endpoint.requests) == sent  # paused: no attempt burnt
    assert not OutboxEntry.objects.filter(status="dead").exists()
    assert sum(OutboxEntry.objects.values_list("attempts", flat=True)) == 5  # one per failed request


def test_an_expired_lease_is_claimed_again(team, peer, endpoint):
    make_event(team)
    claimed = outbox.claim(peer.pk, 10)
    assert [e.status for e in OutboxEntry.objects.all()] == ["in_flight"] and claimed
    assert outbox.claim(peer.pk, 10) == []  # leased: nobody else takes it
    OutboxEntry.objects.update(leased_until=timezone.now() - timedelta(seconds=1))  # the worker died
    assert outbox.deliver_peer(peer.pk) == 1 and make_entry().status == "delivered"


def test_a_claim_takes_expired_leases_first_then_due_entries_each_once_with_its_event(team, peer):
    for n in range(5):
        make_event(team, f"c{n}")
    now = timezone.now()
    OutboxEntry.objects.filter(event__ce_id__in=["c3", "c4"]).update(
        status="in_flight", leased_until=now - timedelta(seconds=1))  # fmt: skip
    OutboxEntry.objects.filter(event__ce_id="c0").update(next_attempt_at=now + timedelta(hours=1))  # not due
    OutboxEntry.objects.filter(event__ce_id="c2").update(next_attempt_at=now - timedelta(minutes=1))
    first = outbox.claim(peer.pk, 3)
    # Expired leases (c3, c4), then the entry due first (c2); returned in id order.
    assert [e.event.ce_id for e in first] == ["c2", "c3", "c4"]
    assert all(e.status == "in_flight" and e.leased_until > now for e in OutboxEntry.objects.filter(pk__in=[e.pk for e in first]))
    assert first[0].provenance == {"kitefedorigin": first[0].provenance["kitefedorigin"], "kitefedchain": ANY,
                                   "kitefedhops": 1}  # fmt: skip
    assert json.loads(outbox.wire_json(first[0]))["data"] == {"n": 1} and first[0].event.extensions == {}
    assert [e.event.ce_id for e in outbox.claim(peer.pk, 10)] == ["c1"]
    assert outbox.claim(peer.pk, 10) == []


def test_a_checked_claim_takes_nothing_once_the_peers_row_or_its_teams_certificates_changed(team, peer):
    """claim(seen=…): the view a drain holds, checked by the claim statement itself. Changed since
    (any update of the row; a certificate issued or expired): None, and nothing is leased."""
    for n in range(4):
        make_event(team, f"k{n}")

    def read():
        view = outbox.PeerView(peer.pk)
        assert view.current() is not None
        return view.seen()

    def statuses():
        return sorted(OutboxEntry.objects.values_list("status", flat=True))

    seen = read()
    assert seen[0] and seen[1] == team.id
    assert [e.event.ce_id for e in outbox.claim(peer.pk, 1, seen=seen)] == ["k0"]  # current: claimed

    Peer.objects.filter(pk=peer.pk).update(paused="")  # the same value: still a new row version
    assert outbox.claim(peer.pk, 1, seen=seen) is None
    assert statuses() == ["in_flight", "pending", "pending", "pending"]

    seen = read()
    assert [e.event.ce_id for e in outbox.claim(peer.pk, 1, seen=seen)] == ["k1"]
    issued = certificates.issue(team=team, subject="kite-a identity")
    assert outbox.claim(peer.pk, 1, seen=seen) is None
    assert statuses() == ["in_flight", "in_flight", "pending", "pending"]

    seen = read()
    assert issued.pk in seen[2]
    assert [e.event.ce_id for e in outbox.claim(peer.pk, 1, seen=seen)] == ["k2"]
    IdentityCertificate.objects.filter(pk=issued.pk).update(not_after=timezone.now() - timedelta(seconds=1))
    assert outbox.claim(peer.pk, 1, seen=seen) is None  # expired: no longer among the valid ones
    assert statuses() == ["in_flight", "in_flight", "in_flight", "pending"]

    seen = read()
    assert issued.pk not in seen[2]
    assert [e.event.ce_id for e in outbox.claim(peer.pk, 5, seen=seen)] == ["k3"]
    assert outbox.claim(peer.pk, 5, seen=seen) == []  # current, nothing due


@contextlib.contextmanager
def synchronous_commit_seen(kind_of):
    """[(kind, synchronous_commit)] right after each statement `kind_of(sql)` names (None: not
    recorded), read on the statement's own connection and transaction."""
    seen = []

    def observe(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        kind = kind_of(sql)
        if kind:
            with connection.cursor() as cursor:
                cursor.execute("SHOW synchronous_commit")
                seen.append((kind, cursor.fetchone()[0]))
        return result

    with connection.execute_wrapper(observe):
        yield seen


def _wal_flushes() -> int:
    """How many times PostgreSQL has flushed its WAL to disk (pg_stat_wal.wal_sync, fsync is on in
    the tests' server), this backend's own counts included."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")  # this backend's counts, reported at its next statement
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
    with connection.cursor() as cursor:
        cursor.execute("SELECT wal_sync FROM pg_stat_wal")
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_the_claim_and_the_delivered_mark_commit_without_waiting_for_the_wal_flush_and_the_event_stays_durable(
    team, peer, endpoint
):
    """The outbox's bookkeeping (a crash that loses it only sends the entry again) does not wait for
    PostgreSQL's WAL flush; the webhook's event does, and so does a caller's own transaction. Each
    is one statement in its own transaction (fastsql.unflushed_forms): counted by PostgreSQL's own
    WAL flushes, 30 claims and 30 delivered marks against 30 durable one-row commits."""
    for index in range(30):
        make_event(team, f"w{index}")
    entries = OutboxEntry.objects.order_by("id")

    before = _wal_flushes()
    for _ in range(30):  # durable single-statement commits, for comparison: one flush each
        OutboxEntry.objects.filter(pk=entries[0].pk).update(next_attempt_at=timezone.now())
    durable = _wal_flushes() - before

    before = _wal_flushes()
    claimed = [outbox.claim(peer.pk, 1) for _ in range(30)]
    for (entry,) in claimed:
        answer = client.PeerAnswer(status_code=202, body={}, headers={}, latency_ms=1)
        assert outbox._mark_delivered(peer, [(entry, answer)], timezone.now(), [entry.leased_until]) == [entry.pk]
    bookkeeping = _wal_flushes() - before
    assert durable >= 25, durable  # the measure works: a durable commit waits for its flush
    assert bookkeeping <= 10, (bookkeeping, durable)  # 60 commits, the WAL writer's own flushes only
    assert OutboxEntry.objects.filter(status="delivered").count() == 30 and Delivery.objects.count() == 30

    with transaction.atomic():  # inside a caller's transaction: that one's commit stays durable
        make_event(team, "inside")
        assert [e.event.ce_id for e in outbox.claim(peer.pk, 10)] == ["inside"]
        with connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            assert cursor.fetchone()[0] == "on"
    with transaction.atomic(), fastsql.unflushed(), connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"  # (a savepoint inside a caller's transaction changes nothing)
    with connection.cursor() as cursor:  # and nothing lingers on the connection
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"


# --- leases: short, renewed while a delivery runs, fenced ---------------------------------------


def _claimed_by_a_drain(peer):
    """Entries claimed as a deliver_peer run claims them, with the run's Drain."""
    entries = outbox.claim(peer.pk, 10)
    drain = outbox.Drain(dispatch.kick_key(peer.pk))
    drain.took(entries)
    return entries, drain


def _taken_over(peer):
    """This worker stalled past its lease and another worker claimed the entries: theirs now."""
    OutboxEntry.objects.update(leased_until=timezone.now() - timedelta(seconds=1))
    return outbox.claim(peer.pk, 10)


@pytest.mark.django_db(transaction=True)
def test_a_delivery_slower_than_the_lease_keeps_it_renewed_so_no_other_worker_takes_the_entry(
    team, peer, endpoint, settings
):
    """The peer takes twice the lease to answer; meanwhile another worker (the peer's own
    request thread, on a connection of its own) finds nothing to claim."""
    from django.db import connections

    settings.KITE_OUTBOX_LEASE_SECONDS = 3
    make_event(team)
    seen = []

    def slow(body):
        try:
            claimed_at = make_entry().leased_until - timedelta(seconds=3)
            while timezone.now() < claimed_at + timedelta(seconds=6):  # twice the lease
                seen.append(outbox.claim(peer.pk, 10))
                time.sleep(0.5)
            seen.append(make_entry().leased_until - claimed_at)
        finally:
            connections.close_all()
        return {"id": json.loads(body)["id"], "duplicate": False}

    endpoint.default = (202, {}, slow)
    assert outbox.deliver_peer(peer.pk) == 1
    *claims, lease_end = seen
    assert claims and all(claim == [] for claim in claims)  # renewed every 0.75 s: never free
    assert lease_end > timedelta(seconds=6)  # the lease was carried past twice its length
    entry = make_entry()
    assert (entry.status, entry.attempts, len(endpoint.requests)) == ("delivered", 1, 1)
    assert list(Delivery.objects.values_list("outcome", flat=True)) == ["delivered"]


def test_a_renewal_moves_the_lease_forward_and_a_worker_that_lost_it_records_no_outcome(team, peer, endpoint):
    make_event(team)
    mine, drain = _claimed_by_a_drain(peer)
    claimed = make_entry().leased_until
    drain.renew()
    renewed = make_entry().leased_until
    assert renewed > claimed and renewed == drain.tokens[-1] and drain.lost == set()

    theirs = _taken_over(peer)
    assert [e.pk for e in theirs] == [e.pk for e in mine] and theirs[0].leased_until not in drain.tokens
    target = peers.target_for(peer)
    assert outbox.send(peer, target, mine, drain) is True  # it went out (the peer dedups by webhook-id) ...
    endpoint.answers = [(503, {}, {"detail": "busy"})]
    assert outbox.send(peer, target, mine, drain) is False
    drain.release(mine)
    # ... but neither its success, nor a failure, nor a release was recorded over theirs.
    entry = make_entry()
    assert (entry.status, entry.leased_until, entry.attempts, entry.last_error) == (
        "in_flight", theirs[0].leased_until, 0, "")  # fmt: skip
    assert not Delivery.objects.exists()
    assert Peer.objects.get(pk=peer.pk).consecutive_failures == 0

    drain.took(mine)  # as if still held: a renewal finds it taken, and it is not sent again
    drain.renew()
    assert drain.lost == {entry.pk} and drain.held == set() and make_entry().leased_until == theirs[0].leased_until
    assert drain.still_ours(mine) == []


def test_an_outcome_carries_its_own_lease_not_every_lease_of_a_long_drain(team, peer, endpoint, monkeypatch):
    """A drain claims again and again; each outcome is fenced by the lease of its own claim (and
    the run's renewals), so what one record costs does not grow with how long the drain runs."""
    monkeypatch.setattr(outbox, "CLAIM_UNBATCHED", 1)  # one claim, one lease, per event
    for n in range(12):
        make_event(team, f"long{n}")
    carried = []
    record = outbox._record_success
    monkeypatch.setattr(outbox, "_record_success", lambda *a: carried.append(list(a[3])) or record(*a))
    assert outbox.deliver_peer(peer.pk, helper=True) == 12  # (a helper drains alone: no second one called)
    assert len(carried) == 12 and all(len(tokens) == 1 for tokens in carried)
    assert len({tokens[0] for tokens in carried}) == 12  # each its own claim's
    assert OutboxEntry.objects.filter(status="delivered").count() == Delivery.objects.count() == 12


def test_a_drain_whose_leases_go_unrenewed_stops_before_they_run_out(team, peer, endpoint, settings, monkeypatch):
    """Renewals failing (the database away from the keeper thread): nothing is sent on a lease that
    may have ended; what was not sent is left for whoever claims it once it has."""
    settings.KITE_OUTBOX_LEASE_SECONDS = 3
    settings.KITE_OUTBOX_IN_FLIGHT = 1  # one call after another, so the lease runs out mid-drain
    monkeypatch.setattr(outbox.Drain, "renewal_due", lambda drain: False)
    for n in range(5):
        make_event(team, f"u{n}")

    def slow(body):
        time.sleep(0.8)
        return {"id": json.loads(body)["id"], "duplicate": False}

    endpoint.default = (202, {}, slow)
    started = time.monotonic()
    delivered = outbox.deliver_peer(peer.pk)
    assert time.monotonic() - started < 3 - 0.75 + 1  # stopped within the lease (a send started before may finish)
    assert 1 <= delivered < 5 and len(endpoint.requests) == delivered
    left = OutboxEntry.objects.exclude(status="delivered")
    assert left.count() == 5 - delivered and {(e.status, e.attempts) for e in left} == {("in_flight", 0)}


def test_a_killed_tasks_kick_flag_holds_kicks_back_two_seconds_at_most(peer):
    from kite.ratelimit import redis_client

    redis_client().delete(dispatch.kick_key(peer.pk))
    assert dispatch.first_kick(peer.pk) is True  # the kick that queued a task, which is then killed
    set_at = time.monotonic()
    assert dispatch.first_kick(peer.pk) is False
    deadline = set_at + dispatch.KICK_FLAG_SECONDS + 1
    while not dispatch.first_kick(peer.pk):  # the sweeper's kicks, every second
        assert time.monotonic() < deadline, "the dead task's flag still holds kicks back"
        time.sleep(0.05)
    assert time.monotonic() - set_at <= 2.2


def test_a_webhook_is_accepted_and_its_entry_kept_when_the_broker_cannot_take_the_kick(
    client, team, peer, monkeypatch, django_capture_on_commit_callbacks
):
    import kombu.exceptions

    from federation import tasks
    from kite.ratelimit import redis_client

    redis_client().delete(dispatch.kick_key(peer.pk))
    Source.objects.create(team=team, name="plain", kind="none")

    def broker_down(*args, **kwargs):
        raise kombu.exceptions.OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(tasks.deliver_peer, "delay", broker_down)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client.post(f"/hooks/{team.id}/plain", b'{"id": "e1", "type": "x"}', content_type="application/json")
    assert response.status_code == 202, response.content
    assert callbacks  # the kick ran after commit, failed, and failed nothing else
    assert list(OutboxEntry.objects.values_list("status", flat=True)) == ["pending"]  # for the sweeper
    assert outbox.due_peer_ids() == [peer.pk]


@pytest.mark.parametrize("value", ["2", "3601"])
def test_a_lease_out_of_range_fails_at_start_naming_the_variable(tmp_path, value):
    from tests.kite.test_settings import start

    started = start(tmp_path, remove=("DATABASE_URL", "REDIS_URL"), KITE_OUTBOX_LEASE_SECONDS=value)
    assert started.returncode != 0 and "KITE_OUTBOX_LEASE_SECONDS must be between 3 and 3600" in started.stderr


def test_a_draining_task_holds_the_kick_flag_so_kicks_meanwhile_queue_nothing(team, peer, endpoint):
    from kite.ratelimit import redis_client

    key = dispatch.kick_key(peer.pk)
    redis_client().delete(key)
    make_event(team, "k0")
    assert dispatch.first_kick(peer.pk) is True  # k0's kick after commit: sets the flag, queues a task
    make_event(team, "k1")
    assert dispatch.first_kick(peer.pk) is False  # k1's: suppressed, left to that task
    seen = []

    def answer(body):
        seen.append((redis_client().exists(key), dispatch.first_kick(peer.pk)))  # a kick mid-drain
        return {"id": json.loads(body)["id"], "duplicate": False}

    endpoint.default = (202, {}, answer)
    assert outbox.deliver_peer(peer.pk) == 2
    assert seen == [(1, False), (1, False)]  # held throughout: no second task queued
    assert redis_client().exists(key) == 0  # cleared at the end: the next event's kick queues a task
    assert dispatch.first_kick(peer.pk) is True


def test_a_backlog_calls_one_helper_that_drains_alongside(team, peer, endpoint, monkeypatch):
    from federation import tasks
    from kite.ratelimit import redis_client

    redis_client().delete(dispatch.helper_key(peer.pk), dispatch.kick_key(peer.pk))
    queued = []
    monkeypatch.setattr(tasks.deliver_peer, "delay", lambda *args, **kwargs: queued.append((args, kwargs)))
    for n in range(outbox.CLAIM_UNBATCHED + 5):
        make_event(team, f"h{n}")
    # The helper, had it run first, drains like any task and leaves the kick flag alone.
    redis_client().set(dispatch.kick_key(peer.pk), 1)
    assert outbox.deliver_peer(peer.pk, helper=True) == outbox.CLAIM_UNBATCHED + 5
    assert redis_client().exists(dispatch.kick_key(peer.pk)) == 1 and redis_client().exists(dispatch.helper_key(peer.pk)) == 0
    assert queued == []  # a helper calls no helper
    redis_client().delete(dispatch.kick_key(peer.pk))
    for n in range(outbox.CLAIM_UNBATCHED + 5):
        make_event(team, f"m{n}")
    assert outbox.deliver_peer(peer.pk) == outbox.CLAIM_UNBATCHED + 5
    assert queued == [((peer.pk,), {"helper": True})]  # the first claim was full: one helper, once


def test_batches_when_the_peer_advertises_batch_max(team, peer, endpoint):
    Peer.objects.filter(pk=peer.pk).update(batch_max=50)
    for n in range(3):
        make_event(team, f"b{n}")

    def results(body):
        events = json.loads(body)
        return [{"id": e["id"], "result": "rejected" if e["id"] == "b1" else "accepted"} for e in events]

    endpoint.default = (200, {}, results)
    assert outbox.deliver_peer(peer.pk) == 3
    headers, body = endpoint.requests[0]
    assert len(endpoint.requests) == 1 and headers["content-type"] == "application/cloudevents-batch+json"
    assert [e["id"] for e in json.loads(body)] == ["b0", "b1", "b2"]
    statuses = dict(OutboxEntry.objects.values_list("event__ce_id", "status"))
    assert statuses == {"b0": "delivered", "b1": "dead", "b2": "delivered"}


def test_outbound_pacing_holds_back_what_is_over_the_rate(team, peer, endpoint):
    Peer.objects.filter(pk=peer.pk).update(rate_limit_per_second=2)
    for n in range(5):
        make_event(team, f"p{n}")
    import time

    window = int(time.time())
    delivered = outbox.deliver_peer(peer.pk)
    windows = int(time.time()) - window + 1  # the limiter counts whole seconds
    # Never more than the rate in any second; the first second's worth goes at once.
    assert delivered == len(endpoint.requests) and 2 <= delivered <= 2 * windows
    held = OutboxEntry.objects.filter(status="pending")
    assert held.count() == 5 - delivered and all(e.attempts == 0 for e in held)
    assert delivered < 5 or windows >= 3


def test_sweeper_finds_due_peers_but_not_paused_ones(team, peer, endpoint):
    make_event(team)
    assert outbox.due_peer_ids() == [peer.pk]
    Peer.objects.filter(pk=peer.pk).update(paused="down")
    assert outbox.due_peer_ids() == []


@pytest.mark.parametrize(("their_request_landed", "status"), [(False, "enrolled"), (True, "active")])
def test_a_heartbeat_judges_the_state_by_the_row_as_it_is_now(team, peer, endpoint, their_request_landed, status):
    """The peer's first request may land while our ping is on the wire: not stuck at enrolled."""
    from federation import heartbeat

    stale = Peer.objects.get(pk=peer.pk)  # read before the ping, as the heartbeat task does
    if their_request_landed:
        PeerHealth.record(peer, last_inbound_at=timezone.now())
    assert heartbeat.heartbeat(stale).ok
    row = Peer.objects.get(pk=peer.pk)
    assert row.status == status and row.batch_max == 100 and row.remote_instance_id == "kite-b"
