"""Federation metrics (DESIGN §7). Counters live in prometheus_client (multiprocess-safe);
`kite_outbox_entries` is read from the database at scrape time (OutboxCollector)."""

import logging

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from federation.errors import Code

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
    Delivered entries are not counted: they only grow (see kite_federation_calls_total)."""

    STATUSES = ("pending", "in_flight", "dead")

    def describe(self):
        return [self._family()]

    def collect(self):
        from federation import selectors

        family = self._family()
        try:
            counts = selectors.outbox_gauge(self.STATUSES)
        except Exception:  # a scrape must not fail because the database is away
            logger.exception("kite_outbox_entries: could not read the outbox")
            return [family]
        for (peer, status), value in sorted(counts.items()):
            family.add_metric([peer, status], value)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "kite_outbox_entries", "Outbox entries per peer and status, read at scrape time.", labels=["peer", "status"]
        )


class PauseCollector:
    """`kite_peer_paused{peer,team,reason}`: 1 for the reason a live peer's queue is paused now
    (operator: maintenance; down; auth_failed), 0 for the others — every live peer has all three,
    so an alert on `== 1` sees a pause begin and end. Read from the database at scrape time."""

    REASONS = ("operator", "down", "auth_failed")

    def describe(self):
        return [self._family()]

    def collect(self):
        from federation.models import Peer

        family = self._family()
        try:
            rows = list(Peer.objects.filter(role=Peer.Role.PEER).exclude(status=Peer.Status.REVOKED)
                        .order_by("team_id", "name").values_list("name", "team_id", "paused"))  # fmt: skip
        except Exception:  # a scrape must not fail because the database is away
            logger.exception("kite_peer_paused: could not read the peers")
            return [family]
        for name, team_id, paused in rows:
            for reason in self.REASONS:
                family.add_metric([name, team_id, reason], 1 if paused == reason else 0)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "kite_peer_paused", "1 while a peer's queue is paused, by reason (operator, down, auth_failed).",
            labels=["peer", "team", "reason"],
        )  # fmt: skip


class CertificateExpiryCollector:
    """`kite_certificate_expiry_timestamp_seconds{team,thumbprint,subject}`: when each identity
    certificate expires (unix time of not_after), read at scrape time. Alert on
    `kite_certificate_expiry_timestamp_seconds - time() < 7 * 86400`."""

    def describe(self):
        return [self._family()]

    def collect(self):
        from federation.models import IdentityCertificate

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
