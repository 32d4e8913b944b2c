"""Writes of the fleet: agents registering and heartbeating, peers' snapshots, the grant a peer gave us."""

import functools
import re
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.utils import timezone

from federation import audit
from federation.models import Peer
from fleet.errors import Code
from fleet.models import Agent, Snapshot
from kite import crypto
from kite.errors import ApiError

GRANT_TOKEN = re.compile(r"fg-[0-9]{1,18}\.[A-Za-z0-9_-]{16,150}")


def agent_register(*, team_id: str, name: str, via: str, version: str | None = None, host: str | None = None,
                   labels: dict | None = None) -> tuple[Agent, bool]:  # fmt: skip
    """Register the agent or refresh it (a heartbeat): last_seen is now; a field left out
    (None) keeps what the agent said before. Returns (agent, created)."""
    now = timezone.now()
    given = {key: value for key, value in (("version", version), ("host", host), ("labels", labels)) if value is not None}
    with transaction.atomic():
        agent, created = Agent.objects.select_for_update().get_or_create(
            team_id=team_id, name=name, defaults={"via": via, "first_seen": now, "last_seen": now, **given}
        )
        if not created:
            for field, value in {"via": via, "last_seen": now, **given}.items():
                setattr(agent, field, value)
            agent.save(update_fields=["via", "last_seen", *given])
    return agent, created


def agent_seen(*, team_id: str, name: str) -> int:
    """The agent was there just now (its listener left): one UPDATE, no row created."""
    return Agent.objects.filter(team_id=team_id, name=name).update(last_seen=timezone.now())


@dataclass
class FleetAnswer:
    """One peer's part of a fan-out: outcome ok|timeout|error|unauthorized|unreachable; `rows`
    (checked wire rows) only when ok; `called`: a request was sent (else nothing to audit)."""

    outcome: str
    latency_ms: int | None = None
    rows: list | None = None
    detail: str = ""
    called: bool = True


def snapshots_record(*, peers: dict[int, Peer], answers: dict[int, FleetAnswer], now) -> None:
    """Keep what each peer answered: its rows and last contact on success; on a refusal, no rows
    (the peer withdrew our access); on any other failure only the attempt (the old rows stay)."""
    found = [_snapshot_values(peers[peer_id], answers[peer_id], now) for peer_id in sorted(answers)]
    if not found:
        return
    db = connections[DEFAULT_DB_ALIAS]
    with db.cursor() as cursor:
        cursor.execute(_upsert_sql(len(found)), [value for values in found for value in values])


_SNAPSHOT_COLUMNS = ("peer_id", "team_id", "rows", "fetched_at", "attempted_at", "outcome", "latency_ms", "detail")


def _snapshot_values(peer: Peer, answer: FleetAnswer, now) -> list:
    ok = answer.outcome == "ok"
    rows = Snapshot._meta.get_field("rows").get_prep_value((answer.rows or []) if ok else [])  # JSON text
    return [peer.pk, peer.team_id, rows, now if ok else None, now, answer.outcome, answer.latency_ms,
            answer.detail[:1000]]  # fmt: skip


@functools.cache
def _upsert_sql(count: int) -> str:
    """One statement for every peer of a fan-out (PostgreSQL and SQLite), built once per count: the
    ORM's bulk_create sends the JSON to PostgreSQL as a text array that psycopg escapes with a
    regular expression (~80 ms for 10 peers of 100 agents), and one UPDATE per peer is a round
    trip and a query compilation each. Rows are kept unless the peer answered or refused us."""
    qn = connections[DEFAULT_DB_ALIAS].ops.quote_name
    table, rows = qn(Snapshot._meta.db_table), qn("rows")  # ROWS is a keyword (window frames)
    columns = ", ".join(qn(column) for column in _SNAPSHOT_COLUMNS)
    one = "(" + ", ".join(["%s"] * len(_SNAPSHOT_COLUMNS)) + ")"
    return (
        f"INSERT INTO {table} ({columns}) VALUES {', '.join([one] * count)} ON CONFLICT (peer_id) DO UPDATE SET "
        "attempted_at = EXCLUDED.attempted_at, outcome = EXCLUDED.outcome, latency_ms = EXCLUDED.latency_ms, "
        f"detail = EXCLUDED.detail, fetched_at = COALESCE(EXCLUDED.fetched_at, {table}.fetched_at), "
        f"{rows} = CASE WHEN EXCLUDED.outcome IN ('ok', 'unauthorized') THEN EXCLUDED.{rows} ELSE {table}.{rows} END"
    )


REMOTE_GRANT_STORED = audit.REMOTE_GRANT_STORED  # named with the other actions: the Audit screen's filter lists them
REMOTE_GRANT_FORGOTTEN = audit.REMOTE_GRANT_FORGOTTEN


def remote_grant_set(*, peer: Peer, token: str | None, actor: str = "") -> Peer:
    """Keep (encrypted) the fleet.agents grant token the peer's operator gave us; None forgets it."""
    if token is not None and not GRANT_TOKEN.fullmatch(token):
        raise ApiError("token must be a grant token 'fg-<id>.<secret>' as the peer's operator received it.",
                       Code.INVALID)  # fmt: skip
    peer.remote_grant_encrypted = crypto.encrypt(token) if token else ""
    with transaction.atomic():
        Peer.objects.filter(pk=peer.pk).update(remote_grant_encrypted=peer.remote_grant_encrypted)
        # The grant's id only: the token is a bearer credential.
        audit.record(REMOTE_GRANT_STORED if token else REMOTE_GRANT_FORGOTTEN, peer=peer, actor=actor,
                     data={"grant": token.partition(".")[0]} if token else {})  # fmt: skip
    return peer
