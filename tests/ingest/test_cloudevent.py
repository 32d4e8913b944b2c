"""Provider payloads → CloudEvent attributes, per source kind. No database."""

import hashlib
import json
from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest
from cloudevents.core.formats.json import JSONFormat

from ingest import cloudevent
from ingest.cloudevent import MalformedEvent
from ingest.models import Event

RECEIVED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def malformed(converter, body: bytes, headers=None) -> str:
    with pytest.raises(MalformedEvent) as caught:
        converter(headers or {}, body, RECEIVED)
    assert caught.value.detail
    return caught.value.code


# --- Stripe ---------------------------------------------------------------------


def test_stripe_event_becomes_com_stripe_type_with_the_provider_event_id():
    body = json.dumps({"id": "evt_3Ab", "type": "invoice.paid", "created": 1700000000, "data": {"x": 1}}).encode()

    draft = cloudevent.from_stripe({}, body, RECEIVED)

    assert (draft.id, draft.type) == ("evt_3Ab", "com.stripe.invoice.paid")
    assert draft.time == datetime.fromtimestamp(1700000000, tz=UTC)
    assert json.loads(draft.data_json) == json.loads(body)


def test_stripe_event_without_created_is_timed_at_reception():
    draft = cloudevent.from_stripe({}, b'{"id": "evt_1", "type": "charge.failed"}', RECEIVED)

    assert draft.time == RECEIVED


def test_stripe_event_without_id_gets_the_sha256_of_its_body():
    body = b'{"type": "charge.failed"}'

    draft = cloudevent.from_stripe({}, body, RECEIVED)

    assert draft.id == "sha256:" + hashlib.sha256(body).hexdigest()
    assert cloudevent.from_stripe({}, body, RECEIVED).id == draft.id
    assert cloudevent.from_stripe({}, body + b" ", RECEIVED).id != draft.id


@pytest.mark.parametrize("body", [b'{"id": "evt_1"}', b'{"type": ""}', b'{"type": 5}', b'["charge.failed"]', b'"x"'])
def test_stripe_event_without_a_string_type_is_invalid(body):
    assert malformed(cloudevent.from_stripe, body) == "invalid_event"


def test_stripe_body_that_is_not_json_is_malformed():
    assert malformed(cloudevent.from_stripe, b"{not json") == "malformed_json"


def test_stripe_id_longer_than_a_cloudevent_attribute_may_be_is_invalid():
    body = json.dumps({"id": "e" * 256, "type": "charge.failed"}).encode()

    assert malformed(cloudevent.from_stripe, body) == "invalid_event"


# --- GitHub -----------------------------------------------------------------------


def github_headers(event="pull_request", delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958", **extra):
    return {"x-github-event": event, "x-github-delivery": delivery, "content-type": "application/json", **extra}


def test_github_event_with_action_becomes_event_dot_action_with_the_delivery_id():
    body = json.dumps({"action": "opened", "number": 1}).encode()

    draft = cloudevent.from_github(github_headers(), body, RECEIVED)

    assert (draft.id, draft.type) == ("72d3162e-cc78-11e3-81ab-4c9367dc0958", "com.github.pull_request.opened")
    assert json.loads(draft.data_json) == {"action": "opened", "number": 1}


def test_github_event_without_action_is_just_the_event_name():
    draft = cloudevent.from_github(github_headers(event="push"), b'{"ref": "refs/heads/main"}', RECEIVED)

    assert draft.type == "com.github.push"


def test_github_form_encoded_delivery_is_read_from_its_payload_field():
    payload = json.dumps({"action": "created", "zen": "Keep it logically awesome."})
    body = urlencode({"payload": payload}).encode()
    headers = github_headers(event="issue_comment", **{"content-type": "application/x-www-form-urlencoded"})

    draft = cloudevent.from_github(headers, body, RECEIVED)

    assert draft.type == "com.github.issue_comment.created"
    assert json.loads(draft.data_json) == json.loads(payload)


def test_github_form_encoded_delivery_without_payload_field_is_malformed():
    headers = github_headers(**{"content-type": "application/x-www-form-urlencoded"})

    assert malformed(cloudevent.from_github, b"zen=hi", headers) == "malformed_json"


def test_github_delivery_without_event_header_is_invalid():
    assert malformed(cloudevent.from_github, b"{}", {"x-github-delivery": "d1"}) == "invalid_event"


def test_github_delivery_without_delivery_header_gets_the_sha256_of_its_payload():
    body = b'{"zen": "hi"}'

    draft = cloudevent.from_github({"x-github-event": "ping"}, body, RECEIVED)

    assert draft.id == "sha256:" + hashlib.sha256(body).hexdigest()


# --- Standard Webhooks and unverified sources ------------------------------------------


def standard_headers(msg_id="msg_2Lh9", timestamp=1714564800):
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": "v1,x"}


def test_standard_webhook_takes_its_id_from_webhook_id_and_type_from_the_payload():
    body = json.dumps({"type": "invoice.created", "timestamp": "2024-05-01T10:00:00Z", "data": {}}).encode()

    draft = cloudevent.from_standard(standard_headers(), body, RECEIVED)

    assert (draft.id, draft.type) == ("msg_2Lh9", "invoice.created")
    assert draft.time == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def test_standard_webhook_without_type_or_timestamp_uses_defaults():
    draft = cloudevent.from_standard(standard_headers(timestamp=1714564800), b"{}", RECEIVED)

    assert draft.type == "com.kite.webhook"
    assert draft.time == datetime.fromtimestamp(1714564800, tz=UTC)


def test_standard_webhook_with_timestamp_beyond_the_calendar_falls_back_instead_of_crashing():
    body = json.dumps({"type": "t", "timestamp": "0001-01-01T00:00:00+01:00"}).encode()

    draft = cloudevent.from_standard(standard_headers(), body, RECEIVED)

    assert draft.time == datetime.fromtimestamp(1714564800, tz=UTC)
    assert cloudevent.rfc3339(draft.time)  # and it can be rendered


def test_unverified_body_with_id_and_type_keeps_them():
    draft = cloudevent.from_plain({}, b'{"id": 42, "type": "deploy.finished"}', RECEIVED)

    assert (draft.id, draft.type, draft.time) == ("42", "deploy.finished", RECEIVED)


def test_unverified_body_without_id_gets_a_deterministic_id():
    body = b'[1, 2, 3]'

    first = cloudevent.from_plain({}, body, RECEIVED)

    assert first.id == "sha256:" + hashlib.sha256(body).hexdigest() == cloudevent.from_plain({}, body, RECEIVED).id
    assert first.type == "com.kite.webhook"


def test_agent_message_is_addressed_to_the_agent_named_in_data_to():
    body = json.dumps({"type": "com.kite.agent.message", "to": "https://kite.example.com/agents/builder-1"}).encode()

    assert cloudevent.from_plain({}, body, RECEIVED).agent == "builder-1"


def test_agent_message_without_a_valid_addressee_is_invalid():
    body = json.dumps({"type": "com.kite.agent.message", "to": "builder-1"}).encode()

    assert malformed(cloudevent.from_plain, body) == "invalid_event"


def test_an_event_of_a_none_source_says_it_is_unverified_wherever_it_goes():
    draft = cloudevent.CONVERTERS["none"]({}, b'{"id": "evt_1", "type": "x"}', RECEIVED)
    assert draft.extensions == {"kiteunverified": True}  # stored, shown, and kept when federated
    assert cloudevent.from_plain({}, b'{"id": "evt_1", "type": "x"}', RECEIVED).extensions == {}


# --- Bodies that parse as JSON somewhere but must not become events ---------------------------

CONVERTERS = {
    "stripe": (cloudevent.from_stripe, {}),
    "github": (cloudevent.from_github, github_headers()),
    "standard": (cloudevent.from_standard, standard_headers()),
    "none": (cloudevent.CONVERTERS["none"], {}),
}
NOT_PORTABLE_JSON = {
    "nan": b'{"id": "evt_1", "type": "x", "amount": NaN}',
    "infinity": b'{"id": "evt_1", "type": "x", "amount": -Infinity}',
    "float overflow": b'{"id": "evt_1", "type": "x", "amount": 1e400}',
    "utf-16": '{"id": "evt_1", "type": "x"}'.encode("utf-16"),
    "utf-32": '{"id": "evt_1", "type": "x"}'.encode("utf-32-le"),
    "utf-8 bom": b'\xef\xbb\xbf{"id": "evt_1", "type": "x"}',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "huge integer": b'{"id": "evt_1", "type": "x", "n": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("kind", CONVERTERS)
@pytest.mark.parametrize("body", NOT_PORTABLE_JSON.values(), ids=NOT_PORTABLE_JSON.keys())
def test_body_that_is_not_interoperable_json_is_malformed(kind, body):
    converter, headers = CONVERTERS[kind]

    assert malformed(converter, body, headers) == "malformed_json"


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": "evt\\u0000", "type": "charge.failed"}',
        b'{"id": "evt_1", "type": "charge\\u0000failed"}',
        b'{"id": "evt\\n1", "type": "charge.failed"}',
        b'{"id": "evt\\ud800", "type": "charge.failed"}',
    ],
    ids=["nul in id", "nul in type", "newline in id", "lone surrogate in id"],
)
def test_control_characters_in_id_or_type_are_invalid(body):
    assert malformed(cloudevent.from_stripe, body) == "invalid_event"


def test_unicode_ids_and_types_are_kept():
    draft = cloudevent.from_plain({}, json.dumps({"id": "évt-✓", "type": "café.ready"}).encode(), RECEIVED)

    assert (draft.id, draft.type) == ("évt-✓", "café.ready")


# --- Structured CloudEvents (federation) ---------------------------------------------------


def test_structured_cloudevent_keeps_its_source_and_extensions():
    payload = {
        "specversion": "1.0",
        "id": "e1",
        "source": "kite://kite-a/tm_1/stripe",
        "type": "com.stripe.charge.failed",
        "time": "2024-05-01T10:00:00Z",
        "kitefedhops": 1,
        "data": {"x": 1},
    }

    draft = cloudevent.from_structured({}, json.dumps(payload).encode(), RECEIVED)

    assert (draft.id, draft.source, draft.extensions) == ("e1", "kite://kite-a/tm_1/stripe", {"kitefedhops": 1})


@pytest.mark.parametrize(
    "change",
    [{"specversion": "0.3"}, {"id": ""}, {"source": None}, {"Bad_Ext": 1}],
    ids=["old specversion", "empty id", "no source", "bad extension name"],
)
def test_structured_cloudevent_that_breaks_the_spec_is_invalid(change):
    payload = {"specversion": "1.0", "id": "e1", "source": "s", "type": "t", **change}

    assert malformed(cloudevent.from_structured, json.dumps(payload).encode()) == "invalid_event"


# --- What the store gives back ---------------------------------------------------------------


def test_stored_event_renders_as_a_cloudevent_1_0_the_sdk_accepts():
    draft = cloudevent.from_stripe({}, b'{"id": "evt_1", "type": "charge.failed", "created": 1700000000}', RECEIVED)
    event = Event(
        id=7,
        txid=0,
        ce_id=draft.id,
        ce_source="kite://kite-test/tm_1/stripe",
        ce_type=draft.type,
        ce_time=draft.time,
        data=draft.data_json,
        extensions={"kitefedhops": 1},
    )

    parsed = JSONFormat().read(None, json.dumps(event.to_cloudevent()))

    assert parsed.get_specversion() == "1.0"
    assert (parsed.get_id(), parsed.get_type()) == ("evt_1", "com.stripe.charge.failed")
    assert parsed.get_time() == datetime.fromtimestamp(1700000000, tz=UTC)
    assert parsed.get_extension("kitecursor") == "0-7"
    assert parsed.get_data() == {"id": "evt_1", "type": "charge.failed", "created": 1700000000}


@pytest.mark.parametrize("data, binary, subject, extensions", [
    ('{"id": "evt_1",\n "n": [1, 2.5e-3, null, true], "s": "caf\u00e9 \\u2028 \\ud83d\\ude00"}', False, "", {}),
    ('123456789012345678901234567890', False, "order 7", {"kitefedhops": 1, "kitefedchain": '["a"]'}),
    ('"aGVsbG8="', True, "", {"dataschema": "https://example.com/s", "big": 2**70, "é": {"k": [None]}}),
    ("{}", False, "", {}),
])  # fmt: skip
def test_the_stored_event_as_json_bytes_is_to_cloudevent_with_its_data_as_stored(data, binary, subject, extensions):
    extensions = dict(extensions, **({cloudevent.DATA_BASE64: True} if binary else {}))
    event = Event(id=7, txid=3, ce_id="e1", ce_source="kite://kite-test/tm_1/s", ce_type="t", ce_time=RECEIVED,
                  ce_subject=subject, data=data, extensions=extensions)  # fmt: skip
    written = event.to_cloudevent_json()
    assert json.loads(written) == event.to_cloudevent()
    assert data.encode() in written  # copied, not parsed and encoded again (2**70 would have become a float)
    if not extensions:  # (the SDK takes only string, integer and boolean extension values)
        parsed = JSONFormat().read(None, written)
        assert parsed.get_id() == "e1" and parsed.get_extension("kitecursor") == "3-7"


def test_with_member_appends_a_json_text_to_any_object():
    assert cloudevent.with_member({}, "data", "[1]") == b'{"data":[1]}'
    assert cloudevent.with_member({"a": "é"}, 'x"y', "null") == '{"a":"é","x\\"y":null}'.encode()
    assert cloudevent.json_bytes({"n": 2**64}) == b'{"n":18446744073709551616}'  # past orjson's 64 bits
    assert cloudevent.json_bytes({1: "a"}) == b'{"1":"a"}'


def test_rfc3339_renders_utc_with_z():
    assert cloudevent.rfc3339(datetime(2024, 5, 1, 12, 0, tzinfo=UTC)) == "2024-05-01T12:00:00Z"


def test_an_empty_id_falls_back_to_the_body_digest():
    from datetime import UTC, datetime

    from ingest.cloudevent import body_digest_id, from_plain

    body = b'{"id": "", "type": "x.y"}'
    assert from_plain({}, body, datetime.now(UTC)).id == body_digest_id(body)
