"""Three reads that read a whole table once it is large (bench/scale.py: 300-500 ms at 700,000 rows)
are found by index: a peer's outbox counts (GET /api/federation/peers), the audit trail filtered on
a value few rows have (GET /api/audit?outcome=…), an event's journey by its id alone (no ?source=).

Each plan test loads 50,000 rows with SQL, ANALYZEs, captures the SQL the code runs and asks
PostgreSQL for its plan (EXPLAIN on the real database, real statistics, no planner settings
changed): the plan must use the index and read no table sequentially, as it did before the index
(each test says which plan it replaced). The counts and results stay exact."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from federation import selectors, services
from federation.models import AuditEvent, OutboxEntry
from ingest import journey
from ingest.models import Source
from tests.federation.test_api import PEER_URL
from tests.federation.test_delivery import make_event
from tests.screens import owner  # noqa: F401  (fixture)

MANY = 50_000


def query_plans(captured, table: str) -> list[str]:
    plans = []
    for query in captured.captured_queries:
        if query["sql"].startswith("SELECT") and f'FROM "{table}"' in query["sql"]:
            with connection.cursor() as cursor:
                cursor.execute("EXPLAIN " + query["sql"])
                plans.append("\n".join(row[0] for row in cursor.fetchall()))
    assert plans, f"no SELECT from {table} captured"
    return plans


def analyze_tables(*tables: str) -> None:
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"ANALYZE {table}")


# --- a peer's outbox counts -----------------------------------------------------------------


@pytest.fixture
def peers(team):
    return [services.peer_create(team=team, name=name, peer_hook_url=PEER_URL, scopes=["*"]).row
            for name in ("b", "c")]  # fmt: skip


def delivered_history(peer, event, count: int) -> None:
    """`count` delivered entries of `peer` (one event's, as the table allows): its delivered history."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO federation_outboxentry (msg_id, team_id, peer_id, event_id, provenance, status, attempts,"
            " next_attempt_at, last_error, created_at, delivered_at)"
            " SELECT gen_random_uuid(), %s, %s, %s, '{}'::jsonb, 'delivered', 1, now(), '', now(), now()"
            " FROM generate_series(1, %s)",
            [event.team_id, peer.pk, event.pk, count],
        )


def test_outbox_counts_are_exact_per_peer_and_status_and_leave_delivered_history_out(team, peers, api):
    b, c = peers
    for n in range(7):
        make_event(team, f"e{n}")  # an entry to b and to c each, pending
    statuses = {"e0": "in_flight", "e1": "dead", "e2": "dead", "e3": "delivered"}
    for ce_id, status in statuses.items():
        OutboxEntry.objects.filter(peer=b, event__ce_id=ce_id).update(status=status)
    OutboxEntry.objects.filter(peer=c).exclude(event__ce_id="e6").update(status="delivered")

    assert selectors.outbox_depths([b.pk, c.pk]) == {
        b.pk: {"pending": 3, "in_flight": 1, "dead": 2},
        c.pk: {"pending": 1, "in_flight": 0, "dead": 0},
    }
    listed = {peer["name"]: peer["outbox"] for peer in api.get("/api/federation/peers").json()["results"]}
    assert listed == {"b": {"pending": 3, "in_flight": 1, "dead": 2}, "c": {"pending": 1, "in_flight": 0, "dead": 0}}
    assert api.get(f"/api/federation/peers/{b.pk}").json()["outbox"] == listed["b"]


def test_the_peer_screen_shows_the_counts_and_still_lists_delivered_entries(owner, team, peers):
    b = peers[0]
    for n in range(3):
        make_event(team, f"e{n}")
    OutboxEntry.objects.filter(peer=b, event__ce_id="e0").update(status="delivered")
    OutboxEntry.objects.filter(peer=b, event__ce_id="e1").update(status="dead")
    page = owner.get(f"/settings/federation/peers/{b.pk}/").content.decode()
    for status, count in (("pending", 1), ("in_flight", 0), ("dead", 1)):
        assert f'href="?outbox={status}">{status} <span class="count' in page and f">{count}</span>" in page
    assert '<a href="?outbox=delivered">delivered</a>' in page
    delivered = owner.get(f"/settings/federation/peers/{b.pk}/", {"outbox": "delivered"}).content.decode()
    assert 'aria-current="true">delivered</a>' in delivered
    assert '<td class="mono">e0<' in delivered and '<td class="mono">e1<' not in delivered


def test_outbox_counts_read_the_queue_from_the_index_not_the_delivered_history(team, peers):
    """Before: GROUP BY peer, status over every entry of the peers — a Seq Scan of the table."""
    b, c = peers
    event = make_event(team, "e-owed")  # pending to b and c
    delivered_history(b, event, MANY)
    OutboxEntry.objects.filter(peer=c).update(status="dead")
    analyze_tables("federation_outboxentry")

    with CaptureQueriesContext(connection) as captured:
        depths = selectors.outbox_depths([b.pk, c.pk])

    assert depths == {b.pk: {"pending": 1, "in_flight": 0, "dead": 0}, c.pk: {"pending": 0, "in_flight": 0, "dead": 1}}
    for plan in query_plans(captured, "federation_outboxentry"):
        # A range of an index on status (outbox_due or outbox_leases): the queue and the dead
        # letters, never the delivered history.
        conditions = [line for line in plan.splitlines() if "Index Cond" in line]
        assert "Seq Scan" not in plan and any("status" in line for line in conditions), plan


# --- the audit trail filtered ---------------------------------------------------------------


def _trail(team, count: int) -> None:
    """`count` audit rows of what happens all day: pings to peer `b` that went well."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO federation_auditevent (team_id, at, action, peer_name, actor, endpoint, outcome, detail, data)"
            " SELECT %s, now(), 'Federation.PeerCalled', 'b', 'kite-b', '/federation/ping', 'ok', '', '{}'::jsonb"
            " FROM generate_series(1, %s)",
            [team.pk, count],
        )


@pytest.mark.parametrize(
    ("query", "index", "rare"),
    [
        ({"outcome": "bad_secret"}, "audit_team_outcome", {"outcome": "bad_secret"}),
        ({"action": "Federation.AuthFailed"}, "audit_team_action", {"action": "Federation.AuthFailed"}),
        ({"peer": "eve"}, "audit_team_peer", {"peer_name": "eve"}),
    ],
)
def test_a_rare_audit_filter_finds_its_rows_by_index_newest_first(api, team, other_team, query, index, rare):
    """Before: the team's rows newest first through audit_team_newest (or a Seq Scan), every row read
    and filtered out when few or none match."""
    _trail(team, MANY)
    fields = {"action": "Federation.PeerCalled", "peer_name": "b", "outcome": "ok", **rare}
    mine = [AuditEvent.objects.create(team=team, **fields).pk for _ in range(3)]
    AuditEvent.objects.create(team=other_team, **fields)  # another team's: never shown
    _trail(team, 10)  # newer rows that do not match
    analyze_tables("federation_auditevent")

    with CaptureQueriesContext(connection) as captured:
        answer = api.get("/api/audit", query)

    assert answer.status_code == 200, answer.json()
    assert [row["id"] for row in answer.json()["results"]] == mine[::-1]
    plans = [plan for plan in query_plans(captured, "federation_auditevent")]
    assert len(plans) == 1
    assert index in plans[0] and "Seq Scan" not in plans[0], plans[0]


def test_an_audit_filter_that_matches_nothing_reads_no_row(api, team):
    _trail(team, MANY)
    analyze_tables("federation_auditevent")
    with CaptureQueriesContext(connection) as captured:
        answer = api.get("/api/audit", {"outcome": "bad_secret"})
    assert answer.status_code == 200 and answer.json()["results"] == []
    sql = next(q["sql"] for q in captured.captured_queries if 'FROM "federation_auditevent"' in q["sql"])
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "audit_team_outcome" in plan and "Seq Scan" not in plan, plan
    # The index range is empty: a handful of index pages, not the table's thousands.
    hits = [int(part.split("=")[1]) for line in plan.splitlines() if "Buffers:" in line
            for part in line.split() if part.startswith("hit=") or part.startswith("read=")]  # fmt: skip
    assert hits and max(hits) < 20, plan


# --- an event's journey by its id alone ---------------------------------------------------------


def test_a_journey_by_id_alone_finds_the_event_by_index(team, api):
    """Before: uniq_event_dedup leads with ce_source, so an id alone read every event of the team."""
    source = Source.objects.get(team=team, name="kite")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO ingest_event (team_id, source_id, ce_id, ce_source, ce_type, ce_time, ce_subject,"
            " datacontenttype, data, extensions, agent, received_at)"
            " SELECT %s, %s, 'evt_' || g, 'kite://bulk/' || (g %% 7), 'com.example.bulk', now(), '',"
            " 'application/json', '{}', '{}'::jsonb, '', now() FROM generate_series(1, %s) g",
            [team.pk, source.pk, MANY],
        )
    analyze_tables("ingest_event")

    with CaptureQueriesContext(connection) as captured:
        found = journey.event_find(team_id=team.pk, event_id="evt_4242")
    assert (found.ce_id, found.ce_source) == ("evt_4242", "kite://bulk/0")
    for plan in query_plans(captured, "ingest_event"):
        assert "event_team_ce_id" in plan and "Seq Scan on ingest_event" not in plan, plan

    answer = api.get("/api/events/evt_4242/journey")
    assert answer.status_code == 200 and answer.json()["event"]["source"] == "kite://bulk/0"
    assert api.get("/api/events/evt_none/journey").status_code == 404
