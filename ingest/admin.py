from django.contrib import admin

from ingest.models import Event, Source


@admin.register(Source)
class SourceAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "team", "rate_limit_per_second", "secret_fingerprint", "created_at"]
    list_select_related = ["team"]
    list_filter = ["kind"]
    search_fields = ["name"]
    readonly_fields = ["secret_encrypted", "secret_fingerprint", "token_sha256"]


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["ce_type", "ce_id", "source", "team", "received_at"]
    list_select_related = ["source", "team"]
    list_filter = ["source__kind"]
    search_fields = ["ce_id", "ce_type"]
    readonly_fields = [f.name for f in Event._meta.fields]

    def has_add_permission(self, request):
        return False
