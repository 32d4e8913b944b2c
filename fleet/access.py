"""May this peer read our fleet? (the `fleet.agents` grant on GET /api/federation/fleet/agents)

The peer is already authenticated (signed request); the grant token comes in the
`kite-grant` header. A grant with a resource_id narrows what the peer sees to one
agent name, or to the agents carrying one label (`label:key=value`).
"""

from federation import audit, grants
from federation.grants import Refused
from federation.models import Grant, Peer
from fleet.errors import Code

RESOURCE_KIND = "fleet.agents"


def grant_for(peer: Peer, token: str, *, client_ip: str, endpoint: str) -> Grant:
    """The grant `token` stands for, if it lets `peer` read our fleet now; else Refused(code, detail),
    audited as Federation.AuthFailed with the code as outcome."""
    if not token:
        raise _refused(peer, Code.GRANT_REQUIRED, "Send the fleet.agents grant token this instance gave you, in "
                       "the kite-grant header.", client_ip, endpoint)  # fmt: skip
    try:  # audited here, against the (authenticated) caller, even for a token naming no grant
        grant = grants.check(token, resource_kind=RESOURCE_KIND, resource_id=_narrowed_to(token), scope="read",
                             client_ip=client_ip, endpoint=endpoint, audit_refusal=False, caller=peer)  # fmt: skip
    except Refused as refused:
        raise _refused(peer, refused.code, refused.detail, client_ip, endpoint) from None
    if grant.team_id != peer.team_id or not _same_instance(grant.peer, peer):
        raise _refused(peer, Code.GRANT_PEER, "This grant was issued to another peer.", client_ip, endpoint)
    return grant


def _refused(peer: Peer, code: str, detail: str, client_ip: str, endpoint: str) -> Refused:
    audit.auth_failed(outcome=code, endpoint=endpoint, method="GET", detail=detail, peer=peer,
                      sender=peer.remote_instance_id, remote_addr=client_ip)  # fmt: skip
    return Refused(str(code), detail)


def _narrowed_to(token: str) -> str | None:
    """The grant's own resource_id: a listing is narrowed by it, not refused for it."""
    prefix = token.partition(".")[0]
    if not prefix.startswith("fg-") or not (prefix.isascii() and prefix[3:].isdigit()) or len(prefix) > 21:
        return None  # grants.check says what is wrong with it
    grant_id = int(prefix[3:])
    if grant_id not in _resource_ids:
        found = Grant.objects.filter(pk=grant_id).values_list("resource_id", flat=True)
        if not found:
            return None  # not remembered: a grant made later under this id must not inherit "all"
        if len(_resource_ids) >= 10_000:
            _resource_ids.clear()
        _resource_ids[grant_id] = found[0]
    return _resource_ids[grant_id]


# A grant's resource_id never changes (a grant is created and deleted, never edited), and its id
# is never reused: remembered per process, it saves every peer call a query.
_resource_ids: dict[int, str | None] = {}


def _same_instance(granted: Peer, caller: Peer) -> bool:
    """The caller is the peer the grant was issued to — or its instance under another row of ours
    (a hand-made peering may authenticate it as a trusted sender)."""
    if granted.pk == caller.pk:
        return True
    return bool(granted.remote_instance_id) and granted.remote_instance_id == caller.remote_instance_id
