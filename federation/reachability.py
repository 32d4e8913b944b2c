"""The reachability chip (docs/architecture.md "Peer states"). Pure: no Django."""

from datetime import datetime, timedelta

SLOW_MS = 1000


def chip(*, now: datetime, last_attempt_at, last_success_at, last_latency_ms, last_attempt_ok: bool) -> str:
    """Reachable | Slow | Stale | Unreachable | Unknown — never Reachable without a recorded success."""
    if last_attempt_at is None:
        return "Unknown"
    if last_success_at is None:
        return "Unreachable"
    age = now - last_success_at
    if age > timedelta(minutes=5):
        return "Unreachable"
    if age > timedelta(minutes=1) or not last_attempt_ok:
        return "Stale"
    if last_latency_ms is not None and last_latency_ms > SLOW_MS:
        return "Slow"
    return "Reachable"


def of_peer(peer, *, now: datetime) -> str | None:
    """A peer row's chip; None for a revoked peer: it is no longer pinged, so there is nothing to say
    of its reachability (and its last success would read as Reachable for a minute)."""
    if peer.status == "revoked":
        return None
    last_attempt_ok = peer.last_attempt_at is not None and peer.last_attempt_at == peer.last_success_at
    return chip(now=now, last_attempt_at=peer.last_attempt_at, last_success_at=peer.last_success_at,
                last_latency_ms=peer.last_latency_ms, last_attempt_ok=last_attempt_ok)  # fmt: skip
