from django.contrib import admin

from federation.models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only: the trail is written by federation.audit only. Also shows the refusals that
    belong to no team (nobody known signed them), which /api/audit cannot."""

    list_display = ["at", "team", "action", "peer_name", "actor", "endpoint", "outcome"]
    list_select_related = ["team"]
    list_filter = ["action", "outcome"]
    search_fields = ["peer_name", "actor", "endpoint", "detail"]
    date_hierarchy = "at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
