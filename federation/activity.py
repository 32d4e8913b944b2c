"""Traffic over time for the Overview (a team, per minute, last hour) and a peer's screen (per
15 minutes, last 24 h): counted in SQL, one query per series, whatever the number of peers.

Rows older than SETTLE (10 s) no longer change: events and delivery attempts are written with
the time they happen and committed at once (one statement, or one short transaction). So what
has been counted is kept in the cache (Redis in production) and not read again:
- the Overview's counts are kept final up to SETTLE before the previous page, and a page counts
  only the rows written since then (plus SETTLE's worth) — with a million delivery attempts in
  the last hour and a page every few seconds, a few thousand rows, not the busy current minute;
- a peer's 15-minute buckets (percentiles do not add up) are kept once they ended SETTLE ago; a
  page reads the current one, a peer's last quarter of an hour.
A cold cache (Redis restarted, or nobody looked for an hour) costs one full count once.

PostgreSQL buckets with date_bin and takes percentiles with percentile_cont; SQLite (the
one-command start) buckets on Unix seconds and reads the same percentiles, interpolated the same
way, from the ranked rows (window functions) — the same figures (tests/federation/test_activity.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.db.models import Count, Min

from federation.models import Delivery, OutboxEntry, Peer
from ingest.models import Event

logger = logging.getLogger(__name__)

SETTLE = timedelta(seconds=10)
PERCENTILES = (0.5, 0.95)
CACHE_PREFIX = "kite:activity:v1"
QUEUED = (OutboxEntry.Status.PENDING, OutboxEntry.Status.IN_FLIGHT)


@dataclass(frozen=True)
class Window:
    width: timedelta
    count: int

    def starts(self, now: datetime) -> list[datetime]:
        """Bucket starts, oldest first, aligned on Unix time; the last bucket holds `now`."""
        seconds = int(self.width.total_seconds())
        last = int(now.timestamp()) // seconds * seconds
        return [datetime.fromtimestamp(last - seconds * back, UTC) for back in range(self.count - 1, -1, -1)]


LAST_HOUR = Window(timedelta(minutes=1), 60)
LAST_DAY = Window(timedelta(minutes=15), 96)


@dataclass(frozen=True)
class Bucket:
    start: datetime
    events: int = 0
    delivered: int = 0
    failed: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None


# --- what the screens ask ------------------------------------------------------------------------


def team_last_hour(team_id: str, now: datetime) -> list[Bucket]:
    """Events in, deliveries out and failed attempts per minute, over the team's peers."""
    events = _tallies("events", team_id, LAST_HOUR, now, lambda *span: _events(team_id, *span), 1)
    sent = _tallies("sent", team_id, LAST_HOUR, now, lambda *span: _attempts(team_id, *span), 2)
    return [Bucket(start, events=e[0], delivered=s[0], failed=s[1])
            for start, e, s in zip(LAST_HOUR.starts(now), events, sent, strict=True)]  # fmt: skip


def peer_last_day(peer: Peer, now: datetime) -> list[Bucket]:
    """Delivered attempts, failed ones and the latency percentiles of the delivered, per 15 minutes."""
    scope = f"{peer.pk}.{int(peer.created_at.timestamp())}"  # a recreated database reuses ids
    rows = _series("peer", scope, LAST_DAY, now, lambda a, b: _peer_attempts(peer.pk, a, b), (0, 0, None, None))
    return [Bucket(start, delivered=r[0], failed=r[1], p50_ms=r[2], p95_ms=r[3])
            for start, r in zip(LAST_DAY.starts(now), rows, strict=True)]  # fmt: skip


def outbox_health(peer_ids: list[int]) -> dict[int, dict]:
    """{peer_id: {queued, dead, oldest_queued_at}} in one query over the outbox_due index's
    (peer, status) prefix: delivered history is never read."""
    health = {pk: {"queued": 0, "dead": 0, "oldest_queued_at": None} for pk in peer_ids}
    rows = (OutboxEntry.objects.filter(peer_id__in=peer_ids, status__in=[*QUEUED, OutboxEntry.Status.DEAD])
            .values("peer_id", "status").annotate(n=Count("id"), oldest=Min("created_at")).order_by())  # fmt: skip
    for row in rows:
        figures = health[row["peer_id"]]
        if row["status"] == OutboxEntry.Status.DEAD:
            figures["dead"] = row["n"]
            continue
        figures["queued"] += row["n"]
        oldest = figures["oldest_queued_at"]
        figures["oldest_queued_at"] = row["oldest"] if oldest is None else min(oldest, row["oldest"])
    return health


# --- settled buckets from the cache, open ones from the database ----------------------------------


def _tallies(kind: str, scope: str, window: Window, now: datetime,
             count: Callable[[datetime, datetime, datetime], list[tuple]], size: int) -> list[tuple]:  # fmt: skip
    """Counts per bucket of `window`, kept final up to SETTLE before the last page: a page counts only
    the rows written since (and SETTLE's worth again), however busy the current minute.
    `count(start, end, final_before)` answers (bucket start, whether before `final_before`, *counts)."""
    starts = [int(start.timestamp()) for start in window.starts(now)]
    width, zeros = int(window.width.total_seconds()), (0,) * size
    key = f"{CACHE_PREFIX}:{kind}:{scope}:{width}"
    kept = _cached(key)
    until = kept.get("until") if isinstance(kept.get("until"), float) else None
    if until is None or not starts[0] <= until <= now.timestamp():
        until, final = float(starts[0]), {}
    else:
        final = {start: tuple(value) for start, value in kept.get("buckets", {}).items() if start >= starts[0]}
    mark = max((now - SETTLE).timestamp(), until)
    provisional: dict[int, tuple] = {}
    for bucket, is_final, *counts in count(_moment(until), _moment(starts[-1] + width), _moment(mark)):
        into = final if is_final else provisional
        into[int(bucket)] = tuple(a + int(b or 0) for a, b in zip(into.get(int(bucket), zeros), counts, strict=True))
    if mark > until or not kept:
        _keep(key, {"until": mark, "buckets": final}, window)
    return [tuple(a + b for a, b in zip(final.get(start, zeros), provisional.get(start, zeros), strict=True))
            for start in starts]  # fmt: skip


def _moment(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _series(kind: str, scope: str, window: Window, now: datetime,
            count: Callable[[datetime, datetime], dict[int, tuple]], empty: tuple) -> list[tuple]:  # fmt: skip
    """One tuple per bucket of `window`; `count(start, end)` answers {bucket start (Unix s): tuple}
    for [start, end) in one query, and is asked only from the oldest bucket not cached on. The
    settled buckets of one series are one cache entry: one read per page, one write when a bucket
    settled since (two pages writing at once write the same figures)."""
    starts = [int(start.timestamp()) for start in window.starts(now)]
    width = int(window.width.total_seconds())
    settled = {start for start in starts if start + width <= (now - SETTLE).timestamp()}
    key = f"{CACHE_PREFIX}:{kind}:{scope}:{width}"
    kept = {start: tuple(value) for start, value in _cached(key).items() if isinstance(start, int) and start in settled}
    missing = [start for start in starts if start not in kept]
    values = dict(kept)
    if missing:
        counted = count(datetime.fromtimestamp(missing[0], UTC), datetime.fromtimestamp(starts[-1] + width, UTC))
        values.update({start: counted.get(start, empty) for start in missing})
    if settled - kept.keys():
        _keep(key, {start: values[start] for start in settled}, window)
    return [values[start] for start in starts]


def _cached(key: str) -> dict:
    try:
        found = cache.get(key)
    except Exception:  # the cache is an accelerator: without it every bucket is counted again
        logger.warning("activity cache unavailable: counting every bucket", exc_info=True)
        return {}
    return found if isinstance(found, dict) else {}


def _keep(key: str, values: dict, window: Window) -> None:
    try:
        cache.set(key, values, timeout=int((window.width * (window.count + 1) + SETTLE).total_seconds()))
    except Exception:
        logger.warning("activity cache unavailable: buckets not kept", exc_info=True)


# --- the counting queries --------------------------------------------------------------------------


def _bucket(column: str, width: int) -> str:
    """SQL: the Unix second that starts `column`'s bucket of `width` seconds."""
    if settings.IS_POSTGRES:
        return f"extract(epoch FROM date_bin(interval '{width} seconds', {column}, timestamptz 'epoch'))::bigint"
    return f"(CAST(strftime('%%s', {column}) AS INTEGER) / {width}) * {width}"


def _param(moment: datetime):
    return moment if settings.IS_POSTGRES else connection.ops.adapt_datetimefield_value(moment)


def _count_if(condition: str) -> str:
    if settings.IS_POSTGRES:
        return f"COUNT(*) FILTER (WHERE {condition})"
    return f"SUM(CASE WHEN {condition} THEN 1 ELSE 0 END)"


def _events(team_id: str, start: datetime, end: datetime, final_before: datetime) -> list[tuple]:
    bucket = _bucket("received_at", int(LAST_HOUR.width.total_seconds()))
    sql = (f"SELECT {bucket}, received_at < %s, COUNT(*) FROM {Event._meta.db_table} "
           "WHERE team_id = %s AND received_at >= %s AND received_at < %s GROUP BY 1, 2")  # fmt: skip
    return _rows(sql, [_param(final_before), team_id, _param(start), _param(end)])


def _attempts(team_id: str, start: datetime, end: datetime, final_before: datetime) -> list[tuple]:
    """Over every peer of the team, revoked ones included (their attempts happened)."""
    bucket = _bucket("attempted_at", int(LAST_HOUR.width.total_seconds()))
    delivered, failed = _count_if("outcome = 'delivered'"), _count_if("outcome <> 'delivered'")
    sql = (f"SELECT {bucket}, attempted_at < %s, {delivered}, {failed} FROM {Delivery._meta.db_table} "
           f"WHERE peer_id IN (SELECT id FROM {Peer._meta.db_table} WHERE team_id = %s) "
           "AND attempted_at >= %s AND attempted_at < %s GROUP BY 1, 2")  # fmt: skip
    return _rows(sql, [_param(final_before), team_id, _param(start), _param(end)])


def _peer_attempts(peer_id: int, start: datetime, end: datetime) -> dict[int, tuple]:
    width = int(LAST_DAY.width.total_seconds())
    bucket, table = _bucket("attempted_at", width), Delivery._meta.db_table
    where, params = "peer_id = %s AND attempted_at >= %s AND attempted_at < %s", [peer_id, _param(start), _param(end)]
    if settings.IS_POSTGRES:
        sql = (f"SELECT {bucket}, COUNT(*) FILTER (WHERE outcome = 'delivered'), COUNT(*) FILTER (WHERE outcome <> "
               f"'delivered'), percentile_cont(%s) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE outcome = "
               f"'delivered') FROM {table} WHERE {where} GROUP BY 1")  # fmt: skip
        return {int(b): (ok, bad, *(cuts or (None,) * len(PERCENTILES)))
                for b, ok, bad, cuts in _rows(sql, [list(PERCENTILES), *params])}  # fmt: skip
    counts = _rows(f"SELECT {bucket}, SUM(CASE WHEN outcome = 'delivered' THEN 1 ELSE 0 END), "
                   f"SUM(CASE WHEN outcome = 'delivered' THEN 0 ELSE 1 END) FROM {table} WHERE {where} GROUP BY 1",
                   params)  # fmt: skip
    cuts = _sqlite_percentiles(bucket, table, where, params)
    return {int(b): (int(ok), int(bad), *cuts.get(int(b), (None,) * len(PERCENTILES))) for b, ok, bad in counts}


def _sqlite_percentiles(bucket: str, table: str, where: str, params: list) -> dict[int, tuple]:
    """percentile_cont over each bucket's delivered latencies: only the ranked rows on either side of
    each percentile's position are read back (positions p × (n − 1), interpolated as PostgreSQL does)."""
    near = " OR ".join(f"i = CAST({p!r} * (n - 1) AS INTEGER) OR i = CAST({p!r} * (n - 1) AS INTEGER) + 1"
                       for p in PERCENTILES)  # fmt: skip
    sql = (f"SELECT b, i, n, v FROM (SELECT b, v, ROW_NUMBER() OVER (PARTITION BY b ORDER BY v) - 1 AS i, "
           f"COUNT(*) OVER (PARTITION BY b) AS n FROM (SELECT {bucket} AS b, latency_ms AS v FROM {table} "
           f"WHERE {where} AND outcome = 'delivered')) WHERE {near}")  # fmt: skip
    ranked: dict[int, tuple[int, dict[int, float]]] = {}
    for b, i, n, v in _rows(sql, params):
        ranked.setdefault(int(b), (n, {}))[1][i] = v
    return {b: tuple(interpolate(values, n, p) for p in PERCENTILES) for b, (n, values) in ranked.items()}


def interpolate(values: dict[int, float], n: int, p: float) -> float:
    """percentile_cont's value from the sorted values at the two ranks around p × (n − 1)."""
    position = p * (n - 1)
    low = int(position)
    if low + 1 >= n:
        return float(values[low])
    return values[low] + (position - low) * (values[low + 1] - values[low])


def _rows(sql: str, params: list) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()
