from datetime import UTC

from django.utils import timezone
from django.utils.dateparse import parse_datetime
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.fields import empty

from federation import filters as peer_filters
from federation import reachability
from federation import renewal as certificate_renewal
from federation.errors import Code
from federation.models import AuditEvent, Delivery, FederationToken, Grant, IdentityCertificate, OutboxEntry, Peer
from federation.routing import DEFAULT_MAX_HOPS
from kite.errors import ApiError
from kite.fields import AsciiIntegerField, StrictSerializer

ROTATE = 'rotate it: POST /api/federation/peers/{id}/rotate-secret {"direction": "inbound"}'


class TokenCreateSerializer(StrictSerializer):
    WHAT = "a token"
    INSTEAD = {"token": "Kite generates the token and shows it once"}

    label = serializers.CharField(max_length=100)


class TokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = FederationToken
        fields = ["id", "label", "fingerprint", "created_at"]


@extend_schema_field({"type": "array", "items": {"type": "object"}, "example": [
    {"prefix": {"type": "com.stripe."}}, {"not": {"exact": {"subject": "test"}}}]})  # fmt: skip
class FiltersField(serializers.JSONField):
    """CloudEvents Subscriptions API filter expressions (federation/filters.py), all of which must
    match. A wrong one, null included, is a 400 `invalid_filters` naming its path."""

    def __init__(self, **kwargs):
        kwargs.setdefault("help_text", "CloudEvents Subscriptions API filter expressions (exact, prefix, suffix, "
                                       "all, any, not), all of which must match, as well as scopes")  # fmt: skip
        super().__init__(**kwargs)

    def run_validation(self, data=empty):
        if data is empty:
            return super().run_validation(data)
        try:
            return peer_filters.validate(data)
        except peer_filters.InvalidFilters as exc:
            raise ApiError(str(exc), Code.INVALID_FILTERS) from None


class PeerCreateSerializer(StrictSerializer):
    WHAT = "a peer"
    INSTEAD = {"paused": "POST /api/federation/peers/{id}/pause after creating it"}

    name = serializers.CharField(max_length=63)
    peer_hook_url = serializers.CharField(max_length=500)
    outbound_token = serializers.CharField(required=False, max_length=500)
    inbound_token = serializers.CharField(required=False, max_length=500)
    scopes = serializers.ListField(child=serializers.CharField(max_length=200), required=False, default=list)
    filters = FiltersField(required=False, default=list)
    max_hops = serializers.IntegerField(required=False, min_value=1, max_value=32, default=DEFAULT_MAX_HOPS)
    rate_limit_per_second = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=100_000)
    tls_fingerprint = serializers.CharField(required=False, allow_blank=True, max_length=71, default="")
    certificate_pem = serializers.CharField(required=False, allow_blank=True, max_length=16_384, default="",
                                            trim_whitespace=False)  # fmt: skip


class PeerUpdateSerializer(StrictSerializer):
    """A field PATCH will not apply is refused by name, never silently ignored."""

    WHAT = "a peer"
    INSTEAD = {
        "inbound_token": f"cannot be changed here: {ROTATE}",
        "inbound_fingerprint": "cannot be changed here: rotate the secret: POST "
                               "/api/federation/peers/{id}/rotate-secret",
        "outbound_fingerprint": "cannot be changed here: set outbound_token, or POST "
                                "/api/federation/peers/{id}/rotate-secret",
        "status": "cannot be changed here: a peer's status follows its heartbeats; DELETE the peer to revoke it",
        "remote_instance_id": "cannot be changed here: an instance ID is learned from the peer and changes only by "
                              "peering again",
        "paused": "cannot be changed here: POST /api/federation/peers/{id}/pause or …/resume",
    }  # fmt: skip

    name = serializers.CharField(max_length=63, required=False)
    peer_hook_url = serializers.CharField(max_length=500, required=False)
    outbound_token = serializers.CharField(required=False, max_length=500)
    scopes = serializers.ListField(child=serializers.CharField(max_length=200), required=False)
    filters = FiltersField(required=False)
    max_hops = serializers.IntegerField(required=False, min_value=1, max_value=32)
    rate_limit_per_second = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=100_000)
    tls_fingerprint = serializers.CharField(required=False, allow_blank=True, max_length=71)
    certificate_pem = serializers.CharField(required=False, allow_blank=True, max_length=16_384, trim_whitespace=False)


MAKE_PEER = "a trusted sender only sends to us: make it a peer with PATCH /api/federation/trusted-senders/{id}"


class TrustedSenderCreateSerializer(StrictSerializer):
    WHAT = "a trusted sender"
    INSTEAD = {field: MAKE_PEER for field in ("peer_hook_url", "outbound_token", "scopes", "filters", "max_hops",
                                               "tls_fingerprint", "rate_limit_per_second")}  # fmt: skip

    name = serializers.CharField(max_length=63)
    inbound_token = serializers.CharField(required=False, max_length=500)
    certificate_pem = serializers.CharField(required=False, allow_blank=True, max_length=16_384, default="",
                                            trim_whitespace=False)  # fmt: skip


class TrustedSenderPromoteSerializer(StrictSerializer):
    """PATCH /api/federation/trusted-senders/{id}: the same row becomes a peer (we send to it too)."""

    WHAT = "a trusted sender made a peer"
    LATER = "change it once it is a peer: PATCH /api/federation/peers/{id}"
    INSTEAD = {
        "inbound_token": f"the inbound secret is kept as it is; {ROTATE}",
        "name": LATER, "rate_limit_per_second": LATER, "certificate_pem": LATER, "filters": LATER,
    }  # fmt: skip

    peer_hook_url = serializers.CharField(max_length=500)
    outbound_token = serializers.CharField(required=False, max_length=500)
    scopes = serializers.ListField(child=serializers.CharField(max_length=200))
    max_hops = serializers.IntegerField(required=False, min_value=1, max_value=32, default=DEFAULT_MAX_HOPS)
    tls_fingerprint = serializers.CharField(required=False, allow_blank=True, max_length=71, default="")


class InvitationCreateSerializer(StrictSerializer):
    WHAT = "an invitation"
    INSTEAD = {"invitation": "Kite generates the invitation string and shows it once",
               "code": "Kite generates the code"}  # fmt: skip

    name = serializers.CharField(max_length=63, required=False, allow_blank=True, default="")
    scopes = serializers.ListField(child=serializers.CharField(max_length=200), required=False, default=list)
    max_hops = serializers.IntegerField(required=False, min_value=1, max_value=32)
    ttl_seconds = serializers.IntegerField(required=False, min_value=60, max_value=7 * 24 * 3600, default=3600)


class InvitationAcceptSerializer(StrictSerializer):
    WHAT = "an invitation's acceptance"

    invitation = serializers.CharField(max_length=4096)
    name = serializers.CharField(max_length=63, required=False, allow_blank=True, default="")
    scopes = serializers.ListField(child=serializers.CharField(max_length=200), required=False, default=list)
    max_hops = serializers.IntegerField(required=False, min_value=1, max_value=32)


class GrantCreateSerializer(StrictSerializer):
    WHAT = "a grant"
    INSTEAD = {"token": "Kite generates the grant token and shows it once"}

    resource_kind = serializers.CharField(max_length=50)
    resource_id = serializers.CharField(max_length=100, required=False, allow_null=True, default=None)
    permission_scopes = serializers.ListField(child=serializers.CharField(max_length=50), required=False,
                                              default=lambda: ["read"])  # fmt: skip
    source_cidrs = serializers.ListField(child=serializers.CharField(max_length=64), required=False, default=list)
    ttl_seconds = serializers.IntegerField(required=False, min_value=60, max_value=365 * 24 * 3600,
                                           default=30 * 24 * 3600)  # fmt: skip


class GrantSerializer(serializers.ModelSerializer):
    class Meta:
        model = Grant
        fields = ["id", "resource_kind", "resource_id", "permission_scopes", "source_cidrs", "expires_at", "created_at"]


class RotateSecretSerializer(StrictSerializer):
    WHAT = "a rotation"
    INSTEAD = {field: "send the new value as secret, with direction" for field in ("inbound_token", "outbound_token")}

    direction = serializers.ChoiceField(choices=["inbound", "outbound"])
    secret = serializers.CharField(required=False, allow_blank=True, max_length=500)
    # Carry the new secret to the peer over the signed channel. Default: yes when the peer has
    # one (it knows our certificate and we know its instance: every invitation peer).
    propagate = serializers.BooleanField(required=False, allow_null=True, default=None)
    # false: a suspected leak — the secret being replaced stops working at once (no 24 h overlap).
    grace = serializers.BooleanField(required=False, default=True)


class CertificateCreateSerializer(StrictSerializer):
    WHAT = "a certificate"
    INSTEAD = {"pem": "Kite generates the certificate: its private key never leaves this instance",
               "private_key": "Kite generates the key and never shows it"}  # fmt: skip

    subject = serializers.CharField(max_length=64)
    validity_days = serializers.IntegerField(required=False, min_value=1, max_value=825, default=90)


class CertificateSerializer(serializers.ModelSerializer):
    renewal = serializers.SerializerMethodField(
        help_text="expiring (within the warning window), replaces / renewed_by (certificate ids of an automatic "
        "renewal), acknowledged_by (peers that pinned it), waiting_for (peers a renewal under way waits for: "
        "[{peer_id, peer, reason}])"
    )

    class Meta:
        model = IdentityCertificate
        fields = ["id", "subject", "thumbprint", "pem", "not_before", "not_after", "created_at", "renewal"]

    def get_renewal(self, row) -> dict:
        return certificate_renewal.status(row)


_COUNT = {"min_value": 0, "max_value": 2147483647}


class PeerSerializer(serializers.ModelSerializer):
    filters = FiltersField(read_only=True)
    reachability = serializers.SerializerMethodField()
    has_remote_grant = serializers.SerializerMethodField()
    outbox = serializers.SerializerMethodField()
    # The peer's health row (PeerHealth, read with select_related("health")), shown as its own fields.
    consecutive_failures = serializers.IntegerField(read_only=True, **_COUNT)
    last_error = serializers.CharField(read_only=True)
    last_heartbeat_at = serializers.DateTimeField(read_only=True, allow_null=True)
    last_success_at = serializers.DateTimeField(read_only=True, allow_null=True)
    last_latency_ms = serializers.IntegerField(read_only=True, allow_null=True, **_COUNT)
    last_inbound_at = serializers.DateTimeField(read_only=True, allow_null=True)

    class Meta:
        model = Peer
        fields = [
            "id", "name", "role", "status", "reachability", "paused", "peer_hook_url", "scopes", "filters",
            "max_hops", "rate_limit_per_second", "tls_fingerprint", "certificate_thumbprint", "remote_instance_id",
            "outbound_fingerprint", "inbound_fingerprint", "batch_max", "consecutive_failures", "last_error",
            "last_heartbeat_at", "last_success_at", "last_latency_ms", "last_inbound_at", "outbox", "has_remote_grant",
            "created_at",
        ]  # fmt: skip

    def get_reachability(self, peer) -> str | None:
        return reachability.of_peer(peer, now=timezone.now())  # null for a revoked peer

    def get_has_remote_grant(self, peer) -> bool:
        return bool(peer.remote_grant_encrypted)

    def get_outbox(self, peer) -> dict:
        depth = self.context.get("depths", {}).get(peer.pk)
        return depth if depth is not None else {}


class TrustedSenderSerializer(serializers.ModelSerializer):
    last_inbound_at = serializers.DateTimeField(read_only=True, allow_null=True)

    class Meta:
        model = Peer
        fields = ["id", "name", "status", "remote_instance_id", "inbound_fingerprint", "last_inbound_at", "created_at"]


class OutboxEntrySerializer(serializers.ModelSerializer):
    event_id = serializers.CharField(source="event.ce_id")

    class Meta:
        model = OutboxEntry
        fields = ["id", "msg_id", "event_id", "status", "attempts", "next_attempt_at", "last_error", "created_at",
                  "delivered_at"]  # fmt: skip


class DeliverySerializer(serializers.ModelSerializer):
    outbox_id = serializers.IntegerField(source="entry_id")

    class Meta:
        model = Delivery
        fields = ["id", "outbox_id", "attempted_at", "status_code", "outcome", "latency_ms", "error"]


class ReplaySerializer(StrictSerializer):
    WHAT = "a replay"

    limit = serializers.IntegerField(min_value=1, max_value=100_000, default=100)


class AuditBoundField(serializers.CharField):
    """An audit event id (a cursor: `next` of the page before) or an ISO 8601 time."""

    def to_internal_value(self, data):
        value = super().to_internal_value(data).strip()
        # ASCII only: str.isdigit() also admits "²" (int() refuses it) and "٣" (int() reads 3).
        if value.isascii() and value.isdigit() and len(value) <= 18:  # an id fits a bigint
            return int(value)
        try:
            parsed = parse_datetime(value)
        except ValueError:
            parsed = None
        if parsed is None:
            raise serializers.ValidationError("Give an audit event id or an ISO 8601 time (2026-01-31T12:00:00Z).")
        return parsed if timezone.is_aware(parsed) else parsed.replace(tzinfo=UTC)


class AuditQuerySerializer(serializers.Serializer):
    action = serializers.RegexField(r"^[A-Za-z][A-Za-z0-9._]{0,59}$", required=False,
                                    help_text="e.g. Federation.PeerCalled")  # fmt: skip
    peer = serializers.CharField(required=False, max_length=63, help_text="peer name, or peer id")
    outcome = serializers.CharField(required=False, max_length=40, help_text="ok, or a failure code such as bad_secret")
    after = AuditBoundField(required=False, help_text="only events after this event id or time")
    before = AuditBoundField(required=False, help_text="only events before this event id (`next`) or time")
    limit = AsciiIntegerField(required=False, min_value=1, max_value=500, default=100)


class AuditEventSerializer(serializers.ModelSerializer):
    peer = serializers.CharField(source="peer_name")

    class Meta:
        model = AuditEvent
        fields = ["id", "at", "action", "peer", "peer_id", "actor", "endpoint", "outcome", "detail", "data"]


class AuditPageSerializer(serializers.Serializer):
    results = AuditEventSerializer(many=True)
    next = serializers.CharField(allow_null=True, help_text="pass as `before` for the next (older) page; null: no more")


class PauseSerializer(StrictSerializer):
    """POST …/pause: an optional reason, for the audit trail."""

    WHAT = "a pause"
    INSTEAD = {"paused": "the pause is the request itself; POST …/resume lifts it"}

    reason = serializers.CharField(required=False, allow_blank=True, max_length=200, default="")
