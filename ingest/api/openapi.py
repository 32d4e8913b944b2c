"""Ingest's answers built by hand, and the webhook hook (a plain Django view, ingest.views.hook),
described for the OpenAPI schema (kite/schema.py). Never routed."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (OpenApiResponse, PolymorphicProxySerializer, extend_schema, extend_schema_field,
                                   inline_serializer)
from rest_framework import serializers
from rest_framework.views import APIView

from ingest.api.serializers import SourceSerializer
from kite.schema import PEER_FACING, PEER_SIGNATURE, page

SOURCES = page("SourcePage", SourceSerializer(many=True))


class SourceIssued(SourceSerializer):
    secret = serializers.CharField(required=False, help_text="generated when not given: shown this once")
    token = serializers.CharField(required=False, help_text="a cloudevents source with auth=token: shown this once")

    class Meta(SourceSerializer.Meta):
        fields = [*SourceSerializer.Meta.fields, "secret", "token"]


@extend_schema_field({
    "type": "object", "additionalProperties": True,
    "required": ["specversion", "id", "source", "type"],
    "properties": {name: {"type": "string"} for name in ("specversion", "id", "source", "type", "time",
                                                          "datacontenttype", "kitecursor", "kitefedorigin")},
    "description": "A structured CloudEvent (JSON format) as stored: its data, and Kite's extensions "
                   "(kitecursor; kitefedorigin, kitefedchain, kitefedhops on federated events).",
})  # fmt: skip
class CloudEvent(serializers.Field):
    pass


EVENTS = inline_serializer("EventPage", {
    "results": serializers.ListField(child=CloudEvent()),
    "next": serializers.CharField(help_text="pass as `after` to read on"),
})  # fmt: skip
HEAD = inline_serializer("EventHead", {"cursor": serializers.CharField(help_text="pass as `after`: newer events only")})

ACCEPTED = inline_serializer("HookAccepted", {"id": serializers.CharField(), "duplicate": serializers.BooleanField()})
BATCH_RESULT = inline_serializer("HookBatchResult", {
    "id": serializers.CharField(), "result": serializers.ChoiceField(choices=["accepted", "duplicate", "rejected"]),
    "detail": serializers.CharField(required=False),
}, many=True)  # fmt: skip


class HookDoc(APIView):
    @extend_schema(
        operation_id="hooks_receive", tags=["webhooks", PEER_FACING],
        auth=[{PEER_SIGNATURE: []}, {}],
        request={"application/json": OpenApiTypes.OBJECT, "application/cloudevents+json": OpenApiTypes.OBJECT,
                 "application/cloudevents-batch+json": {"type": "array", "items": {"type": "object"}}},
        responses={
            202: OpenApiResponse(ACCEPTED, description="stored (duplicate: false)"),
            200: OpenApiResponse(PolymorphicProxySerializer("HookAnswer", [ACCEPTED, BATCH_RESULT], None, many=False),
                                 description="already stored (a duplicate: {id, duplicate: true}), or a CloudEvents "
                                 "batch: one result per event"),
        },
    )  # fmt: skip
    def post(self, request, team_id, source):
        """The provider's raw body, verified as the source's kind says: Stripe-Signature (stripe),
        X-Hub-Signature-256 (github), Standard Webhooks (standard, and `kite`: where a peer delivers
        events, signed as in the peerSignature scheme), none (a `none` source takes anything).
        401 on a bad signature and 404 for an unknown team or source: nothing is stored."""


class Arrival(serializers.Serializer):
    source = serializers.CharField()
    kind = serializers.CharField()
    ce_source = serializers.CharField()
    verification = serializers.ChoiceField(choices=["verified", "none"])
    verified_by = serializers.CharField()
    peer = serializers.CharField(allow_null=True, help_text="the peer that handed it over")
    received_at = serializers.DateTimeField()


class Provenance(serializers.Serializer):
    origin = serializers.CharField(allow_null=True)
    chain = serializers.ListField(child=serializers.CharField(), allow_null=True,
                                  help_text="null when the event's kitefedchain is not a JSON array of strings")
    hops = serializers.IntegerField(allow_null=True)
    here = serializers.CharField()
    path = serializers.ListField(child=serializers.CharField(), help_text="the instances it crossed, this one last")
    extensions = serializers.DictField(help_text="the kitefed* extensions as the event carries them")


JOURNEY = inline_serializer("EventJourney", {
    "event": CloudEvent(),
    "arrival": Arrival(),
    "peers": serializers.ListField(child=serializers.DictField(), help_text="one per peer the event was owed to: "
                                   "its outbox entry and the newest attempts"),
    "provenance": Provenance(),
})  # fmt: skip
