from django.conf import settings
from rest_framework import serializers

from ingest.models import Source
from kite.fields import StrictSerializer


class SourceCreateSerializer(StrictSerializer):
    WHAT = "a source"

    name = serializers.CharField(max_length=50)
    kind = serializers.ChoiceField(choices=["stripe", "github", "standard", "none"])
    secret = serializers.CharField(required=False, allow_blank=False, max_length=500, write_only=True)
    rate_limit_per_second = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=100_000)


class SourceSerializer(serializers.ModelSerializer):
    hook_url = serializers.SerializerMethodField()
    verified = serializers.SerializerMethodField()

    class Meta:
        model = Source
        fields = ["id", "name", "kind", "verified", "hook_url", "secret_fingerprint", "rate_limit_per_second",
                  "created_at"]  # fmt: skip

    def get_hook_url(self, source) -> str:
        return f"{settings.KITE_PUBLIC_URL}/hooks/{source.team_id}/{source.name}"

    def get_verified(self, source) -> bool:
        """False for a `none` source: anyone who knows its URL can post to it."""
        return source.kind != Source.Kind.NONE


class EventQuerySerializer(serializers.Serializer):
    source = serializers.CharField(required=False, max_length=50)
    type = serializers.CharField(required=False, max_length=255)
    agent = serializers.CharField(required=False, max_length=100)
    after = serializers.CharField(required=False, allow_blank=True)  # cursor_parse validates: 400 bad_cursor
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, default=100)
