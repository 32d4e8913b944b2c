"""OpenTelemetry tracing: one trace per event, across instances (README, "Tracing").

Imports nothing but the standard library until set up (ingest.cloudevent, which is pure, uses
its checks of outside values).

Off unless the standard OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is
set. Then each web process and each worker pool process sets up the SDK (beat, which only
publishes, is not traced) with a batch exporter over OTLP/HTTP
(protobuf), the exporter reading its own OTEL_EXPORTER_OTLP_* variables, OTEL_SERVICE_NAME (default
`kite`) and OTEL_TRACES_SAMPLER as the SDK defines them; Django's and Celery's instrumentation are
installed. With nothing set there is no provider, no exporter, no thread, no middleware: every hook
below costs one flag check.

Where the context travels:
- An event's trace context is the CloudEvents Distributed Tracing extension (`traceparent`,
  `tracestate`), set once, by the first Kite that stores the event (its `kite.store` span, which
  continues a webhook's `traceparent` header), and never changed by later hops: the extension
  carries the starting trace, not each hop (CloudEvents distributed-tracing.md). So the event's
  spans on every instance (store, outbox, broadcast, delivery) are in that one trace.
- Each hop travels as HTTP: a delivery POST carries the `traceparent` of its delivery span (one
  event) or of its `kite.deliver.batch` span (a batch); the peer's request span continues it and
  its `kite.store` spans link to that request.

Batches: one `kite.deliver` span per event (in the event's own trace, with the peer, attempt and that
event's outcome: a batch's answer has one result per event) plus one `kite.deliver.batch` span per
POST that each of them links to. A span is a few microseconds; the POST and the peer's insert of
the same events cost far more, so per-event spans are cheap where it matters, and only a per-event
span can say which events of a batch were rejected.

Outside values are checked before they are kept: a `traceparent` attribute must be W3C version 00
(55 characters), a `tracestate` at most 32 members and MAX_TRACESTATE characters; a CloudEvent
carrying anything else is refused (400); a malformed header is ignored, as W3C Trace Context says.
"""

import contextlib
import contextvars
import os
import re

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
MAX_TRACESTATE = 512  # W3C: SHOULD propagate at least 512 characters; more is not kept nor forwarded
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_KEY = r"(?:[a-z][_0-9a-z*/-]{0,255}|[a-z0-9][_0-9a-z*/-]{0,240}@[a-z][_0-9a-z*/-]{0,13})"
_MEMBER = re.compile(rf"({_KEY})=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{{0,255}}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
# Periodic work that would otherwise start a trace every second (the outbox sweep) is not traced.
UNTRACED = frozenset({"apply_async/federation.tasks.sweep_outbox", "run/federation.tasks.sweep_outbox"})

ENABLED = False
_NOOP = contextlib.nullcontext()
_tracer = None
_provider = None
# The `kite.store` spans open in this context, by event id: the event's other spans here are theirs.
_storing: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kite_storing", default=None)


# --- outside values -------------------------------------------------------------------


def valid_traceparent(value) -> bool:
    return isinstance(value, str) and _TRACEPARENT.fullmatch(value) is not None


def valid_tracestate(value) -> bool:
    """W3C Trace Context §3.3: comma-separated key=value members (empty ones allowed), at most 32,
    keys unique; here also at most MAX_TRACESTATE characters."""
    if not isinstance(value, str) or len(value) > MAX_TRACESTATE:
        return False
    keys = []
    for member in value.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        match = _MEMBER.fullmatch(member)
        if match is None:
            return False
        keys.append(match[1])
    return len(keys) <= 32 and len(set(keys)) == len(keys)


def check_extensions(extensions: dict) -> str | None:
    """What is wrong with a CloudEvent's Distributed Tracing attributes, or None."""
    if TRACEPARENT in extensions and not valid_traceparent(extensions[TRACEPARENT]):
        return ("Extension `traceparent` must be a W3C Trace Context traceparent, version 00: "
                "00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>, lower case, ids not all zero.")  # fmt: skip
    if TRACESTATE in extensions:
        if TRACEPARENT not in extensions:
            return "Extension `tracestate` needs `traceparent` (CloudEvents Distributed Tracing extension)."
        if not valid_tracestate(extensions[TRACESTATE]):
            return (f"Extension `tracestate` must be a W3C Trace Context tracestate: at most 32 key=value members, "
                    f"{MAX_TRACESTATE} characters.")  # fmt: skip
    return None


def _from_headers(headers: dict[str, str]) -> dict[str, str]:
    """A request's W3C headers as extension attributes, or {} (malformed: ignored, W3C §3.2.2.x)."""
    parent = headers.get(TRACEPARENT, "").strip(" \t")
    if not valid_traceparent(parent):
        return {}
    state = headers.get(TRACESTATE, "")
    return {TRACEPARENT: parent, **({TRACESTATE: state} if state and valid_tracestate(state) else {})}


# --- setup ----------------------------------------------------------------------------


def configured(environ=os.environ) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint is set and the SDK is not disabled."""
    from django.core.exceptions import ImproperlyConfigured

    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if (environ.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower() == "none":
        return False
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip()
        if protocol:
            if protocol != "http/protobuf":
                raise ImproperlyConfigured(f"{name}={protocol!r}: Kite exports traces over OTLP/HTTP only; "
                                           "set it to http/protobuf or leave it unset.")  # fmt: skip
            break
    return True


def setup(*, web: bool = False, environ=os.environ) -> bool:
    """Set up tracing in this process if the environment asks for it (once; True if on).
    web: also trace Django's requests (before the WSGI handler is built: the middleware goes first)."""
    global ENABLED, _tracer, _provider
    if _provider is None:
        if not configured(environ):
            return False
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        _provider = TracerProvider(resource=_resource(environ), sampler=_sampler())
        _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(_provider)
        _tracer = trace.get_tracer("kite")
        # Links, not parent and child: one delivery task drains the events of many traces.
        CeleryInstrumentor().instrument(tracer_provider=_provider, use_span_links=True)
        ENABLED = True
    if web:
        from opentelemetry.instrumentation.django import DjangoInstrumentor

        if not DjangoInstrumentor().is_instrumented_by_opentelemetry:
            # Health checks and scrapes make no trace unless the variables the instrumentation reads say otherwise.
            excluded = environ.get("OTEL_PYTHON_DJANGO_EXCLUDED_URLS") or environ.get("OTEL_PYTHON_EXCLUDED_URLS")
            DjangoInstrumentor().instrument(tracer_provider=_provider, excluded_urls=excluded or "healthz,metrics")
    return True


def _resource(environ):
    from django.conf import settings
    from opentelemetry.sdk.resources import Resource

    # Not service.instance.id: the SDK makes that one per process (anew in each forked worker).
    resource = Resource.create({"kite.instance_id": settings.KITE_INSTANCE_ID})
    if not environ.get("OTEL_SERVICE_NAME") and str(resource.attributes.get("service.name", "")).startswith(
        "unknown_service"
    ):
        resource = resource.merge(Resource({"service.name": "kite"}))
    return resource


def _sampler():
    from opentelemetry.sdk.trace import sampling

    configured_sampler = sampling._get_from_env_or_default()  # OTEL_TRACES_SAMPLER(_ARG), as the SDK reads them

    class Sampler(sampling.Sampler):
        def should_sample(self, parent_context, trace_id, name, *args, **kwargs):
            if name in UNTRACED:
                return sampling.SamplingResult(sampling.Decision.DROP)
            return configured_sampler.should_sample(parent_context, trace_id, name, *args, **kwargs)

        def get_description(self):
            return f"Kite({configured_sampler.get_description()})"

    return Sampler()


def flush(timeout_millis: int = 5000) -> None:
    if _provider is not None:
        _provider.force_flush(timeout_millis)


# --- hooks ----------------------------------------------------------------------------


def span(name: str, attributes: dict | None = None):
    """A child span of the current one, made current (a no-op context manager when off)."""
    if not ENABLED:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=attributes)


def storing(drafts, headers: dict[str, str]):
    """Around storing one event or a batch (ingest.cloudevent Drafts; a batch's MalformedEvents are
    skipped): a `kite.store` span per event, and every event leaves with a `traceparent` — its own,
    if it came with one; else the store span's, which continues the request's `traceparent` header.
    Off: a valid header is all the event gets (the trace goes on at the next instance that traces)."""
    if not ENABLED:
        if TRACEPARENT in headers:
            carried = _from_headers(headers)
            for draft in drafts if isinstance(drafts, list) else [drafts]:
                if carried and getattr(draft, "extensions", None) is not None and TRACEPARENT not in draft.extensions:
                    draft.extensions.update(carried)
        return _NOOP
    return _StoreSpans([d for d in (drafts if isinstance(drafts, list) else [drafts]) if hasattr(d, "extensions")])


class _StoreSpans:
    def __init__(self, drafts):
        self.drafts = drafts
        self.spans = {}

    def __enter__(self):
        from opentelemetry import trace

        current = trace.get_current_span().get_span_context()
        for draft in self.drafts:
            self.spans[draft.id] = self._start(draft, current, trace)
        self.token = _storing.set({**(_storing.get() or {}), **self.spans})
        return self

    @staticmethod
    def _start(draft, current, trace):
        attributes = {"cloudevents.event_id": draft.id, "cloudevents.event_type": draft.type}
        carried = _context_of(draft.extensions)
        if carried is None:  # the first Kite to store it: its trace starts here (or at the webhook's sender)
            span = _tracer.start_span("kite.store", attributes=attributes)
            draft.extensions.update(_attributes_of(span.get_span_context()))
            return span
        carried_trace = trace.get_current_span(carried).get_span_context().trace_id
        if current.is_valid and current.trace_id == carried_trace:
            return _tracer.start_span("kite.store", attributes=attributes)  # one event, delivered on its own
        links = [trace.Link(current)] if current.is_valid else None  # the request (a hop) that brought it
        return _tracer.start_span("kite.store", context=carried, links=links, attributes=attributes)

    def __exit__(self, kind, error, tb):
        _storing.reset(self.token)
        for span in self.spans.values():  # a refusal is on the receive span (kite.receive)
            span.end()
        return False


def event_span(name: str, event, attributes: dict | None = None):
    """A span of a stored event's: under its `kite.store` span while that is open in this context,
    else under the event's `traceparent` (a no-op context manager when off)."""
    if not ENABLED:
        return _NOOP
    from opentelemetry import trace

    store = (_storing.get() or {}).get(event.ce_id)
    parent = trace.set_span_in_context(store) if store is not None else _context_of(event.extensions or {})
    return _tracer.start_as_current_span(name, context=parent, attributes=attributes)


def delivery(peer: str, entries: list, batched: bool) -> "_Delivery | None":
    """Spans for one delivery attempt to `peer` of outbox entries (None when off): see the module."""
    return _Delivery(peer, entries, batched) if ENABLED else None


class _Delivery:
    def __init__(self, peer: str, entries: list, batched: bool):
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        self.batch = None
        links = None
        if batched:
            attributes = {"kite.peer": peer, "kite.batch_size": len(entries)}
            self.batch = _tracer.start_span("kite.deliver.batch", kind=SpanKind.PRODUCER, attributes=attributes)
            links = [trace.Link(self.batch.get_span_context())]
        self.spans = []
        for entry in entries:
            event = entry.event
            attributes = {"kite.peer": peer, "kite.attempt": entry.attempts + 1, "cloudevents.event_id": event.ce_id,
                          "kite.batch_size": len(entries)}  # fmt: skip
            parent = _context_of(event.extensions or {})
            self.spans.append(_tracer.start_span("kite.deliver", context=parent, kind=SpanKind.PRODUCER, links=links,
                                                 attributes=attributes))  # fmt: skip
        hop = self.batch if self.batch is not None else self.spans[0]
        self.headers = {TRACEPARENT: _traceparent(hop.get_span_context())}

    def answered(self, status_code: int, outcomes: list[str]) -> None:
        """outcomes: one per entry (delivered | dead)."""
        for span, outcome in zip(self.spans, outcomes, strict=True):
            span.set_attributes({"kite.outcome": outcome, "http.response.status_code": status_code})
            self._end(span, outcome == "delivered", outcome)
        if self.batch is not None:
            self.batch.set_attribute("http.response.status_code", status_code)
            self._end(self.batch, True, "")

    def failed(self, kind: str, status_code: int | None, detail: str) -> None:
        for span in [*self.spans, *([self.batch] if self.batch is not None else [])]:
            span.set_attribute("kite.outcome", kind)
            if status_code is not None:
                span.set_attribute("http.response.status_code", status_code)
            self._end(span, False, detail[:200])

    @staticmethod
    def _end(span, ok: bool, description: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        if not ok:
            span.set_status(Status(StatusCode.ERROR, description))
        span.end()


def _context_of(extensions: dict):
    """The context an event's valid `traceparent` (and `tracestate`) names, or None."""
    parent = extensions.get(TRACEPARENT)
    if not valid_traceparent(parent):
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {TRACEPARENT: parent}
    if valid_tracestate(extensions.get(TRACESTATE)):
        carrier[TRACESTATE] = extensions[TRACESTATE]
    return TraceContextTextMapPropagator().extract(carrier)


def _traceparent(context) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _attributes_of(context) -> dict:
    attributes = {TRACEPARENT: _traceparent(context)}
    state = context.trace_state.to_header() if context.trace_state else ""
    if state and valid_tracestate(state):
        attributes[TRACESTATE] = state
    return attributes
