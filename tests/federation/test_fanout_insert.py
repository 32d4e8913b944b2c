"""An event routed to N peers gets N outbox entries, written in its own transaction by one statement
however large N is (federation.enqueue.entries_write; on PostgreSQL an INSERT … SELECT … FROM unnest
with the values the entries share bound once and each msg_id made by the database)."""

import uuid

import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation import enqueue, routing, services
from federation.models import OutboxEntry, Peer
from ingest import services as ingest_services
from ingest.cloudevent import Draft
from ingest.models import Event, Source
from kite import fastsql
from tests.factories import TeamFactory
from tests.federation.test_api import PEER_URL

ARRIVED_FROM = {"kitefedorigin": "kite-c", "kitefedchain": '["kite-c"]', "kitefedhops": 1}


def _peers(team, n: int, prefix: str = "p", scopes=("com.stripe.*",)) -> list[Peer]:
    return [services.peer_create(team=team, name=f"{prefix}{i:03d}", peer_hook_url=PEER_URL, scopes=list(scopes)).row
            for i in range(n)]  # fmt: skip


def _draft(event_id: str) -> Draft:
    return Draft(id=event_id, type="com.stripe.charge.succeeded", time=timezone.now(), data_json='{"n": 1}',
                 source="kite://kite-c/tm/stripe", extensions=dict(ARRIVED_FROM))  # fmt: skip


def _store(team, event_id: str = "e1") -> Event:
    source = Source.objects.get(team=team, name="kite")
    return ingest_services.event_store(source=source, draft=_draft(event_id)).event


def _unrouted_event(team, event_id: str) -> Event:
    """An event stored without its routing hook: route_event is then called on it alone."""
    source = Source.objects.get(team=team, name="kite")
    event = Event(team=team, source=source, ce_id=event_id, ce_source="kite://kite-c/tm/stripe",
                  ce_type="com.stripe.charge.succeeded", ce_time=timezone.now(), data="{}",
                  extensions=dict(ARRIVED_FROM))  # fmt: skip
    fastsql.insert([event])
    return event


@pytest.mark.django_db
def test_an_event_matching_n_peers_gets_one_pending_entry_per_peer_with_the_same_provenance_and_its_own_msg_id():
    team = TeamFactory()
    matching = _peers(team, 50)
    _peers(team, 4, prefix="elsewhere", scopes=["com.github.*"])  # scopes do not match: no entry
    revoked = _peers(team, 1, prefix="gone")[0]
    Peer.objects.filter(pk=revoked.pk).update(status=Peer.Status.REVOKED)
    enqueue.forget_routes(team.pk)
    other = TeamFactory()
    _peers(other, 3)  # another team's peers never get this team's events
    started = timezone.now()
    event = _store(team)
    finished = timezone.now()
    entries = list(OutboxEntry.objects.filter(event=event))
    assert sorted(e.peer_id for e in entries) == sorted(p.pk for p in matching)  # each matching peer once
    forward = routing.next_hop(routing.provenance_of(ARRIVED_FROM), settings.KITE_INSTANCE_ID)
    assert forward.hops == 2 and forward.chain[-1] == settings.KITE_INSTANCE_ID  # not the event's own extensions
    for entry in entries:
        assert entry.provenance == forward.extensions()
        assert (entry.team_id, entry.status, entry.attempts, entry.leased_until, entry.last_error,
                entry.delivered_at) == (team.pk, OutboxEntry.Status.PENDING, 0, None, "", None)  # fmt: skip
        assert started <= entry.created_at <= finished and started <= entry.next_attempt_at <= finished
        assert isinstance(entry.msg_id, uuid.UUID) and entry.msg_id.version == 4
    assert len({entry.msg_id for entry in entries}) == 50
    assert OutboxEntry.objects.count() == 50


@pytest.mark.django_db
def test_routing_an_event_costs_the_same_statements_for_3_peers_as_for_50():
    counts = {}
    for n in (3, 50):
        team = TeamFactory()
        _peers(team, n)
        event = _unrouted_event(team, f"n{n}")
        enqueue.routes_for(team.pk)  # read once per routes version, not per event
        with CaptureQueriesContext(connection) as captured:
            enqueue.route_event(event, None)
        statements = [q["sql"] for q in captured.captured_queries]
        inserts = [sql for sql in statements if "INSERT" in sql and "federation_outboxentry" in sql]
        assert len(inserts) == 1, statements
        assert OutboxEntry.objects.filter(event=event).count() == n
        counts[n] = len(statements)
    assert counts[3] == counts[50]


@pytest.mark.django_db
def test_storing_a_webhook_for_3_or_50_peers_runs_as_many_statements():
    counts = {}
    for n in (3, 50):
        team = TeamFactory()
        _peers(team, n)
        _store(team, "warm")  # routes read and cached
        with CaptureQueriesContext(connection) as captured:
            event = _store(team, f"n{n}")
        assert OutboxEntry.objects.filter(event=event).count() == n
        counts[n] = len(captured.captured_queries)
    assert counts[3] == counts[50]


@pytest.mark.django_db
def test_the_entries_go_in_the_events_own_transaction_and_leave_with_it():
    team = TeamFactory()
    _peers(team, 5)
    with transaction.atomic():
        event = _store(team)
        assert OutboxEntry.objects.filter(event=event).count() == 5  # written before the commit, not after
        transaction.set_rollback(True)
    assert not Event.objects.filter(ce_id="e1").exists() and not OutboxEntry.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("missing", ["peer", "event"])
def test_an_entry_for_a_peer_or_event_gone_fails_the_foreign_key_check(missing):
    """The foreign keys hold for the one-statement INSERT as for any: an entry whose peer or event
    was deleted meanwhile (a retention purge) fails the constraint check, and nothing is written."""
    team = TeamFactory()
    peers = _peers(team, 3)
    event = _unrouted_event(team, "gone")
    forward = routing.next_hop(routing.provenance_of(ARRIVED_FROM), settings.KITE_INSTANCE_ID)
    peer_ids = [p.pk for p in peers]
    if missing == "peer":
        peer_ids.append(Peer.objects.order_by("-pk").values_list("pk", flat=True).first() + 1000)
    else:
        Event.objects.filter(pk=event.pk).delete()
    with pytest.raises(IntegrityError), transaction.atomic():
        enqueue.entries_write(event, forward, peer_ids)
        connection.check_constraints()  # the check a commit makes (the constraints are deferred)
    assert not OutboxEntry.objects.exists()
