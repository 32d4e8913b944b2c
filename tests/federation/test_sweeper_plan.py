"""The sweeper (every second, backlog or not) finds due peers by index, however long the outbox's
delivered history: its plan with a backlog due behind 50,000 delivered entries reads no table
sequentially (it walked the outbox past the history, 53 ms at 100,000 entries, before), and its
answer stays exact."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation import outbox, services
from federation.models import OutboxEntry, Peer
from tests.federation.test_api import PEER_URL
from tests.federation.test_delivery import make_event
from tests.federation.test_scale_reads import MANY, analyze_tables, delivered_history, query_plans


@pytest.fixture
def peers(team):
    return [services.peer_create(team=team, name=name, peer_hook_url=PEER_URL, scopes=["*"]).row
            for name in ("b", "c", "d")]  # fmt: skip


def test_the_sweeper_finds_exactly_the_peers_with_something_due(team, peers):
    b, c, d = peers
    for n in range(3):
        make_event(team, f"e{n}")  # an entry to each peer, pending and due
    later = timezone.now() + timedelta(minutes=5)
    OutboxEntry.objects.filter(peer=c).update(next_attempt_at=later)  # backing off: not due
    OutboxEntry.objects.filter(peer=d).update(status="in_flight", leased_until=timezone.now() - timedelta(seconds=1))
    assert outbox.due_peer_ids() == [b.pk, d.pk]  # d: an expired lease
    OutboxEntry.objects.filter(peer=d).update(leased_until=later)  # a live lease: not due
    Peer.objects.filter(pk=b.pk).update(paused=Peer.Pause.OPERATOR)
    assert outbox.due_peer_ids() == []
    OutboxEntry.objects.filter(peer=c, event__ce_id="e0").update(next_attempt_at=timezone.now())
    assert outbox.due_peer_ids() == [c.pk]


def test_the_sweepers_plan_reads_no_table_sequentially_behind_a_long_delivered_history(team, peers):
    b, _c, _d = peers
    event = make_event(team, "first")
    delivered_history(b, event, MANY)
    with connection.cursor() as cursor:  # then a backlog due, behind the history in the table
        cursor.execute("INSERT INTO federation_outboxentry (msg_id, team_id, peer_id, event_id, provenance, status,"
                       " attempts, next_attempt_at, last_error, created_at)"
                       " SELECT gen_random_uuid(), %s, %s, %s, '{}'::jsonb, 'pending', 0, now(), '', now()"
                       " FROM generate_series(1, %s)", [team.pk, b.pk, event.pk, MANY // 2])  # fmt: skip
    analyze_tables("federation_outboxentry", "federation_peer")
    with CaptureQueriesContext(connection) as captured:
        assert b.pk in outbox.due_peer_ids()
    for plan in query_plans(captured, "federation_peer"):
        assert "Seq Scan on federation_outboxentry" not in plan, plan
