"""The audit trail (DESIGN §7): one row per admin action, peer call and refusal.

`record()` is the only writer. It never raises into the caller's path: an audit
failure is logged, the audited action goes on (a lost audit row must not turn a
delivery or a ping into an error).
"""

import logging

from django.db import transaction

from federation.models import AuditEvent, Peer

logger = logging.getLogger(__name__)

PEER_CALLED = "Federation.PeerCalled"
REMOTE_REQUEST = "Federation.RemoteRequest"


def record(action: str, *, team=None, team_id: str | None = None, peer: Peer | None = None, peer_name: str = "",
           actor: str = "", endpoint: str = "", outcome: str = "ok", detail: str = "",
           data: dict | None = None) -> AuditEvent | None:
    try:
        with transaction.atomic():  # a savepoint when nested: a failed insert leaves the caller's transaction usable
            return _create(action, team, team_id, peer, peer_name, actor, endpoint, outcome, detail, data)
    except Exception:
        logger.exception("could not record audit event %s", action)
        return None


def _create(action, team, team_id, peer, peer_name, actor, endpoint, outcome, detail, data) -> AuditEvent:
    return AuditEvent.objects.create(
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
