"""Federation metrics (README "Audit log and metrics"). Counters live in prometheus_client (multiprocess-safe);
the outbox, peer and certificate gauges are read from the database at scrape time (the collectors)."""

import logging

from django.db.models import Count, FilteredRelation, Min, Q
from django.utils import timezone
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from federation import reachability
from federation.errors import Code
from federation.models import IdentityCertificate, Peer

logger = logging.getLogger(__name__)

CALLS = Counter(
    "kite_federation_calls_total",
    "Peer-to-peer calls by peer, direction (inbound, outbound) and outcome (ok, or the failure code or kind).",
    ["peer", "direction", "outcome"],
)
DROPPED = Counter(
    "kite_federation_dropped_total", "Events not forwarded to a peer, by reason.", ["peer", "reason"]
)
AUDIT_REFUSALS_SUPPRESSED = Counter(
    "kite_audit_refusals_suppressed_total",
    "Refused peer requests counted but not written to the audit trail, by the limit that held them back"
    " (factor_rate, team_rate, team_daily, teamless_rate, teamless_daily).",
    ["reason"],
)
DELIVERY_SECONDS = Histogram(
    "kite_federation_delivery_seconds",
    "Seconds from an event's arrival to its delivery to a peer.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

# Failure codes a call's outcome may carry; any other code a peer answers with is reported by
# its kind (transient, auth, gone, permanent), so a peer cannot mint label values.
KNOWN_CODES = {code.value for code in Code} | {
    "tls", "connection", "unknown_invitation", "unsupported_contract", "answer_too_large",
    "bad_grant", "grant_revoked", "grant_expired", "grant_scope", "grant_source",
}  # fmt: skip


def outcome_of(failure) -> str:
    """`ok`, or what went wrong with an outbound call (a client.PeerCallError)."""
    if failure is None:
        return "ok"
    return failure.code if failure.code in KNOWN_CODES else failure.kind


class OutboxCollector:
    """`kite_outbox_entries{peer,status}`: the entries still owed (pending, in flight) or given up
    (dead) per live peer, by one GROUP BY at scrape time — exact with any number of processes.
    Delivered entries are not counted: they only grow (see kite_federation_calls_total).
    `kite_outbox_oldest_pending_age_seconds{peer}`: how long the oldest entry still owed to each
    live peer has waited (0: none owed) — a stuck queue, whatever its depth. Same GROUP BY."""

    STATUSES = ("pending", "in_flight", "dead")
    OWED = ("pending", "in_flight")

    def describe(self):
        return [self._family(), self._age_family()]

    def collect(self):
        family, ages = self._family(), self._age_family()
        try:
            counts, oldest = outbox_by_peer(self.STATUSES, owed=self.OWED)
        except Exception:  # a scrape must not fail because the database is away
            logger.exception("kite_outbox_entries: could not read the outbox")
            return [family, ages]
        for (peer, status), value in sorted(counts.items()):
            family.add_metric([peer, status], value)
        now = timezone.now()
        for peer in sorted({peer for peer, _ in counts}):
            ages.add_metric([peer], max(0.0, (now - oldest[peer]).total_seconds()) if peer in oldest else 0.0)
        return [family, ages]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "kite_outbox_entries", "Outbox entries per peer and status, read at scrape time.", labels=["peer", "status"]
        )

    @staticmethod
    def _age_family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "kite_outbox_oldest_pending_age_seconds",
            "Seconds since the oldest entry still owed to each peer (pending or in flight) was queued; 0 when none is.",
            labels=["peer"],
        )


def outbox_by_peer(statuses, *, owed) -> tuple[dict[tuple[str, str], int], dict]:
    """({(peer name, status): entries}, {peer name: created_at of its oldest entry in `owed`}) for
    every live peer, 0 included, in one GROUP BY: the join only takes the wanted statuses, so
    delivered history is never scanned. Peers of several teams may share a name: their counts add
    up and the oldest of their entries counts, as a label set must be unique."""
    rows = (
        Peer.objects.filter(role=Peer.Role.PEER)
        .exclude(status=Peer.Status.REVOKED)
        .annotate(entry=FilteredRelation("outbox", condition=Q(outbox__status__in=list(statuses))))
        .values("pk", "name", "entry__status")
        .annotate(n=Count("entry__id"), oldest=Min("entry__created_at"))
        .order_by()
    )
    counts: dict[tuple[str, str], int] = {}
    oldest: dict = {}
    for row in rows:
        name, status = row["name"], row["entry__status"]
        for each in statuses:
            counts.setdefault((name, each), 0)
        if status:
            counts[(name, status)] += row["n"]
        if status in owed:
            oldest[name] = min(oldest.get(name, row["oldest"]), row["oldest"])
    return counts, oldest


class PeerStateCollector:
    """Two state sets per live peer, read from the database at scrape time, one sample per state so
    an alert on `== 1` sees a state begin and end:
    `kite_peer_paused{peer,team,reason}`: 1 for the reason the peer's queue is paused now (operator:
    maintenance; down; auth_failed), 0 for the others;
    `kite_peer_reachability{peer,team,state}`: 1 for the peer's reachability chip (reachable, slow,
    stale, unreachable: no success for 5 minutes, unknown: never tried), 0 for the others."""

    REASONS = ("operator", "down", "auth_failed")
    STATES = ("reachable", "slow", "stale", "unreachable", "unknown")
    FIELDS = ("name", "team", "paused", "status", "health__last_attempt_at", "health__last_success_at",
              "health__last_latency_ms")

    def describe(self):
        return [self._family(), self._reachability_family()]

    def collect(self):
        paused, reachable = self._family(), self._reachability_family()
        try:
            peers = list(Peer.objects.filter(role=Peer.Role.PEER).exclude(status=Peer.Status.REVOKED)
                         .select_related("health").order_by("team_id", "name").only(*self.FIELDS))  # fmt: skip
        except Exception:  # a scrape must not fail because the database is away
            logger.exception("kite_peer_paused: could not read the peers")
            return [paused, reachable]
        now = timezone.now()
        for peer in peers:
            for reason in self.REASONS:
                paused.add_metric([peer.name, peer.team_id, reason], 1 if peer.paused == reason else 0)
            chip = reachability.of_peer(peer, now=now).lower()
            for state in self.STATES:
                reachable.add_metric([peer.name, peer.team_id, state], 1 if chip == state else 0)
        return [paused, reachable]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "kite_peer_paused", "1 while a peer's queue is paused, by reason (operator, down, auth_failed).",
            labels=["peer", "team", "reason"],
        )  # fmt: skip

    @staticmethod
    def _reachability_family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "kite_peer_reachability",
            "1 for each peer's reachability now (reachable, slow, stale, unreachable, unknown), 0 for the others.",
            labels=["peer", "team", "state"],
        )


class CertificateExpiryCollector:
    """`kite_certificate_expiry_timestamp_seconds{team,thumbprint,subject}`: when each identity
    certificate expires (unix time of not_after), read at scrape time. Alert on
    `kite_certificate_expiry_timestamp_seconds - time() < 7 * 86400`."""

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        try:
            rows = list(IdentityCertificate.objects.order_by("team_id", "not_after", "id")
                        .values_list("team_id", "thumbprint", "subject", "not_after"))  # fmt: skip
        except Exception:  # a scrape must not fail because the database is away
            logger.exception("kite_certificate_expiry_timestamp_seconds: could not read the certificates")
            return [family]
        for team_id, thumbprint, subject, not_after in rows:
            family.add_metric([team_id, thumbprint, subject], not_after.timestamp())
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "kite_certificate_expiry_timestamp_seconds",
            "Unix time at which each identity certificate expires (its not_after).",
            labels=["team", "thumbprint", "subject"],
        )
