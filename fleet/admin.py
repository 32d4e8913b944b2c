from django.contrib import admin
from django.utils import timezone

from fleet import selectors
from fleet.models import Agent, Snapshot


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    """Agent presence (ops console): writes come from the agents themselves."""

    list_display = ["name", "status", "team", "last_seen", "version", "host", "via", "first_seen"]
    list_select_related = ["team"]
    list_filter = ["via", "team"]
    search_fields = ["name", "host", "version"]
    ordering = ["team", "name"]
    readonly_fields = [f.name for f in Agent._meta.fields]

    @admin.display(description="status")
    def status(self, agent):
        return selectors.status_of(agent.last_seen, timezone.now())

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Snapshot)
class SnapshotAdmin(admin.ModelAdmin):
    """What each peer last showed of its fleet (served, flagged stale, when it does not answer)."""

    list_display = ["peer", "team", "outcome", "attempted_at", "fetched_at", "latency_ms", "agents"]
    list_select_related = ["peer", "team"]
    list_filter = ["outcome"]
    search_fields = ["peer__name"]
    readonly_fields = [f.name for f in Snapshot._meta.fields]

    @admin.display(description="agents")
    def agents(self, snapshot):
        return len(snapshot.rows or [])

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
