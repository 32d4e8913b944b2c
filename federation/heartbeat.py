"""Ping peers: persist the outcome, move states, resume a paused queue (docs/architecture.md "Peer states")."""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from django.db import close_old_connections, transaction
from django.db.models import Case, Exists, OuterRef, Q, Value, When
from django.utils import timezone

from federation import audit, client, dispatch, enqueue, peers
from federation.contract import BATCH_CAP
from federation.models import Peer, PeerHealth

PING_TIMEOUT = (3.0, 5.0)
CLOCK_TOLERANCE_SECONDS = 300


@dataclass
class PingResult:
    ok: bool
    status_code: int | None = None
    latency_ms: int | None = None
    factors: dict = field(default_factory=dict)
    error: str = ""
    body: object = None

    def as_dict(self) -> dict:
        return {
            "ok": self.ok, "status_code": self.status_code, "latency_ms": self.latency_ms,
            "factors": self.factors, "error": self.error,
        }  # fmt: skip


def factors_for_failure(failure: client.PeerCallError) -> dict:
    code = failure.code
    factors = {"tls": "ok", "certificate": "not_configured", "secret": "unknown", "clock": "unknown"}
    if code == "tls":
        factors["tls"] = "failed"
    elif code in ("connection", "insecure_url"):  # insecure_url: refused by the destination policy, never connected
        factors["tls"] = "unknown"
    elif code == "unknown_team":  # the peer has no team of that id: the hook URL is wrong, not the secret
        factors["url"] = "unknown_team"
    elif code in ("bad_secret", "unknown_peer"):
        factors["secret"] = "mismatch"
        factors["clock"] = "ok"
    elif code == "stale_timestamp":
        factors["clock"] = "skewed"
    elif code in ("bad_certificate", "missing_certificate"):
        factors["certificate"] = "failed"
        factors["secret"] = "ok"
    return factors


def ping(peer: Peer, *, actor: str = audit.SYSTEM) -> PingResult:
    target = peers.target_for(peer)
    target = client.Target(**{**target.__dict__, "url": peers.ping_url(peer)})
    started = time.time()
    try:
        answer = client.call(target, "GET", timeout=PING_TIMEOUT, audit_as=audit.PeerCall(peer=peer, actor=actor))
    except client.PeerCallError as failure:
        return PingResult(False, failure.status_code, None, factors_for_failure(failure), failure.detail)
    body = answer.body if isinstance(answer.body, dict) else {}
    factors = {"tls": "ok", "certificate": "ok" if target.signer else "not_configured", "secret": "ok",
               "clock": _clock(body, started)}  # fmt: skip
    return PingResult(True, answer.status_code, answer.latency_ms, factors, "", body)


def _clock(body: dict, sent_at: float) -> str:
    try:
        remote = datetime.fromisoformat(str(body.get("time", "")).replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return "unknown"
    return "ok" if abs(remote.timestamp() - sent_at) <= CLOCK_TOLERANCE_SECONDS else "skewed"


def heartbeat(peer: Peer, *, actor: str = audit.SYSTEM) -> PingResult:
    """Ping and record it; a success enrols the peer and resumes a queue paused as down. A peer
    paused by an operator is pinged all the same (its reachability stays current); only the
    operator's resume lifts that pause."""
    result = ping(peer, actor=actor)
    now = timezone.now()
    health, updates = {"last_attempt_at": now, "last_heartbeat_at": now}, {}
    if result.ok:
        health.update(last_success_at=now, last_latency_ms=result.latency_ms, last_error="")
        capabilities = result.body.get("capabilities") if isinstance(result.body, dict) else None
        if isinstance(capabilities, dict) and isinstance(capabilities.get("batch_max"), int):
            updates["batch_max"] = max(1, min(capabilities["batch_max"], BATCH_CAP))
        remote = result.body.get("instance_id") if isinstance(result.body, dict) else None
        if isinstance(remote, str) and remote and not peer.remote_instance_id:
            updates["remote_instance_id"] = remote[:63]
        if peer.status in (Peer.Status.ACCEPTED, Peer.Status.ENROLLED):
            # Decided by the row as it is now, not as read before the ping: the peer's own first
            # request may have landed meanwhile (it records last_inbound_at).
            contacted = PeerHealth.objects.filter(peer_id=OuterRef("pk"), last_inbound_at__isnull=False)
            updates["status"] = Case(When(Exists(contacted), then=Value(Peer.Status.ACTIVE)),
                                     default=Value(Peer.Status.ENROLLED))  # fmt: skip
    else:
        health["last_error"] = result.error[:1000]
    live = Peer.objects.filter(pk=peer.pk).exclude(status=Peer.Status.REVOKED)
    with transaction.atomic():
        # Only a queue paused as down is lifted, judged by the row as it is now: an operator's
        # pause (or auth_failed) made since the row was read stays. Its failures count again from 0.
        if result.ok and live.filter(paused=Peer.Pause.DOWN).update(paused=Peer.Pause.NONE):
            health["consecutive_failures"] = 0
        if updates and live.update(**updates) or not updates and live.exists():  # not revoked meanwhile
            PeerHealth.record(peer, **health)
    if "remote_instance_id" in updates:
        enqueue.forget_routes(peer.team_id)
    if result.ok and peer.paused == Peer.Pause.DOWN:  # lifted now, or paused anew meanwhile: the drain sees that
        dispatch.kick(peer.pk)
    return result


def _heartbeat_in_thread(peer_id: int) -> None:
    try:
        peer = Peer.objects.filter(pk=peer_id).first()
        if peer is not None:
            heartbeat(peer)
    finally:
        close_old_connections()


def heartbeat_all(*, only_down: bool = False, max_parallel: int = 16) -> int:
    peers = Peer.objects.filter(role=Peer.Role.PEER).exclude(status=Peer.Status.REVOKED).exclude(peer_hook_url="")
    if only_down:
        peers = peers.filter(Q(paused=Peer.Pause.DOWN))
    ids = list(peers.values_list("pk", flat=True))
    if ids:
        with ThreadPoolExecutor(max_workers=min(max_parallel, len(ids))) as pool:
            list(pool.map(_heartbeat_in_thread, ids))
    return len(ids)
