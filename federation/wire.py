"""JSON bodies peers send to the control endpoints. Pure: no Django.

RFC 8259 only, parsed by orjson, whose nesting limit (1024) turns `[` × 200,000 into
an error instead of a RecursionError; the request body is already capped by
KITE_MAX_BODY_BYTES before it gets here.
"""

import orjson


class BadBody(ValueError):
    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def json_object(raw: bytes, what: str) -> dict:
    """`raw` as a JSON object, or BadBody naming what was expected."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadBody(f"The {what} is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise BadBody(f"The {what} must be a JSON object.")
    return value
