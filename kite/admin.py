from django.contrib import admin

from kite import services
from kite.models import ApiKey, Membership, Team


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ["name", "id", "created_at"]
    search_fields = ["name", "id"]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "team", "role"]
    list_select_related = ["user", "team"]
    list_filter = ["role"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "label", "team", "created_at", "last_used_at", "revoked_at"]
    list_select_related = ["team"]
    search_fields = ["prefix", "label"]
    readonly_fields = ["team", "prefix", "digest", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    @admin.action(description="Revoke selected API keys")
    def revoke(self, request, queryset):
        for api_key in queryset:
            services.apikey_revoke(api_key=api_key)

    def has_add_permission(self, request):
        return False  # keys are shown once: create them with `manage.py createapikey`
