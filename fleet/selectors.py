"""Reads of the fleet: our agents as rows, the peers the aggregated view asks, their snapshots."""

from datetime import datetime, timedelta

import orjson
from django.conf import settings
from django.db import connection
from django.db.models import F
from django.utils import timezone

from federation.models import Peer
from fleet import rows as fleet_rows
from fleet.models import Agent, Snapshot

# Peers whose fleet the aggregated view asks: every live peering (a one-way peer we only send to
# never becomes `active` here, yet its operator may have granted us its fleet).
FLEET_PEER_STATUSES = (Peer.Status.ACCEPTED, Peer.Status.ENROLLED, Peer.Status.ACTIVE)


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def status_of(last_seen: datetime, now: datetime) -> str:
    return "online" if now - last_seen < timedelta(seconds=settings.KITE_AGENT_OFFLINE_SECONDS) else "offline"


def agents(team_id: str):
    return Agent.objects.filter(team_id=team_id).order_by("name")


def agent_for_team(team_id: str, agent_id) -> Agent | None:
    try:
        return agents(team_id).filter(pk=int(agent_id)).first()
    except (TypeError, ValueError):
        return None


WIRE_FIELDS = ("id", "name", "last_seen", "version", "host", "labels")


def wire_row(agent: dict, now: datetime) -> dict:
    """An agent (its WIRE_FIELDS) as this instance tells it, to its own API and to peers."""
    return {**agent, "status": status_of(agent["last_seen"], now), "last_seen": iso(agent["last_seen"])}


def local_row(agent: dict, now: datetime) -> dict:
    return {**wire_row(agent, now), "peer": None, "read_only": False, "stale": False}


def agent_detail(agent: Agent) -> dict:
    fields = {name: getattr(agent, "pk" if name == "id" else name) for name in WIRE_FIELDS}
    return {**local_row(fields, timezone.now()), "first_seen": iso(agent.first_seen), "via": agent.via}


def local_rows(team_id: str, q: str = "") -> list[dict]:
    now = timezone.now()
    found = (local_row(agent, now) for agent in agents(team_id).values(*WIRE_FIELDS))
    return [row for row in found if fleet_rows.matches(row, q)]


def granted_rows(team_id: str, resource_id: str | None) -> list[dict]:
    """What a peer holding a grant for `resource_id` (None: every agent) may see. Plain values, not
    model instances: every peer's list reads them all (bench/fleet.py)."""
    now = timezone.now()
    found = agents(team_id)
    if resource_id and not resource_id.startswith(fleet_rows.LABEL_GRANT_PREFIX):
        found = found.filter(name=resource_id)
    return [wire_row(agent, now) for agent in found.values(*WIRE_FIELDS)
            if fleet_rows.grant_allows(resource_id, agent["name"], agent["labels"])]  # fmt: skip


def granted_agent(team_id: str, resource_id: str | None, agent_id: int) -> dict | None:
    """One agent as a peer holding a grant for `resource_id` may see it (its detail: the listed
    fields plus first_seen and via); None when there is no such agent or the grant does not show it."""
    found = agents(team_id).filter(pk=agent_id).values(*WIRE_FIELDS, "first_seen", "via").first()
    if found is None or not fleet_rows.grant_allows(resource_id, found["name"], found["labels"]):
        return None
    first_seen, via = found.pop("first_seen"), found.pop("via")
    return {**wire_row(found, timezone.now()), "first_seen": iso(first_seen), "via": via}


# granted_rows as one JSON array built by PostgreSQL: no row becomes a Python object on its way
# from the table to the peer (a peer's fleet call spent ~2.5 ms of CPU per 100 agents on that).
# The same rows, fields and order; `last_seen` always with microseconds.
_GRANTED_JSON = f"""
SELECT coalesce(json_agg(json_build_object(
    'id', id, 'name', name,
    'last_seen', to_char(last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'version', version, 'host', host, 'labels', labels,
    'status', CASE WHEN %(now)s::timestamptz - last_seen < make_interval(secs => %(offline)s)
                   THEN 'online' ELSE 'offline' END
  ) ORDER BY name), '[]')::text
FROM {Agent._meta.db_table}
WHERE team_id = %(team)s
  AND (%(name)s::text IS NULL OR name = %(name)s)
  AND (%(label_key)s::text IS NULL OR labels ->> %(label_key)s = %(label_value)s)
"""


def granted_rows_json(team_id: str, resource_id: str | None) -> str:
    """granted_rows as a JSON array (text), rendered by PostgreSQL where it can be."""
    if connection.vendor != "postgresql":
        return orjson.dumps(granted_rows(team_id, resource_id)).decode()
    name = label_key = label_value = None
    if resource_id and resource_id.startswith(fleet_rows.LABEL_GRANT_PREFIX):
        label_key, _, label_value = resource_id[len(fleet_rows.LABEL_GRANT_PREFIX):].partition("=")
    elif resource_id:
        name = resource_id
    params = {"now": timezone.now(), "offline": settings.KITE_AGENT_OFFLINE_SECONDS, "team": team_id, "name": name,
              "label_key": label_key, "label_value": label_value}  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(_GRANTED_JSON, params)
        return cursor.fetchone()[0]


def fleet_peers(team_id: str | None, name: str | None = None, *, not_asked_since=None) -> list[Peer]:
    """The peers whose fleet the aggregated view asks (team_id None: of every team); with
    `not_asked_since`, only those nobody has asked since then."""
    peers = Peer.objects.filter(role=Peer.Role.PEER, status__in=FLEET_PEER_STATUSES).exclude(peer_hook_url="")
    if team_id is not None:
        peers = peers.filter(team_id=team_id)
    if name is not None:
        peers = peers.filter(name=name)
    if not_asked_since is not None:
        peers = peers.exclude(fleet_snapshot__attempted_at__gte=not_asked_since)
    # When its snapshot was last written, and with what outcome (federated.record decides by them).
    peers = peers.annotate(snapshot_attempted_at=F("fleet_snapshot__attempted_at"),
                           snapshot_outcome=F("fleet_snapshot__outcome"))  # fmt: skip
    return list(peers.order_by("team_id", "name", "id"))


def snapshots(peer_ids: list[int]) -> dict[int, Snapshot]:
    return {snapshot.peer_id: snapshot for snapshot in Snapshot.objects.filter(peer_id__in=peer_ids)}
