"""One trace across instances: A → B → C, live, exporting over OTLP/HTTP to a receiver in this test
(kite/tracing.py; README "Tracing")."""

import gzip
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.e2e.harness import Database, RedisDatabase, wait_for
from tests.e2e.test_federation import FAST, Cluster, FedKite, federate

pytestmark = pytest.mark.e2e


class Collector:
    """A minimal OTLP/HTTP trace receiver: POST /v1/traces, protobuf ExportTraceServiceRequest."""

    def __init__(self, port: int = 0):
        self.spans: list[dict] = []
        self.requests = self.connections = 0
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self):
                with collector.lock:
                    collector.connections += 1
                super().setup()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf"
                if ok:
                    collector.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append({
                        "service": resource.get("service.name"), "instance": resource.get("kite.instance_id"),
                        "name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                        "links": [(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        "error": span.status.code == 2,
                    })  # fmt: skip
        with self.lock:
            self.requests += 1
            self.spans += found

    def in_trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [span for span in self.spans if span["trace_id"] == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class TracedCluster(Cluster):
    """Instances exporting to `collector`, each under its own OTEL_SERVICE_NAME."""

    def __init__(self, tmp_path_factory, collector: Collector):
        super().__init__(tmp_path_factory)
        self.collector = collector

    def start(self, label: str) -> FedKite:
        database, redis_db = Database(label), RedisDatabase()
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": self.collector.endpoint, "OTEL_SERVICE_NAME": f"kite-{label}",
                "OTEL_BSP_SCHEDULE_DELAY": "200"}  # fmt: skip
        kite = FedKite(
            data_dir=self.tmp.mktemp(label) / "data",
            instance_id=f"otel-{label}-{secrets.token_hex(3)}",
            database_url=database.url,
            redis_url=redis_db.url,
            extra_env={**FAST, **otel},
        )
        self.started.append((kite, database, redis_db))
        kite.start()
        assert kite.api("POST", "/api/sources", json={"name": "plain", "kind": "none"}).status_code == 201
        return kite


@pytest.fixture
def collector():
    started = Collector()
    yield started
    started.close()


@pytest.fixture
def traced(tmp_path_factory, collector):
    started = TracedCluster(tmp_path_factory, collector)
    yield started
    started.close()


def _batching(sender: FedKite, peer: dict) -> bool:
    return (sender.peer(peer["id"]).get("batch_max") or 1) > 1


def test_one_trace_spans_a_b_c_and_continues_the_webhooks_traceparent(traced, collector):
    a, b, c = traced.start("a"), traced.start("b"), traced.start("c")
    to_b, to_c = federate(a, b, "b"), federate(b, c, "c")
    # Deliveries between Kites are batched once a heartbeat has learned the peer's batch_max: a lone event still goes alone.
    wait_for(lambda: _batching(a, to_b) and _batching(b, to_c), 20, "A and B to learn their peers' batch_max")

    trace_id, sender_span = secrets.token_hex(16), secrets.token_hex(8)
    response = requests.post(
        f"{a.url}/hooks/{a.team_id()}/plain", json={"id": "traced-1", "type": "com.example.order.created"},
        headers={"traceparent": f"00-{trace_id}-{sender_span}-01", "tracestate": "shop=t61rcWkgMzE"},
        verify=str(a.cert), timeout=10,
    )  # fmt: skip
    assert response.status_code == 202, response.text

    at_c = wait_for(lambda: [e for e in c.events(source="kite") if e["id"] == "traced-1"], 30,
                    lambda: "\n".join(k.state() for k in (a, b, c)))[0]  # fmt: skip
    at_a = next(e for e in a.events() if e["id"] == "traced-1")
    # The extension is the event's starting trace: set once at A, the same on every instance.
    assert at_a["traceparent"].split("-")[1] == trace_id
    assert at_c["traceparent"] == at_a["traceparent"] and at_c["tracestate"] == "shop=t61rcWkgMzE"

    expected = {("kite-a", "kite.receive"), ("kite-a", "kite.verify"), ("kite-a", "kite.store"),
                ("kite-a", "kite.outbox"), ("kite-a", "kite.deliver"), ("kite-b", "kite.store"),
                ("kite-b", "kite.outbox"), ("kite-b", "kite.broadcast"), ("kite-b", "kite.deliver"),
                ("kite-c", "kite.store"), ("kite-c", "kite.broadcast")}  # fmt: skip

    def all_there():
        return expected <= {(s["service"], s["name"]) for s in collector.in_trace(trace_id)}

    def missing() -> str:
        seen = {(s["service"], s["name"]) for s in collector.in_trace(trace_id)}
        everywhere = sorted({(s["service"], s["name"]) for s in collector.spans})
        return f"spans of {trace_id}: missing {sorted(expected - seen)}; every span seen: {everywhere}"

    wait_for(all_there, 20, missing)
    spans = collector.in_trace(trace_id)
    by = {(s["service"], s["name"]): s for s in spans}
    # A's request span continues the sender's span; A's store span is the event's traceparent.
    assert any(s["service"] == "kite-a" and s["parent_span_id"] == sender_span for s in spans)
    assert at_a["traceparent"].split("-")[2] == by[("kite-a", "kite.store")]["span_id"]
    assert {s["instance"] for s in spans} == {a.instance_id, b.instance_id, c.instance_id}
    for service, peer in (("kite-a", "b"), ("kite-b", "c")):
        deliver = by[(service, "kite.deliver")]
        assert deliver["attributes"]["kite.peer"] == peer
        assert deliver["attributes"]["kite.attempt"] == 1
        assert deliver["attributes"]["kite.outcome"] == "delivered" and not deliver["error"]
        assert deliver["attributes"]["kite.batch_size"] == 1
        # A lone event goes as one CloudEvent, not a batch of one (even to a peer that takes batches):
        # its delivery span is the hop, and the peer's request continued it, in the event's own trace.
        assert deliver["links"] == []
        next_hop = "kite-b" if service == "kite-a" else "kite-c"
        requests_there = [s for s in spans if s["service"] == next_hop and s["parent_span_id"] == deliver["span_id"]]
        assert requests_there, spans
    # The peer's store span is under the request (the hop) that brought the event, in the same trace.
    parents = {s["span_id"]: s["parent_span_id"] for s in spans}
    for service, sender in (("kite-b", "kite-a"), ("kite-c", "kite-b")):
        store = by[(service, "kite.store")]
        hops = {s["span_id"] for s in spans
                if s["service"] == service and s["parent_span_id"] == by[(sender, "kite.deliver")]["span_id"]}  # fmt: skip
        above, span_id = [], store["parent_span_id"]
        while span_id in parents and len(above) < 10:
            above.append(span_id)
            span_id = parents[span_id]
        assert hops & set(above) and not store["links"], (store, hops, above)
        assert store["attributes"]["cloudevents.event_id"] == "traced-1"


def test_without_otel_variables_nothing_is_exported(tmp_path_factory):
    """No OTEL_* at all: no exporter. The witness listens where an OTLP/HTTP exporter made with the
    defaults would send (localhost:4318): it must see no connection."""
    witness = Collector(port=4318)
    plain = Cluster(tmp_path_factory)
    try:
        kite = plain.start("untraced")
        response = requests.post(
            f"{kite.url}/hooks/{kite.team_id()}/plain", json={"id": "untraced-1", "type": "com.example.ping"},
            headers={"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"}, verify=str(kite.cert), timeout=10,
        )  # fmt: skip
        assert response.status_code == 202
        stored = next(e for e in kite.events() if e["id"] == "untraced-1")
        # Tracing off, the sender's context still goes with the event (a tracing peer continues it).
        assert stored["traceparent"] == f"00-{'ab' * 16}-{'cd' * 8}-01"
        time.sleep(1)  # past a batch exporter's schedule delay (200 ms here, were one made)
    finally:
        plain.close()
        witness.close()
    assert witness.connections == 0
