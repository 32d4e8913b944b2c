import orjson
from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from federation import audit, selectors as federation_selectors
from fleet import federated, rows, selectors, services
from fleet.api import openapi as o
from fleet.errors import Code
from fleet.models import Agent
from kite.auth import CanManagePeers
from kite.errors import ApiError
from kite.fields import refuse_any, refuse_unapplied
from kite.schema import NoBody

MAX_QUERY = 200
_YES, _NO = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}
# Documentation only (these views read the request themselves): the schema, and a fuzzer reading it, knows the inputs.
_LIST_PARAMETERS = [OpenApiParameter("q"), OpenApiParameter("peer"), OpenApiParameter("federation", bool),
                    OpenApiParameter("snapshot", bool)]  # fmt: skip
_REGISTRATION = inline_serializer("AgentRegistration", {
    "name": serializers.RegexField(f"^{rows.NAME.pattern}$"),
    "version": serializers.CharField(required=False, max_length=rows.MAX_VERSION),
    "host": serializers.CharField(required=False, max_length=rows.MAX_HOST),
    "labels": serializers.DictField(child=serializers.CharField(max_length=rows.MAX_LABEL_VALUE), required=False),
})  # fmt: skip
_REMOTE_GRANT = inline_serializer("RemoteGrant", {"token": serializers.CharField(help_text="fg-<id>.<secret>")})


def _flag(params, name: str) -> bool:
    value = params.get(name, "").strip().lower()
    if value not in _YES | _NO:
        raise ApiError(f"{name} must be true or false.", Code.INVALID)
    return value in _YES


def _query(request) -> federated.Query:
    params = request.query_params
    q, peer = params.get("q", "").strip(), params.get("peer", "").strip() or None
    if len(q) > MAX_QUERY or (peer is not None and len(peer) > 63):
        raise ApiError(f"q must be at most {MAX_QUERY} characters and peer a peer's name.", Code.INVALID)
    if "\x00" in q or "\x00" in (peer or ""):  # PostgreSQL text cannot hold it: refused here, not a 500 there
        raise ApiError("q and peer cannot contain NUL characters.", Code.INVALID)
    if peer is not None and not selectors.fleet_peers(request.user.team.id, name=peer):
        raise ApiError(f"No live peer named {peer!r} in your team.", Code.INVALID)
    # peer= asks for a peer's agents: it implies federation=true.
    federation = _flag(params, "federation") or peer is not None
    return federated.Query(federation=federation, peer=peer, q=q, snapshot=_flag(params, "snapshot"))


class AgentListRegister(APIView):
    @extend_schema(operation_id="fleet_agents_list", parameters=_LIST_PARAMETERS, responses=o.FLEET)
    def get(self, request):
        """Our agents; with federation=true also every live peer's (read-only, `peer:<name>/<id>`)."""
        query = _query(request)
        listed = federated.fleet_list(team_id=request.user.team.id, query=query, actor=audit.actor_of(request.user))
        # Plain JSON values, a thousand rows and more with federation on: orjson renders them in a
        # tenth of the time DRF's JSONRenderer takes (bench/fleet.py).
        return HttpResponse(orjson.dumps(listed), content_type="application/json")

    @extend_schema(request=_REGISTRATION, responses={200: o.AgentDetail, 201: o.AgentDetail})
    def post(self, request):
        """Register an agent, or refresh it (a heartbeat): {name, version?, host?, labels?}."""
        refuse_unapplied(request.data, ("name", "version", "host", "labels"), what="an agent registration",
                         instead={"status": "read-only (follows the agent's heartbeats)",
                                  "peer": "read-only (a peer's agents are changed on their own instance)"})  # fmt: skip
        try:
            registration = rows.clean_registration(request.data)
        except rows.Invalid as invalid:
            raise ApiError(str(invalid), Code.INVALID) from None
        agent, created = services.agent_register(team_id=request.user.team.id, via=Agent.Via.API, **registration)
        return Response(selectors.agent_detail(agent), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class AgentDetail(APIView):
    @extend_schema(parameters=[o.AGENT_ID], responses={200: o.AgentDetail, 502: OpenApiResponse(
        description="the peer did not answer and its last snapshot has no such agent")})  # fmt: skip
    def get(self, request, agent_id: str):
        """One agent. `peer:<name>/<id>`: that peer's agent, asked over the signed, grant-checked
        channel (`read_only: true`; `stale: true` when served from the peer's snapshot)."""
        if agent_id.startswith(rows.REMOTE_PREFIX):
            found = federated.remote_agent(team_id=request.user.team.id, agent_id=agent_id,
                                           actor=audit.actor_of(request.user))  # fmt: skip
            return Response(found)
        agent = selectors.agent_for_team(request.user.team.id, agent_id)
        if agent is None:
            raise ApiError("No such agent in your team.", Code.NOT_FOUND, status=404)
        return Response(selectors.agent_detail(agent))

    def http_method_not_allowed(self, request, *args, **kwargs):
        """Nothing changes an agent here (it registers itself with POST /api/fleet/agents); a
        peer's agent is the peer's to change, and that is said so."""
        if kwargs.get("agent_id", "").startswith(rows.REMOTE_PREFIX):
            raise ApiError(f"{request.method} refused: a peer's agent is read-only here; it is changed on its own "
                           "instance.", Code.READ_ONLY, status=405, headers={"Allow": "GET, HEAD, OPTIONS"})  # fmt: skip
        return super().http_method_not_allowed(request, *args, **kwargs)


class PeerRemoteGrant(APIView):
    """PUT {token}: keep the fleet.agents grant token a peer's operator gave us (hand-made peers;
    an invitation exchanges one by itself). DELETE: forget it."""

    permission_classes = [CanManagePeers]

    @extend_schema(request=_REMOTE_GRANT, responses=o.REMOTE_GRANT_KEPT)
    def put(self, request, peer_id: int):
        refuse_unapplied(request.data, ("token",), what="a remote grant")
        token = request.data.get("token") if isinstance(request.data, dict) else None
        if not isinstance(token, str):
            raise ApiError("Send {\"token\": \"fg-<id>.<secret>\"}.", Code.INVALID)
        peer = services.remote_grant_set(peer=self._peer(request, peer_id), token=token.strip(),
                                         actor=audit.actor_of(request.user))  # fmt: skip
        return Response(self._answer(peer))

    @extend_schema(request=NoBody, responses={204: None})
    def delete(self, request, peer_id: int):
        refuse_any(request.data, what="forgetting a remote grant")
        services.remote_grant_set(peer=self._peer(request, peer_id), token=None, actor=audit.actor_of(request.user))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @staticmethod
    def _peer(request, peer_id):
        peer = federation_selectors.peer_for_team(request.user.team.id, peer_id)
        if peer is None or peer.status == peer.Status.REVOKED:
            raise ApiError("No such peer in your team.", Code.NOT_FOUND, status=404)
        return peer

    @staticmethod
    def _answer(peer) -> dict:
        return {"peer_id": peer.pk, "name": peer.name, "has_remote_grant": bool(peer.remote_grant_encrypted)}
