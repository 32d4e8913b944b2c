"""ingest.edge in one process, on the test database: what it stores, batches, and leaves to Django.

The end-to-end tests (tests/e2e/test_loop_ingest.py) attack it over HTTPS in a real runkite;
these drive its coroutines directly, to reach what HTTP cannot: a batch formed on purpose, and
failures inside it. They commit for real (transaction=True): the edge's connections are its own.
"""

import asyncio
import json

import pytest

from ingest import edge, selectors, services
from ingest.models import Event
from tests.factories import SOURCE_SECRET, SourceFactory
from tests.signing import stripe_signature

pytestmark = pytest.mark.django_db(transaction=True)


def body(event_id: str) -> bytes:
    return json.dumps({"id": event_id, "type": "payment_intent.succeeded", "created": 1700000000}).encode()


def hook_request(path: str, content_type: str, raw: bytes, headers=(), scheme: str = "http"):
    """The ASGI scope and body the edge sees for a POST of `raw` to `path` with `headers` ((name, value) text)."""
    headers = [(b"host", b"kite.example"), (b"content-type", content_type.encode()),
               (b"content-length", str(len(raw)).encode()),
               *((name.lower().encode(), value.encode()) for name, value in headers)]  # fmt: skip
    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"", "headers": headers,
             "http_version": "1.1", "scheme": scheme, "root_path": "",
             "server": ("127.0.0.1", 8443 if scheme == "https" else 8000), "client": ("127.0.0.1", 50000)}  # fmt: skip
    return scope, raw


def scope_and_body(team, event_id: str, secret: str = SOURCE_SECRET):
    raw = body(event_id)
    return hook_request(f"/hooks/{team.id}/stripe", "application/json", raw,
                        [("stripe-signature", stripe_signature(secret, raw))])  # fmt: skip


@pytest.fixture
def warm(client, team):
    """A Stripe source this process has cached (its first webhook went through Django)."""
    source = SourceFactory(team=team, name="stripe", kind="stripe")
    scope, raw = scope_and_body(team, "evt_warm")
    response = client.post(f"/hooks/{team.id}/stripe", raw, content_type="application/json",
                           HTTP_STRIPE_SIGNATURE=dict(scope["headers"])[b"stripe-signature"].decode())  # fmt: skip
    assert response.status_code == 202
    assert selectors.source_for_hook_copy(team.id, "stripe") is not None
    return source


def run(coroutine_function, connections: int = 4):
    """(what coroutine_function(edge) returns, the edge): in an event loop as in a web process, where
    Django's database access raises SynchronousOnlyOperation (the edge must not need it)."""

    async def main():
        front = edge.Edge(connections=connections)
        try:
            return await asyncio.wait_for(coroutine_function(front), 10), front
        finally:
            await front.close()

    return asyncio.run(main())


def test_a_verified_webhook_is_stored_and_answered_202(team, warm):
    scope, raw = scope_and_body(team, "evt_edge")
    (status, headers, answer), _ = run(lambda front: front.take(scope, raw))
    assert status == 202 and json.loads(answer) == {"id": "evt_edge", "duplicate": False}
    assert (b"content-length", str(len(answer)).encode()) in headers
    stored = Event.objects.get(ce_id="evt_edge")
    assert stored.source_id == warm.pk and stored.ce_type == "com.stripe.payment_intent.succeeded"


def test_what_the_edge_does_not_store_is_left_to_django_with_nothing_stored(team, warm):
    forged = scope_and_body(team, "evt_forged", secret="whsec_" + "x" * 32)
    unknown = scope_and_body(team, "evt_unknown")
    unknown[0]["path"] = f"/hooks/{team.id}/nope"
    head = scope_and_body(team, "evt_head")
    head[0]["method"] = "PUT"
    for scope, raw in (forged, unknown, head):
        answer, _ = run(lambda front, scope=scope, raw=raw: front.take(scope, raw))
        assert answer is None, scope["path"]
    duplicate = scope_and_body(team, "evt_warm")
    assert run(lambda front: front.take(*duplicate))[0] is None  # Django answers 200 duplicate
    assert list(Event.objects.values_list("ce_id", flat=True)) == ["evt_warm"]


def test_webhooks_waiting_together_go_in_one_statement_each_key_once(team, warm):
    source = selectors.source_for_hook_copy(team.id, "stripe")

    async def five(front):
        events = []
        for event_id in ("b1", "b2", "b3", "b4", "b1"):  # the last repeats the first
            copy = selectors.source_for_hook_copy(team.id, "stripe")
            draft = services.webhook_draft(copy, {}, body(event_id), None)
            events.append((copy, services.new_event(copy, draft)))
        return await asyncio.gather(*(front.store(copy, event) for copy, event in events))

    stored, front = run(five, connections=1)  # one connection: the first takes it, the others wait together
    assert stored == [True, True, True, True, False]
    txids = set(Event.objects.filter(ce_id__in=["b1", "b2", "b3", "b4"]).values_list("txid", flat=True))
    assert len(txids) == 1 and Event.objects.filter(ce_id="b1").count() == 1
    assert source.pk == warm.pk and front.pool.opened == 0 and not front.waiting and not front.storing


def test_a_failure_inside_the_edge_leaves_the_webhook_to_django_and_the_connection_closed(team, warm, monkeypatch):
    def broken(source, events, sender=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(services, "store_alone_statement_many", broken)
    scope, raw = scope_and_body(team, "evt_broken")
    answer, front = run(lambda front: front.take(scope, raw))
    assert answer is None and front.pool.opened == 0 and not front.storing
    assert not Event.objects.filter(ce_id="evt_broken").exists()


def test_a_database_that_cannot_be_reached_leaves_every_webhook_to_django(team, warm, monkeypatch):
    params = edge.Pool.params()
    monkeypatch.setattr(edge.Pool, "params", staticmethod(lambda: {**params, "port": 1, "connect_timeout": 2}))
    scope, raw = scope_and_body(team, "evt_unreachable")
    answer, front = run(lambda front: front.take(scope, raw))
    assert answer is None and front.pool.opened == 0
    assert not Event.objects.filter(ce_id="evt_unreachable").exists()


def test_a_verifier_that_fails_unexpectedly_leaves_the_webhook_to_django(team, warm, monkeypatch):
    def broken(source, headers, body):
        raise RuntimeError("boom")

    monkeypatch.setattr(services, "webhook_verify", broken)
    scope, raw = scope_and_body(team, "evt_unverified")
    answer, front = run(lambda front: front.take(scope, raw))
    assert answer is None and front.pool.opened == 0
    assert not Event.objects.filter(ce_id="evt_unverified").exists()
