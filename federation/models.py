import uuid

from django.db import models
from django.utils import timezone

from federation.routing import DEFAULT_MAX_HOPS
from ingest.models import Event
from kite.models import Team


class FederationToken(models.Model):
    """A generated secret an operator pastes into a peer or trusted sender, here or there."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="federation_tokens")
    label = models.CharField(max_length=100)
    secret_encrypted = models.TextField()
    fingerprint = models.CharField(max_length=24)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"{self.label} ({self.fingerprint})"


class IdentityCertificate(models.Model):
    """This instance's identity towards peers (README "Identity certificates (the second factor)"): Ed25519 key, encrypted at rest."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="identity_certificates")
    subject = models.CharField(max_length=200)
    thumbprint = models.CharField(max_length=71, unique=True)
    pem = models.TextField()
    private_key_encrypted = models.TextField(help_text="MultiFernet token; never shown")
    not_before = models.DateTimeField()
    not_after = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)
    # An automatic renewal: the certificate this one replaces, retired once every peer with a
    # signed channel acknowledged this one (federation.renewal); NULL again once it is gone.
    replaces = models.OneToOneField(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="renewed_by"
    )
    expiry_warned_at = models.DateTimeField(null=True, blank=True, help_text="Federation.CertificateExpiring noted")

    def __str__(self):
        return f"{self.subject} ({self.thumbprint[:19]}…)"


class Peer(models.Model):
    """Another Kite instance: where we send (peer) and/or whom we accept from."""

    class Role(models.TextChoices):
        PEER = "peer"  # we deliver to it (and may accept from it)
        SENDER = "sender"  # a trusted sender: it only delivers to us

    class Status(models.TextChoices):
        PROPOSED = "proposed"
        ACCEPTED = "accepted"
        ENROLLED = "enrolled"
        ACTIVE = "active"
        REVOKED = "revoked"

    class Pause(models.TextChoices):
        NONE = ""
        DOWN = "down"  # too many failures in a row: wait for a successful heartbeat
        AUTH_FAILED = "auth_failed"  # the peer refused our credentials: an operator must act
        OPERATOR = "operator"  # paused for maintenance by an operator: only resume lifts it

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="peers")
    name = models.CharField(max_length=63)
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.PEER)
    peer_hook_url = models.URLField(max_length=500, blank=True)
    remote_instance_id = models.CharField(max_length=63, blank=True)
    outbound_secret_encrypted = models.TextField(blank=True)
    outbound_fingerprint = models.CharField(max_length=24, blank=True)
    inbound_secret_encrypted = models.TextField(blank=True)
    inbound_fingerprint = models.CharField(max_length=24, blank=True)
    previous_inbound_secret_encrypted = models.TextField(blank=True)
    previous_inbound_fingerprint = models.CharField(max_length=24, blank=True)
    previous_inbound_expires_at = models.DateTimeField(null=True, blank=True)
    scopes = models.JSONField(default=list, blank=True)
    # CloudEvents Subscriptions API filter expressions that must all match too (federation/filters.py).
    filters = models.JSONField(default=list, blank=True)
    max_hops = models.PositiveSmallIntegerField(default=DEFAULT_MAX_HOPS)
    rate_limit_per_second = models.PositiveIntegerField(null=True, blank=True)
    tls_fingerprint = models.CharField(max_length=71, blank=True)
    certificate_pem = models.TextField(blank=True, help_text="The peer's identity certificate, pinned")
    certificate_thumbprint = models.CharField(max_length=71, blank=True)
    # An invitation we issued (status proposed): only the code's SHA-256 is kept, until redeemed.
    invitation_code_sha256 = models.CharField(max_length=64, blank=True, db_index=True)
    invitation_expires_at = models.DateTimeField(null=True, blank=True)
    # A handshake redeemed here: the SHA-256 of the nonce our answer gave the invitee, with which
    # (and its certificate) it alone may withdraw this row until `handshake_withdraw_until`.
    handshake_nonce_sha256 = models.CharField(max_length=64, blank=True, db_index=True)
    handshake_withdraw_until = models.DateTimeField(null=True, blank=True)
    # The grant token the peer gave us (e.g. to read its fleet), MultiFernet-encrypted.
    remote_grant_encrypted = models.TextField(blank=True)
    batch_max = models.PositiveIntegerField(null=True, blank=True, help_text="Learned from the peer's ping")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACCEPTED)
    paused = models.CharField(max_length=12, choices=Pause.choices, default=Pause.NONE, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["team", "name"], condition=~models.Q(status="revoked"), name="uniq_live_peer_name"
            ),
        ]
        indexes = [models.Index(fields=["team", "remote_instance_id"], name="peer_team_remote")]

    def __str__(self):
        return f"{self.name} ({self.team_id})"

    @property
    def sends_to(self) -> bool:
        return self.role == self.Role.PEER and bool(self.peer_hook_url) and self.status != self.Status.REVOKED

    def save(self, *args, **kwargs):
        super().save(*args, **kwargs)
        if Peer.health.is_cached(self) and self.vitals._state.adding:  # health given with a new row (tests, the admin)
            given = {name: getattr(self.vitals, name) for name in HEALTH_FIELDS}
            if any(value not in (None, "", 0) for value in given.values()):
                PeerHealth.record(self, **given)

    @property
    def vitals(self) -> "PeerHealth":
        """Its health row (read it with select_related("health")); an empty one, not saved, while
        nothing has been recorded of the peer (the row is made by its first write: PeerHealth.record)."""
        try:
            return self.health
        except PeerHealth.DoesNotExist:
            self.health = PeerHealth(peer=self)
            return self.health


class PeerHealth(models.Model):
    """What deliveries, heartbeats and the peer's own requests record of a peer, apart from the row
    an operator configures: a delivery's outcome never rewrites that row. (`paused` stays on the
    peer: it is policy, which the claim reads.)"""

    peer = models.OneToOneField(Peer, on_delete=models.CASCADE, primary_key=True, related_name="health")
    consecutive_failures = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    last_inbound_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "peer health"

    def __str__(self):
        return f"health of peer {self.peer_id}"

    @classmethod
    def record(cls, peer: Peer, *, remember: bool = True, **values) -> None:
        """Write `values` into the peer's health row — one INSERT … ON CONFLICT DO UPDATE of those
        columns: the row is made by its first write, whichever way the peer was made — and, with
        `remember`, into the row `peer` holds, when it holds one."""
        cls.objects.bulk_create([cls(peer_id=peer.pk, **values)], update_conflicts=True, unique_fields=["peer"],
                                update_fields=list(values))  # fmt: skip
        if remember and Peer.health.is_cached(peer):
            for name, value in values.items():
                setattr(peer.vitals, name, value)


HEALTH_FIELDS = tuple(field.name for field in PeerHealth._meta.concrete_fields if not field.primary_key)


def _health_field(name: str) -> property:
    """`peer.<name>` reads (and, for a row not saved yet, sets) its health row's value."""
    return property(lambda peer: getattr(peer.vitals, name), lambda peer, value: setattr(peer.vitals, name, value),
                    doc=f"PeerHealth.{name}")  # fmt: skip


for _name in HEALTH_FIELDS:
    setattr(Peer, _name, _health_field(_name))


class OutboxEntry(models.Model):
    """One event owed to one peer. Written in the event's own transaction."""

    class Status(models.TextChoices):
        PENDING = "pending"
        IN_FLIGHT = "in_flight"
        DELIVERED = "delivered"
        DEAD = "dead"

    msg_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False, help_text="webhook-id on every try")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    peer = models.ForeignKey(Peer, on_delete=models.CASCADE, related_name="outbox")
    event = models.ForeignKey(Event, on_delete=models.CASCADE, related_name="+")
    provenance = models.JSONField(default=dict, help_text="kitefed* extensions the event carries to this peer")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    leased_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "outbox entries"
        indexes = [
            models.Index(fields=["peer", "status", "next_attempt_at"], name="outbox_due"),
            models.Index(fields=["status", "leased_until"], name="outbox_leases"),
        ]

    def __str__(self):
        return f"{self.msg_id} → {self.peer_id} ({self.status})"


class Delivery(models.Model):
    """One attempt to deliver (one or, batched, several) outbox entries."""

    peer = models.ForeignKey(Peer, on_delete=models.CASCADE, related_name="deliveries")
    entry = models.ForeignKey(OutboxEntry, on_delete=models.CASCADE, related_name="deliveries")
    attempted_at = models.DateTimeField(default=timezone.now)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=20)
    latency_ms = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)

    class Meta:
        verbose_name_plural = "deliveries"
        indexes = [
            models.Index(fields=["peer", "-attempted_at"], name="delivery_recent"),
            models.Index(fields=["attempted_at"], name="delivery_age"),  # the retention purge
        ]


class InboundReceipt(models.Model):
    """A control call's webhook-id, accepted once per sender: a replayed request is refused.
    Kept a little longer than the timestamp tolerance (older requests are refused as stale)."""

    peer = models.ForeignKey(Peer, on_delete=models.CASCADE, related_name="+")
    msg_id = models.CharField(max_length=255)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["peer", "msg_id"], name="uniq_inbound_receipt")]
        indexes = [models.Index(fields=["received_at"], name="receipt_age")]


class Grant(models.Model):
    """What a peer may read here (README "Grants and permissions"): a bearer token `fg-<id>.<secret>`, digest only."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    peer = models.ForeignKey(Peer, on_delete=models.CASCADE, related_name="grants")
    resource_kind = models.CharField(max_length=50)
    resource_id = models.CharField(max_length=100, null=True, blank=True, help_text="null: every resource of the kind")
    permission_scopes = models.JSONField(default=list)
    source_cidrs = models.JSONField(default=list, help_text="empty: from anywhere")
    secret_sha256 = models.CharField(max_length=64)
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return f"fg-{self.pk} {self.resource_kind} → {self.peer_id}"


class AuditEvent(models.Model):
    """One audited happening (README "Audit log and metrics"): an admin action, a peer call either way, a refusal."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+", null=True, blank=True)
    at = models.DateTimeField(default=timezone.now)
    action = models.CharField(
        max_length=60, help_text="e.g. Federation.PeerCalled, Federation.PeerCreated, Federation.AuthFailed"
    )
    # The peer's name as it was (a deleted peer's audit rows stay readable); the FK while it exists.
    peer = models.ForeignKey(Peer, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    peer_name = models.CharField(max_length=63, blank=True)
    actor = models.CharField(max_length=120, blank=True, help_text="who: an API key, a user, a peer, the system")
    endpoint = models.CharField(max_length=200, blank=True)
    outcome = models.CharField(max_length=40, blank=True, help_text="ok, or the failure code (bad_secret, …)")
    detail = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["team", "-id"], name="audit_team_newest"),  # /api/audit pages by id
            models.Index(fields=["at"], name="audit_age"),
            # /api/audit filtered on a value few rows have: found by index, not by reading every row
            models.Index(fields=["team", "action", "-id"], name="audit_team_action"),
            models.Index(fields=["team", "outcome", "-id"], name="audit_team_outcome"),
            models.Index(fields=["team", "peer_name", "-id"], name="audit_team_peer"),
        ]

    def __str__(self):
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.action} {self.peer_name} {self.outcome}"


class CertificateAcknowledgement(models.Model):
    """What a peer with a signed channel answered when told to pin one of our certificates."""

    certificate = models.ForeignKey(IdentityCertificate, on_delete=models.CASCADE, related_name="acknowledgements")
    peer = models.ForeignKey(Peer, on_delete=models.CASCADE, related_name="+")
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    pinned = models.BooleanField(default=True, help_text="False: the peer pins no certificate of ours")
    attempts = models.PositiveIntegerField(default=0)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["certificate", "peer"], name="uniq_certificate_ack")]

    def __str__(self):
        return f"{self.certificate_id} → {self.peer_id} ({'acknowledged' if self.acknowledged_at else 'pending'})"
