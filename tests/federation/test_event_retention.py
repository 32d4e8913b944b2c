"""The event purge (KITE_EVENT_RETENTION_DAYS, ingest.services.events_purge_expired, hourly): what it
deletes — expired events with their settled outbox entries and delivery attempts — and what it keeps:
newer events, and an expired event still owed to a peer (pending or in flight), until a later run
finds it delivered or dead. Batches are small transactions read by index, and a purge stopped
midway keeps what it committed and finishes on the next run."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation import services
from federation.models import AuditEvent, Delivery, OutboxEntry
from ingest import hooks
from ingest import services as ingest_services
from ingest.models import Event, Source
from tests.federation.test_api import PEER_URL
from tests.federation.test_delivery import make_event, synchronous_commit_seen

EXPIRED = timedelta(days=10)


@pytest.fixture
def peers(team):
    return [services.peer_create(team=team, name=name, peer_hook_url=PEER_URL, scopes=["*"]).row
            for name in ("b", "c")]  # fmt: skip


def _stored(team, ce_id: str, statuses: tuple[str, str], attempts: int = 1, age: timedelta = EXPIRED) -> Event:
    """An event received `age` ago, its entries to b and c in `statuses`, each with `attempts` attempts."""
    event = make_event(team, ce_id)
    Event.objects.filter(pk=event.pk).update(received_at=timezone.now() - age)
    for entry, status in zip(OutboxEntry.objects.filter(event=event).order_by("peer__name"), statuses, strict=True):
        OutboxEntry.objects.filter(pk=entry.pk).update(status=status)
        for _ in range(attempts):
            Delivery.objects.create(peer_id=entry.peer_id, entry=entry, outcome="delivered")
    return event


def _left() -> dict:
    return {
        "events": set(Event.objects.values_list("ce_id", flat=True)),
        "entries": set(OutboxEntry.objects.values_list("event__ce_id", "peer__name", "status")),
        "attempts": Delivery.objects.count(),
    }


def test_expired_settled_events_go_with_their_entries_and_attempts_and_owed_ones_stay(team, peers):
    _stored(team, "delivered", ("delivered", "delivered"), attempts=2)
    _stored(team, "dead-and-delivered", ("dead", "delivered"))
    _stored(team, "owed-to-c", ("delivered", "pending"))
    _stored(team, "in-flight", ("in_flight", "dead"))
    _stored(team, "recent", ("delivered", "delivered"), age=timedelta(days=2))
    before_attempts = Delivery.objects.count()

    assert ingest_services.events_purge_expired(days=7, batch=2, pause=0) == 2

    left = _left()
    assert left["events"] == {"owed-to-c", "in-flight", "recent"}
    assert left["entries"] == {
        ("owed-to-c", "b", "delivered"), ("owed-to-c", "c", "pending"), ("in-flight", "b", "in_flight"),
        ("in-flight", "c", "dead"), ("recent", "b", "delivered"), ("recent", "c", "delivered"),
    }  # fmt: skip
    assert left["attempts"] == before_attempts - 2 * 2 - 2  # delivered: 2 entries × 2; dead-and-delivered: 2 × 1

    # Once its last peer has it, the next run deletes it too.
    OutboxEntry.objects.filter(event__ce_id="owed-to-c", status="pending").update(status="delivered")
    assert ingest_services.events_purge_expired(days=7, pause=0) == 1
    assert _left()["events"] == {"in-flight", "recent"}


def test_an_expired_event_no_peer_was_owed_goes_and_zero_days_keeps_everything(team):
    old = _stored(team, "no-peer", ())
    assert not OutboxEntry.objects.exists()
    assert ingest_services.events_purge_expired(days=0) == 0
    assert Event.objects.filter(pk=old.pk).exists()
    assert ingest_services.events_purge_expired(days=7, pause=0) == 1
    assert not Event.objects.filter(pk=old.pk).exists()


def test_batches_are_transactions_of_their_own_in_received_order(team, peers):
    for n in range(5):
        _stored(team, f"old-{n}", ("delivered", "dead"), age=EXPIRED + timedelta(minutes=5 - n))
    with CaptureQueriesContext(connection) as captured:
        assert ingest_services.events_purge_expired(days=7, batch=2, pause=0) == 5
    deletes = [q["sql"] for q in captured.captured_queries if q["sql"].startswith('DELETE FROM "ingest_event"')]
    assert len(deletes) == 3  # 2 + 2 + 1
    # Each batch commits on its own (a savepoint of the test's transaction here): no long transaction.
    assert sum(q["sql"].startswith("RELEASE SAVEPOINT") for q in captured.captured_queries) >= 3
    assert not Event.objects.exists() and not OutboxEntry.objects.exists() and not Delivery.objects.exists()


def test_a_batch_commits_without_waiting_for_the_wal_flush_and_the_tables_autovacuum_is_paced(
    team, peers, transactional_db
):
    """A batch lost in a database crash is deleted again by the next run, so its commit does not wait
    for the WAL flush (a flush that every webhook committing meanwhile would wait for too); the
    autovacuum after a purge runs at 10 ms per cost round on the purged tables (migrations)."""
    for n in range(3):
        _stored(team, f"old-{n}", ("delivered", "dead"), age=EXPIRED + timedelta(minutes=5 - n))
    AuditEvent.objects.create(team=team, action="Federation.PeerCreated", outcome="ok", at=timezone.now() - EXPIRED)
    def deleted_table(sql):
        return sql.split('"')[1] if sql.startswith("DELETE FROM") else None

    with synchronous_commit_seen(deleted_table) as seen:
        assert ingest_services.events_purge_expired(days=7, batch=2, pause=0) == 3
        assert services.retention_purge(days=7, pause=0)["audit"] >= 1
    assert {table for table, _ in seen} >= {"ingest_event", "federation_outboxentry", "federation_auditevent"}
    assert {setting for _, setting in seen} == {"off"}
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")  # nothing lingers on the connection
        assert cursor.fetchone()[0] == "on"
        cursor.execute("SELECT relname, reloptions FROM pg_class WHERE relname = ANY(%s)",
                       [["ingest_event", "federation_outboxentry", "federation_delivery", "federation_auditevent"]])
        options = dict(cursor.fetchall())
    assert options == dict.fromkeys(options, ["autovacuum_vacuum_cost_delay=10"]) and len(options) == 4


def test_a_purge_stopped_midway_keeps_what_it_committed_and_the_next_run_finishes(team, peers, transactional_db):
    for n in range(5):
        _stored(team, f"old-{n}", ("delivered", "delivered"), age=EXPIRED + timedelta(minutes=5 - n))
    calls = []

    def stop_at_the_second_batch(ids):
        calls.append(ids)
        if len(calls) == 2:
            raise RuntimeError("worker killed")
        return set()

    hooks.event_purging.insert(0, stop_at_the_second_batch)
    try:
        with pytest.raises(RuntimeError):
            ingest_services.events_purge_expired(days=7, batch=2, pause=0)
    finally:
        hooks.event_purging.remove(stop_at_the_second_batch)
    # The first batch (the two oldest) is gone for good; the second rolled back whole.
    assert _left()["events"] == {"old-2", "old-3", "old-4"}
    assert OutboxEntry.objects.count() == 6 and Delivery.objects.count() == 6

    assert ingest_services.events_purge_expired(days=7, batch=2, pause=0) == 3
    assert _left() == {"events": set(), "entries": set(), "attempts": 0}


def test_a_dead_letter_replayed_before_the_purge_is_owed_again_and_kept(team, peers):
    from federation import outbox

    event = _stored(team, "replayed", ("dead", "delivered"))
    peer_b = peers[0]
    assert outbox.replay_dead(peer=peer_b, limit=10) == 1
    assert ingest_services.events_purge_expired(days=7, pause=0) == 0
    assert Event.objects.filter(pk=event.pk).exists()
    assert OutboxEntry.objects.get(event=event, peer=peer_b).status == "pending"


def test_the_hourly_task_purges_with_the_configured_days(team, settings):
    from ingest import tasks

    assert [e["schedule"] for e in settings.CELERY_BEAT_SCHEDULE.values()
            if e["task"] == "ingest.tasks.events_purge_expired"] == [3600.0]  # fmt: skip
    _stored(team, "three-days", (), age=timedelta(days=3))
    settings.KITE_EVENT_RETENTION_DAYS = 0
    assert tasks.events_purge_expired() == 0
    settings.KITE_EVENT_RETENTION_DAYS = 5
    assert tasks.events_purge_expired() == 0
    settings.KITE_EVENT_RETENTION_DAYS = 2
    assert tasks.events_purge_expired() == 1


def test_a_dead_letter_replayed_while_the_batch_deletes_is_kept_with_its_event(team, peers, monkeypatch):
    from federation import retention

    event = _stored(team, "racing", ("dead", "delivered"))
    dead = OutboxEntry.objects.get(event=event, status="dead")
    real, reads = retention._entries, []

    def replayed_right_after_the_read(event_ids):
        found = real(event_ids)
        reads.append(found)
        if len(reads) == 1:  # a replay commits between the purge's read and its DELETE
            OutboxEntry.objects.filter(pk=dead.pk).update(status="pending")
        return found

    monkeypatch.setattr(retention, "_entries", replayed_right_after_the_read)
    assert ingest_services.events_purge_expired(days=7, pause=0) == 0
    assert Event.objects.filter(pk=event.pk).exists()
    assert OutboxEntry.objects.get(pk=dead.pk).status == "pending"  # delivered to b after all, later
    assert not OutboxEntry.objects.filter(event=event, status="delivered").exists()  # c's settled one went


def test_webhooks_are_stored_while_a_purge_batch_is_open(team, peers, transactional_db):
    """The purge's transaction holds row locks on expired events and settled entries only: storing a
    new event (and routing it to the peers) in another connection does not wait for it."""
    import threading

    from django.db import connections

    _stored(team, "old", ("delivered", "dead"))
    stored = {}

    def store_meanwhile(ids):
        def store():
            try:
                stored["event"] = make_event(team, "fresh")
            finally:
                connections.close_all()

        worker = threading.Thread(target=store)
        worker.start()
        worker.join(timeout=10)
        stored["waited"] = worker.is_alive()
        return set()

    hooks.event_purging.append(store_meanwhile)  # after federation's: its deletions are made and locked
    try:
        assert ingest_services.events_purge_expired(days=7, pause=0) == 1
    finally:
        hooks.event_purging.remove(store_meanwhile)
    assert stored["waited"] is False and stored["event"].ce_id == "fresh"
    assert set(OutboxEntry.objects.filter(event__ce_id="fresh").values_list("status", flat=True)) == {"pending"}
    assert _left()["events"] == {"fresh"}


def test_a_row_no_hook_deletes_fails_the_batch_and_loses_nothing(team, peers, transactional_db):
    """The events go with one DELETE (no per-row cascade): a row that still refers to one — of an app
    with no event_purging hook — makes the batch's commit fail, and the batch stays whole."""
    from django.db import IntegrityError

    from federation import retention

    _stored(team, "old", ("delivered", "dead"))
    hooks.event_purging.remove(retention.events_purging)
    try:
        with pytest.raises(IntegrityError):
            ingest_services.events_purge_expired(days=7, pause=0)
    finally:
        hooks.event_purging.append(retention.events_purging)
    assert _left()["events"] == {"old"} and OutboxEntry.objects.count() == 2 and Delivery.objects.count() == 2
    assert ingest_services.events_purge_expired(days=7, pause=0) == 1


def test_a_run_stops_at_its_time_budget_after_a_committed_batch_and_the_next_goes_on(team, settings):
    for n in range(5):
        _stored(team, f"old-{n}", (), age=EXPIRED + timedelta(minutes=5 - n))
    assert ingest_services.purge_budget() == 0.75 * settings.CELERY_TASK_SOFT_TIME_LIMIT
    assert ingest_services.events_purge_expired(days=7, batch=2, pause=0, budget=0) == 2
    assert _left()["events"] == {"old-2", "old-3", "old-4"}
    assert ingest_services.events_purge_expired(days=7, batch=2, pause=0) == 3


def test_the_audit_and_delivery_purge_stops_at_its_time_budget_too(team, peers):
    from federation.models import AuditEvent

    old = timezone.now() - timedelta(days=100)
    AuditEvent.objects.bulk_create([AuditEvent(team=team, action="Federation.PeerCalled", at=old) for _ in range(5)])
    assert services.retention_purge(days=90, batch=2, pause=0, budget=0) == {"audit": 2, "deliveries": 0}
    assert services.retention_purge(days=90, batch=2, pause=0) == {"audit": 3, "deliveries": 0}


def test_every_batch_reads_a_range_of_the_age_index_from_where_the_last_stopped(team):
    """50,000 recent events and 30 expired: each batch's SELECT is planned as a range of
    event_received_at starting at the last batch's end (not a scan from the oldest entry again,
    nor a read of the table), as the purge runs it."""
    source = Source.objects.get(team=team, name="kite")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO ingest_event (team_id, source_id, ce_id, ce_source, ce_type, ce_time, ce_subject,"
            " datacontenttype, data, extensions, agent, received_at)"
            " SELECT %s, %s, 'evt_' || g, 'kite://bulk', 'com.example.bulk', now(), '', 'application/json', '{}',"
            " '{}'::jsonb, '', now() - interval '1 second' * g - interval '10 days' * (g <= 30)::int"
            " FROM generate_series(1, 50030) g",
            [team.pk, source.pk],
        )
        cursor.execute("ANALYZE ingest_event")
    with CaptureQueriesContext(connection) as captured:
        assert ingest_services.events_purge_expired(days=7, batch=10, pause=0) == 30
    selects = [q["sql"] for q in captured.captured_queries
               if q["sql"].startswith('SELECT "ingest_event"."id" AS "pk", "ingest_event"."received_at"')]  # fmt: skip
    assert len(selects) == 4  # 10 + 10 + 10, and the one that finds none
    for n, sql in enumerate(selects):
        with connection.cursor() as cursor:
            cursor.execute("EXPLAIN " + sql)
            plan = "\n".join(row[0] for row in cursor.fetchall())
        condition = next(line for line in plan.splitlines() if "Index Cond" in line)
        assert "event_received_at" in plan and "Seq Scan" not in plan, plan
        assert (">=" in condition) == (n > 0) and "<" in condition, plan
