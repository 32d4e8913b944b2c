"""The peer-facing fleet, signed as in SECURITY.md "The signed message" (not API-key auth):

    GET /api/federation/fleet/agents        the agents the caller's grant shows
    GET /api/federation/fleet/agents/{id}   one of them, with first_seen and via

Read-only and team-scoped: the calling peer's team, narrowed by its `fleet.agents`
grant (`kite-grant` header). The signature is bound to the path called, so one made for
the list (or for another agent) is refused on a detail. 401 when the signature fails (the
factor named), 403 without a usable grant (the grant's code); both audited as
Federation.AuthFailed, an answer as Federation.RemoteRequest (a detail's with the agent
id in its data, a 404 with outcome `agent_not_found`). Another method is 405.
"""

import functools
import json
import re

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from federation import audit, inbound, metrics
from federation.grants import Refused
from fleet import access, selectors
from fleet.api import openapi
from fleet.errors import Code
from fleet.federated import GRANT_HEADER, PATH
from ingest.verifiers import lower_headers
from kite.errors import ApiError, Code as KiteCode, json_error
from kite.schema import documented_by

# A Kite's agent ids are bigint primary keys, written as such (no sign, no leading zero: the caller
# checks the answer is the id it asked for); anything else names no agent here, and is refused
# before any database work: a 10 KB id or a `../` costs nothing.
AGENT_ID = re.compile(r"[1-9][0-9]{0,17}")


def _get_only(view):
    @functools.wraps(view)
    def wrapped(request, *args, **kwargs):
        if request.method != "GET":
            response = json_error("The peer-facing fleet is read-only: GET only.", KiteCode.METHOD_NOT_ALLOWED, 405)
            response["Allow"] = "GET"
            return response
        return view(request, *args, **kwargs)

    return csrf_exempt(wrapped)


@documented_by(openapi.PeerAgentsDoc)
@_get_only
def agents(request):
    caller = _caller(request, PATH)
    if isinstance(caller, HttpResponse):
        return caller
    peer, grant, sender, client_ip = caller
    results = selectors.granted_rows_json(peer.team_id, grant.resource_id)
    audit.remote_request(peer=peer, endpoint=PATH, method="GET", sender=sender, remote_addr=client_ip)
    body = f'{{"instance_id": {json.dumps(settings.KITE_INSTANCE_ID)}, "results": {results}}}'
    return HttpResponse(body, content_type="application/json")


@documented_by(openapi.PeerAgentDoc)
@_get_only
def agent(request, agent_id: str):
    if not AGENT_ID.fullmatch(agent_id):
        return json_error("No such agent: agent ids here are numbers.", Code.AGENT_NOT_FOUND, 404)
    endpoint = f"{PATH}/{agent_id}"
    caller = _caller(request, endpoint)
    if isinstance(caller, HttpResponse):
        return caller
    peer, grant, sender, client_ip = caller
    found = selectors.granted_agent(peer.team_id, grant.resource_id, int(agent_id))
    outcome = "ok" if found is not None else str(Code.AGENT_NOT_FOUND)
    # As audit.remote_request, with the agent asked for in the row's data.
    metrics.CALLS.labels(peer.name, "inbound", outcome).inc()
    audit.record(audit.REMOTE_REQUEST, peer=peer, actor=sender or peer.remote_instance_id, endpoint=endpoint,
                 outcome=outcome, data={"method": "GET", "remote_addr": client_ip, "agent": int(agent_id)})  # fmt: skip
    if found is None:  # the same answer whether it does not exist or the grant does not show it
        return json_error(f"No agent {agent_id} here that your grant shows.", Code.AGENT_NOT_FOUND, 404)
    return JsonResponse({"instance_id": settings.KITE_INSTANCE_ID, "agent": found})


def _caller(request, endpoint: str):
    """(peer, grant, sender, client ip) of a signed GET of `endpoint` holding a usable grant, or the
    refusal to answer with (audited as Federation.AuthFailed)."""
    headers = lower_headers(request.headers)
    sender, client_ip = headers.get("kite-peer", "")[:63], request.META.get("REMOTE_ADDR", "")
    try:
        peer = inbound.authenticate(headers, b"", team_id=inbound.team_hint(request), method="GET", path=endpoint)
    except inbound.Refusal as refusal:
        inbound.refused(refusal, headers, endpoint=endpoint, method="GET", remote_addr=client_ip)
        return json_error(refusal.detail, refusal.code, refusal.status)
    except ApiError as exc:  # rate limited
        return exc.response()
    try:
        grant = access.grant_for(peer, headers.get(GRANT_HEADER, ""), client_ip=client_ip, endpoint=endpoint)
    except Refused as refused:
        return json_error(refused.detail, refused.code, 403)
    return peer, grant, sender, client_ip
