"""Reads of stored events, in cursor order."""

import functools
import re
from dataclasses import dataclass

from django.conf import settings
from django.db import connection
from django.db.models import Q

from ingest import hooks, lookups  # noqa: F401  (registers __glob)
from ingest.errors import Code
from ingest.models import Event, Source
from kite import fastsql
from kite.errors import ApiError

_CURSOR = re.compile(r"([0-9]{1,19})-([0-9]{1,19})")  # ASCII: \d also matches "٣", which int() reads as 3
BIGINT_MAX = 2**63 - 1
MAX_PAGE = 1000


@dataclass(frozen=True)
class Cursor:
    txid: int
    id: int

    def __str__(self):
        return f"{self.txid}-{self.id}"


START = Cursor(0, 0)


def cursor_parse(raw: str | None) -> Cursor:
    if raw in (None, "", "0"):
        return START
    match = _CURSOR.fullmatch(raw)
    if not match:
        raise ApiError(
            "after must be a cursor as returned in `next` or an event's `kitecursor` (e.g. 0-42).", Code.BAD_CURSOR
        )
    # Past every event (19 nines): read as the largest cursor, so that no database is given a number beyond a bigint.
    return Cursor(min(int(match[1]), BIGINT_MAX), min(int(match[2]), BIGINT_MAX))


@dataclass(frozen=True)
class EventFilter:
    source: str | None = None
    type_glob: str | None = None
    agent: str | None = None
    # Listeners see agent messages only when they are the addressee; an admin
    # reading the store (GET /api/events without `agent`) sees all of them.
    all_agents: bool = False

    def matches(self, source: str, ce_type: str, agent: str) -> bool:
        """The same filter, applied to a broadcast notice without a query."""
        from fnmatch import fnmatchcase

        if self.source and source != self.source:
            return False
        if self.type_glob and not fnmatchcase(ce_type, self.type_glob):
            return False
        return not agent or agent == self.agent or (self.all_agents and not self.agent)


def events_after(*, team_id: str, after: Cursor, filters: EventFilter, limit: int = 100) -> list[Event]:
    """Events committed for good after `after`, oldest first.

    On PostgreSQL only rows of transactions older than every running one are
    read, so the (txid, id) order never grows in the middle and a cursor never
    skips an event that commits late.
    """
    if settings.IS_POSTGRES:
        return _events_after_postgres(team_id, after, filters, min(limit, MAX_PAGE))
    return _events_after_orm(team_id, after, filters, min(limit, MAX_PAGE))


def _events_after_orm(team_id: str, after: Cursor, filters: EventFilter, limit: int) -> list[Event]:
    """SQLite's (one writer at a time: ids commit in order, txid stays 0)."""
    qs = Event.objects.filter(team_id=team_id)
    qs = qs.filter(Q(txid__gt=after.txid) | Q(txid=after.txid, id__gt=after.id))
    if filters.source:
        qs = qs.filter(source__name=filters.source)
    if filters.type_glob:
        qs = qs.filter(ce_type__glob=filters.type_glob)
    # Agent messages go only to their addressee; other events to everyone.
    if filters.agent:
        qs = qs.filter(Q(agent="") | Q(agent=filters.agent))
    elif not filters.all_agents:
        qs = qs.filter(agent="")
    return list(qs.order_by("txid", "id")[:limit])


_EVENT_FIELDS = tuple(Event._meta.concrete_fields)


@functools.cache
def _events_after_sql(by_source: bool, by_type: bool, agents: str) -> str:
    """events_after's SELECT on PostgreSQL, built once per shape of filter: every listener's
    every wake-up reads it, and the ORM compiled the same query each time (a listener's reads were
    a larger part of a receiving web process's CPU than storing the events they read)."""
    qn, meta = connection.ops.quote_name, Event._meta
    names = ("team", "source", "txid", "id", "ce_type", "agent")
    column = {name: f"e.{qn(meta.get_field(name).column)}" for name in names}
    # A row comparison is an index range on (team, txid, id); the equivalent OR is not, and
    # read every event of the team from the start (1.2 ms a read after 10,000 events).
    where = [f"{column['team']} = %(team)s", f"({column['txid']}, {column['id']}) > (%(txid)s, %(id)s)",
             f"{column['txid']} < pg_snapshot_xmin(pg_current_snapshot())::text::bigint"]  # fmt: skip
    join = ""
    if by_source:
        join = f" JOIN {qn(Source._meta.db_table)} s ON s.{qn(Source._meta.pk.column)} = {column['source']}"
        where.append(f"s.{qn(Source._meta.get_field('name').column)} = %(source)s")
    if by_type:
        where.append(f"{column['ce_type']} LIKE %(type)s ESCAPE '\\'")
    if agents == "one":  # agent messages go only to their addressee; other events to everyone
        where.append(f"({column['agent']} = '' OR {column['agent']} = %(agent)s)")
    elif agents == "none":
        where.append(f"{column['agent']} = ''")
    columns = ", ".join(f"e.{qn(field.column)}" for field in _EVENT_FIELDS)
    return (f"SELECT {columns} FROM {qn(meta.db_table)} e{join} WHERE {' AND '.join(where)}"
            f" ORDER BY {column['txid']}, {column['id']} LIMIT %(limit)s")  # fmt: skip


def _events_after_postgres(team_id: str, after: Cursor, filters: EventFilter, limit: int) -> list[Event]:
    agents = "one" if filters.agent else ("all" if filters.all_agents else "none")
    sql = _events_after_sql(bool(filters.source), bool(filters.type_glob), agents)
    params = {"team": team_id, "txid": after.txid, "id": after.id, "limit": limit, "source": filters.source,
              "type": lookups.glob_to_like(filters.type_glob) if filters.type_glob else None, "agent": filters.agent}
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return [fastsql.load(Event, _EVENT_FIELDS, row) for row in rows]


def events_head(*, team_id: str) -> Cursor:
    """The cursor after the newest event a reader can see now: "only new events from here"."""
    qs = Event.objects.filter(team_id=team_id)
    if settings.IS_POSTGRES:
        qs = qs.extra(where=["ingest_event.txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint"])
    newest = qs.order_by("-txid", "-id").values_list("txid", "id").first()
    return Cursor(*newest) if newest else START


def sources_for_team(team_id: str):
    return Source.objects.filter(team_id=team_id).order_by("name")


@functools.cache
def _source_for_hook_sql() -> tuple[str, list[str]]:
    from kite.models import Team

    qn = connection.ops.quote_name
    source, team = qn(Source._meta.db_table), qn(Team._meta.db_table)
    fields = Source._meta.concrete_fields
    columns = ", ".join(f"{source}.{qn(field.column)}" for field in fields)
    # PostgreSQL: the row's xmin, which every UPDATE changes, is the version a cached copy is checked by.
    version = f", {source}.xmin::text AS row_version" if connection.vendor == "postgresql" else ""
    sql = (
        f"SELECT {columns}, {team}.{qn('routes_version')} AS team_routes_version,"
        f" {team}.{qn('listening_until')} AS team_listening_until{version} FROM {source}"
        f" JOIN {team} ON {team}.{qn('id')} = {source}.{qn('team_id')}"
        f" WHERE {source}.{qn('team_id')} = %s AND {source}.{qn('name')} = %s"
    )
    return sql, [field.attname for field in fields]


def source_for_hook(team_id: str, name: str) -> Source | None:
    """The read every webhook makes ((team, name) is unique), as plain SQL: the ORM's query
    compilation cost more CPU than the query itself (bench/RESULTS.md). The source carries
    its team's `routes_version` and `listening_until` as `team_routes_version` (for the
    federation routing hook) and `team_listening_until` (for the broadcast), and on
    PostgreSQL the row's version as `row_version` (see `source_for_hook_cached`)."""
    sql, attnames = _source_for_hook_sql()
    if connection.vendor != "postgresql":  # SQLite hands some columns back as text: let the ORM convert
        found = list(Source.objects.raw(sql, [team_id, name]))
        return found[0] if found else None
    with connection.cursor() as cursor:
        cursor.execute(sql, [team_id, name])
        row = cursor.fetchone()
    if row is None:
        return None
    found = Source.from_db(connection.alias, attnames, row[:-3])
    found.team_routes_version, found.team_listening_until, found.row_version = row[-3:]
    found.from_cache = False
    if len(_hook_sources) >= HOOK_SOURCE_CACHE_SIZE:
        _hook_sources.clear()  # a crude bound: only an instance with that many live sources refills
    _hook_sources[(team_id, name)] = found
    return fastsql.copied(found)


# Sources as last read by this process, by (team, name), on PostgreSQL. A copy is used only
# for a team whose event_stored hooks can say without the database what they write (no peers to
# route to, or its routes cached at the version read with the source: hooks.event_stored_alone_for):
# the webhook is verified with it and its event stored by one statement — with its outbox entries —
# that also checks that the source row (its xmin) and the team's routes_version are still what was
# read; a webhook whose check fails, or that the statement cannot store, is verified again against
# a fresh read (ingest.views). So a rotated secret, a changed rate limit, a deleted source or a
# changed peer is honoured exactly as without the cache.
HOOK_SOURCE_CACHE_SIZE = 4096
_hook_sources: dict[tuple[str, str], Source] = {}


def source_for_hook_copy(team_id: str, name: str) -> Source | None:
    """This process's copy of the source, when it has one it may use (as `source_for_hook_cached`),
    without reading the database: None otherwise."""
    cached = _hook_sources.get((team_id, name))
    if cached is None or not hooks.event_stored_alone_for(cached):
        return None
    found = fastsql.copied(cached)
    found.from_cache = True
    return found


def source_for_hook_cached(team_id: str, name: str) -> Source | None:
    """`source_for_hook`, from this process's copy when it has one (`from_cache` says which)."""
    found = source_for_hook_copy(team_id, name)
    # none, or an event some hook writes for, which is stored in a transaction: read it
    return found if found is not None else source_for_hook(team_id, name)
