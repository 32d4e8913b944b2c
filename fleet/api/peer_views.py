"""GET /api/federation/fleet/agents: the peer-facing fleet, signed as in DESIGN §3 (not API-key auth).

Read-only and team-scoped: the calling peer's team, narrowed by its `fleet.agents`
grant (`kite-grant` header). 401 when the signature fails (the factor named), 403
without a usable grant (the grant's code); both audited as Federation.AuthFailed,
an answer as Federation.RemoteRequest.
"""

import json

from django.conf import settings
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET

from federation import audit, inbound
from federation.grants import Refused
from fleet import access, selectors
from fleet.federated import GRANT_HEADER, PATH
from ingest.verifiers import lower_headers
from kite.errors import ApiError, json_error


@csrf_exempt
@require_GET
def agents(request):
    headers = lower_headers(request.headers)
    sender, client_ip = headers.get("kite-peer", "")[:63], request.META.get("REMOTE_ADDR", "")
    try:
        peer = inbound.authenticate(headers, b"", team_id=inbound.team_hint(request), method="GET", path=PATH)
    except inbound.Refusal as refusal:
        inbound.refused(refusal, headers, endpoint=PATH, method="GET", remote_addr=client_ip)
        return json_error(refusal.detail, refusal.code, refusal.status)
    except ApiError as exc:  # rate limited
        return exc.response()
    try:
        grant = access.grant_for(peer, headers.get(GRANT_HEADER, ""), client_ip=client_ip, endpoint=PATH)
    except Refused as refused:
        return json_error(refused.detail, refused.code, 403)
    results = selectors.granted_rows_json(peer.team_id, grant.resource_id)
    audit.remote_request(peer=peer, endpoint=PATH, method="GET", sender=sender, remote_addr=client_ip)
    body = f'{{"instance_id": {json.dumps(settings.KITE_INSTANCE_ID)}, "results": {results}}}'
    return HttpResponse(body, content_type="application/json")
