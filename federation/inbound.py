"""Who is calling (docs/architecture.md "Signing and who is calling"): authenticate a signed peer request.

The sender is found by `kite-peer` (its instance ID, or the name of a
hand-made peer whose ID is not known yet), otherwise by trying the inbound
secrets in constant time; its instance ID is learned on first success. A
refusal names the factor that failed.
"""

import functools
import re
import time
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Case, F, Value, When
from django.utils import timezone

from federation import audit, certificates, dispatch, enqueue, metrics, peers, routing, signing
from federation.errors import Code
from federation.models import InboundReceipt, Peer, PeerHealth
from federation.peers import inbound_secrets
from ingest.cloudevent import MalformedEvent
from ingest import verifiers
from ingest.verifiers import StoreGuard, VerificationError
from kite import fastsql, ratelimit
from kite.errors import ApiError

LAST_SEEN_RESOLUTION = timedelta(seconds=1)  # don't rewrite the peer row on every request


@dataclass
class Refusal(Exception):
    code: str
    detail: str
    peer: Peer | None = None  # the peer the request named, when it is known here (for the audit trail)
    status: int = 401


def _candidates(team_id: str | None, sender: str) -> tuple[list[Peer], list[Peer]]:
    """(rows `kite-peer` names, rows whose instance ID is not known yet) — the second
    list is tried when the first is empty or none of it matches. One query in plain SQL, each
    row's health (PeerHealth) joined to it (every peer request makes it: the ORM's compilation,
    or a RawQuerySet's work per query, cost more than the query). On PostgreSQL each peer also
    carries its row's version (`row_version`, its xmin: every UPDATE changes it)."""
    sql = _candidates_sql() + (" AND p.team_id = %s" if team_id is not None else "") + (
        " AND (p.remote_instance_id = %s OR p.remote_instance_id = '')")  # fmt: skip
    params = [Peer.Status.REVOKED.value, *([team_id] if team_id is not None else []), sender or ""]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        found = [peers.loaded(row) for row in cursor.fetchall()]
    named = [p for p in found if sender and (p.remote_instance_id == sender or (not p.remote_instance_id and p.name == sender))]
    unnamed = [p for p in found if not p.remote_instance_id and p not in named]
    return named, unnamed


def _candidates_sql() -> str:
    return peers.with_health_sql() + "WHERE p.status <> %s AND p.inbound_secret_encrypted <> ''"


# The candidates of an event delivery that authenticated, as this process last read them, by
# (team, kite-peer) — PostgreSQL only, and only while the hook's source is itself a cached copy
# (ingest.verifiers.from_cache), so that its event is stored by the one statement that checks
# every copy. A delivery authenticated with them stores its event only if that statement finds
# the matched peer's row unchanged (its xmin: a revocation, a rotated secret, a new pinned
# certificate, a pause, any edit changes it); if not, the rows are dropped and the delivery is
# verified again against fresh reads. A refusal is never judged from them: the delivery is
# tried again against fresh rows, which decide. Filled only by a success, so requests that fail
# to authenticate cannot grow it.
INBOUND_CACHE_SIZE = 4096
_inbound_peers: dict[tuple[str, str], tuple[list[Peer], list[Peer]]] = {}


def _forget(key: tuple[str, str]) -> None:
    _inbound_peers.pop(key, None)


def _guarded(peer: Peer, key: tuple[str, str]) -> Peer:
    """A copy of a cached candidate for one request (its health row shared, as last_inbound_at is),
    carrying the check its event's INSERT makes."""
    clone = fastsql.copied(peer)
    clone.store_guard = StoreGuard(_PEER_UNCHANGED_SQL, (peer.pk, peer.row_version), functools.partial(_forget, key))
    return clone


_PEER_UNCHANGED_SQL = f"EXISTS (SELECT 1 FROM {Peer._meta.db_table} WHERE id = %s AND xmin = %s::xid)"


@dataclass(frozen=True)
class Match:
    peer: Peer
    current: bool  # signed with the current inbound secret, not one in its grace period


def _first_match(candidates: list[Peer], request, body: bytes, method: str, path: str) -> Match | None:
    """Every candidate and secret is checked: the time taken does not say which matched. The
    signature is bound to method, path and the candidate's team (signing.Binding)."""
    matched = None
    for peer in candidates:
        message = request.hmac_message(body, signing.Binding(method, path, peer.team_id))
        for index, secret in enumerate(inbound_secrets(peer)):
            if signing.hmac_matches(secret, request, message) and matched is None:
                matched = Match(peer, current=index == 0)
    return matched


_TEAM_HINT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def team_hint(request) -> str | None:
    """`?team=` on a peer-facing endpoint: the team whose rows the caller says know it (Kite adds it
    from the hook URL it delivers to). It only narrows which rows are tried — one team's rather
    than those of every team peered with that instance; the signature decides, as without it."""
    team = request.GET.get("team", "")
    return team if _TEAM_HINT.fullmatch(team) else None


def authenticate(headers: dict[str, str], body: bytes, *, team_id: str | None, method: str = "POST",
                 path: str | None = None, now: int | None = None, current_only: bool = False,
                 cached: bool = False) -> Peer:  # fmt: skip
    """The peer that signed this request for `method` `path`, or Refusal(code, detail).

    path: a control call's (its webhook-id is accepted once: InboundReceipt); None for an event
    delivery to `team_id`'s kite hook, whose repeated id is answered `duplicate` by the event's
    own dedup instead. current_only: rotation and termination — a grace-period secret is refused.
    cached: an event delivery whose event will be stored by the statement that checks the
    returned peer's `store_guard` (see _inbound_peers)."""
    now = int(time.time()) if now is None else now
    control = path is not None
    path = path if control else f"/hooks/{team_id}/kite"
    try:
        request = signing.parse_headers(headers, now)
    except signing.SignatureError as exc:
        raise Refusal(exc.code, exc.detail, status=exc.status) from None
    key = (team_id, request.sender)
    cached = cached and not control and team_id is not None and connection.vendor == "postgresql"
    copies = _inbound_peers.get(key) if cached else None
    if copies is not None:
        try:
            matched = _matched(*copies, request, body, method, path, current_only)
        except Refusal:  # judged again against fresh rows: those decide a refusal
            _forget(key)
        else:
            return _accepted(_guarded(matched, key), request, control)
    named, unnamed = _candidates(team_id, request.sender)
    matched = _matched(named, unnamed, request, body, method, path, current_only)
    if cached:
        if len(_inbound_peers) >= INBOUND_CACHE_SIZE:
            _inbound_peers.clear()  # a crude bound, as the sources' cache has
        _inbound_peers[key] = (named, unnamed)
    return _accepted(matched, request, control)


def _matched(named: list[Peer], unnamed: list[Peer], request, body: bytes, method: str, path: str,
             current_only: bool) -> Peer:  # fmt: skip
    """Which of the candidates signed the request, with its certificate and instance ID checked."""
    matched = _signed_by(named, unnamed, request, body, method, path, current_only)
    _check_instance_id(matched, request.sender)
    return matched


def _signed_by(named: list[Peer], unnamed: list[Peer], request, body: bytes, method: str, path: str,
               current_only: bool) -> Peer:  # fmt: skip
    """Which of the candidates signed the request, with its certificate checked (no database access)."""
    match = _first_match(named, request, body, method, path) or _first_match(unnamed, request, body, method, path)
    if match is None:
        if named:
            raise Refusal(Code.BAD_SECRET, f"Signature does not match the inbound secret for {request.sender!r} "
                          f"(signed for {method} {path}).", named[0] if len(named) == 1 else None)  # fmt: skip
        raise Refusal(Code.UNKNOWN_PEER, "No peer or trusted sender known here signed this request.")
    matched = match.peer
    if current_only and not match.current:
        raise Refusal(Code.CURRENT_SECRET_REQUIRED, f"{method} {path} needs the current secret: the one used is "
                      "only accepted for deliveries while its rotation's grace period lasts.", matched)  # fmt: skip
    if matched.certificate_thumbprint:
        _check_certificate(matched, request, body, signing.Binding(method, path, matched.team_id))
    return matched


def _accepted(matched: Peer, request, control: bool) -> Peer:
    _check_rate(matched)
    if control:
        _first_use(matched, request.msg_id)
    _note_contact(matched, request.sender)
    return matched


def _first_use(peer: Peer, msg_id: str) -> None:
    """A control call's webhook-id is accepted once per sender. Receipts outlive the timestamp
    tolerance (a replay after that is stale anyway) and are purged with the heartbeats."""
    try:
        with transaction.atomic():
            InboundReceipt.objects.create(peer_id=peer.pk, msg_id=msg_id)
    except IntegrityError:
        raise Refusal(Code.REPLAYED, f"webhook-id {msg_id[:80]!r} was already used: a request is accepted once.",
                      peer) from None  # fmt: skip


def receipts_purge(now=None) -> int:
    cutoff = (now or timezone.now()) - timedelta(seconds=2 * signing.TOLERANCE_SECONDS)
    return InboundReceipt.objects.filter(received_at__lt=cutoff).delete()[0]


def _check_instance_id(peer: Peer, sender: str) -> None:
    """A row learning its instance ID from a request cannot take one another row of the team has
    (loop rules and grants key on it), unless the request proved to be that instance: signed v1a
    by the same pinned certificate. Two rows of one instance that pin no certificate (a peer and a
    trusted sender set up by hand) share an ID proven by nothing but its secrets, as before.
    Changing an ID once learned means peering again."""
    if peer.remote_instance_id or not sender:
        return
    holders = (Peer.objects.filter(team_id=peer.team_id, remote_instance_id=sender).exclude(pk=peer.pk)
               .exclude(status=Peer.Status.REVOKED).values_list("certificate_thumbprint", flat=True))  # fmt: skip
    if any(pinned != peer.certificate_thumbprint for pinned in holders):
        raise Refusal(Code.INSTANCE_ID_TAKEN, f"Instance ID {sender!r} belongs to another peer of this team, whose "
                      "pinned certificate did not sign this request.", peer, status=409)  # fmt: skip


def _check_certificate(peer: Peer, request, body: bytes, binding: signing.Binding) -> None:
    """A peer with a pinned certificate must also sign `v1a` with it (SECURITY.md "The signed message")."""
    if not request.ed25519_entries:
        raise Refusal(
            Code.MISSING_CERTIFICATE,
            f"{peer.name!r} has a pinned certificate ({peer.certificate_thumbprint[:19]}…) but the request has no "
            "v1a signature: the sender has no valid identity certificate.",
            peer,
        )
    thumbprints = request.key_thumbprint.split()  # several while the sender rotates its certificate
    if thumbprints and peer.certificate_thumbprint not in thumbprints:
        raise Refusal(
            Code.BAD_CERTIFICATE,
            f"Signed with certificate {thumbprints[0][:19]}…, but {peer.name!r} is pinned to "
            f"{peer.certificate_thumbprint[:19]}…: paste the sender's current certificate.",
            peer,
        )
    if not signing.ed25519_matches(_verifier(peer.certificate_pem), request, request.ed25519_message(body, binding)):
        raise Refusal(
            Code.BAD_CERTIFICATE, f"The v1a signature does not verify with {peer.name!r}'s pinned certificate.", peer
        )


@functools.lru_cache(maxsize=256)
def _verifier(pem: str):
    return certificates.verifier_for(pem)


def _check_rate(peer: Peer) -> None:
    verdict = ratelimit.hit(f"peer-in:{peer.pk}", peer.rate_limit_per_second)
    if not verdict.allowed:
        raise ApiError(
            f"Peer {peer.name!r} is limited to {peer.rate_limit_per_second} requests/s.",
            Code.RATE_LIMITED,
            status=429,
            headers={"Retry-After": str(verdict.retry_after)},
        )


def _contact_due(peer: Peer, now) -> bool:
    """Whether this contact is the one a second that writes the peer's last_inbound_at."""
    return peer.last_inbound_at is None or now - peer.last_inbound_at > LAST_SEEN_RESOLUTION


def _note_contact(peer: Peer, sender: str) -> None:
    now = timezone.now()
    updates, health, activate = {}, {}, False
    if sender and not peer.remote_instance_id:
        updates["remote_instance_id"] = sender[:63]  # learned on first success
    if _contact_due(peer, now):
        health["last_inbound_at"] = now  # the health row: the peer's own row is not rewritten for it
        # Active once enrolled — judged by the row now (our ping may have just enrolled it).
        activate = peer.status in (Peer.Status.ENROLLED, Peer.Status.ACCEPTED)
    if peer.status == Peer.Status.ACCEPTED and peer.last_success_at is None and peer.sends_to and (
        peer.last_inbound_at is None
    ):
        # A new peering (invitation): the other side just reached us; ping back now rather than at
        # the next heartbeat, so both sides are enrolled and active within seconds.
        transaction.on_commit(lambda: dispatch.enrol_soon(peer.pk))
    if health:
        PeerHealth.record(peer, **health)
    if updates:
        if activate:
            updates["status"] = Case(
                When(status=Peer.Status.ENROLLED, then=Value(Peer.Status.ACTIVE)), default=F("status")
            )
        Peer.objects.filter(pk=peer.pk).update(**updates)
        enqueue.forget_routes(peer.team_id)
        peer.remote_instance_id = updates["remote_instance_id"]
    elif activate:  # only a row still enrolled is written (any write is a new row version: see _inbound_peers)
        activate = Peer.objects.filter(pk=peer.pk, status=Peer.Status.ENROLLED).update(status=Peer.Status.ACTIVE)
    if activate:
        peer.refresh_from_db(fields=["status"])


def verify_kite_source(secret, headers, body, now, team_id=None):
    """The `kite` source's verifier, registered into ingest by FederationConfig.ready().

    Event deliveries are the hot path: an accepted one is only counted (its Event row is its
    record); a refused one is also audited (Federation.AuthFailed, rare)."""
    try:
        peer = authenticate(headers, body, team_id=team_id, now=now, cached=verifiers.from_cache.get())
    except Refusal as refusal:
        refused(refusal, headers, endpoint=f"/hooks/{team_id}/kite", method="POST", team_id=team_id)
        raise VerificationError(str(refusal.code), refusal.detail, refusal.status) from None
    metrics.CALLS.labels(peer.name, "inbound", "ok").inc()
    return peer


def verify_kite_source_on_loop(headers: dict[str, str], body: bytes, team_id: str) -> Peer | None:
    """An event delivery judged on a web process's event loop (ingest.edge), from this process's
    copies of the sender's rows alone: the peer that signed it (carrying the `store_guard` its
    event's INSERT checks), or None — and Django judges the delivery as it always does. None
    whenever accepting would need the database or a word of its own: nothing cached for the
    sender, a signature that does not verify against the copies, the sender's instance ID not
    learned yet, its once-a-second contact due (last_inbound_at), a rate limit. Reads and
    writes nothing, refuses nothing, audits nothing; the same checks as `authenticate` decide."""
    try:
        request = signing.parse_headers(headers, int(time.time()))
    except signing.SignatureError:
        return None
    key = (team_id, request.sender)
    copies = _inbound_peers.get(key)
    if copies is None:
        return None
    try:
        matched = _signed_by(*copies, request, body, "POST", f"/hooks/{team_id}/kite", current_only=False)
    except Refusal:
        return None
    if not matched.remote_instance_id or matched.rate_limit_per_second or _contact_due(matched, timezone.now()):
        return None
    metrics.CALLS.labels(matched.name, "inbound", "ok").inc()
    return _guarded(matched, key)


def refused(refusal: Refusal, headers: dict[str, str], *, endpoint: str, method: str, team_id: str | None = None,
            remote_addr: str = "") -> None:  # fmt: skip
    """Audit and count a refused peer request, the failing factor as its outcome."""
    audit.auth_failed(outcome=str(refusal.code), endpoint=endpoint, method=method, detail=refusal.detail,
                      peer=refusal.peer, team_id=team_id, sender=headers.get("kite-peer", ""),
                      remote_addr=remote_addr)  # fmt: skip


VIA_EXTENSION = "kitefedpeer"  # the peer (its name here) that handed us the event; never forwarded


def adopt_provenance(source, draft, sender) -> None:
    """An event delivered by a peer (registered into ingest as an event_received hook).

    Provenance comes from the authenticated sender, not from what the body claims alone: an
    event without `kitefedorigin` gets the sending peer as its origin (chain [peer], hops 1),
    so loop rules and onward hops see where it came from; an event whose `source` claims this
    instance is refused (a peer cannot pass off an event as one received here, verified, from
    Stripe or anyone); and the stored event records the sending peer as `kitefedpeer`."""
    if source.kind != "kite" or not isinstance(sender, Peer):
        return
    if draft.source.startswith(f"kite://{settings.KITE_INSTANCE_ID}/") or not draft.source:
        raise MalformedEvent(Code.LOCAL_SOURCE, f"source {draft.source[:100]!r} names this instance: a peer cannot "
                             "deliver an event as if it had been received here.")  # fmt: skip
    extensions = draft.extensions
    if routing.provenance_of(extensions) is None:
        sender_id = sender.remote_instance_id or sender.name
        extensions.update(routing.Provenance(origin=sender_id, chain=(sender_id,), hops=1).extensions())
    extensions[VIA_EXTENSION] = sender.name
