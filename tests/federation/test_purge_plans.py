"""The daily retention purges read the rows they delete by index, however many newer rows are kept:
each batch's SELECT, as the purge runs it, is planned by PostgreSQL on a table of 50,000 recent rows
and a few old ones, and must be an index range scan, not a read of the whole table (bench/scale.py:
without delivery_age, 0.5 s per batch at 700,000 delivery rows)."""

from django.db import connection
from django.test.utils import CaptureQueriesContext

from federation import services
from federation.models import AuditEvent, Delivery, OutboxEntry
from tests.federation.test_api import PEER_URL
from tests.federation.test_delivery import make_event

KEPT, OLD = 50_000, 30


def _plan(sql: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql)
        return "\n".join(row[0] for row in cursor.fetchall())


def _batch_selects(captured, table: str) -> list[str]:
    head = f'SELECT "{table}"."id" AS "id", '  # and the row's age: the next batch starts after it
    return [q["sql"] for q in captured.captured_queries if q["sql"].startswith(head) and " LIMIT " in q["sql"]]


def _purge(table: str) -> tuple[dict, list[str]]:
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {table}")
    with CaptureQueriesContext(connection) as captured:
        purged = services.retention_purge(days=90, batch=5000)
    return purged, [_plan(sql) for sql in _batch_selects(captured, table)]


def test_the_delivery_purge_reads_old_attempts_by_index(team):
    peer = services.peer_create(team=team, name="b", peer_hook_url=PEER_URL, scopes=["*"]).row
    make_event(team)
    entry = OutboxEntry.objects.get(peer=peer)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO federation_delivery (peer_id, entry_id, attempted_at, status_code, outcome, latency_ms, error)"
            " SELECT %s, %s, now() - interval '1 day' * (g %% 89) - interval '100 days' * (g <= %s)::int,"
            " 202, 'delivered', 40, '' FROM generate_series(1, %s) g",
            [peer.pk, entry.pk, OLD, KEPT + OLD],
        )

    purged, plans = _purge("federation_delivery")

    assert purged == {"audit": 0, "deliveries": OLD}
    assert Delivery.objects.count() == KEPT
    assert len(plans) == 2  # the batch that found the old rows, the one that found none
    for plan in plans:
        assert "delivery_age" in plan and "Seq Scan" not in plan, plan


def test_the_audit_purge_reads_old_rows_by_index(team):
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO federation_auditevent (team_id, at, action, peer_name, actor, endpoint, outcome, detail, data)"
            " SELECT %s, now() - interval '1 day' * (g %% 89) - interval '100 days' * (g <= %s)::int,"
            " 'Federation.PeerCalled', 'b', 'kite-b', '/federation/ping', 'ok', '', '{}'::jsonb"
            " FROM generate_series(1, %s) g",
            [team.pk, OLD, KEPT + OLD],
        )

    purged, plans = _purge("federation_auditevent")

    assert purged == {"audit": OLD, "deliveries": 0}
    assert AuditEvent.objects.count() == KEPT
    assert len(plans) == 2
    for plan in plans:
        assert "audit_age" in plan and "Seq Scan" not in plan, plan
