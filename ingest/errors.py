"""Error codes of the ingest app (the `code` of {detail, code})."""

import enum


class Code(enum.StrEnum):
    INVALID = "invalid"
    CONFLICT = "conflict"
    PLACEHOLDER_SECRET = "placeholder_secret"
    UNKNOWN_TEAM = "unknown_team"
    UNKNOWN_SOURCE = "unknown_source"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    MALFORMED_JSON = "malformed_json"
    INVALID_EVENT = "invalid_event"
    MISSING_SIGNATURE = "missing_signature"
    BAD_SIGNATURE = "bad_signature"
    STALE_TIMESTAMP = "stale_timestamp"
    MISSING_TOKEN = "missing_token"
    BAD_TOKEN = "bad_token"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    BAD_CURSOR = "bad_cursor"
    EVENT_NOT_FOUND = "event_not_found"  # no event of that id in the caller's team (404)
    AMBIGUOUS_EVENT = "ambiguous_event"  # several sources of the team have that id: ?source= picks one (409)
