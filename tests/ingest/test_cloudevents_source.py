"""A `cloudevents` source: CloudEvents producers post structured, binary or batched events (HTTP protocol
binding 1.0), signed with Standard Webhooks or sent with the source's bearer token; Kite keeps every attribute
the producer set and refuses what only Kite may say."""

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from django.conf import settings

from ingest.models import Event, Source
from kite import crypto
from tests.signing import standard_webhook_headers

# The API shows only events of transactions older than every running one: tests that read it commit for real.
committed = pytest.mark.django_db(transaction=True)
BATCH = "application/cloudevents-batch+json"
STRUCTURED = "application/cloudevents+json"


def assert_error(response, status: int, code: str, naming: str | None = None):
    body = response.json()
    assert (response.status_code, body["code"]) == (status, code), body
    assert isinstance(body["detail"], str) and body["detail"]
    if naming:
        assert naming in body["detail"], body["detail"]


@pytest.fixture
def signed(api):
    return api.post("/api/sources", {"name": "producer", "kind": "cloudevents"}, format="json").json()


@pytest.fixture
def tokened(api):
    return api.post("/api/sources", {"name": "tokened", "kind": "cloudevents", "auth": "token"}, format="json").json()


def send(client, team, source: dict, message: HTTPMessage | tuple, *, sign=True, token=None, signed_at=None,
         msg_id="msg-1", name=None):  # fmt: skip
    """POST a message (the SDK's HTTPMessage, or (headers, body)) to a source's hook URL."""
    headers, body = (message.headers, message.body) if isinstance(message, HTTPMessage) else message
    headers = {name.lower(): value for name, value in headers.items()}
    content_type = headers.pop("content-type", "application/octet-stream")
    if sign:
        headers.update(signature_headers(source["secret"], msg_id, body, signed_at))
    if token:
        headers["authorization"] = f"Bearer {token}"
    return client.post(f"/hooks/{team.id}/{name or source['name']}", body, content_type=content_type, headers=headers)


def signature_headers(secret: str, msg_id: str, body: bytes, signed_at: int | None = None) -> dict[str, str]:
    """Standard Webhooks headers: from the reference library when the body is text (it signs str only),
    by the spec's recipe (HMAC-SHA256 of "id.timestamp.body", base64) for binary data."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        signed_at = int(time.time()) if signed_at is None else signed_at
        key = base64.b64decode(secret.removeprefix("whsec_"))
        digest = hmac.new(key, f"{msg_id}.{signed_at}.".encode() + body, hashlib.sha256).digest()
        return {"webhook-id": msg_id, "webhook-timestamp": str(signed_at),
                "webhook-signature": "v1," + base64.b64encode(digest).decode()}  # fmt: skip
    return standard_webhook_headers(secret, msg_id, body, signed_at)


def stored_as_kite_answers(api) -> list[dict]:
    return api.get("/api/events?source=producer").json()["results"] + api.get(
        "/api/events?source=tokened"
    ).json()["results"]


def assert_same_event(sent: CloudEvent, answered: dict) -> None:
    """Attribute by attribute: what the SDK reads from the request Kite got, and what Kite gives back."""
    kept = JSONFormat().read(None, json.dumps(answered).encode())
    expected = dict(sent.get_attributes())
    expected.setdefault("datacontenttype", "application/json")
    actual = dict(kept.get_attributes())
    assert actual.pop("kitecursor")
    assert actual == expected
    assert kept.get_data() == sent.get_data()


def producer_event(data=None, **attributes) -> CloudEvent:
    base = {"type": "com.example.order.created", "source": "https://shop.example.com/orders", "id": "ord-1",
            "subject": "orders/1", "dataschema": "https://shop.example.com/schemas/order.json",
            "tenant": "acme", "priority": 5, "urgent": True}  # fmt: skip
    return CloudEvent({**base, **attributes}, data)


# --- creating the source ------------------------------------------------------------------------


def test_cloudevents_source_gets_a_generated_standard_webhooks_secret_shown_once(api, team):
    response = api.post("/api/sources", {"name": "producer", "kind": "cloudevents"}, format="json")

    assert response.status_code == 201
    body = response.json()
    assert body["secret"].startswith("whsec_") and (body["kind"], body["auth"]) == ("cloudevents", "signature")
    assert "secret" not in json.dumps(api.get("/api/sources").json()["results"]).replace("secret_fingerprint", "")


def test_token_source_shows_its_token_once_and_keeps_only_its_hash(api, team):
    response = api.post("/api/sources", {"name": "tokened", "kind": "cloudevents", "auth": "token"}, format="json")

    assert response.status_code == 201
    body = response.json()
    token = body["token"]
    assert token.startswith("kce_") and len(token) > 40 and "secret" not in body
    assert body["auth"] == "token" and body["secret_fingerprint"] == crypto.fingerprint(token)
    row = Source.objects.get(team=team, name="tokened")
    assert row.token_sha256 == crypto.sha256_hex(token) and row.secret_encrypted == ""
    assert token not in json.dumps(list(Source.objects.filter(pk=row.pk).values()), default=str)
    assert token not in api.get("/api/sources").content.decode()


@pytest.mark.parametrize(
    "body, naming",
    [
        ({"name": "t", "kind": "cloudevents", "auth": "token", "secret": "whsec_c2VjcmV0c2VjcmV0"}, "secret"),
        ({"name": "t", "kind": "stripe", "auth": "token"}, "auth"),
        ({"name": "t", "kind": "none", "auth": "signature"}, "auth"),
        ({"name": "t", "kind": "cloudevents", "auth": "open"}, "auth"),
        ({"name": "t", "kind": "cloudevents", "auth": None}, "auth"),
    ],
)
def test_a_source_auth_that_cannot_apply_is_400_and_nothing_created(api, team, body, naming):
    before = Source.objects.count()

    response = api.post("/api/sources", body, format="json")

    assert response.status_code == 400 and naming in json.dumps(response.json())
    assert Source.objects.count() == before


# --- the three content modes, compared attribute by attribute with the SDK ----------------------


@committed
def test_structured_mode_keeps_every_attribute_and_extension(api, client, team, signed):
    at = datetime(2026, 3, 1, 10, 20, 30, 123456, tzinfo=UTC)
    sent = producer_event({"total": 42, "items": [{"sku": "a", "qty": 2}]}, time=at)
    message = to_structured_event(sent)

    response = send(client, team, signed, message)

    assert (response.status_code, response.json()) == (202, {"id": "ord-1", "duplicate": False})
    (answered,) = stored_as_kite_answers(api)
    assert_same_event(from_http_event(message), answered)
    assert answered["source"] == "https://shop.example.com/orders"  # the producer's, not a kite:// one
    assert (answered["tenant"], answered["priority"], answered["urgent"]) == ("acme", 5, True)


@committed
def test_binary_mode_json_data_keeps_every_attribute(api, client, team, signed):
    sent = producer_event({"total": 7}, datacontenttype="application/json; charset=utf-8")
    message = to_binary_event(sent)
    assert "ce-tenant" in message.headers and message.body == b'{"total": 7}'

    assert send(client, team, signed, message).status_code == 202

    (answered,) = stored_as_kite_answers(api)
    # Binary mode carries extensions as text: the SDK reads 5 and True back as "5" and "True", as Kite keeps them.
    assert_same_event(from_http_event(message), answered)
    assert (answered["priority"], answered["datacontenttype"]) == ("5", "application/json; charset=utf-8")


@committed
def test_binary_mode_binary_data_is_kept_byte_for_byte_as_data_base64(api, client, team, signed):
    payload = bytes(range(256)) * 3
    message = to_binary_event(producer_event(payload, datacontenttype="application/octet-stream"))

    assert send(client, team, signed, message).status_code == 202

    (answered,) = stored_as_kite_answers(api)
    assert "data" not in answered and base64.b64decode(answered["data_base64"]) == payload
    assert_same_event(from_http_event(message), answered)
    assert Event.objects.get(ce_id="ord-1").to_cloudevent()["data_base64"] == answered["data_base64"]


@committed
def test_binary_mode_text_data_is_kept_as_a_string(api, client, team, signed):
    text = "<order id='1'>café ☕</order>\n"
    message = to_binary_event(producer_event(text, datacontenttype="application/xml"))

    assert send(client, team, signed, message).status_code == 202

    (answered,) = stored_as_kite_answers(api)
    assert answered["data"] == text
    assert_same_event(from_http_event(message), answered)


@committed
def test_binary_mode_percent_encoded_attributes_are_decoded(api, client, team, signed):
    message = to_binary_event(producer_event({"a": 1}, subject="naïve 100% \"quoted\""))
    assert "%" in message.headers["ce-subject"]

    assert send(client, team, signed, message).status_code == 202

    (answered,) = stored_as_kite_answers(api)
    assert answered["subject"] == 'naïve 100% "quoted"'


@committed
def test_structured_mode_binary_data_comes_back_as_data_base64(api, client, team, signed):
    message = to_structured_event(producer_event(b"\x00\x01\xfe\xff", datacontenttype="image/png"))
    assert b"data_base64" in message.body

    assert send(client, team, signed, message).status_code == 202

    (answered,) = stored_as_kite_answers(api)
    assert answered["data_base64"] == "AAH+/w=="
    assert_same_event(from_http_event(message), answered)


@committed
def test_an_event_is_stored_once_per_source_and_id(api, client, team, signed):
    first = to_structured_event(producer_event({"n": 1}))
    again = to_binary_event(producer_event({"n": 2}))  # same source and id, another mode and data
    elsewhere = to_structured_event(producer_event({"n": 3}, source="https://other.example.com/orders"))

    answers = [send(client, team, signed, m, msg_id=f"m{i}") for i, m in enumerate([first, again, elsewhere])]

    assert [(r.status_code, r.json()["duplicate"]) for r in answers] == [(202, False), (200, True), (202, False)]
    kept = stored_as_kite_answers(api)
    assert [(e["source"], e["data"]["n"]) for e in kept] == [
        ("https://shop.example.com/orders", 1), ("https://other.example.com/orders", 3)]  # fmt: skip


@committed
def test_batch_answers_one_result_per_event(api, client, team, signed):
    good = json.loads(to_structured_event(producer_event({"n": 1}, id="b-1")).body)
    other = json.loads(to_structured_event(producer_event({"n": 2}, id="b-2")).body)
    missing_type = {k: v for k, v in good.items() if k != "type"} | {"id": "b-3"}
    reserved = {**good, "id": "b-4", "kitefedorigin": "elsewhere"}
    body = json.dumps([good, other, good, missing_type, reserved]).encode()

    response = send(client, team, signed, ({"content-type": BATCH}, body))

    assert response.status_code == 200
    results = response.json()
    assert [(r["id"], r["result"]) for r in results] == [
        ("b-1", "accepted"), ("b-2", "accepted"), ("b-1", "duplicate"), ("", "rejected"), ("", "rejected")]  # fmt: skip
    assert "type" in results[3]["detail"] and "kitefedorigin" in results[4]["detail"]
    assert sorted(e["id"] for e in stored_as_kite_answers(api)) == ["b-1", "b-2"]


@committed
def test_event_without_time_gets_the_time_it_arrived(api, client, team, signed):
    event = {"specversion": "1.0", "id": "no-time", "source": "urn:example", "type": "t"}
    before = time.time()

    assert send(client, team, signed, ({"content-type": STRUCTURED}, json.dumps(event).encode())).status_code == 202

    (answered,) = stored_as_kite_answers(api)
    assert before - 1 <= JSONFormat().read(None, json.dumps(answered)).get_time().timestamp() <= time.time() + 1
    assert "subject" not in answered and "dataschema" not in answered


# --- authentication -----------------------------------------------------------------------------


@committed
def test_token_source_takes_its_bearer_token(api, client, team, tokened):
    message = to_binary_event(producer_event({"n": 1}))

    response = send(client, team, tokened, message, sign=False, token=tokened["token"])

    assert response.status_code == 202
    assert [e["id"] for e in stored_as_kite_answers(api)] == ["ord-1"]


@pytest.fixture
def events_before():
    return Event.objects.count()


def assert_nothing_stored(events_before):
    assert Event.objects.count() == events_before


def altered(token: str) -> str:
    """The token with its last character changed (to "A", or to "B" when it already is "A")."""
    return token[:-1] + ("B" if token.endswith("A") else "A")


def test_token_source_refuses_a_missing_wrong_or_other_sources_token(api, client, team, tokened, events_before):
    other = api.post("/api/sources", {"name": "other", "kind": "cloudevents", "auth": "token"}, format="json").json()
    message = to_structured_event(producer_event({"n": 1}))
    signed_only = dict(tokened, secret=api.post("/api/sources", {"name": "s2", "kind": "cloudevents"},
                                                format="json").json()["secret"])  # fmt: skip

    answers = {
        "none": send(client, team, tokened, message, sign=False),
        "other source's": send(client, team, tokened, message, sign=False, token=other["token"]),
        "altered": send(client, team, tokened, message, sign=False, token=altered(tokened["token"])),
        "signature instead": send(client, team, signed_only, message),
        "basic": send(client, team, tokened, ({"content-type": STRUCTURED, "authorization": "Basic " +
                                               tokened["token"]}, message.body), sign=False),  # fmt: skip
    }

    assert_error(answers["none"], 401, "missing_token")
    assert_error(answers["other source's"], 401, "bad_token")
    assert_error(answers["altered"], 401, "bad_token")
    assert_error(answers["signature instead"], 401, "missing_token")
    assert_error(answers["basic"], 401, "missing_token")
    assert_nothing_stored(events_before)


def test_signed_source_refuses_unsigned_bad_stale_and_tampered_requests(api, client, team, signed, events_before):
    message = to_structured_event(producer_event({"n": 1}))
    tampered = message.body.replace(b'"n": 1', b'"n": 2')
    headers = signature_headers(signed["secret"], "m1", message.body)

    unsigned = send(client, team, signed, message, sign=False)
    bearer = send(client, team, signed, message, sign=False, token=signed["secret"])
    wrong_secret = send(client, team, dict(signed, secret="whsec_" + "A" * 43), message)
    stale = send(client, team, signed, message, signed_at=int(time.time()) - 301)
    future = send(client, team, signed, message, signed_at=int(time.time()) + 301)
    replayed_onto_other_body = send(client, team, signed, ({**message.headers, **headers}, tampered), sign=False)

    for response in (unsigned, bearer):
        assert_error(response, 401, "missing_signature")
    for response in (wrong_secret, replayed_onto_other_body):
        assert_error(response, 401, "bad_signature")
    for response in (stale, future):
        assert_error(response, 401, "stale_timestamp")
    assert_nothing_stored(events_before)


def test_a_replayed_signed_request_is_stored_once(api, client, team, signed):
    message = to_structured_event(producer_event({"n": 1}))
    headers = {**message.headers, **signature_headers(signed["secret"], "m1", message.body)}

    first = send(client, team, signed, (headers, message.body), sign=False)
    replay = send(client, team, signed, (headers, message.body), sign=False)

    assert (first.status_code, replay.status_code, replay.json()["duplicate"]) == (202, 200, True)
    assert Event.objects.filter(team=team).exclude(source__name="kite").count() == 1


def test_wrong_team_is_404_or_that_teams_own_secret(api, outsider_api, client, team, other_team, signed,
                                                    events_before):  # fmt: skip
    message = to_structured_event(producer_event({"n": 1}))

    no_such_source = send(client, other_team, signed, message)
    outsider_api.post("/api/sources", {"name": "producer", "kind": "cloudevents"}, format="json")
    other_teams_source = send(client, other_team, signed, message)
    no_such_team = send(client, type("T", (), {"id": "no-such-team"}), signed, message)

    assert_error(no_such_source, 404, "unknown_source")
    assert_error(other_teams_source, 401, "bad_signature")
    assert_error(no_such_team, 404, "unknown_team")
    assert_nothing_stored(events_before)


def test_cloudevents_source_is_never_open(api, client, team, signed, tokened, events_before):
    plain = ({"content-type": "application/json"}, b'{"id": "x", "type": "t"}')

    assert_error(send(client, team, signed, plain, sign=False), 401, "missing_signature")
    assert_error(send(client, team, tokened, plain, sign=False), 401, "missing_token")
    assert_nothing_stored(events_before)


# --- refused events -----------------------------------------------------------------------------


def test_oversized_body_is_413_and_nothing_stored(client, team, signed, events_before):
    message = to_structured_event(producer_event({"blob": "x" * settings.KITE_MAX_BODY_BYTES}))

    assert_error(send(client, team, signed, message), 413, "payload_too_large")
    assert_nothing_stored(events_before)


def test_deeply_nested_data_is_400_and_nothing_stored(client, team, signed, events_before):
    deep = {"specversion": "1.0", "id": "d", "source": "urn:x", "type": "t", "data": []}
    inner = deep["data"]
    for _ in range(100):
        inner.append([])
        inner = inner[0]
    just_enough = json.loads(json.dumps(deep))
    just_enough["data"] = just_enough["data"][0]  # 100 levels
    bomb = b'{"specversion":"1.0","id":"b","source":"urn:x","type":"t","data":' + b"[" * 200_000 + b"]" * 200_000 + b"}"

    too_deep = send(client, team, signed, ({"content-type": STRUCTURED}, json.dumps(deep).encode()))
    binary_deep = send(client, team, signed, ({"content-type": "application/json", "ce-specversion": "1.0",
                                               "ce-id": "d", "ce-source": "urn:x", "ce-type": "t"},
                                              json.dumps(deep["data"]).encode()))  # fmt: skip
    exploded = send(client, team, signed, ({"content-type": STRUCTURED}, bomb))

    assert_error(too_deep, 400, "invalid_event", naming="100 levels")
    assert_error(binary_deep, 400, "invalid_event", naming="100 levels")
    assert_error(exploded, 400, "malformed_json")
    assert_nothing_stored(events_before)
    ok = send(client, team, signed, ({"content-type": STRUCTURED}, json.dumps(just_enough).encode()))
    assert ok.status_code == 202


def test_a_batch_of_10000_events_is_400_and_nothing_stored(client, team, signed, events_before):
    events = [{"specversion": "1.0", "id": str(i), "source": "urn:x", "type": "t"} for i in range(10_000)]
    body = json.dumps(events, separators=(",", ":")).encode()
    assert len(body) < settings.KITE_MAX_BODY_BYTES  # refused for its count, not its size

    response = send(client, team, signed, ({"content-type": BATCH}, body))

    assert_error(response, 400, "invalid_event", naming="1-1000")
    assert_nothing_stored(events_before)


@pytest.mark.parametrize("batch", [b"[]", b"{}", b'"x"'])
def test_a_batch_that_is_not_a_list_of_events_is_400(client, team, signed, events_before, batch):
    assert_error(send(client, team, signed, ({"content-type": BATCH}, batch)), 400, "invalid_event")
    assert_nothing_stored(events_before)


RESERVED = ["kitefedorigin", "kitefedchain", "kitefedhops", "kitefedpeer", "kitecursor", "kiteunverified", "kitex"]


@pytest.mark.parametrize("name", RESERVED)
def test_kites_own_extensions_are_refused_in_every_mode(client, team, signed, events_before, name):
    event = {"specversion": "1.0", "id": "r", "source": "urn:x", "type": "t", name: "1"}
    binary = {"content-type": "application/json", **{f"ce-{k}": v for k, v in event.items()}}

    structured = send(client, team, signed, ({"content-type": STRUCTURED}, json.dumps(event).encode()))
    in_headers = send(client, team, signed, (binary, b"{}"))
    in_batch = send(client, team, signed, ({"content-type": BATCH}, json.dumps([event]).encode()))

    assert_error(structured, 400, "invalid_event", naming=name)
    assert_error(in_headers, 400, "invalid_event", naming=name)
    assert (in_batch.status_code, in_batch.json()[0]["result"]) == (200, "rejected")
    assert name in in_batch.json()[0]["detail"]
    assert_nothing_stored(events_before)


VALID = {"specversion": "1.0", "id": "v", "source": "urn:x", "type": "t"}


@pytest.mark.parametrize(
    "change, naming",
    [
        ({"specversion": None}, "specversion"),
        ({"id": None}, "`id`"),
        ({"source": None}, "`source`"),
        ({"type": None}, "`type`"),
        ({"specversion": "0.3"}, "specversion"),
        ({"specversion": 1.0}, "specversion"),
        ({"id": 5}, "`id`"),
        ({"id": ""}, "`id`"),
        ({"source": ["urn:x"]}, "`source`"),
        ({"type": {"t": 1}}, "`type`"),
        ({"time": "yesterday"}, "`time`"),
        ({"time": 1700000000}, "`time`"),
        ({"subject": ""}, "`subject`"),
        ({"dataschema": 3}, "`dataschema`"),
        ({"datacontenttype": "x/" + "y" * 100}, "`datacontenttype`"),
        ({"source": "kite://instance/team/stripe"}, "`source`"),
        ({"Tenant": "a"}, "Tenant"),
        ({"my_ext": "a"}, "my_ext"),
        ({"a" * 21: "a"}, "a" * 21),
        ({"ext": 1.5}, "ext"),
        ({"ext": {"nested": 1}}, "ext"),
        ({"ext": 2**31}, "ext"),
        ({"data": 1, "data_base64": "AA=="}, "data_base64"),
        ({"data_base64": "not base64!"}, "data_base64"),
    ],
)
def test_a_malformed_event_is_400_naming_the_attribute_and_nothing_stored(client, team, signed, events_before,
                                                                           change, naming):  # fmt: skip
    event = {k: v for k, v in {**VALID, **change}.items() if v is not None}

    response = send(client, team, signed, ({"content-type": STRUCTURED}, json.dumps(event).encode()))

    assert_error(response, 400, "invalid_event", naming=naming)
    assert_nothing_stored(events_before)


@pytest.mark.parametrize(
    "headers, naming",
    [
        ({"ce-id": "1", "ce-source": "urn:x", "ce-type": "t"}, "specversion"),
        ({"ce-specversion": "1.0", "ce-source": "urn:x", "ce-type": "t"}, "`id`"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t"}, "`source`"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "urn:x"}, "`type`"),
        ({**{f"ce-{k}": v for k, v in VALID.items()}, "ce-time": "2026-13-01T00:00:00Z"}, "`time`"),
        ({**{f"ce-{k}": v for k, v in VALID.items()}, "ce-subject": "%FF%FE"}, "ce-subject"),
        ({**{f"ce-{k}": v for k, v in VALID.items()}, "ce-datacontenttype": "text/plain"}, "ce-datacontenttype"),
        ({}, "specversion"),
    ],
)
def test_a_malformed_binary_mode_event_is_400_naming_the_attribute(client, team, signed, events_before, headers,
                                                                   naming):  # fmt: skip
    response = send(client, team, signed, ({"content-type": "application/json", **headers}, b'{"a": 1}'))

    assert_error(response, 400, "invalid_event", naming=naming)
    assert_nothing_stored(events_before)


def test_json_data_that_is_not_json_is_400(client, team, signed, events_before):
    headers = {"content-type": "application/json", **{f"ce-{k}": v for k, v in VALID.items()}}

    assert_error(send(client, team, signed, (headers, b"{not json")), 400, "malformed_json")
    assert_nothing_stored(events_before)


def test_another_event_format_is_415(client, team, signed, events_before):
    response = send(client, team, signed, ({"content-type": "application/cloudevents+avro"}, b"\x00"))

    assert_error(response, 415, "unsupported_media_type")
    assert_nothing_stored(events_before)


# --- the abuse-protection handshake (CloudEvents HTTP Webhook §4) -------------------------------


def test_options_grants_the_origin_and_the_rate(api, client, team, signed):
    limited = api.post("/api/sources", {"name": "limited", "kind": "cloudevents", "rate_limit_per_second": 5},
                       format="json")  # fmt: skip
    assert limited.status_code == 201
    origin = {"WebHook-Request-Origin": "eventemitter.example.com"}

    open_rate = client.options(f"/hooks/{team.id}/producer", headers=origin)
    five_a_second = client.options(f"/hooks/{team.id}/limited", headers={**origin, "WebHook-Request-Rate": "1000"})

    assert open_rate.status_code == 200 and open_rate["WebHook-Allowed-Origin"] == "eventemitter.example.com"
    assert open_rate["WebHook-Allowed-Rate"] == "*" and "OPTIONS" in open_rate["Allow"]
    assert (five_a_second.status_code, five_a_second["WebHook-Allowed-Rate"]) == (200, "300")


def test_options_on_an_unknown_team_or_source_answers_as_a_post_would(client, team, signed):
    origin = {"WebHook-Request-Origin": "eventemitter.example.com"}
    body = to_structured_event(producer_event({"n": 1}))

    for path, code in [("/hooks/no-such-team/producer", "unknown_team"), (f"/hooks/{team.id}/nope", "unknown_source")]:
        options = client.options(path, headers=origin)
        post = client.post(path, body.body, content_type=STRUCTURED)
        assert_error(options, 404, code)
        assert options.json() == post.json()
        assert "WebHook-Allowed-Origin" not in options


@pytest.mark.parametrize(
    "headers", [{}, {"WebHook-Request-Origin": "evil.example.com\tX-Injected: 1"}, {"WebHook-Request-Origin": "a b"},
                {"WebHook-Request-Origin": "x" * 300}, {"WebHook-Request-Origin": "https://e.example.com/path"},
                {"WebHook-Request-Origin": "*"}]
)  # fmt: skip
def test_options_without_a_sane_origin_is_400(client, team, signed, headers):
    response = client.options(f"/hooks/{team.id}/producer", headers=headers)

    assert_error(response, 400, "invalid")
    assert "WebHook-Allowed-Origin" not in response


def test_options_on_a_source_of_another_kind_is_405(api, client, team):
    api.post("/api/sources", {"name": "stripe", "kind": "stripe"}, format="json")

    response = client.options(f"/hooks/{team.id}/stripe", headers={"WebHook-Request-Origin": "e.example.com"})

    assert_error(response, 405, "method_not_allowed")
    assert "WebHook-Allowed-Origin" not in response


# --- what a peer receives of it -----------------------------------------------------------------


@pytest.mark.parametrize("data", [b"\x00\xff binary", "text, not JSON", {"json": [1, 2]}])
def test_a_peer_reading_the_event_as_federation_sends_it_stores_the_same_event(client, team, signed, data):
    """The outbox sends Event.to_cloudevent() in structured mode; the receiving Kite's `kite` source
    converter must give back the same attributes: dataschema, data_base64 and extensions included."""
    from django.utils import timezone

    from ingest import cloudevent, services

    content_type = "application/json" if isinstance(data, dict) else "application/octet-stream"
    assert send(client, team, signed, to_binary_event(producer_event(data, datacontenttype=content_type))).status_code
    sent = Event.objects.get(ce_id="ord-1").to_cloudevent()
    del sent["kitecursor"]

    draft = cloudevent.CONVERTERS["kite"]({"content-type": STRUCTURED}, json.dumps(sent).encode(), timezone.now())
    received = services.new_event(Source.objects.get(team=team, name="producer"), draft)
    received.id, received.txid = 1, 0
    again = received.to_cloudevent()
    del again["kitecursor"]

    assert again == sent
    assert sent["dataschema"] == "https://shop.example.com/schemas/order.json"
    assert ("data_base64" in sent) == isinstance(data, bytes)


def test_options_carrying_a_signed_event_stores_nothing(client, team, signed, events_before):
    message = to_structured_event(producer_event({"n": 1}))
    headers = {**signature_headers(signed["secret"], "m1", message.body), "WebHook-Request-Origin": "e.example.com"}

    response = client.options(f"/hooks/{team.id}/producer", message.body, content_type=STRUCTURED, headers=headers)

    assert response.status_code == 200 and response.content == b""
    assert_nothing_stored(events_before)
