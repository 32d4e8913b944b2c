"""kite/tracing.py's spans in process, recorded in memory: where each hangs, what it says, and the
context each hop carries. No database: drafts, events and outbox entries are plain objects."""

from types import SimpleNamespace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kite import tracing

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE}-b7ad6b7169203331-01"


@pytest.fixture
def spans(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "ENABLED", True)
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    return exporter


def draft(event_id: str, **extensions):
    return SimpleNamespace(id=event_id, type="com.example.ping", extensions=dict(extensions))


def entry(event_id: str, attempts: int = 0, **extensions):
    return SimpleNamespace(attempts=attempts, event=SimpleNamespace(ce_id=event_id, extensions=dict(extensions)))


def hop(span) -> str:
    """The W3C traceparent of a recorded span (its flags as the SDK set them: sampled, and random)."""
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def named(exporter, name: str) -> list:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def test_a_new_event_gets_its_store_spans_context_as_traceparent(spans):
    first = draft("e1")
    with tracing.span("kite.receive"):
        with tracing.storing(first, {}):
            with tracing.event_span("kite.outbox", SimpleNamespace(ce_id="e1", extensions=first.extensions)):
                pass
    (store,), (outbox,) = named(spans, "kite.store"), named(spans, "kite.outbox")
    (receive,) = named(spans, "kite.receive")
    assert first.extensions["traceparent"] == hop(store)
    assert store.parent.span_id == receive.context.span_id
    assert outbox.parent.span_id == store.context.span_id  # an event's spans hang under its store span here


def test_an_event_that_came_with_a_traceparent_keeps_it_and_its_store_span_links_the_request(spans):
    carried = draft("e1", traceparent=PARENT, tracestate="rojo=1")
    with tracing.span("kite.receive"):
        with tracing.storing([carried, ValueError("a rejected event of the batch")], {}):
            pass
    (store,), (receive,) = named(spans, "kite.store"), named(spans, "kite.receive")
    assert carried.extensions == {"traceparent": PARENT, "tracestate": "rojo=1"}
    assert f"{store.context.trace_id:032x}" == TRACE and store.parent.span_id == int("b7ad6b7169203331", 16)
    assert [link.context.span_id for link in store.links] == [receive.context.span_id]


def test_a_single_delivery_carries_its_delivery_span_as_the_http_traceparent(spans):
    traced = tracing.delivery("b", [entry("e1", attempts=2, traceparent=PARENT)], batched=False)
    traced.answered(202, ["delivered"])
    (deliver,) = named(spans, "kite.deliver")
    assert traced.headers == {"traceparent": hop(deliver)} and hop(deliver).startswith(f"00-{TRACE}-")
    assert dict(deliver.attributes) == {"kite.peer": "b", "kite.attempt": 3, "cloudevents.event_id": "e1",
                                        "kite.batch_size": 1, "kite.outcome": "delivered",
                                        "http.response.status_code": 202}  # fmt: skip
    assert deliver.status.is_ok and not named(spans, "kite.deliver.batch")


def test_a_batch_has_a_span_per_event_in_its_own_trace_linked_to_the_batch_span(spans):
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    traced = tracing.delivery("b", [entry("e1", traceparent=PARENT), entry("e2", traceparent=other)], batched=True)
    traced.answered(200, ["delivered", "dead"])
    (batch,) = named(spans, "kite.deliver.batch")
    first, second = named(spans, "kite.deliver")
    assert traced.headers == {"traceparent": hop(batch)}
    assert [f"{s.context.trace_id:032x}" for s in (first, second)] == [TRACE, "1" * 32]
    assert all([link.context.span_id for link in s.links] == [batch.context.span_id] for s in (first, second))
    assert (first.attributes["kite.outcome"], second.attributes["kite.outcome"]) == ("delivered", "dead")
    assert first.status.is_ok and second.status.status_code == trace.StatusCode.ERROR


def test_a_failed_delivery_says_how_on_every_span(spans):
    traced = tracing.delivery("b", [entry("e1", attempts=4, traceparent=PARENT), entry("e2")], batched=True)
    traced.failed("transient", 503, "HTTP 503: busy")
    for span in named(spans, "kite.deliver") + named(spans, "kite.deliver.batch"):
        assert span.attributes["kite.outcome"] == "transient" and span.attributes["http.response.status_code"] == 503
        assert span.status.status_code == trace.StatusCode.ERROR and span.status.description == "HTTP 503: busy"


def test_off_nothing_is_made():
    assert not tracing.ENABLED
    assert tracing.delivery("b", [entry("e1")], batched=True) is None
    assert tracing.span("x") is tracing.event_span("x", None) is tracing.storing([], {}) is tracing._NOOP
