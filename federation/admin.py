from django.contrib import admin

from federation.models import AuditEvent, Delivery, FederationToken, Grant, IdentityCertificate, OutboxEntry, Peer


class ReadOnlyAdmin(admin.ModelAdmin):
    """The ops console shows federation rows; every write goes through the services (API,
    screens, manage.py), which check, audit and keep secrets encrypted."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Peer)
class PeerAdmin(ReadOnlyAdmin):
    list_display = ["name", "team", "role", "status", "paused", "peer_hook_url", "remote_instance_id",
                    "outbound_fingerprint", "inbound_fingerprint", "last_success_at"]  # fmt: skip
    list_select_related = ["team", "health"]
    list_filter = ["role", "status", "paused"]
    search_fields = ["name", "remote_instance_id", "peer_hook_url"]
    exclude = ["outbound_secret_encrypted", "inbound_secret_encrypted", "previous_inbound_secret_encrypted",
               "remote_grant_encrypted", "invitation_code_sha256"]  # fmt: skip


@admin.register(OutboxEntry)
class OutboxEntryAdmin(ReadOnlyAdmin):
    list_display = ["msg_id", "peer", "status", "attempts", "next_attempt_at", "last_error"]
    list_select_related = ["peer"]
    list_filter = ["status"]
    raw_id_fields = ["event"]


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
    list_display = ["attempted_at", "peer", "outcome", "status_code", "latency_ms", "error"]
    list_select_related = ["peer"]
    list_filter = ["outcome"]
    raw_id_fields = ["entry"]


@admin.register(IdentityCertificate)
class IdentityCertificateAdmin(ReadOnlyAdmin):
    list_display = ["subject", "team", "thumbprint", "not_after", "created_at"]
    list_select_related = ["team"]
    exclude = ["private_key_encrypted"]


@admin.register(FederationToken)
class FederationTokenAdmin(ReadOnlyAdmin):
    list_display = ["label", "team", "fingerprint", "created_at"]
    list_select_related = ["team"]
    exclude = ["secret_encrypted"]


@admin.register(Grant)
class GrantAdmin(ReadOnlyAdmin):
    list_display = ["pk", "peer", "resource_kind", "resource_id", "expires_at"]
    list_select_related = ["peer"]
    exclude = ["secret_sha256"]


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    """Read-only: the trail is written by federation.audit only. Also shows the refusals that
    belong to no team (nobody known signed them), which /api/audit cannot."""

    list_display = ["at", "team", "action", "peer_name", "actor", "endpoint", "outcome"]
    list_select_related = ["team"]
    list_filter = ["action", "outcome"]
    search_fields = ["peer_name", "actor", "endpoint", "detail"]
    date_hierarchy = "at"
