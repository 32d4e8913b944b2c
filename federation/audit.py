"""The audit trail (README "Audit log and metrics"): one row per admin action, peer call and refusal.

`record()` is the only writer. It never raises into the caller's path: an audit
failure is logged, the audited action goes on (a lost audit row must not turn a
delivery or a ping into an error).

Who writes what:
- admin actions: the services that perform them, inside their own transaction
  (a failed action leaves no row), with the `actor` the view or command passes;
- outbound peer calls: `client.call(..., audit_as=PeerCall(...))` — every call but
  event deliveries, which are the hot path and have the Delivery table;
- inbound peer calls: `remote_request()` / `auth_failed()` from the peer-facing views.
  Event deliveries to `/hooks/{team}/kite` are not audited when they succeed (hot path,
  and the Event row is their record); a refused one is (`auth_failed`, rare).

The two call helpers also count `kite_federation_calls_total`, so the metric and the
audit trail name the same outcomes: `ok`, or the failure code / kind.
"""

import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from django.db import transaction

from federation import metrics
from federation.models import AuditEvent, Peer
from kite import ratelimit

logger = logging.getLogger(__name__)

PEER_CALLED = "Federation.PeerCalled"
REMOTE_REQUEST = "Federation.RemoteRequest"
AUTH_FAILED = "Federation.AuthFailed"
# One per admin action:
PEER_CREATED = "Federation.PeerCreated"
PEER_UPDATED = "Federation.PeerUpdated"
PEER_REVOKED = "Federation.PeerRevoked"
SECRET_ROTATED = "Federation.SecretRotated"
CERTIFICATE_ISSUED = "Federation.CertificateIssued"
CERTIFICATE_REVOKED = "Federation.CertificateRevoked"
TOKEN_CREATED = "Federation.TokenCreated"
TOKEN_DELETED = "Federation.TokenDeleted"
TRUSTED_SENDER_CREATED = "Federation.TrustedSenderCreated"
TRUSTED_SENDER_PROMOTED = "Federation.TrustedSenderPromoted"  # made a peer: PATCH /api/federation/trusted-senders/{id}
INVITATION_CREATED = "Federation.InvitationCreated"
INVITATION_ACCEPTED = "Federation.InvitationAccepted"
REMOTE_GRANT_STORED = "Federation.RemoteGrantStored"  # the fleet grant a hand-made peer gave us (fleet.services)
REMOTE_GRANT_FORGOTTEN = "Federation.RemoteGrantForgotten"
GRANT_CREATED = "Federation.GrantCreated"
GRANT_REVOKED = "Federation.GrantRevoked"
DEAD_LETTERS_REPLAYED = "Federation.DeadLettersReplayed"
PEER_PAUSED = "Federation.PeerPaused"  # an operator held the queue for maintenance
PEER_RESUMED = "Federation.PeerResumed"

SYSTEM = "system"
COMMAND_LINE = "manage.py"
# A flood of refused requests must not become a flood of rows: past these limits refusals are
# only counted (kite_federation_calls_total, and kite_audit_refusals_suppressed_total{reason}).
# Per team and factor per second, so one noisy factor leaves room for the others:
REFUSALS_AUDITED_PER_SECOND = 5
# Per team over all factors, per second and per UTC day: at most 50,000 rows a team a day.
REFUSALS_AUDITED_PER_TEAM_PER_SECOND = 10
REFUSALS_AUDITED_PER_TEAM_PER_DAY = 50_000
# Refusals that name no team (nobody we know signed them) share one such budget, as one team.
TEAMLESS = "-"
DAY = 86_400


def record(action: str, *, team=None, team_id: str | None = None, peer: Peer | None = None, peer_name: str = "",
           actor: str = "", endpoint: str = "", outcome: str = "ok", detail: str = "",
           data: dict | None = None) -> AuditEvent | None:
    try:
        with transaction.atomic():  # a savepoint when nested: a failed insert leaves the caller's transaction usable
            return _create(action, team, team_id, peer, peer_name, actor, endpoint, outcome, detail, data)
    except Exception:
        logger.exception("could not record audit event %s", action)
        return None


def record_all(events: list[dict]) -> None:
    """Several events (each `record`'s keyword arguments, `action` included) in one INSERT: a fan-out
    notes one Federation.PeerCalled per peer it asked."""
    if not events:
        return
    try:
        with transaction.atomic():
            AuditEvent.objects.bulk_create([_event(**event) for event in events])
    except Exception:
        logger.exception("could not record %d audit events", len(events))


def _create(action, team, team_id, peer, peer_name, actor, endpoint, outcome, detail, data) -> AuditEvent:
    event = _event(action, team=team, team_id=team_id, peer=peer, peer_name=peer_name, actor=actor,
                   endpoint=endpoint, outcome=outcome, detail=detail, data=data)  # fmt: skip
    event.save(force_insert=True)
    return event


def _event(action: str, *, team=None, team_id: str | None = None, peer: Peer | None = None, peer_name: str = "",
           actor: str = "", endpoint: str = "", outcome: str = "ok", detail: str = "",
           data: dict | None = None) -> AuditEvent:  # fmt: skip
    return AuditEvent(
        team_id=team.pk if team is not None else (team_id or (peer.team_id if peer is not None else None)),
        action=action,
        peer=peer if peer is not None and peer.pk else None,
        peer_name=(peer.name if peer is not None else peer_name)[:63],
        actor=str(actor)[:120],
        endpoint=endpoint[:200],
        outcome=str(outcome)[:40],
        detail=detail,
        data=data or {},
    )


def actor_of(principal) -> str:
    """Who did it, for the `actor` column: an API key by its id and prefix (never the key), or a user."""
    api_key = getattr(principal, "api_key", None)
    if api_key is not None:
        return f"api-key {api_key.prefix}… (id {api_key.pk})"
    user = getattr(principal, "user", None) or principal
    return f"user {user.get_username()}" if hasattr(user, "get_username") else str(user)


# --- outbound ----------------------------------------------------------------------


@dataclass
class PeerCall:
    """What `client.call(..., audit_as=)` notes an outbound call on: Federation.PeerCalled and the
    calls metric. `deferred`: the rows wait for `flush()`, which the caller runs once it knows which
    peer row to name (accepting an invitation stores that row only after the handshake)."""

    peer: Peer | None = None
    team_id: str | None = None
    peer_name: str = ""
    actor: str = SYSTEM
    deferred: bool = False
    _pending: list = field(default_factory=list, repr=False)

    def done(self, method: str, url: str, *, status_code: int | None, latency_ms: int, failure=None) -> None:
        outcome = metrics.outcome_of(failure)
        metrics.CALLS.labels(self._name(), "outbound", outcome).inc()
        noted = {
            "endpoint": urlsplit(url).path, "outcome": outcome, "detail": failure.detail if failure else "",
            "data": {"method": method, "status_code": status_code, "latency_ms": latency_ms},
        }  # fmt: skip
        self._pending.append(noted)
        if not self.deferred:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for noted in pending:
            record(PEER_CALLED, peer=self.peer, team_id=self.team_id, peer_name=self.peer_name, actor=self.actor,
                   **noted)  # fmt: skip

    def _name(self) -> str:
        return self.peer.name if self.peer is not None else (self.peer_name or "unknown")


# --- inbound -----------------------------------------------------------------------


def remote_request(*, peer: Peer, endpoint: str, method: str, outcome: str = "ok", sender: str = "",
                   remote_addr: str = "", detail: str = "") -> None:  # fmt: skip
    """An authenticated peer called us (Federation.RemoteRequest), counted as an inbound call."""
    metrics.CALLS.labels(peer.name, "inbound", outcome).inc()
    record(REMOTE_REQUEST, peer=peer, actor=sender or peer.remote_instance_id, endpoint=endpoint, outcome=outcome,
           detail=detail, data=_request_data(method, remote_addr))  # fmt: skip


def auth_failed(*, outcome: str, endpoint: str, method: str = "", detail: str = "", peer: Peer | None = None,
                team_id: str | None = None, sender: str = "", remote_addr: str = "") -> None:  # fmt: skip
    """A peer call we refused, `outcome` naming the failing factor (unknown_peer, bad_secret,
    bad_certificate, missing_certificate, stale_timestamp, unknown_invitation, grant_expired …).

    Always counted; recorded as Federation.AuthFailed within the limits above (per team and
    factor, per team, per team and day). Without a peer or team (nobody we know signed it) the row
    belongs to no team: the Django admin shows it, /api/audit (team-scoped) does not."""
    metrics.CALLS.labels(peer.name if peer is not None else "unknown", "inbound", outcome).inc()
    team_id = peer.team_id if peer is not None else team_id
    if not _refusal_allowed(team_id, outcome):
        return
    record(AUTH_FAILED, peer=peer, team_id=team_id, actor=sender, endpoint=endpoint, outcome=outcome, detail=detail,
           data=_request_data(method, remote_addr))  # fmt: skip


def _request_data(method: str, remote_addr: str) -> dict:
    return {key: value for key, value in (("method", method), ("remote_addr", remote_addr)) if value}


def _refusal_allowed(team_id: str | None, outcome: str) -> bool:
    """Whether this refusal gets a row. The limits are asked narrowest first and stop at the first
    no: a flood costs one Redis round trip per refusal, as before, and each wider counter only
    counts what the narrower ones let through."""
    pool = "team" if team_id else "teamless"
    team_id = team_id or TEAMLESS
    limits = (
        ("factor_rate", f"audit-refusal:{team_id}:{outcome}", REFUSALS_AUDITED_PER_SECOND, 1),
        (f"{pool}_rate", f"audit-refusals:{team_id}", REFUSALS_AUDITED_PER_TEAM_PER_SECOND, 1),
        (f"{pool}_daily", f"audit-refusals-day:{team_id}", REFUSALS_AUDITED_PER_TEAM_PER_DAY, DAY),
    )
    try:
        for reason, key, limit, window in limits:
            if not ratelimit.hit(key, limit, window_seconds=window).allowed:
                metrics.AUDIT_REFUSALS_SUPPRESSED.labels(reason).inc()
                return False
    except Exception:  # the limiter's store is down: audit rather than lose the row
        logger.exception("refusal rate limit unavailable")
    return True

