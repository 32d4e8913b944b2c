"""Provider payloads → CloudEvents 1.0 attributes. Pure: no Django, no database.

The pipeline assigns `source` (kite://<instance>/<team>/<source name>); this
module decides `id`, `type`, `time`, `subject` and `data` per source kind.
"""

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes

import orjson

from kite import tracing

MAX_ATTRIBUTE_LENGTH = 255
AGENT_MESSAGE_TYPE = "com.kite.agent.message"
DEFAULT_TYPE = "com.kite.webhook"
# CloudEvents: extension names are lower-case letters and digits.
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
_CORE_ATTRIBUTES = {"specversion", "id", "source", "type", "time", "subject", "datacontenttype", "dataschema", "data",
                    "data_base64"}  # fmt: skip
_AGENT_URL = re.compile(r"^https?://[^/]+/agents/(?P<name>[A-Za-z0-9._-]{1,100})/?$")


class MalformedEvent(Exception):
    def __init__(self, code: str, detail: str, status: int = 400):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status


@dataclass
class Draft:
    """A CloudEvent before the pipeline gives it a source and stores it."""

    id: str
    type: str
    time: datetime
    data_json: str  # the `data` member as JSON text, stored verbatim
    subject: str = ""
    datacontenttype: str = "application/json"
    source: str = ""  # set only when the event arrives already a CloudEvent (federation)
    extensions: dict[str, Any] = field(default_factory=dict)
    agent: str = ""  # the addressee of an agent message
    dataschema: str = ""
    data_base64: bool = False  # data_json is a JSON string holding the base64 of binary data


def json_bytes(value) -> bytes:
    """Compact UTF-8 JSON: orjson (a tenth of the stdlib encoder's time), the stdlib's for what
    orjson refuses (an integer past 64 bits, a key that is not a string)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def with_member(attributes: dict, member: str, text: str) -> bytes:
    """The JSON object `attributes` plus `member` whose value is the JSON text `text`, inserted as it
    is: a stored event's data (kept verbatim after a strict parse, so valid JSON) is not parsed and
    encoded again on every read and delivery."""
    head = json_bytes(attributes)
    return head[:-1] + (b',"' if len(head) > 2 else b'"') + json_bytes(member)[1:-1] + b'":' + text.encode() + b"}"


def body_digest_id(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _not_json_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """RFC 8259 JSON only (UTF-8, no BOM, finite numbers): stored data must read back anywhere.

    Python's json alone also takes UTF-16/32, NaN and 1e400 (→ inf), and raises
    RecursionError or ValueError, not JSONDecodeError, on deep nesting or huge integers.
    """
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_not_json_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MalformedEvent("malformed_json", f"Body is not valid JSON: {str(exc)[:200]}.") from None


_CONTROL_OR_SURROGATE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def _text(value: Any, name: str) -> str:
    text = str(value)
    if not text or len(text) > MAX_ATTRIBUTE_LENGTH:
        raise MalformedEvent("invalid_event", f"{name} must be 1-{MAX_ATTRIBUTE_LENGTH} characters.")
    if _CONTROL_OR_SURROGATE.search(text):  # PostgreSQL cannot store NUL or lone surrogates
        raise MalformedEvent("invalid_event", f"{name} must not contain control characters.")
    return text


def _unix_time(value: Any, fallback: datetime) -> datetime:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 10**11:
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            # 0001-01-01T00:00+01:00 parses but lies outside datetime's range once in UTC.
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
        except (ValueError, OverflowError):
            return fallback
    return fallback


def _object_id(payload: Any, body: bytes) -> str:
    value = payload.get("id") if isinstance(payload, dict) else None
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) != "":
        return _text(payload["id"], "id")
    return body_digest_id(body)


def _agent_of(event_type: str, data: Any) -> str:
    """The addressee of an agent message: `data.to` (or, for an envelope body, `data.data.to`)."""
    if event_type != AGENT_MESSAGE_TYPE or not isinstance(data, dict):
        return ""
    to = data.get("to")
    if to is None and isinstance(data.get("data"), dict):
        to = data["data"].get("to")
    match = _AGENT_URL.match(str(to or ""))
    if not match:
        raise MalformedEvent("invalid_event", "An agent message needs data.to = https://<host>/agents/<name>.")
    return match["name"]


def from_stripe(headers, body: bytes, received_at: datetime) -> Draft:
    payload = parse_json(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str) or not payload["type"]:
        raise MalformedEvent("invalid_event", "A Stripe event is a JSON object with a string `type`.")
    return Draft(
        id=_object_id(payload, body),
        type=_text("com.stripe." + payload["type"], "type"),
        time=_unix_time(payload.get("created"), received_at),
        data_json=body.decode(),
    )


def from_github(headers, body: bytes, received_at: datetime) -> Draft:
    event_name = headers.get("x-github-event", "").strip()
    if not event_name:
        raise MalformedEvent("invalid_event", "X-GitHub-Event header is missing.")
    raw = body
    if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        form = parse_qs(body.decode("utf-8", "replace"))
        if "payload" not in form:
            raise MalformedEvent("malformed_json", "Form-encoded GitHub delivery has no `payload` field.")
        raw = form["payload"][0].encode()
    payload = parse_json(raw)
    action = payload.get("action") if isinstance(payload, dict) else None
    event_type = f"com.github.{event_name}" + (f".{action}" if isinstance(action, str) and action else "")
    delivery = headers.get("x-github-delivery", "").strip()
    return Draft(
        id=_text(delivery, "X-GitHub-Delivery") if delivery else body_digest_id(raw),
        type=_text(event_type, "type"),
        time=received_at,
        data_json=raw.decode(),
    )


def from_standard(headers, body: bytes, received_at: datetime) -> Draft:
    payload = parse_json(body)
    event_type = payload.get("type") if isinstance(payload, dict) else None
    fallback_time = _unix_time(int(headers.get("webhook-timestamp", "0") or 0), received_at)
    event_type = event_type if isinstance(event_type, str) and event_type else DEFAULT_TYPE
    return Draft(
        id=_text(headers["webhook-id"], "webhook-id") if headers.get("webhook-id") else body_digest_id(body),
        type=_text(event_type, "type"),
        time=_unix_time(payload.get("timestamp") if isinstance(payload, dict) else None, fallback_time),
        data_json=body.decode(),
        agent=_agent_of(event_type, payload),
    )


def from_plain(headers, body: bytes, received_at: datetime) -> Draft:
    payload = parse_json(body)
    event_type = payload.get("type") if isinstance(payload, dict) else None
    event_type = event_type if isinstance(event_type, str) and event_type else DEFAULT_TYPE
    return Draft(
        id=_object_id(payload, body),
        type=_text(event_type, "type"),
        time=received_at,
        data_json=body.decode(),
        agent=_agent_of(event_type, payload),
    )


UNVERIFIED_EXTENSION = "kiteunverified"


def from_unverified(headers, body: bytes, received_at: datetime) -> Draft:
    """A `none` source: anyone who knows its URL can post, and the event says so wherever it goes
    (`kiteunverified: true`, kept when federated)."""
    draft = from_plain(headers, body, received_at)
    draft.extensions[UNVERIFIED_EXTENSION] = True
    return draft


BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
MAX_BATCH = 1000
MAX_EXTENSION_VALUE = 1000


def from_structured(headers, body: bytes, received_at: datetime) -> Draft | list:
    """A structured-mode CloudEvent (what one Kite sends another), or a batch of them.

    A batch (application/cloudevents-batch+json) gives a list with, per event,
    a Draft or the MalformedEvent that rejects just that event.
    """
    payload = parse_json(body)
    if headers.get("content-type", "").startswith(BATCH_CONTENT_TYPE):
        if not isinstance(payload, list) or not 0 < len(payload) <= MAX_BATCH:
            raise MalformedEvent("invalid_event", f"A CloudEvents batch is a JSON array of 1-{MAX_BATCH} events.")
        return [_draft_or_error(item, received_at) for item in payload]
    if not isinstance(payload, dict):
        raise MalformedEvent("invalid_event", "A structured CloudEvent is a JSON object.")
    return draft_from_cloudevent(payload, received_at)


def _draft_or_error(item, received_at, convert=None):
    """One event of a batch: its draft (`convert`, by default the federation reading), or the error
    that rejects it alone."""
    if not isinstance(item, dict):
        return MalformedEvent("invalid_event", "Each event of a batch is a JSON object.")
    try:
        return (convert or draft_from_cloudevent)(item, received_at)
    except MalformedEvent as exc:
        return exc


def _extension_value(name: str, value):
    if isinstance(value, bool) or isinstance(value, int):
        return value
    if isinstance(value, str) and len(value) <= MAX_EXTENSION_VALUE and not _CONTROL_OR_SURROGATE.search(value):
        return value
    raise MalformedEvent(
        "invalid_event", f"Extension `{name}` must be a string (≤{MAX_EXTENSION_VALUE} printable characters) or integer."
    )


def draft_from_cloudevent(payload: dict, received_at: datetime) -> Draft:
    if payload.get("specversion") != "1.0":
        raise MalformedEvent("invalid_event", "specversion must be \"1.0\".")
    for name in ("id", "source", "type"):
        if not isinstance(payload.get(name), str) or not payload[name]:
            raise MalformedEvent("invalid_event", f"CloudEvent attribute `{name}` must be a non-empty string.")
    extensions = {key: value for key, value in payload.items() if key not in _CORE_ATTRIBUTES}
    bad = [key for key in extensions if not _EXTENSION_NAME.match(key)]
    if bad:
        raise MalformedEvent("invalid_event", f"Invalid CloudEvent extension name(s): {', '.join(sorted(bad))}.")
    extensions = {key: _extension_value(key, value) for key, value in extensions.items()}
    if "traceparent" in extensions or "tracestate" in extensions:  # Distributed Tracing: W3C values only
        problem = tracing.check_extensions(extensions)
        if problem:
            raise MalformedEvent("invalid_event", problem)
    extensions.pop("kitecursor", None)  # a read position of the sender's store means nothing here
    extensions.pop("kitefedpeer", None)  # who handed it to us is for the receiver to say, never the sender
    data = payload.get("data")
    subject = payload.get("subject")
    dataschema = payload.get("dataschema")
    binary = _data_base64(payload)
    return Draft(
        id=_text(payload["id"], "id"),
        type=_text(payload["type"], "type"),
        source=_text(payload["source"], "source"),
        time=_unix_time(payload.get("time"), received_at),
        subject=_text(subject, "subject") if subject not in (None, "") else "",
        datacontenttype=_text(payload.get("datacontenttype") or "application/json", "datacontenttype")[:100],
        # ASCII-escaped: a lone surrogate inside data must not reach the database raw.
        data_json=json.dumps(binary if binary is not None else data, separators=(",", ":")),
        extensions=extensions,
        agent=_agent_of(payload["type"], data),
        dataschema=_text(dataschema, "dataschema") if dataschema not in (None, "") else "",
        data_base64=binary is not None,
    )


def _data_base64(payload: dict) -> str | None:
    """`data_base64` of the JSON event format (binary data), as canonical base64, or None."""
    if "data_base64" not in payload:
        return None
    if payload.get("data") is not None:
        raise MalformedEvent("invalid_event", "A CloudEvent has `data` or `data_base64`, not both.")
    try:
        return base64.b64encode(base64.b64decode(payload["data_base64"], validate=True)).decode()
    except (TypeError, ValueError, binascii.Error):
        raise MalformedEvent("invalid_event", "CloudEvent attribute `data_base64` must be a base64 string.") from None


# --- A CloudEvents producer (a `cloudevents` source): the HTTP protocol binding 1.0 -------------

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
DATA_BASE64 = "data_base64"  # stored among an event's extensions: its data is binary, kept as base64
RESERVED_EXTENSION_PREFIX = "kite"  # Kite's own extensions: never taken from a producer
MAX_DATA_DEPTH = 100
MAX_DATACONTENTTYPE = 100  # the stored column's width: refused beyond, never cut
_JSON_MEDIA = re.compile(r"^(application|text)/([a-z0-9.+-]+\+)?json$")  # as the CloudEvents SDKs read it
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_OPTIONAL_STRINGS = ("subject", "datacontenttype", "dataschema", "time")
_INT32 = range(-(2**31), 2**31)


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_json_media(content_type: str) -> bool:
    return bool(_JSON_MEDIA.match(_media_type(content_type)))


def from_cloudevents(headers, body: bytes, received_at: datetime) -> Draft | list:
    """Structured mode, a batch (a list: a Draft or the MalformedEvent of each event) or binary mode."""
    media = _media_type(headers.get("content-type", ""))
    if media in (STRUCTURED_CONTENT_TYPE, BATCH_CONTENT_TYPE):
        payload = parse_json(body)
        if media == STRUCTURED_CONTENT_TYPE:
            if not isinstance(payload, dict):
                raise MalformedEvent("invalid_event", "A structured CloudEvent is a JSON object.")
            return producer_draft(payload, received_at)
        if not isinstance(payload, list) or not 0 < len(payload) <= MAX_BATCH:
            raise MalformedEvent("invalid_event", f"A CloudEvents batch is a JSON array of 1-{MAX_BATCH} events.")
        return [_draft_or_error(item, received_at, producer_draft) for item in payload]
    if media.startswith("application/cloudevents"):
        detail = f"{media[:100]!r}: Kite reads the JSON event format ({STRUCTURED_CONTENT_TYPE}, a batch) or binary mode."
        raise MalformedEvent("unsupported_media_type", detail, status=415)
    if not any(name.startswith("ce-") for name in headers):
        raise MalformedEvent("invalid_event", "CloudEvent attribute `specversion` is missing: send structured "
                             f"({STRUCTURED_CONTENT_TYPE}), batched or binary mode (ce-* headers).")  # fmt: skip
    return producer_draft(binary_mode_event(headers, body), received_at)


def binary_mode_event(headers, body: bytes) -> dict:
    """The event a binary-mode request carries, as the JSON event format would write it: JSON data
    parsed, other data as a string when it is UTF-8 text, as `data_base64` when it is not."""
    event = {}
    for name, value in headers.items():
        if not name.startswith("ce-"):
            continue
        attribute = name[3:]
        if attribute in ("data", "datacontenttype", "data-base64"):
            raise MalformedEvent("invalid_event", f"Header {name} is not a CloudEvents attribute in binary mode: "
                                 "the data is the body and its type the Content-Type.")  # fmt: skip
        event[attribute] = _header_value(name, value)
    if headers.get("content-type"):
        event["datacontenttype"] = headers["content-type"]
    if not body:
        return event
    if is_json_media(event.get("datacontenttype", "application/json")):
        event["data"] = parse_json(body)
        return event
    try:
        event["data"] = body.decode("utf-8")
    except UnicodeDecodeError:
        event["data_base64"] = base64.b64encode(body).decode()
    return event


def _header_value(name: str, value: str) -> str:
    """HTTP binding §3.1.3.2: printable ASCII, anything else percent-encoded UTF-8."""
    try:
        if not value.isascii():
            raise ValueError
        return unquote_to_bytes(value).decode("utf-8")
    except ValueError:  # UnicodeDecodeError too
        raise MalformedEvent("invalid_event", f"Header {name} must be printable ASCII, other characters "
                             "percent-encoded UTF-8.") from None  # fmt: skip


def producer_draft(event: dict, received_at: datetime) -> Draft:
    """A producer's event, checked as the CloudEvents spec says (each refusal names the attribute)
    and refused when it claims what only Kite may say (a kite* extension, a kite: source)."""
    _check_attributes(event)
    time = _rfc3339_time(event["time"]) if "time" in event else received_at
    draft = draft_from_cloudevent(event, received_at)
    draft.time = time
    return draft


def _check_attributes(event: dict) -> None:
    if "specversion" not in event:
        raise MalformedEvent("invalid_event", "CloudEvent attribute `specversion` is missing.")
    if event["specversion"] != "1.0":
        raise MalformedEvent("invalid_event", 'CloudEvent attribute `specversion` must be "1.0".')
    for name in ("id", "source", "type"):
        if name not in event:
            raise MalformedEvent("invalid_event", f"CloudEvent attribute `{name}` is missing.")
        if not isinstance(event[name], str) or not event[name]:
            raise MalformedEvent("invalid_event", f"CloudEvent attribute `{name}` must be a non-empty string.")
    for name in _OPTIONAL_STRINGS:
        if name in event and (not isinstance(event[name], str) or not event[name]):
            raise MalformedEvent("invalid_event", f"CloudEvent attribute `{name}` must be a non-empty string.")
    if len(event.get("datacontenttype", "")) > MAX_DATACONTENTTYPE:
        raise MalformedEvent("invalid_event", f"CloudEvent attribute `datacontenttype` must be at most "
                             f"{MAX_DATACONTENTTYPE} characters.")  # fmt: skip
    if event["source"].lower().startswith("kite:"):
        raise MalformedEvent("invalid_event", "CloudEvent attribute `source` must not be a kite: URI: those name "
                             "the events Kite receives itself.")  # fmt: skip
    _check_extensions(event)
    if _deeper_than(event.get("data"), MAX_DATA_DEPTH):
        raise MalformedEvent("invalid_event", f"CloudEvent `data` is nested deeper than {MAX_DATA_DEPTH} levels.")


def _check_extensions(event: dict) -> None:
    for name, value in event.items():
        if name in _CORE_ATTRIBUTES:
            continue
        if not _EXTENSION_NAME.match(name):
            raise MalformedEvent("invalid_event", f"CloudEvent extension name {name[:40]!r} must be 1-20 lower-case "
                                 "letters (a-z) and digits.")  # fmt: skip
        if name.startswith(RESERVED_EXTENSION_PREFIX):
            raise MalformedEvent("invalid_event", f"CloudEvent extension `{name}` is reserved: extensions named "
                                 f"{RESERVED_EXTENSION_PREFIX}* are Kite's own.")  # fmt: skip
        if isinstance(value, int) and not isinstance(value, bool) and value not in _INT32:
            raise MalformedEvent("invalid_event", f"Extension `{name}` is an Integer: a signed 32-bit number.")


def _rfc3339_time(value: str) -> datetime:
    try:
        if not _RFC3339.match(value):
            raise ValueError
        return datetime.fromisoformat(value.upper().replace("Z", "+00:00")).astimezone(UTC)
    except (ValueError, OverflowError):
        raise MalformedEvent("invalid_event", "CloudEvent attribute `time` must be an RFC 3339 timestamp.") from None


def _deeper_than(value: Any, limit: int) -> bool:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


CONVERTERS = {
    "stripe": from_stripe,
    "github": from_github,
    "standard": from_standard,
    "cloudevents": from_cloudevents,
    "none": from_unverified,
    "kite": from_structured,
}


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
