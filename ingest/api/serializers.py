from django.conf import settings
from rest_framework import serializers

from ingest.models import Source
from kite.fields import AsciiIntegerField, StrictSerializer


class SourceCreateSerializer(StrictSerializer):
    WHAT = "a source"

    name = serializers.CharField(max_length=50)
    kind = serializers.ChoiceField(choices=["stripe", "github", "standard", "cloudevents", "none"])
    secret = serializers.CharField(required=False, allow_blank=False, max_length=500, write_only=True)
    rate_limit_per_second = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=100_000)
    auth = serializers.ChoiceField(choices=["signature", "token"], required=False)  # cloudevents only


class SourceSerializer(serializers.ModelSerializer):
    hook_url = serializers.SerializerMethodField()
    verified = serializers.SerializerMethodField()
    auth = serializers.SerializerMethodField()

    class Meta:
        model = Source
        fields = ["id", "name", "kind", "verified", "auth", "hook_url", "secret_fingerprint", "rate_limit_per_second",
                  "created_at"]  # fmt: skip

    def get_hook_url(self, source) -> str:
        return f"{settings.KITE_PUBLIC_URL}/hooks/{source.team_id}/{source.name}"

    def get_verified(self, source) -> bool:
        """False for a `none` source: anyone who knows its URL can post to it."""
        return source.kind != Source.Kind.NONE

    def get_auth(self, source) -> str:
        """How a request to the hook URL is authenticated: signature, token, peer or none."""
        if source.kind in (Source.Kind.NONE, Source.Kind.KITE):
            return "none" if source.kind == Source.Kind.NONE else "peer"
        return "token" if source.token_sha256 else "signature"


class EventQuerySerializer(serializers.Serializer):
    source = serializers.CharField(required=False, max_length=50)
    type = serializers.CharField(required=False, max_length=255)
    agent = serializers.CharField(required=False, max_length=100)
    after = serializers.CharField(required=False, allow_blank=True)  # cursor_parse validates: 400 bad_cursor
    limit = AsciiIntegerField(required=False, min_value=1, max_value=1000, default=100)
