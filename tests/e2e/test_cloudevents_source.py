"""A CloudEvents producer posts to a live instance over HTTPS (the SDK's own structured and binary messages, a
batch by hand): `kite listen` and /api/events give back every attribute it set; the refusals store nothing."""

import base64
import json
import secrets
import time
from datetime import UTC, datetime

import pytest
import requests
from cloudevents.core.bindings.http import from_http_event, to_binary_event, to_structured_event
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from tests.e2e.harness import wait_until_streaming
from tests.ingest.test_cloudevents_source import signature_headers
from tests.signing import standard_webhook_headers

pytestmark = pytest.mark.e2e
BATCH = "application/cloudevents-batch+json"


@pytest.fixture(scope="module")
def producer(shared_kite):
    name = f"ce-{secrets.token_hex(3)}"
    source = shared_kite.api("POST", "/api/sources", json={"name": name, "kind": "cloudevents"}).json()
    tokened = shared_kite.api("POST", "/api/sources", json={"name": f"{name}-t", "kind": "cloudevents",
                                                            "auth": "token"}).json()  # fmt: skip
    assert source["auth"] == "signature" and tokened["auth"] == "token"
    return source, tokened


def post(kite, source: dict, headers: dict, body: bytes, *, sign=True, token=None, path=None) -> requests.Response:
    headers = dict(headers)
    if sign:
        headers.update(signature_headers(source["secret"], f"m-{secrets.token_hex(4)}", body))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = kite.url + (path or f"/hooks/{kite.team_id()}/{source['name']}")
    return requests.post(url, data=body, headers=headers, verify=str(kite.cert), timeout=10)


def assert_same_event(sent: CloudEvent, answered: dict) -> None:
    kept = JSONFormat().read(None, json.dumps(answered).encode())
    expected = dict(sent.get_attributes())
    expected.setdefault("datacontenttype", "application/json")
    actual = dict(kept.get_attributes())
    assert actual.pop("kitecursor")
    assert actual == expected
    assert kept.get_data() == sent.get_data()


def stored(kite, source: dict) -> dict[str, dict]:
    events = kite.api("GET", f"/api/events?source={source['name']}&limit=1000").json()["results"]
    return {event["id"]: event for event in events}


def event(event_id: str, data, **attributes) -> CloudEvent:
    return CloudEvent({"type": "com.example.order.created", "source": "https://shop.example.com/orders",
                       "id": event_id, "subject": "orders/1", "dataschema": "https://shop.example.com/order.json",
                       "time": datetime(2026, 3, 1, 10, 20, 30, 123456, tzinfo=UTC), "tenant": "acme",
                       "priority": 5, **attributes}, data)  # fmt: skip


def test_structured_binary_and_batched_events_reach_kite_listen_and_the_api_attribute_by_attribute(
    shared_kite, producer, listen
):
    source, tokened = producer
    listener = listen(shared_kite, "--source", source["name"])
    marker = lambda marker_id: post(shared_kite, source, *_structured(event(marker_id, {"marker": True})))  # noqa: E731
    wait_until_streaming(listener, marker)
    messages = {
        "structured": to_structured_event(event("structured", {"total": 42, "lines": [{"sku": "a"}]})),
        "binary-json": to_binary_event(event("binary-json", {"total": 7})),
        "binary-bytes": to_binary_event(event("binary-bytes", bytes(range(256)),
                                              datacontenttype="application/octet-stream")),  # fmt: skip
        "binary-text": to_binary_event(event("binary-text", "café ☕ 100%", datacontenttype="text/plain")),
    }
    batch = [json.loads(to_structured_event(event(f"batch-{i}", {"i": i})).body) for i in range(3)]

    answers = {name: post(shared_kite, source, m.headers, m.body) for name, m in messages.items()}
    batched = post(shared_kite, source, {"Content-Type": BATCH}, json.dumps(batch + batch[:1]).encode())

    assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(messages, 202)
    assert [(r["id"], r["result"]) for r in batched.json()] == [
        ("batch-0", "accepted"), ("batch-1", "accepted"), ("batch-2", "accepted"), ("batch-0", "duplicate"),
    ]  # fmt: skip
    ids = [*messages, "batch-0", "batch-1", "batch-2"]
    printed = {e["id"]: e for e in listener.wait_for_ids(ids)}
    answered = stored(shared_kite, source)
    for name, message in messages.items():
        assert_same_event(from_http_event(message), printed[name])
        assert_same_event(from_http_event(message), answered[name])
    for item in batch:
        assert_same_event(JSONFormat().read(None, json.dumps(item)), printed[item["id"]])
    assert base64.b64decode(printed["binary-bytes"]["data_base64"]) == bytes(range(256))
    assert printed["binary-text"]["data"] == "café ☕ 100%"
    assert listener.ids().count("batch-0") == 1


def _structured(sent: CloudEvent) -> tuple[dict, bytes]:
    message = to_structured_event(sent)
    return message.headers, message.body


def test_token_source_over_https(shared_kite, producer):
    _, tokened = producer
    message = to_binary_event(event("tokened-1", {"n": 1}))

    ok = post(shared_kite, tokened, message.headers, message.body, sign=False, token=tokened["token"])
    refused = post(shared_kite, tokened, message.headers, message.body, sign=False, token=tokened["token"] + "x")

    assert ok.status_code == 202
    assert (refused.status_code, refused.json()["code"]) == (401, "bad_token")
    assert list(stored(shared_kite, tokened)) == ["tokened-1"]


def test_refusals_over_https_store_nothing(shared_kite, producer):
    source, tokened = producer
    before = stored(shared_kite, source), stored(shared_kite, tokened)
    good = to_structured_event(event("refused-1", {"n": 1}))
    reserved = json.loads(good.body) | {"kitefedorigin": "someone-else"}
    no_type = {k: v for k, v in json.loads(good.body).items() if k != "type"}
    stale = standard_webhook_headers(source["secret"], "stale", good.body, int(time.time()) - 600)

    answers = [
        (post(shared_kite, source, good.headers, good.body, sign=False), 401, "missing_signature"),
        (post(shared_kite, source, {**good.headers, **stale}, good.body, sign=False), 401, "stale_timestamp"),
        (post(shared_kite, source, good.headers, good.body, sign=False, token=tokened["token"]), 401,
         "missing_signature"),
        (post(shared_kite, tokened, good.headers, good.body, sign=False), 401, "missing_token"),
        (post(shared_kite, source, good.headers, json.dumps(reserved).encode()), 400, "invalid_event"),
        (post(shared_kite, source, good.headers, json.dumps(no_type).encode()), 400, "invalid_event"),
        (post(shared_kite, source, good.headers, good.body, path=f"/hooks/not-a-team/{source['name']}"), 404,
         "unknown_team"),
        (post(shared_kite, source, {"Content-Type": BATCH}, json.dumps([json.loads(good.body)] * 10_000).encode()),
         413, "payload_too_large"),
    ]  # fmt: skip

    assert [(r.status_code, r.json()["code"]) for r, _, _ in answers] == [(s, c) for _, s, c in answers]
    assert "kitefedorigin" in answers[4][0].json()["detail"] and "type" in answers[5][0].json()["detail"]
    assert (stored(shared_kite, source), stored(shared_kite, tokened)) == before


def test_webhook_validation_request_over_https(shared_kite, producer):
    source, _ = producer
    team_id = shared_kite.team_id()

    def options(path: str) -> requests.Response:
        return requests.options(shared_kite.url + path, headers={"WebHook-Request-Origin": "emitter.example.com"},
                                verify=str(shared_kite.cert), timeout=10)  # fmt: skip

    granted = options(f"/hooks/{team_id}/{source['name']}")
    unknown = options(f"/hooks/{team_id}/no-such-source")

    assert granted.status_code == 200
    assert granted.headers["WebHook-Allowed-Origin"] == "emitter.example.com"
    assert granted.headers["WebHook-Allowed-Rate"] == "*"
    assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_source")
    assert "WebHook-Allowed-Origin" not in unknown.headers
