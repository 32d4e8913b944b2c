"""Error codes of the fleet app (the `code` of {detail, code})."""

import enum


class Code(enum.StrEnum):
    INVALID = "invalid"
    NOT_FOUND = "not_found"
    READ_ONLY = "read_only"  # a peer's agent: shown, never changed from here
    # The peer-facing GET /api/federation/fleet/agents refuses (403) without a usable grant;
    # federation.grants.check's own codes (bad_grant, grant_expired, grant_scope, grant_source,
    # grant_revoked) come through as they are.
    GRANT_REQUIRED = "grant_required"
    GRANT_PEER = "grant_peer"  # a grant issued to another peer (or team)
    # The peer-facing GET /api/federation/fleet/agents/{id}: no such agent here, or not one the
    # caller's grant shows (404; the same answer for both, so a grant never tells what it hides).
    AGENT_NOT_FOUND = "agent_not_found"
    # GET /api/fleet/agents/peer:<name>/<id>:
    PEER_NOT_FOUND = "peer_not_found"  # no live peer of that name in the caller's team (404)
    REMOTE_AGENT_NOT_FOUND = "remote_agent_not_found"  # the peer says it has no such agent for us (404)
    NO_ACCESS = "no_access"  # no fleet.agents grant from the peer, or it refused ours (403)
    PEER_UNREACHABLE = "peer_unreachable"  # no answer, and its snapshot does not hold the agent (502)
