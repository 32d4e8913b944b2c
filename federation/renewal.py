"""Identity certificates watched and renewed (docs/architecture.md "Rotation"), by beat (`check`, tasks.certificates_check).

Each beat, per team:
- a valid certificate that expires within the warning window (KITE_CERTIFICATE_RENEW_DAYS, or
  14 days when renewal is off) is noted once: `Federation.CertificateExpiring`;
- when the newest valid certificate expires within KITE_CERTIFICATE_RENEW_DAYS (0: off), a new
  one is issued that `replaces` it (`Federation.CertificateRenewed`);
- a renewal under way is announced over the signed channel to every peer that has not
  acknowledged it yet (channel.announce_certificate records each answer), again on later beats;
- once every peer we send to has acknowledged it, the certificate it replaces is revoked
  (`Federation.CertificateRevoked`, as an operator's revoke). Until then both sign every request
  and the old one stays first in signing order (certificates.valid): the TLS client certificate
  and the first `kite-key` are the ones every peer knows, and a peer pinned to either verifies.

A peer we send to without a signed channel cannot be told: the old certificate is kept, and the
screens say so, until an operator gave it the new PEM and revokes the old one. An invitation not
yet redeemed keeps it too (it names the old one); redeemed, its peer is told like the others.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from federation import audit, certificates, channel
from federation.models import IdentityCertificate, Peer

logger = logging.getLogger(__name__)

CERTIFICATE_EXPIRING = "Federation.CertificateExpiring"
CERTIFICATE_RENEWED = "Federation.CertificateRenewed"
ACTOR = "system (certificate renewal)"
WARNING_DAYS_WHEN_OFF = 14


def renew_days() -> int:
    return settings.KITE_CERTIFICATE_RENEW_DAYS


def warning_days() -> int:
    return renew_days() or WARNING_DAYS_WHEN_OFF


def check(now: datetime | None = None) -> dict:
    """One beat over the teams with work; idempotent, and safe to run twice at once."""
    now = now or timezone.now()
    done = {"warned": 0, "renewed": 0, "announced": 0, "retired": 0}
    # Teams with work: a certificate within the warning window (a due renewal is one), or a renewal under way.
    soon = Q(not_before__lte=now, not_after__gt=now, not_after__lte=now + timedelta(days=warning_days()))
    team_ids = IdentityCertificate.objects.filter(soon | Q(replaces__isnull=False)).values_list("team_id", flat=True)
    for team_id in sorted(set(team_ids)):
        try:
            _check_team(team_id, now, done)
        except Exception:  # one team's failure (a database error) must not hold back the others
            logger.exception("certificate check of team %s failed; retried at the next beat", team_id)
    return done


def _check_team(team_id: str, now: datetime, done: dict) -> None:
    done["warned"] += warn_expiring(team_id, now)
    if renew_days() and renew(team_id, now) is not None:
        done["renewed"] += 1
    for renewal in under_way(team_id):
        done["announced"] += announce(renewal)
        done["retired"] += retire_if_acknowledged(renewal)


# --- the expiry warning ------------------------------------------------------------


def expiring(team_id: str, now: datetime | None = None) -> list[IdentityCertificate]:
    """The team's valid certificates that expire within the warning window, soonest first."""
    now = now or timezone.now()
    return list(IdentityCertificate.objects.filter(
        team_id=team_id, not_before__lte=now, not_after__gt=now, not_after__lte=now + timedelta(days=warning_days()),
    ).order_by("not_after", "id"))  # fmt: skip


def warn_expiring(team_id: str, now: datetime) -> int:
    """`Federation.CertificateExpiring` once per certificate (the conditional update is the claim)."""
    warned = 0
    for row in expiring(team_id, now):
        with transaction.atomic():
            if IdentityCertificate.objects.filter(pk=row.pk, expiry_warned_at__isnull=True).update(expiry_warned_at=now):
                days = (row.not_after - now).total_seconds() / 86400
                audit.record(CERTIFICATE_EXPIRING, team_id=team_id, actor=audit.SYSTEM,
                             detail=f"{row.subject} expires in {days:.1f} days ({row.not_after:%Y-%m-%d %H:%M} UTC).",
                             data=certificates.audit_data(row))  # fmt: skip
                warned += 1
    return warned


# --- renewal -----------------------------------------------------------------------


def renew(team_id: str, now: datetime) -> IdentityCertificate | None:
    """A new certificate replacing the team's newest valid one when that expires within
    KITE_CERTIFICATE_RENEW_DAYS; None when none is due (or another beat renewed it)."""
    newest = (IdentityCertificate.objects.filter(team_id=team_id, not_before__lte=now, not_after__gt=now)
              .order_by("-created_at", "-id").first())  # fmt: skip
    if newest is None or newest.not_after > now + timedelta(days=renew_days()):
        return None
    with transaction.atomic():
        old = IdentityCertificate.objects.select_for_update().select_related("team").filter(pk=newest.pk).first()
        if old is None or IdentityCertificate.objects.filter(replaces=old).exists():
            return None
        new = certificates.issue(team=old.team, subject=old.subject, validity_days=validity_days(old), actor=ACTOR,
                                 replaces=old)  # fmt: skip
        audit.record(CERTIFICATE_RENEWED, team_id=team_id, actor=ACTOR,
                     detail=f"{old.thumbprint} expires {old.not_after:%Y-%m-%d %H:%M} UTC: renewed by {new.thumbprint}.",
                     data={"old": certificates.audit_data(old), "new": certificates.audit_data(new)})  # fmt: skip
    return new


def validity_days(old: IdentityCertificate) -> int:
    """As long as the old one was valid, at least the default, and well past the renewal window
    (a renewal that is itself due at once would renew on every beat)."""
    lifetime = round((old.not_after - old.not_before).total_seconds() / 86400)
    wanted = max(lifetime, certificates.DEFAULT_VALIDITY_DAYS, 2 * renew_days() + 1)
    return min(wanted, certificates.MAX_VALIDITY_DAYS)


def under_way(team_id: str) -> list[IdentityCertificate]:
    """Renewals whose old certificate is still here (deleting it sets `replaces` to NULL)."""
    return list(IdentityCertificate.objects.filter(team_id=team_id, replaces__isnull=False)
                .select_related("replaces").order_by("created_at", "id"))  # fmt: skip


@dataclass(frozen=True)
class Waiting:
    """A peer that keeps the old certificate in use, and why."""

    peer: Peer
    reason: str

    def as_dict(self) -> dict:
        return {"peer_id": self.peer.pk, "peer": self.peer.name, "reason": self.reason}


def _peers_we_call(team_id: str) -> list[Peer]:
    """Peers that verify what we sign: those we deliver to (a trusted sender only sends)."""
    return [peer for peer in Peer.objects.filter(team_id=team_id, role=Peer.Role.PEER)
            .exclude(status=Peer.Status.REVOKED).order_by("name") if peer.sends_to]  # fmt: skip


def waiting_for(certificate: IdentityCertificate) -> list[Waiting]:
    """The peers that have not acknowledged `certificate`, each with the reason. An invitation not
    yet redeemed waits too: it names the certificate being replaced, which the invitee checks the
    handshake's answer against; once redeemed, the new peer is told like the others."""
    acks = {ack.peer_id: ack for ack in certificate.acknowledgements.all()}
    now = timezone.now()
    waiting = [Waiting(peer, f"invitation not redeemed yet (until {peer.invitation_expires_at:%Y-%m-%d %H:%M} UTC): "
                             "it names the certificate being replaced")
               for peer in Peer.objects.filter(team_id=certificate.team_id, status=Peer.Status.PROPOSED,
                                               invitation_expires_at__gt=now).order_by("name")]  # fmt: skip
    for peer in _peers_we_call(certificate.team_id):
        ack = acks.get(peer.pk)
        if ack is not None and ack.acknowledged_at is not None:
            continue
        if not channel.has_channel(peer):
            reason = "no signed channel to tell it: give it the new certificate's PEM, then revoke the old one"
        elif ack is None:
            reason = "not told yet"
        else:
            reason = f"not acknowledged after {ack.attempts} attempt(s): {ack.last_error or 'no answer'}"
        waiting.append(Waiting(peer, reason))
    return waiting


def announce(renewal: IdentityCertificate) -> int:
    """Tell the peers with a channel that have not acknowledged the renewal; how many were told."""
    if renewal.not_after <= timezone.now():
        return 0
    acknowledged = set(renewal.acknowledgements.filter(acknowledged_at__isnull=False).values_list("peer_id", flat=True))
    peers = [peer for peer in channel.channel_peers(renewal.team_id) if peer.pk not in acknowledged]
    results = channel.announce_certificate(team_id=renewal.team_id, pem=renewal.pem, peers=peers) if peers else []
    return sum(1 for result in results if result["ok"])


def retire_if_acknowledged(renewal: IdentityCertificate) -> int:
    """Revoke the certificate `renewal` replaces once no peer waits for it: 1 if it was."""
    if waiting_for(renewal):
        return 0
    with transaction.atomic():
        old = IdentityCertificate.objects.select_for_update().filter(pk=renewal.replaces_id).first()
        if old is None:  # another beat or an operator was first
            return 0
        certificates.revoke(certificate=old, actor=ACTOR)
    return 1


# --- what the screens and the API show --------------------------------------------------


def status(certificate: IdentityCertificate, now: datetime | None = None) -> dict:
    """One certificate's renewal state, as GET /api/federation/certificates and the screen show it."""
    now = now or timezone.now()
    renewed_by = IdentityCertificate.objects.filter(replaces=certificate).first()
    acks = certificate.acknowledgements.select_related("peer").order_by("peer__name")
    return {
        "expiring": certificate.not_before <= now < certificate.not_after <= now + timedelta(days=warning_days()),
        "replaces": certificate.replaces_id,
        "renewed_by": renewed_by.pk if renewed_by else None,
        "acknowledged_by": [ack.peer.name for ack in acks if ack.acknowledged_at is not None],
        "waiting_for": [w.as_dict() for w in waiting_for(certificate)] if certificate.replaces_id else [],
    }


def warnings(team_id: str, now: datetime | None = None) -> list[dict]:
    """Certificates in use that expire soon, with what the renewal waits for: the peers screen's banner."""
    now = now or timezone.now()
    found = []
    for row in expiring(team_id, now):
        renewal = IdentityCertificate.objects.filter(replaces=row).first()
        newer = (IdentityCertificate.objects.filter(team_id=team_id, created_at__gt=row.created_at, not_after__gt=now)
                 .order_by("-created_at").first())  # fmt: skip
        found.append({
            "certificate": row, "days_left": int((row.not_after - now).total_seconds() // 86400), "renewal": renewal,
            "waiting_for": waiting_for(renewal) if renewal else [], "renew_days": renew_days(),
            "newer": None if renewal else newer,  # issued by hand: nothing retires this one by itself
        })  # fmt: skip
    return found
