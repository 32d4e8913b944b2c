"""The aggregated fleet (README "The fleet across instances"): our agents plus every live peer's, read-only.

Each peer is asked in parallel (signed GET /api/federation/fleet/agents with the
grant it gave us in `kite-grant`) with a per-peer timeout below the list's
deadline. A peer that does not answer is served from its snapshot, flagged
stale; a peer never heard from is listed with its outcome and no rows. One bad
peer never fails the list. The threads only talk HTTP: everything they need is
read before they start, and nothing is written until they are done (no
database connection or transaction waits on a peer).
"""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from federation import audit, certificates, client, metrics
from federation.models import Peer
from federation.peers import ping_url, secret_of
from fleet import rows, selectors, services
from fleet.errors import Code
from fleet.services import FleetAnswer
from kite import crypto
from kite.errors import ApiError

PATH = "/api/federation/fleet/agents"
GRANT_HEADER = "kite-grant"
MAX_PARALLEL = 32


# --- the threads ----------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=MAX_PARALLEL, thread_name_prefix="fleet")
        return _pool


def _forget_pool_in_child() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # a forked Celery worker has none of its parent's threads


os.register_at_fork(after_in_child=_forget_pool_in_child)


@dataclass(frozen=True)
class Call:
    """What asking one peer needs, read before any thread starts."""

    peer_id: int
    target: client.Target | None
    grant: str


def prepare(peers: list[Peer]) -> list[Call]:
    signers: dict[str, object] = {}
    calls = []
    for peer in peers:
        grant = _grant_of(peer)
        calls.append(Call(peer.pk, _target(peer, signers) if grant else None, grant))
    return calls


def _target(peer: Peer, signers: dict, path: str = PATH) -> client.Target:
    """What peers.target_for(peer) builds, for our path, with the team's signer read once for
    all its peers (a query each otherwise)."""
    if peer.team_id not in signers:
        signers[peer.team_id] = certificates.signer_for(peer.team_id)
    return client.Target(url=ping_url(peer, path), secret=secret_of(peer, "outbound"),
                         sender_id=settings.KITE_INSTANCE_ID, tls_fingerprint=peer.tls_fingerprint,
                         signer=signers[peer.team_id])  # fmt: skip


def _grant_of(peer: Peer) -> str:
    try:
        return crypto.decrypt_cached(peer.remote_grant_encrypted) if peer.remote_grant_encrypted else ""
    except Exception:  # encrypted under a key no longer configured: as good as none
        return ""


def outcome_of(failure: client.PeerCallError) -> str:
    if failure.timed_out:
        return "timeout"
    if failure.status_code in (401, 403):
        return "unauthorized"
    if failure.status_code is None and failure.code == "connection":
        return "unreachable"
    return "error"


def fetch(call: Call, timeout: float) -> FleetAnswer:
    """One peer's fleet (runs in a pool thread: HTTP only, no database)."""
    started = time.perf_counter()
    try:
        answer = client.call(call.target, "GET", timeout=(timeout, timeout), headers={GRANT_HEADER: call.grant},
                             max_answer_bytes=client.MAX_FLEET_ANSWER_BYTES)  # fmt: skip
    except client.PeerCallError as failure:  # a destination the policy refuses included (insecure_url)
        return FleetAnswer(outcome_of(failure), _ms_since(started), None, failure.detail)
    raws = rows.answer_rows(answer.body)
    if raws is None:
        return FleetAnswer("error", answer.latency_ms, None, "The peer's answer is not a fleet list {results: […]}.")
    return FleetAnswer("ok", answer.latency_ms, sorted(rows.checked_rows(raws), key=lambda row: row["name"]))


def _ms_since(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


NO_GRANT = ("No fleet.agents grant from this peer: an invitation exchanges one; for a peer added by hand, "
            "its operator creates one and you store it with PUT /api/fleet/peers/{id}/remote-grant.")  # fmt: skip


class FanOut:
    """Calls started at once; `collect(within)` waits for them until `within` seconds after the start."""

    def __init__(self, calls: list[Call], *, timeout: float):
        self.timeout, self.started = timeout, time.perf_counter()
        self.calls = calls
        self.futures = {call.peer_id: _executor().submit(fetch, call, timeout) for call in calls if call.grant}

    def collect(self, within: float) -> dict[int, FleetAnswer]:
        wait(self.futures.values(), timeout=max(0.0, self.started + within - time.perf_counter()))
        answers = {}
        for call in self.calls:
            future = self.futures.get(call.peer_id)
            if future is None:
                answers[call.peer_id] = FleetAnswer("unauthorized", None, None, NO_GRANT, called=False)
            elif future.done():
                answers[call.peer_id] = future.result()
            else:
                future.cancel()
                answers[call.peer_id] = FleetAnswer("timeout", _ms_since(self.started), None,
                                                   f"No answer within {self.timeout:g} s.")  # fmt: skip
        return answers


def record(peers: dict[int, Peer], answers: dict[int, FleetAnswer], *, actor: str, every: bool = False) -> datetime:
    """Snapshots, audit rows and metrics of one fan-out, in one transaction after it; returns the
    time noted as the answering peers' last contact. A list writes a peer's snapshot only when it
    is due (`_snapshot_due`); the refresh (`every`) writes them all."""
    now = timezone.now()
    called = [(peers[peer_id], answer) for peer_id, answer in answers.items() if answer.called]
    due = answers if every else {pk: answer for pk, answer in answers.items() if _snapshot_due(peers[pk], answer, now)}
    with transaction.atomic():
        services.snapshots_record(peers=peers, answers=due, now=now)
        audit.record_all([{"action": audit.PEER_CALLED, "peer": peer, "actor": actor, "endpoint": PATH,
                           "outcome": answer.outcome, "detail": answer.detail[:500],
                           "data": {"method": "GET", "latency_ms": answer.latency_ms, "agents": len(answer.rows or [])}}
                          for peer, answer in called])  # fmt: skip
    for peer, answer in called:
        metrics.CALLS.labels(peer.name, "outbound", answer.outcome).inc()
    return now


def _snapshot_due(peer: Peer, answer: FleetAnswer, now: datetime) -> bool:
    """A list rewrites a peer's snapshot (a hundred rows or more) at most once per half refresh
    period — operators listing at once don't each rewrite every peer's rows — and at once when the
    outcome changes (a peer that refuses us loses its rows now; a failure is on record now)."""
    attempted = getattr(peer, "snapshot_attempted_at", None)
    if attempted is None or answer.outcome != getattr(peer, "snapshot_outcome", None):
        return True
    return now - attempted >= timedelta(seconds=settings.KITE_FLEET_REFRESH_SECONDS / 2)


# --- the list -------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    federation: bool = False
    peer: str | None = None  # only this peer's agents
    q: str = ""
    snapshot: bool = False  # serve the snapshots only, ask no peer


def fleet_list(*, team_id: str, query: Query, actor: str) -> dict:
    """{includes_federation, results, peers} as GET /api/fleet/agents answers it."""
    started = time.perf_counter()
    if not query.federation:
        return {"includes_federation": False, "results": selectors.local_rows(team_id, query.q), "peers": []}
    peers = selectors.fleet_peers(team_id, name=query.peer)
    fan_out = None
    if not query.snapshot and peers:
        fan_out = FanOut(prepare(peers), timeout=settings.KITE_FLEET_PEER_TIMEOUT_SECONDS)
    local = [] if query.peer else selectors.local_rows(team_id, query.q)  # while the peers answer
    answers, contacted = {}, None
    if fan_out is not None:
        # Each peer gets its timeout from the moment all were asked; the whole list, its deadline.
        left = settings.KITE_FLEET_DEADLINE_SECONDS - (fan_out.started - started)
        answers = fan_out.collect(min(settings.KITE_FLEET_PEER_TIMEOUT_SECONDS, left))
        contacted = record({peer.pk: peer for peer in peers}, answers, actor=actor)
    # Snapshots only of the peers that did not answer now (each may hold a hundred rows or more).
    answered = {pk for pk, answer in answers.items() if answer.outcome == "ok"}
    snapshots = selectors.snapshots([peer.pk for peer in peers if peer.pk not in answered])
    results, entries = list(local), []
    for peer in peers:
        found, entry = _peer_part(peer, answers.get(peer.pk), snapshots.get(peer.pk), contacted)
        results += [row for row in found if rows.matches(row, query.q)] if query.q else found
        entries.append(entry)
    return {"includes_federation": True, "results": results, "peers": entries}


def _peer_part(peer: Peer, answer: FleetAnswer | None, snapshot, contacted) -> tuple[list[dict], dict]:
    """One peer's rows and its `peers` entry: live, else its snapshot flagged stale, else nothing."""
    entry = {"name": peer.name, "outcome": "unknown", "latency_ms": None, "last_contact": None, "stale": False,
             "detail": ""}  # fmt: skip
    if answer is not None and answer.outcome == "ok":
        entry.update(outcome="ok", latency_ms=answer.latency_ms, last_contact=selectors.iso(contacted))
        return [rows.remote_row(peer.name, wire, stale=False) for wire in answer.rows], entry
    if answer is not None:
        entry.update(outcome=answer.outcome, latency_ms=answer.latency_ms, detail=answer.detail)
        stale = True
        if answer.outcome == "unauthorized":  # the peer withdrew our access: its old rows are not ours to show
            entry["last_contact"] = selectors.iso(snapshot.fetched_at) if snapshot is not None else None
            return [], entry
    elif snapshot is not None:  # snapshot-only: as fresh as the last refresh says
        entry.update(outcome=snapshot.outcome, latency_ms=snapshot.latency_ms, detail=snapshot.detail)
        stale = snapshot.outcome != "ok" or _older_than_two_refreshes(snapshot.fetched_at)
    else:
        entry["detail"] = "Not asked yet: the next snapshot refresh or a live list will."
        return [], entry
    if snapshot is None or snapshot.fetched_at is None:
        return [], entry  # never answered: listed with its outcome, no rows
    entry.update(last_contact=selectors.iso(snapshot.fetched_at), stale=stale)
    # Stored as checked and sorted when they arrived (fetch): served as they are.
    return [rows.remote_row(peer.name, wire, stale=stale) for wire in snapshot.rows], entry


def _older_than_two_refreshes(moment) -> bool:
    return moment is None or timezone.now() - moment > timedelta(seconds=2 * settings.KITE_FLEET_REFRESH_SECONDS)


# --- one peer's agent ----------------------------------------------------------------


def remote_agent(*, team_id: str, agent_id: str, actor: str) -> dict:
    """GET /api/fleet/agents/peer:<name>/<id>: the peer's agent, asked with the signed, grant-checked
    GET /api/federation/fleet/agents/<id> within the per-peer timeout; when the peer does not answer,
    its snapshot's row flagged stale. Refusals (ApiError): 404 `peer_not_found` (no live peer of that
    name in the team), 404 `remote_agent_not_found` (the peer has none its grant shows us), 403
    `no_access` (no grant from it, or it refused ours: old rows are not ours to show), 502
    `peer_unreachable` (no answer, and the snapshot does not hold it). Nothing is written but the
    call's audit row: a detail never rewrites the peer's snapshot."""
    parts = rows.parse_remote_id(agent_id)
    if parts is None:
        raise ApiError(f"{agent_id[:120]!r} is not a peer's agent id (peer:<name>/<id>).",
                       Code.REMOTE_AGENT_NOT_FOUND, status=404)  # fmt: skip
    name, remote_id = parts
    peer = next(iter(selectors.fleet_peers(team_id, name=name)), None)
    if peer is None:
        raise ApiError(f"No live peer named {name!r} in your team.", Code.PEER_NOT_FOUND, status=404)
    if not rows.askable(remote_id):
        raise ApiError(f"{peer.name} has no agent {remote_id[:100]!r}: a peer's agent ids are letters, digits, "
                       "'.', '_', '~' or '-'.", Code.REMOTE_AGENT_NOT_FOUND, status=404)  # fmt: skip
    grant = _grant_of(peer)
    if not grant:
        raise ApiError(NO_GRANT, Code.NO_ACCESS, status=403)
    answer = _ask_for_agent(peer, grant, remote_id)
    _record_agent_call(peer, remote_id, answer, actor)
    if answer.outcome == "ok":
        return rows.remote_detail(peer.name, answer.rows[0], stale=False, outcome="ok",
                                  last_contact=selectors.iso(timezone.now()))  # fmt: skip
    if answer.outcome == "not_found":
        raise ApiError(f"{peer.name} has no agent {remote_id} that its grant to us shows.",
                       Code.REMOTE_AGENT_NOT_FOUND, status=404)  # fmt: skip
    if answer.outcome == "unauthorized":
        raise ApiError(f"{peer.name} refused our fleet grant: {answer.detail}", Code.NO_ACCESS, status=403)
    return _agent_from_snapshot(peer, remote_id, answer)


def _ask_for_agent(peer: Peer, grant: str, remote_id: str) -> FleetAnswer:
    """The call runs in the pool, so the wait is bounded by the per-peer timeout as a list's is."""
    timeout = settings.KITE_FLEET_PEER_TIMEOUT_SECONDS
    target = _target(peer, {}, path=f"{PATH}/{remote_id}")
    started = time.perf_counter()
    future = _executor().submit(fetch_agent, target, grant, remote_id, timeout)
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        return FleetAnswer("timeout", _ms_since(started), None, f"No answer within {timeout:g} s.")


def fetch_agent(target: client.Target, grant: str, remote_id: str, timeout: float) -> FleetAnswer:
    """One agent of a peer (runs in a pool thread: HTTP only, no database). Outcomes as fetch's,
    plus `not_found`: the peer answered 404 agent_not_found (a Kite without the detail call answers
    a plain 404 not_found: that is an `error`, and the snapshot serves)."""
    started = time.perf_counter()
    try:
        answer = client.call(target, "GET", timeout=(timeout, timeout), headers={GRANT_HEADER: grant})
    except client.PeerCallError as failure:
        if failure.status_code == 404 and failure.code == Code.AGENT_NOT_FOUND:
            return FleetAnswer("not_found", _ms_since(started), None, failure.detail)
        return FleetAnswer(outcome_of(failure), _ms_since(started), None, failure.detail)
    row = rows.detail_row(answer.body.get("agent")) if isinstance(answer.body, dict) else None
    if row is None or str(row["id"]) != remote_id:
        return FleetAnswer("error", answer.latency_ms, None, f"The peer's answer is not its agent {remote_id} "
                          "({agent: {id, name, …}}).")  # fmt: skip
    return FleetAnswer("ok", answer.latency_ms, [row])


def _record_agent_call(peer: Peer, remote_id: str, answer: FleetAnswer, actor: str) -> None:
    """Federation.PeerCalled as a list notes it, with the agent asked for in its data."""
    agent = int(remote_id) if remote_id.isascii() and remote_id.isdigit() else remote_id
    audit.record(audit.PEER_CALLED, peer=peer, actor=actor, endpoint=f"{PATH}/{remote_id}", outcome=answer.outcome,
                 detail=answer.detail[:500], data={"method": "GET", "latency_ms": answer.latency_ms, "agent": agent})  # fmt: skip
    metrics.CALLS.labels(peer.name, "outbound", answer.outcome).inc()


def _agent_from_snapshot(peer: Peer, remote_id: str, answer: FleetAnswer) -> dict:
    snapshot = selectors.snapshots([peer.pk]).get(peer.pk)
    if snapshot is not None and snapshot.fetched_at is not None:  # a refused peer's snapshot holds no rows
        row = next((row for row in snapshot.rows if str(row.get("id")) == remote_id), None)
        if row is not None:
            # A list row: when it was first seen and how it came are only in a live answer.
            return rows.remote_detail(peer.name, {**row, "first_seen": None, "via": None}, stale=True,
                                      outcome=answer.outcome, last_contact=selectors.iso(snapshot.fetched_at))  # fmt: skip
    raise ApiError(f"{peer.name} did not answer ({answer.outcome}: {answer.detail[:300]}) and its last snapshot has "
                   f"no agent {remote_id}.", Code.PEER_UNREACHABLE, status=502)  # fmt: skip


# --- the beat task --------------------------------------------------------------------


def refresh_snapshots() -> int:
    """Ask every live peer of every team (in parallel, all teams at once) that no list has asked in
    the last half period (a list refreshes what it asks); returns the number of peers asked."""
    recently = timezone.now() - timedelta(seconds=settings.KITE_FLEET_REFRESH_SECONDS / 2)
    peers = {peer.pk: peer for peer in selectors.fleet_peers(None, not_asked_since=recently)}
    if not peers:
        return 0
    fan_out = FanOut(prepare(list(peers.values())), timeout=settings.KITE_FLEET_PEER_TIMEOUT_SECONDS)
    answers = fan_out.collect(settings.KITE_FLEET_PEER_TIMEOUT_SECONDS)
    record(peers, answers, actor=audit.SYSTEM, every=True)
    return sum(1 for answer in answers.values() if answer.called)
