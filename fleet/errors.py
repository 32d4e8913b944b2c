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
