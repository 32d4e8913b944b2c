"""Federation configuration, an operator's actions: tokens, peers and trusted senders (create,
change, pause, resume, rotate a secret, revoke, delete), and the retention purge (README "Federation")."""

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from federation import audit, client, dispatch, enqueue, heartbeat, peers
from federation.errors import Code
from federation.models import AuditEvent, Delivery, FederationToken, OutboxEntry, Peer, PeerHealth
from federation.routing import DEFAULT_MAX_HOPS
from ingest import services as ingest_services
from kite import crypto, fastsql
from kite.errors import ApiError
from kite.models import Team

PEER_FIELDS = {"name", "peer_hook_url", "scopes", "filters", "max_hops", "rate_limit_per_second",
               "tls_fingerprint", "certificate_pem"}  # fmt: skip
log = logging.getLogger(__name__)
# The columns peer_update writes for each field it takes.
UPDATED_COLUMNS = {**{field: [field] for field in PEER_FIELDS - {"certificate_pem"}},
                   "certificate_pem": ["certificate_pem", "certificate_thumbprint"],
                   "outbound_token": ["outbound_secret_encrypted", "outbound_fingerprint"]}  # fmt: skip


@dataclass(frozen=True)
class Issued:
    """A row plus the plaintext secrets generated for it, shown exactly once."""

    row: object
    secrets: dict


def token_create(*, team: Team, label: str, actor: str = "") -> Issued:
    secret = crypto.new_webhook_secret()
    with transaction.atomic():
        token = FederationToken.objects.create(
            team=team, label=label, secret_encrypted=crypto.encrypt(secret), fingerprint=crypto.fingerprint(secret)
        )
        audit.record(audit.TOKEN_CREATED, team=team, actor=actor, data=_token_data(token))
    return Issued(token, {"token": secret})


def token_delete(*, token: FederationToken, actor: str = "") -> None:
    with transaction.atomic():
        audit.record(audit.TOKEN_DELETED, team_id=token.team_id, actor=actor, data=_token_data(token))
        token.delete()


def _token_data(token: FederationToken) -> dict:
    return {"id": token.pk, "label": token.label, "fingerprint": token.fingerprint}


def peer_create(
    *, team: Team, name: str, peer_hook_url: str, outbound_token: str | None = None,
    inbound_token: str | None = None, scopes: list | None = None, filters: list | None = None,
    max_hops: int = DEFAULT_MAX_HOPS, rate_limit_per_second: int | None = None, tls_fingerprint: str = "",
    certificate_pem: str = "", actor: str = "",
) -> Issued:  # fmt: skip
    """A peer configured by hand. Secrets left out are generated and returned once; a pasted
    certificate of the other side is pinned (its requests must then carry both factors)."""
    peer = Peer(
        team=team,
        name=peers.check_name(name),
        role=Peer.Role.PEER,
        peer_hook_url=peers.check_url(peer_hook_url),
        scopes=peers.check_scopes(scopes if scopes is not None else []),
        filters=peers.check_filters(filters if filters is not None else []),
        max_hops=max_hops,
        rate_limit_per_second=rate_limit_per_second,
        tls_fingerprint=peers.check_tls_fingerprint(tls_fingerprint),
        status=Peer.Status.ACCEPTED,
    )
    peers.pin_certificate(peer, certificate_pem)
    generated = {}
    for direction, given in (("outbound", outbound_token), ("inbound", inbound_token)):
        secret = peers.check_secret(given, f"{direction}_token") if given else crypto.new_webhook_secret()
        if not given:
            generated[f"{direction}_token"] = secret
        peers.set_secret(peer, direction, secret)
    with transaction.atomic():
        peers.save_new(peer)
        audit.record(audit.PEER_CREATED, peer=peer, actor=actor,
                     data={**peers.peer_summary(peer), "generated": sorted(generated)})  # fmt: skip
    return Issued(peer, generated)


def trusted_sender_create(*, team: Team, name: str, inbound_token: str | None = None, certificate_pem: str = "",
                          actor: str = "") -> Issued:  # fmt: skip
    """A peer that only sends to us: we check its requests with `inbound_token` (and, pasted,
    its certificate)."""
    peer = Peer(team=team, name=peers.check_name(name), role=Peer.Role.SENDER, status=Peer.Status.ACCEPTED)
    peers.pin_certificate(peer, certificate_pem)
    secret = peers.check_secret(inbound_token, "inbound_token") if inbound_token else crypto.new_webhook_secret()
    peers.set_secret(peer, "inbound", secret)
    with transaction.atomic():
        peers.save_new(peer)
        audit.record(audit.TRUSTED_SENDER_CREATED, peer=peer, actor=actor,
                     data={**peers.peer_summary(peer), "generated": [] if inbound_token else ["inbound_token"]})  # fmt: skip
    return Issued(peer, {} if inbound_token else {"inbound_token": secret})


def trusted_sender_promote(*, sender: Peer, peer_hook_url: str, scopes: list, outbound_token: str | None = None,
                           max_hops: int = DEFAULT_MAX_HOPS, tls_fingerprint: str = "", actor: str = "") -> Issued:
    """A trusted sender becomes a peer: the same row (id, name, inbound secret, pinned certificate,
    learned instance ID) now also says where we send and how we sign. An outbound secret left out
    is generated and returned once. Like a peer made by hand it is `accepted` until a heartbeat
    passes."""
    hook_url = peers.check_url(peer_hook_url)  # before the row lock: the destination policy resolves the name
    scopes, tls_fingerprint = peers.check_scopes(scopes), peers.check_tls_fingerprint(tls_fingerprint)
    outbound = peers.check_secret(outbound_token, "outbound_token") if outbound_token else crypto.new_webhook_secret()
    with transaction.atomic():
        row = Peer.objects.select_for_update().filter(pk=sender.pk, team_id=sender.team_id).first()
        if row is None or row.status == Peer.Status.REVOKED:
            raise ApiError("No such trusted sender in your team.", Code.NOT_FOUND, status=404)
        if row.role != Peer.Role.SENDER:
            raise ApiError(f"{row.name!r} is already a peer: change it with PATCH /api/federation/peers/{row.pk}.",
                           Code.CONFLICT, status=409)  # fmt: skip
        row.role, row.status, row.peer_hook_url, row.scopes = Peer.Role.PEER, Peer.Status.ACCEPTED, hook_url, scopes
        row.max_hops, row.tls_fingerprint = max_hops, tls_fingerprint
        peers.set_secret(row, "outbound", outbound)
        row.save()
        audit.record(audit.TRUSTED_SENDER_PROMOTED, peer=row, actor=actor,
                     data={**peers.peer_summary(row), "generated": [] if outbound_token else ["outbound_token"]})  # fmt: skip
    return Issued(row, {} if outbound_token else {"outbound_token": outbound})


def peer_update(*, peer: Peer, actor: str = "", **changes) -> Peer:
    unknown = set(changes) - PEER_FIELDS - {"outbound_token"}
    if unknown:
        raise ApiError(f"Cannot change {', '.join(sorted(unknown))} here.", Code.INVALID)
    if "name" in changes:
        peer.name = peers.check_name(changes["name"])
    if "peer_hook_url" in changes:
        peer.peer_hook_url = peers.check_url(changes["peer_hook_url"])
    if "scopes" in changes:
        peer.scopes = peers.check_scopes(changes["scopes"])
    if "filters" in changes:
        peer.filters = peers.check_filters(changes["filters"])
    if "tls_fingerprint" in changes:
        peer.tls_fingerprint = peers.check_tls_fingerprint(changes["tls_fingerprint"])
    if "certificate_pem" in changes:
        peers.pin_certificate(peer, changes["certificate_pem"])
    for field in ("max_hops", "rate_limit_per_second"):
        if field in changes:
            setattr(peer, field, changes[field])
    if "outbound_token" in changes:
        peers.set_secret(peer, "outbound", peers.check_secret(changes["outbound_token"], "outbound_token"))
    fixed = {"outbound_token", "peer_hook_url", "tls_fingerprint", "certificate_pem"} & set(changes)
    try:
        with transaction.atomic():
            # Only the columns changed are written, and auth_failed is lifted as the row is now: a
            # pause made since the peer was read (an operator's maintenance pause) stays.
            peer.save(update_fields=[column for field in changes for column in UPDATED_COLUMNS[field]])
            if fixed and Peer.objects.filter(pk=peer.pk, paused=Peer.Pause.AUTH_FAILED).update(paused=Peer.Pause.NONE):
                PeerHealth.record(peer, consecutive_failures=0)  # the operator fixed something: try again
            peer.refresh_from_db(fields=["paused"])
            peer.health = PeerHealth.objects.filter(peer_id=peer.pk).first() or PeerHealth(peer=peer)
            audit.record(audit.PEER_UPDATED, peer=peer, actor=actor, data={"changed": _changed(peer, changes)})
    except IntegrityError:
        raise ApiError(f"Team already has a peer named {peer.name!r}.", Code.CONFLICT, status=409) from None
    if not peer.paused:
        transaction.on_commit(lambda: dispatch.kick(peer.pk))
    return peer


def peer_revoke(*, peer: Peer, reason: str = "revoked by this side", actor: str = "") -> None:
    """Stop for good: nothing more is sent or accepted; queued entries are dead-lettered."""
    with transaction.atomic():
        Peer.objects.filter(pk=peer.pk).update(status=Peer.Status.REVOKED, paused=Peer.Pause.NONE)
        dead = OutboxEntry.objects.filter(
            peer=peer, status__in=[OutboxEntry.Status.PENDING, OutboxEntry.Status.IN_FLIGHT]
        ).update(status=OutboxEntry.Status.DEAD, last_error=f"peer {reason}", leased_until=None)
        audit.record(audit.PEER_REVOKED, peer=peer, actor=actor, detail=reason,
                     data={"role": peer.role, "dead_lettered": dead})  # fmt: skip
    peer.status = Peer.Status.REVOKED
    enqueue.forget_routes(peer.team_id)


def peer_delete(*, peer: Peer, actor: str = "") -> heartbeat.PingResult | None:
    """Delete a peer: tell it (a signed terminate) so that it stops sending too, then revoke it here,
    whatever it answered. Returns its answer; None when there was nobody to tell (no URL: an
    invitation not redeemed, a trusted sender)."""
    told = terminate(peer, "deleted by the other side", actor=actor) if peer.sends_to else None
    if told is not None and not told.ok:
        log.warning("peer %s was not told of its deletion: %s", peer.name, told.error)
    peer_revoke(peer=peer, actor=actor)
    return told


def terminate(peer: Peer, reason: str, *, actor: str = audit.SYSTEM) -> heartbeat.PingResult:
    """Tell the peer we are deleting it (signed POST /api/federation/terminate): it marks us
    revoked and stops sending. Best effort: the peer is revoked here whatever it answers."""
    target = peers.target_for(peer)
    target = client.Target(**{**target.__dict__, "url": peers.ping_url(peer, "/api/federation/terminate")})
    try:
        answer = client.call(target, "POST", client.encode({"reason": reason}), timeout=heartbeat.PING_TIMEOUT,
                             audit_as=audit.PeerCall(peer=peer, actor=actor))  # fmt: skip
    except client.PeerCallError as failure:
        return heartbeat.PingResult(False, failure.status_code, None, heartbeat.factors_for_failure(failure),
                                    failure.detail)  # fmt: skip
    return heartbeat.PingResult(True, answer.status_code, answer.latency_ms, {}, "", answer.body)


def _changed(peer: Peer, changes: dict) -> dict:
    """The new values of what changed; a secret or certificate by its fingerprint or thumbprint."""
    shown = {field: getattr(peer, field) for field in changes if field in PEER_FIELDS - {"certificate_pem"}}
    if "certificate_pem" in changes:
        shown["certificate_thumbprint"] = peer.certificate_thumbprint
    if "outbound_token" in changes:
        shown["outbound_fingerprint"] = peer.outbound_fingerprint
    return shown


INBOUND_GRACE = timedelta(hours=24)


def rotate_secret(*, peer: Peer, direction: str, secret: str | None = None, grace: bool = True,
                  actor: str = "") -> Issued:  # fmt: skip
    """A new secret for one direction, generated (returned once) or given.

    inbound: the one we check; the previous one stays valid for 24 h (deliveries only, never
    rotation or termination), so the other side can switch when it likes and no delivery fails
    meanwhile — unless `grace` is False (a suspected leak: the old one stops working now).
    outbound: the one we sign with, replaced at once (paste what the other side's inbound
    rotation gave you)."""
    if not isinstance(grace, bool):
        raise ApiError("grace must be true or false.", Code.INVALID)
    if direction not in ("inbound", "outbound"):
        raise ApiError("direction must be inbound or outbound.", Code.INVALID)
    if direction == "outbound" and peer.role != Peer.Role.PEER:
        raise ApiError("A trusted sender only has an inbound secret.", Code.INVALID)
    new = peers.check_secret(secret, "secret") if secret else crypto.new_webhook_secret()
    with transaction.atomic():
        peer = Peer.objects.select_for_update().get(pk=peer.pk)
        if direction == "inbound" and peer.inbound_secret_encrypted and grace:
            peer.previous_inbound_secret_encrypted = peer.inbound_secret_encrypted
            peer.previous_inbound_fingerprint = peer.inbound_fingerprint
            peer.previous_inbound_expires_at = timezone.now() + INBOUND_GRACE
        elif direction == "inbound":  # no grace: nothing but the new secret is accepted from now on
            peer.previous_inbound_secret_encrypted = peer.previous_inbound_fingerprint = ""
            peer.previous_inbound_expires_at = None
        peers.set_secret(peer, direction, new)
        lifted = direction == "outbound" and peer.paused == Peer.Pause.AUTH_FAILED
        if lifted:
            peer.paused = Peer.Pause.NONE
        peer.save()
        if lifted:
            PeerHealth.record(peer, consecutive_failures=0)
        audit.record(audit.SECRET_ROTATED, peer=peer, actor=actor, data={
            "direction": direction, "fingerprint": getattr(peer, f"{direction}_fingerprint"), "generated": not secret,
            "grace": grace,
        })  # fmt: skip
    if direction == "outbound" and not peer.paused:
        transaction.on_commit(lambda: dispatch.kick(peer.pk))
    return Issued(peer, {"secret": new} if not secret else {})


RETENTION_BATCH = 1000  # rows per DELETE (each in a transaction of its own: little WAL per commit)
RETENTION_PAUSE = 0.05  # seconds at least between batches
RETENTION_YIELD = 4.0  # and after each batch a rest four times as long as it took: at most a fifth of the time
PURGE_LOG_EVERY = 50  # batches


def retention_purge(*, days: int, batch: int = RETENTION_BATCH, pause: float = RETENTION_PAUSE,
                    budget: float | None = None) -> dict[str, int]:  # fmt: skip
    """Audit events and delivery attempts older than `days` (KITE_AUDIT_RETENTION_DAYS; 0 keeps
    them), deleted `batch` rows per statement, oldest first, resting between batches (at least
    `pause`, and four times as long as the batch took), so no purge holds long locks or takes more
    than about a fifth of a busy database's time. Each batch commits on its own, without waiting
    for the WAL flush (fastsql.unflushed: one lost in a database crash is deleted again by the next
    run). Restartable: a run that has taken `budget` seconds (ingest.services.purge_budget())
    stops there and leaves the rest to the next."""
    if days <= 0:
        return {"audit": 0, "deliveries": 0}
    cutoff = timezone.now() - timedelta(days=days)
    deadline = time.monotonic() + (ingest_services.purge_budget() if budget is None else budget)
    purged = {
        "audit": _delete_in_batches(AuditEvent.objects.filter(at__lt=cutoff), "at", batch, pause, deadline),
        "deliveries": _delete_in_batches(Delivery.objects.filter(attempted_at__lt=cutoff), "attempted_at", batch,
                                         pause, deadline),
    }  # fmt: skip
    if any(purged.values()):
        log.info("retention purge: older than %d days, %d audit events and %d delivery attempts deleted", days,
                 purged["audit"], purged["deliveries"])  # fmt: skip
    return purged


def _delete_in_batches(queryset, age_field: str, batch: int, pause: float, deadline: float) -> int:
    """Delete the rows of `queryset` in (age_field, id) order — a range of the age index, each batch
    starting where the last one stopped, so no batch steps over the rows deleted before it."""
    total, batches, after = 0, 0, None
    rows = queryset.order_by(age_field, "id")
    while True:
        # The >= bound makes the range an index condition (the OR alone would only filter).
        page = rows if after is None else rows.filter(Q(**{f"{age_field}__gt": after[1]})
                                                      | Q(**{age_field: after[1], "id__gt": after[0]}),
                                                      **{f"{age_field}__gte": after[1]})  # fmt: skip
        began = time.monotonic()
        found = list(page.values_list("id", age_field)[:batch])
        if not found:
            return total
        with fastsql.unflushed():
            total += queryset.model.objects.filter(id__in=[pk for pk, _ in found])._raw_delete(queryset.db)
        after, batches = found[-1], batches + 1
        if batches % PURGE_LOG_EVERY == 0:
            log.info("retention purge: %s, %d rows deleted so far", queryset.model._meta.db_table, total)
        if time.monotonic() >= deadline:
            log.info("retention purge: %s stopped at its time budget, the next run goes on",
                     queryset.model._meta.db_table)  # fmt: skip
            return total
        if len(found) == batch:
            time.sleep(max(pause, (time.monotonic() - began) * RETENTION_YIELD))


# --- an operator's maintenance pause ----------------------------------------------------------

MAX_PAUSE_REASON = 200


def _check_pausable(peer: Peer) -> None:
    if peer.role != Peer.Role.PEER:
        raise ApiError("A trusted sender only sends to us: there is no queue here to pause or resume.",
                       Code.TRUSTED_SENDER)  # fmt: skip
    if peer.status == Peer.Status.REVOKED:
        raise ApiError("This peer is revoked: nothing is sent to it any more.", Code.PEER_REVOKED, status=409)


def peer_pause(*, peer: Peer, reason: str = "", actor: str = "") -> tuple[Peer, bool]:
    """Hold the peer's queue for maintenance: events keep queuing, no delivery is attempted (none
    is burnt), heartbeats go on. Only `peer_resume` lifts it — not a heartbeat, not a fixed token.
    Over a queue paused as down or auth_failed it takes their place. Returns the row and whether
    it changed: pausing a paused peer changes nothing and audits nothing."""
    _check_pausable(peer)
    if not isinstance(reason, str) or len(reason) > MAX_PAUSE_REASON:
        raise ApiError(f"reason must be text of at most {MAX_PAUSE_REASON} characters.", Code.INVALID)
    with transaction.atomic():
        row = Peer.objects.select_for_update().get(pk=peer.pk)
        _check_pausable(row)  # revoked meanwhile
        if row.paused == Peer.Pause.OPERATOR:
            return row, False
        previous, row.paused = row.paused, Peer.Pause.OPERATOR
        Peer.objects.filter(pk=row.pk).update(paused=Peer.Pause.OPERATOR)
        audit.record(audit.PEER_PAUSED, peer=row, actor=actor, detail=reason.strip(),
                     data={"previous": previous or None})  # fmt: skip
    return row, True


def peer_resume(*, peer: Peer, actor: str = "") -> tuple[Peer, bool]:
    """Lift an operator's pause and drain what queued meanwhile now (a kick after commit). A queue
    paused as down or auth_failed is not the operator's pause: it stays as it is (a heartbeat or a
    fixed token lifts those). Returns the row and whether it changed."""
    _check_pausable(peer)
    with transaction.atomic():
        row = Peer.objects.select_for_update().get(pk=peer.pk)
        _check_pausable(row)
        if row.paused != Peer.Pause.OPERATOR:
            return row, False
        row.paused = Peer.Pause.NONE
        Peer.objects.filter(pk=row.pk).update(paused=Peer.Pause.NONE)
        PeerHealth.record(row, consecutive_failures=0)
        row.consecutive_failures = 0
        queued = OutboxEntry.objects.filter(peer=row, status=OutboxEntry.Status.PENDING).count()
        audit.record(audit.PEER_RESUMED, peer=row, actor=actor, data={"pending": queued})
        if row.sends_to:
            transaction.on_commit(lambda: dispatch.kick(row.pk), robust=True)
    return row, True
