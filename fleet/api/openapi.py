"""The fleet's answers (built by hand: plain values, orjson) and its peer-facing endpoints (plain
Django views, fleet.api.peer_views), described for the OpenAPI schema (kite/schema.py). Never routed."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field, inline_serializer
from rest_framework import serializers
from rest_framework.views import APIView

from federation.api.openapi import SIGNATURE_HEADERS, TEAM
from fleet import rows
from kite.schema import PEER_FACING, PEER_GRANT, PEER_SIGNATURE


@extend_schema_field({"oneOf": [{"type": "integer"}, {"type": "string"}]})
class AgentId(serializers.Field):
    """An integer for this instance's agents, `peer:<name>/<id>` for a peer's."""


class AgentRow(serializers.Serializer):
    id = AgentId()
    name = serializers.CharField()
    status = serializers.ChoiceField(choices=["online", "offline"])
    last_seen = serializers.DateTimeField()
    version = serializers.CharField()
    host = serializers.CharField()
    labels = serializers.DictField(child=serializers.CharField())
    peer = serializers.CharField(allow_null=True, help_text="the peer it belongs to; null: ours")
    read_only = serializers.BooleanField(help_text="true for a peer's agent: it is changed on its own instance")
    stale = serializers.BooleanField(help_text="served from the peer's last snapshot, not a live answer")


class AgentDetail(AgentRow):
    first_seen = serializers.DateTimeField(allow_null=True)
    via = serializers.ChoiceField(choices=["listen", "api"], allow_null=True, help_text="how it registered")
    outcome = serializers.CharField(required=False, help_text="a peer's agent: how asking the peer went")
    last_contact = serializers.DateTimeField(required=False, allow_null=True)


class PeerOutcome(serializers.Serializer):
    name = serializers.CharField()
    outcome = serializers.CharField(help_text="ok, timeout, unauthorized, … (what asking the peer gave)")
    latency_ms = serializers.IntegerField(allow_null=True)
    last_contact = serializers.DateTimeField(allow_null=True)
    stale = serializers.BooleanField()
    detail = serializers.CharField(required=False)


FLEET = inline_serializer("Fleet", {
    "includes_federation": serializers.BooleanField(),
    "results": AgentRow(many=True),
    "peers": PeerOutcome(many=True),
})  # fmt: skip
REMOTE_GRANT_KEPT = inline_serializer("RemoteGrantKept", {
    "peer_id": serializers.IntegerField(), "name": serializers.CharField(),
    "has_remote_grant": serializers.BooleanField(),
})  # fmt: skip


# --- peer-facing (kite.schema.documented_by on fleet.api.peer_views) ------------------------


class WireAgent(serializers.Serializer):
    """An agent as this instance tells a peer whose grant shows it."""

    id = serializers.IntegerField()
    name = serializers.RegexField(f"^{rows.NAME.pattern}$")
    status = serializers.ChoiceField(choices=["online", "offline"])
    last_seen = serializers.DateTimeField()
    version = serializers.CharField()
    host = serializers.CharField()
    labels = serializers.DictField(child=serializers.CharField())


class WireAgentDetail(WireAgent):
    first_seen = serializers.DateTimeField()
    via = serializers.ChoiceField(choices=["listen", "api"])


PEER_FLEET_DOC = {
    "tags": [PEER_FACING],
    "auth": [{PEER_SIGNATURE: [], PEER_GRANT: []}],
    "parameters": [TEAM, *SIGNATURE_HEADERS],
}
WIRE_FLEET = inline_serializer("PeerFleet", {"instance_id": serializers.CharField(), "results": WireAgent(many=True)})
WIRE_AGENT = inline_serializer("PeerFleetAgent", {"instance_id": serializers.CharField(), "agent": WireAgentDetail()})


class PeerAgentsDoc(APIView):
    @extend_schema(operation_id="peer_fleet_agents", responses=WIRE_FLEET, **PEER_FLEET_DOC)
    def get(self, request):
        """The agents the caller's fleet.agents grant shows (signed GET, `kite-grant` header). 401 when the
        signature fails (the factor named), 403 without a usable grant."""


class PeerAgentDoc(APIView):
    @extend_schema(operation_id="peer_fleet_agent", responses=WIRE_AGENT, **PEER_FLEET_DOC)
    def get(self, request, agent_id):
        """One of them, with first_seen and via. 404 agent_not_found whether it does not exist or the grant
        does not show it."""


AGENT_ID = OpenApiParameter("agent_id", OpenApiTypes.STR, OpenApiParameter.PATH,
                            description="an agent id here, or `peer:<name>/<id>` for a peer's")  # fmt: skip
