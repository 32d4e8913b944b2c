"""kite/tracing.py: what is taken from outside (W3C Trace Context in headers and in CloudEvents),
what is configured from OTEL_*, and that nothing is set up without them. The live trace across
instances is tests/e2e/test_tracing.py."""

import json
import os
import subprocess
import sys

import pytest
from cloudevents.core.bindings.http import to_structured_event
from django.core.exceptions import ImproperlyConfigured

from federation import services as federation_services
from ingest.models import Event
from kite import tracing
from tests.factories import SourceFactory
from tests.federation.test_routing_inbound import SECRET, make_ce, signed_batch, signed_post
from tests.ingest.test_cloudevents_source import producer_event, send

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("value", [PARENT, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"])
def test_w3c_traceparent_is_valid(value):
    assert tracing.valid_traceparent(value)


@pytest.mark.parametrize("value", [
    "", None, 42, PARENT.upper(), PARENT + "-extra", " " + PARENT, "01" + PARENT[2:], "ff" + PARENT[2:],
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01", "x" * 1000,
])  # fmt: skip
def test_anything_else_is_not_a_traceparent(value):
    assert not tracing.valid_traceparent(value)


@pytest.mark.parametrize("value, valid", [
    ("congo=t61rcWkgMzE", True), ("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", True), ("a=1, ,b=2", True),
    ("tenant@vendor=x", True), ("", True), ("a=1,a=2", False), ("A=1", False), ("a=", False), ("a=b=c", False),
    (",".join(f"k{i}=v" for i in range(33)), False), (",".join(f"k{i}=v" for i in range(32)), True),
    ("k=" + "v" * 256, True), ("k=" + "v" * 257, False),
    ("a=" + "v" * 255 + ",b=" + "v" * 255, False),  # valid members, but past MAX_TRACESTATE (512)
])  # fmt: skip
def test_tracestate_is_w3c_and_at_most_512_characters(value, valid):
    assert tracing.valid_tracestate(value) is valid


def test_configured_only_with_an_otlp_endpoint():
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert not tracing.configured({})
    assert tracing.configured(endpoint)
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert tracing.configured({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert not tracing.configured({**endpoint, "OTEL_SDK_DISABLED": "true"})
    assert not tracing.configured({**endpoint, "OTEL_TRACES_EXPORTER": "none"})


@pytest.mark.parametrize("name", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"])
def test_a_protocol_other_than_http_protobuf_fails_loudly_naming_the_variable(name):
    with pytest.raises(ImproperlyConfigured, match=name):
        tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", name: "grpc"})


def test_every_process_stops_at_start_on_a_protocol_kite_cannot_export_over(tmp_path):
    from tests.kite.test_settings import start

    started = start(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4317", OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert started.returncode != 0
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='grpc'" in started.stderr and "http/protobuf" in started.stderr
    assert start(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318").returncode == 0


def _web_process(tmp_path, **otel) -> dict:
    """What a web process (kite.asgi, as uvicorn loads it) set up: threads, modules, middleware."""
    code = (
        "import json, sys, threading; import kite.asgi; from django.conf import settings; from kite import tracing;"
        "print(json.dumps({'threads': [t.name for t in threading.enumerate()], 'enabled': tracing.ENABLED,"
        "'sdk': 'opentelemetry.sdk.trace' in sys.modules,"
        "'middleware': [m for m in settings.MIDDLEWARE if 'opentelemetry' in m]}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "KITE_"))}
    env.update(KITE_DATA_DIR=str(tmp_path), DJANGO_SETTINGS_MODULE="kite.settings", **otel)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_without_otel_variables_a_web_process_sets_up_nothing(tmp_path):
    off = _web_process(tmp_path)
    assert off == {"threads": ["MainThread"], "enabled": False, "sdk": False, "middleware": []}
    # The same process told of a collector (none listens: nothing is exported in this short life).
    on = _web_process(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    assert on["enabled"] and on["sdk"] and on["middleware"]
    assert len(on["threads"]) > 1  # the batch exporter's thread


# --- what a webhook's sender may give ------------------------------------------------------


@pytest.fixture
def plain(team):
    return SourceFactory(team=team, name="plain", kind="none")


def _post_plain(client, team, event_id: str, **headers):
    return client.post(f"/hooks/{team.id}/plain", json.dumps({"id": event_id, "type": "com.example.ping"}),
                       content_type="application/json", headers=headers)  # fmt: skip


def test_a_webhooks_traceparent_header_goes_with_the_event(client, team, plain):
    response = _post_plain(client, team, "e1", traceparent=PARENT, tracestate="congo=t61rcWkgMzE")
    assert response.status_code == 202
    stored = Event.objects.get(team=team, ce_id="e1")
    assert (stored.extensions["traceparent"], stored.extensions["tracestate"]) == (PARENT, "congo=t61rcWkgMzE")
    assert stored.to_cloudevent()["traceparent"] == PARENT


@pytest.mark.parametrize("headers, kept", [
    ({"traceparent": PARENT.upper()}, {}),
    ({"traceparent": "00-" + "f" * 1000}, {}),
    ({"traceparent": "junk", "tracestate": "a=1"}, {}),
    ({"tracestate": "a=1"}, {}),
    ({"traceparent": PARENT, "tracestate": ",".join(f"k{i}=" + "v" * 20 for i in range(30))}, {"traceparent": PARENT}),
    ({"traceparent": PARENT, "tracestate": "a=1,a=2"}, {"traceparent": PARENT}),
])  # fmt: skip
def test_a_malformed_or_oversized_header_is_ignored_not_refused(client, team, plain, headers, kept):
    """W3C Trace Context: a receiver ignores what it cannot parse. The webhook is stored as without it."""
    assert _post_plain(client, team, "e1", **headers).status_code == 202
    extensions = Event.objects.get(team=team, ce_id="e1").extensions
    assert {k: v for k, v in extensions.items() if k.startswith("trace")} == kept


# --- what a CloudEvents producer or a peer may give ----------------------------------------


@pytest.fixture
def producer(api):
    return api.post("/api/sources", {"name": "producer", "kind": "cloudevents"}, format="json").json()


def test_a_producers_traceparent_is_kept_as_sent_and_wins_over_the_header(client, team, producer):
    message = to_structured_event(producer_event({"n": 1}, traceparent=PARENT, tracestate="rojo=00f067aa0ba902b7"))
    other = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    response = send(client, team, producer, (dict(message.headers, traceparent=other), message.body))
    assert response.status_code == 202, response.json()
    stored = Event.objects.get(team=team, ce_id="ord-1").extensions
    assert (stored["traceparent"], stored["tracestate"]) == (PARENT, "rojo=00f067aa0ba902b7")


@pytest.mark.parametrize("attributes, naming", [
    ({"traceparent": PARENT.upper()}, "traceparent"),
    ({"traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01"}, "traceparent"),
    ({"traceparent": PARENT + "-" + "x" * 900}, "traceparent"),
    ({"traceparent": PARENT, "tracestate": "k=" + "v" * 200 + ",l=" + "v" * 200 + ",m=" + "v" * 200}, "tracestate"),
    ({"traceparent": PARENT, "tracestate": "not a tracestate"}, "tracestate"),
    ({"tracestate": "a=1"}, "tracestate"),
])  # fmt: skip
def test_a_cloudevent_with_a_malformed_trace_context_is_refused_and_nothing_stored(client, team, producer,
                                                                                    attributes, naming):  # fmt: skip
    before = Event.objects.count()
    response = send(client, team, producer, to_structured_event(producer_event({"n": 1}, **attributes)))
    body = response.json()
    assert (response.status_code, body["code"]) == (400, "invalid_event"), body
    assert f"`{naming}`" in body["detail"]
    assert Event.objects.count() == before


def test_a_peers_batch_rejects_only_the_event_with_a_malformed_traceparent(client, team):
    federation_services.trusted_sender_create(team=team, name="instance-a", inbound_token=SECRET)
    response = signed_batch(client, team, [make_ce("good", traceparent=PARENT), make_ce("bad", traceparent="00-xyz")])
    assert response.status_code == 200
    assert [(item["id"], item["result"]) for item in response.json()] == [("good", "accepted"), ("", "rejected")]
    assert "traceparent" in response.json()[1]["detail"]
    assert list(Event.objects.filter(team=team).values_list("ce_id", flat=True)) == ["good"]
    assert Event.objects.get(team=team, ce_id="good").extensions["traceparent"] == PARENT


def test_a_peers_single_delivery_with_a_malformed_tracestate_is_400_and_nothing_stored(client, team):
    federation_services.trusted_sender_create(team=team, name="instance-a", inbound_token=SECRET)
    response = signed_post(client, team, make_ce("one", traceparent=PARENT, tracestate="x" * 600))
    assert (response.status_code, response.json()["code"]) == (400, "invalid_event")
    assert not Event.objects.filter(team=team).exists()
