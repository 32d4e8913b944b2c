"""Error codes of the federation app (the `code` of {detail, code})."""

import enum


class Code(enum.StrEnum):
    INVALID = "invalid"
    INVALID_FILTERS = "invalid_filters"  # a peer's filters: the detail names the path, e.g. filters[1].not.exact
    CONFLICT = "conflict"
    INSECURE_URL = "insecure_url"
    NOT_FOUND = "not_found"
    # Who is calling (docs/architecture.md "Signing and who is calling"): the factor that failed.
    UNKNOWN_PEER = "unknown_peer"
    BAD_SECRET = "bad_secret"
    BAD_CERTIFICATE = "bad_certificate"
    MISSING_CERTIFICATE = "missing_certificate"
    MISSING_SIGNATURE = "missing_signature"
    STALE_TIMESTAMP = "stale_timestamp"
    PEER_REVOKED = "peer_revoked"
    RATE_LIMITED = "rate_limited"
    PEER_UNREACHABLE = "peer_unreachable"  # a change could not be carried to the peer
    MALFORMED_SIGNATURE = "malformed_signature"  # oversized or absurd signature headers (400)
    REPLAYED = "replayed"  # a control call's webhook-id was already used by that sender
    CURRENT_SECRET_REQUIRED = "current_secret_required"  # rotate/terminate signed with a grace-period secret
    INSTANCE_ID_TAKEN = "instance_id_taken"  # another peer of the team has that instance ID
    LOCAL_SOURCE = "local_source"  # a federated event claiming to be born on this instance
    TRUSTED_SENDER = "trusted_sender"  # asked of a trusted sender what only a peer we deliver to has (pause)
