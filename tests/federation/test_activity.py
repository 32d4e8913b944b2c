"""federation/activity.py: traffic per bucket counted in SQL, settled buckets kept in the cache,
the SQLite fallback giving PostgreSQL's figures, the outbox's health in one query."""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation import activity
from federation.models import Delivery, OutboxEntry, Peer
from ingest.models import Event, Source

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 6, 10, 20, 30, 250000, tzinfo=UTC)  # 30.25 s into minute 10:20


def percentile_cont(values: list[float], p: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = p * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _peer(team, name: str) -> Peer:
    return Peer.objects.create(team=team, name=name, peer_hook_url=f"https://{name}.example/hooks/t/kite",
                               status=Peer.Status.ACTIVE)  # fmt: skip


def _event(team, n: int, at: datetime) -> Event:
    source = Source.objects.get(team=team, name="kite")
    return Event.objects.create(team=team, source=source, ce_id=f"e{n}", ce_source="kite://x", ce_type="t.x",
                                ce_time=at, data="{}", received_at=at)  # fmt: skip


def _attempt(peer: Peer, event: Event, at: datetime, outcome: str = "delivered", latency: int = 10) -> Delivery:
    entry = OutboxEntry.objects.create(team_id=peer.team_id, peer=peer, event=event, status="delivered")
    return Delivery.objects.create(peer=peer, entry=entry, attempted_at=at, outcome=outcome, latency_ms=latency,
                                   status_code=200 if outcome == "delivered" else 503)  # fmt: skip


@pytest.fixture
def two_peers(team):
    return _peer(team, "a"), _peer(team, "b")


def test_the_last_hour_counts_events_in_and_attempts_out_per_minute_of_the_team_only(team, other_team, two_peers):
    a, b = two_peers
    theirs = _peer(other_team, "theirs")
    event = _event(team, 0, NOW - timedelta(minutes=5))
    _event(team, 1, NOW - timedelta(minutes=5, seconds=10))  # 10:15:20: minute 10:15
    _event(team, 2, NOW - timedelta(minutes=70))  # before the window
    _event(other_team, 3, NOW - timedelta(minutes=5))
    _attempt(a, event, NOW - timedelta(minutes=5))
    _attempt(b, event, NOW - timedelta(minutes=5, seconds=20))  # 10:15:10
    _attempt(b, event, NOW - timedelta(minutes=59, seconds=30), outcome="transient")  # 09:21:00, the first minute
    _attempt(a, event, NOW - timedelta(seconds=1))  # the open minute
    _attempt(theirs, event, NOW - timedelta(minutes=5))  # another team's peer

    buckets = activity.team_last_hour(team.id, NOW)

    assert len(buckets) == 60 and buckets[0].start == datetime(2026, 12, 6, 9, 21, tzinfo=UTC)
    assert buckets[-1].start == datetime(2026, 12, 6, 10, 20, tzinfo=UTC)
    busy = {bucket.start.strftime("%H:%M"): (bucket.events, bucket.delivered, bucket.failed)
            for bucket in buckets if bucket.events or bucket.delivered or bucket.failed}  # fmt: skip
    assert busy == {"10:15": (2, 2, 0), "09:21": (0, 0, 1), "10:20": (0, 1, 0)}


def test_latency_percentiles_per_15_minutes_are_percentile_cont_of_the_delivered(team, two_peers):
    a, b = two_peers
    event = _event(team, 0, NOW)
    latencies = [3, 7, 7, 10, 41, 250, 900]
    for index, latency in enumerate(latencies):
        _attempt(a, event, NOW - timedelta(hours=2, seconds=index), latency=latency)  # 08:20:30 back: 08:15
    _attempt(a, event, NOW - timedelta(hours=2), outcome="transient", latency=0)  # not a latency
    _attempt(a, event, NOW - timedelta(hours=23, minutes=50), latency=55)  # 10:30:30 yesterday: 10:30
    _attempt(b, event, NOW - timedelta(hours=2), latency=5000)  # the other peer

    buckets = activity.peer_last_day(a, NOW)

    assert len(buckets) == 96 and buckets[-1].start == datetime(2026, 12, 6, 10, 15, tzinfo=UTC)
    assert buckets[0].start == datetime(2026, 12, 5, 10, 30, tzinfo=UTC)
    found = {bucket.start.strftime("%d %H:%M"): bucket for bucket in buckets if bucket.delivered or bucket.failed}
    assert set(found) == {"06 08:15", "05 10:30"}
    busy = found["06 08:15"]
    assert (busy.delivered, busy.failed) == (7, 1)
    assert busy.p50_ms == pytest.approx(percentile_cont(latencies, 0.5)) == 10
    assert busy.p95_ms == pytest.approx(percentile_cont(latencies, 0.95))  # 695: between 250 and 900
    assert (found["05 10:30"].p50_ms, found["05 10:30"].p95_ms) == (55, 55)
    assert all(bucket.p50_ms is None for bucket in buckets if not bucket.delivered)


def test_what_was_counted_is_not_read_again_and_only_the_last_seconds_are(team, two_peers):
    a, _ = two_peers
    event = _event(team, 0, NOW - timedelta(minutes=30))
    _attempt(a, event, NOW - timedelta(minutes=30))
    first = activity.team_last_hour(team.id, NOW)
    assert sum(bucket.delivered for bucket in first) == 1

    # Rows written later with older times (which the product never does) show what is read again: nothing
    # before SETTLE ahead of the previous page; a row within SETTLE of it is counted.
    _attempt(a, event, NOW - timedelta(minutes=30))
    _attempt(a, event, NOW - activity.SETTLE - timedelta(seconds=5))
    _attempt(a, event, NOW - timedelta(seconds=5))
    with CaptureQueriesContext(connection) as queries:
        again = activity.team_last_hour(team.id, NOW + timedelta(seconds=1))
    assert sum(bucket.delivered for bucket in again) == 2
    assert len(queries) == 2  # events and attempts, each since the previous page's mark

    later = activity.team_last_hour(team.id, NOW + timedelta(minutes=2))  # the 5 s row is final by now
    assert sum(bucket.delivered for bucket in later) == 2
    assert activity.team_last_hour(team.id, NOW + timedelta(minutes=31))[0].delivered == 0  # 09:50 left the window


def test_a_peers_ended_buckets_come_from_the_cache_and_the_current_one_from_the_database(team, two_peers):
    a, _ = two_peers
    event = _event(team, 0, NOW)
    _attempt(a, event, NOW - timedelta(hours=3), latency=40)
    assert sum(bucket.delivered for bucket in activity.peer_last_day(a, NOW)) == 1
    _attempt(a, event, NOW - timedelta(hours=3), latency=40)  # into an ended bucket: not read again
    _attempt(a, event, NOW - timedelta(seconds=30), latency=50)  # the current bucket: read every time
    with CaptureQueriesContext(connection) as queries:
        buckets = activity.peer_last_day(a, NOW)
    assert len(queries) == 1
    assert [(b.delivered, b.p50_ms) for b in buckets if b.delivered] == [(1, 40), (1, 50)]


def test_the_number_of_queries_does_not_grow_with_the_peers(team):
    event = _event(team, 0, NOW - timedelta(minutes=3))
    counts = []
    for size in (1, 20):
        peers = [_peer(team, f"p{size}-{n}") for n in range(size)]
        for peer in peers:
            _attempt(peer, event, NOW - timedelta(minutes=3))
        with CaptureQueriesContext(connection) as queries:
            activity.team_last_hour(team.id, NOW + timedelta(hours=size))  # a window of its own: nothing cached
            activity.outbox_health([peer.pk for peer in peers])
            for peer in peers[:1]:
                activity.peer_last_day(peer, NOW + timedelta(hours=size))
        counts.append(len(queries))
    assert counts == [4, 4]


def test_outbox_health_counts_what_is_owed_and_dead_and_the_oldest_queued(team, two_peers):
    a, b = two_peers
    event = _event(team, 0, NOW)
    made = {}
    for status, age in (("pending", 30), ("pending", 90), ("in_flight", 120), ("dead", 600), ("delivered", 900)):
        made[status, age] = OutboxEntry.objects.create(team=team, peer=a, event=event, status=status,
                                                       created_at=NOW - timedelta(seconds=age))  # fmt: skip
    health = activity.outbox_health([a.pk, b.pk])
    assert health[a.pk] == {"queued": 3, "dead": 1, "oldest_queued_at": NOW - timedelta(seconds=120)}
    assert health[b.pk] == {"queued": 0, "dead": 0, "oldest_queued_at": None}


# --- the SQLite fallback -------------------------------------------------------------------------------

SQLITE_SCRIPT = r"""
import json, sys
from datetime import UTC, datetime, timedelta
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from federation import activity
from federation.models import Delivery, OutboxEntry, Peer
from ingest.models import Event, Source
from kite import services
rows = json.loads(sys.stdin.read())
now = datetime.fromisoformat(rows["now"])
team = services.team_create(name="sqlite-team")
source = Source.objects.get(team=team, name="kite")
peer = Peer.objects.create(team=team, name="a", peer_hook_url="https://a.example/h", status="active")
event = Event.objects.create(team=team, source=source, ce_id="x", ce_source="kite://x", ce_type="t", ce_time=now,
                             data="{}", received_at=now)
for n, at in enumerate(rows["events"]):
    Event.objects.create(team=team, source=source, ce_id=f"e{n}", ce_source="kite://x", ce_type="t", ce_time=now,
                         data="{}", received_at=datetime.fromisoformat(at))
for at, outcome, latency in rows["attempts"]:
    entry = OutboxEntry.objects.create(team=team, peer=peer, event=event, status="delivered")
    Delivery.objects.create(peer=peer, entry=entry, attempted_at=datetime.fromisoformat(at), outcome=outcome,
                            latency_ms=latency)
hour = activity.team_last_hour(team.id, now)
day = activity.peer_last_day(peer, now)
print(json.dumps({"hour": [[b.events, b.delivered, b.failed] for b in hour],
                  "day": [[b.delivered, b.failed, b.p50_ms, b.p95_ms] for b in day]}))
"""


def _sample() -> dict:
    """Events and attempts on bucket edges, in the open minute, and with latencies to interpolate."""
    events = [NOW - timedelta(minutes=m, seconds=s) for m, s in ((0, 0), (1, 30), (59, 30), (59, 31), (10, 0))]
    attempts = []
    for index in range(40):
        at = NOW - timedelta(minutes=7 * index, seconds=index % 7, microseconds=123 * index)
        attempts.append((at, "delivered" if index % 5 else "transient", (index * 37) % 400))
    attempts += [(NOW - timedelta(hours=3, seconds=n), "delivered", latency) for n, latency in enumerate([1, 2, 1000])]
    attempts.append((NOW - timedelta(minutes=30, seconds=30), "delivered", 0))  # exactly on 09:50:00
    return {"events": events, "attempts": attempts}


def test_the_sqlite_fallback_gives_the_figures_postgresql_gives(team, tmp_path):
    assert settings.IS_POSTGRES
    sample = _sample()
    a = _peer(team, "a")
    event = _event(team, 0, NOW)  # the event the attempts belong to (the script makes one at NOW too)
    for n, at in enumerate(sample["events"], start=1):
        _event(team, n, at)
    for at, outcome, latency in sample["attempts"]:
        _attempt(a, event, at, outcome=outcome, latency=latency)
    on_postgres = {
        "hour": [[b.events, b.delivered, b.failed] for b in activity.team_last_hour(team.id, NOW)],
        "day": [[b.delivered, b.failed, b.p50_ms, b.p95_ms] for b in activity.peer_last_day(a, NOW)],
    }  # fmt: skip
    assert sum(row[0] + row[1] for row in on_postgres["day"]) == len(sample["attempts"])
    assert any(row[2] is not None and row[2] != row[3] for row in on_postgres["day"])  # interpolated somewhere

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    environment = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    environment.update(DJANGO_SETTINGS_MODULE="kite.settings", KITE_DATA_DIR=str(data_dir),
                       DATABASE_URL=f"sqlite:///{data_dir / 'kite.sqlite3'}")  # fmt: skip
    payload = {"now": NOW.isoformat(),
               "events": [at.isoformat() for at in sample["events"]],
               "attempts": [(at.isoformat(), outcome, latency) for at, outcome, latency in sample["attempts"]]}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", SQLITE_SCRIPT], input=json.dumps(payload), capture_output=True,
                          text=True, cwd=ROOT, env=environment, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    on_sqlite = json.loads(done.stdout.strip().splitlines()[-1])
    assert on_sqlite["hour"] == on_postgres["hour"]
    for ours, theirs in zip(on_sqlite["day"], on_postgres["day"], strict=True):
        assert ours[:2] == theirs[:2] and ours[2:] == pytest.approx(theirs[2:])


def test_a_recreated_database_does_not_read_another_peers_cached_buckets(team, other_team):
    """Peer ids start again in a new database; the cache key carries the peer's creation time too."""
    first = _peer(team, "first")
    event = _event(team, 0, NOW)
    _attempt(first, event, NOW - timedelta(hours=5))
    assert sum(b.delivered for b in activity.peer_last_day(first, NOW)) == 1
    impostor = Peer(pk=first.pk, team=other_team, name="first", created_at=timezone.now() + timedelta(seconds=5))
    Delivery.objects.filter(peer=first).delete()
    assert sum(b.delivered for b in activity.peer_last_day(impostor, NOW)) == 0
