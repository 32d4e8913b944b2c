"""A federated event stored without a transaction: its outbox entries written by the statement that
stores it (ingest.hooks.event_stored_alone, federation.enqueue._route_alone), from the routes this
process cached at the version the statement's guard checks; its peers kicked once it is in.

They commit for real (transaction=True): the kicks follow the commit, and the edge's connections
are its own.
"""

import asyncio
import json
import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation import dispatch, enqueue, services
from federation.models import OutboxEntry
from ingest import selectors
from ingest import services as ingest_services
from ingest.models import Event
from kite.ratelimit import redis_client
from tests.federation.test_routing_inbound import SECRET, _dropped, _peer, _stripe, make_ce, signed_post
from tests.ingest.test_edge import run, scope_and_body

pytestmark = pytest.mark.django_db(transaction=True)

ENTRY_FIELDS = ("team_id", "peer_id", "provenance", "status", "attempts", "leased_until", "last_error", "delivered_at")


def _entries(event_id: str) -> list[dict]:
    return list(OutboxEntry.objects.filter(event__ce_id=event_id).order_by("peer_id").values(*ENTRY_FIELDS, "msg_id"))


def _flags(peers) -> list[int]:
    return [redis_client().exists(dispatch.kick_key(peer.pk)) for peer in peers]


def _clear_flags(peers) -> None:
    redis_client().delete(*[dispatch.kick_key(peer.pk) for peer in peers], *[dispatch.wake_key(peer.pk) for peer in peers])


@pytest.fixture
def peers(team):
    """Two peers that take Stripe events and one that takes none; their kick flags cleared before and after."""
    made = [_peer(team, name="b"), _peer(team, name="c", scopes=["*"]), _peer(team, name="github-only", scopes=["github.*"])]
    _clear_flags(made)
    yield made
    _clear_flags(made)


def test_the_statement_writes_the_entries_the_transaction_writes_and_kicks_the_peers(client, team, peers):
    assert _stripe(client, team, event_id="evt_cold").status_code == 202  # routes not cached yet: a transaction
    _clear_flags(peers)
    with CaptureQueriesContext(connection) as queries:
        assert _stripe(client, team, event_id="evt_warm").status_code == 202
    writes = [q["sql"] for q in queries if "INSERT" in q["sql"]]
    assert len(writes) == 1 and '"ingest_event"' in writes[0] and '"federation_outboxentry"' in writes[0], writes
    cold, warm = _entries("evt_cold"), _entries("evt_warm")
    assert [e["peer_id"] for e in warm] == [peers[0].pk, peers[1].pk]
    assert [{k: e[k] for k in ENTRY_FIELDS} for e in warm] == [{k: e[k] for k in ENTRY_FIELDS} for e in cold]
    assert all(e["msg_id"].version == 4 for e in warm) and len({e["msg_id"] for e in cold + warm}) == 4
    stored = OutboxEntry.objects.filter(event__ce_id="evt_warm")
    assert all(e.next_attempt_at <= timezone.now() and e.event.ce_id == "evt_warm" for e in stored)
    assert _flags(peers) == [1, 1, 0]  # kicked after the statement: the two it routed to
    assert _dropped("github-only", "scope") >= 2


def test_a_duplicate_gets_no_second_entries_and_no_kick(client, team, peers):
    assert _stripe(client, team, event_id="evt_0").status_code == 202
    assert _stripe(client, team, event_id="evt_1").status_code == 202
    _clear_flags(peers)
    dropped = _dropped("github-only", "scope")
    again = _stripe(client, team, event_id="evt_1")
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert len(_entries("evt_1")) == 2 and _flags(peers) == [0, 0, 0]
    assert _dropped("github-only", "scope") == dropped  # counted for a stored event only


def test_a_peer_changed_after_the_routes_were_cached_routes_the_next_event(client, team, peers):
    """The statement's guard checks the team's routes version: an event verified with copies read
    before a peer was revoked or added is not stored by the statement, and goes where the peers
    now say."""
    assert _stripe(client, team, event_id="evt_before").status_code == 202
    services.peer_revoke(peer=peers[0])
    added = _peer(team, name="d", scopes=["stripe.*"])
    assert _stripe(client, team, event_id="evt_after").status_code == 202
    assert [e["peer_id"] for e in _entries("evt_after")] == [peers[1].pk, added.pk]
    assert Event.objects.filter(ce_id="evt_after").count() == 1


def test_an_event_at_a_peers_hop_limit_is_stored_in_a_transaction_with_its_delivery_failed_event(client, team):
    """Routing that writes an event of its own (delivery_failed) needs the transaction: the statement
    steps aside and the transaction does it, even with the routes cached."""
    upstream = services.trusted_sender_create(team=team, name="instance-a", inbound_token=SECRET).row
    limited = _peer(team, name="instance-c", scopes=["*"], remote="kite-c", max_hops=2)
    first = make_ce("e-ok", kitefedorigin="kite-x", kitefedchain='["kite-x"]', kitefedhops=1)
    assert signed_post(client, team, first, sender="kite-a", msg_id="msg_ok").status_code == 202  # routes cached
    before = _dropped("instance-c", "max_hops")
    over = make_ce("e-over", kitefedorigin="kite-x", kitefedchain='["kite-x", "kite-a"]', kitefedhops=2)
    assert signed_post(client, team, over, sender="kite-a", msg_id="msg_over").status_code == 202
    failed = Event.objects.get(team=team, ce_type=enqueue.FAILED_TYPE)
    assert json.loads(failed.data)["event"]["id"] == "e-over" and _dropped("instance-c", "max_hops") == before + 1
    assert not OutboxEntry.objects.filter(event__ce_id="e-over").exists()
    assert OutboxEntry.objects.filter(event__ce_id="e-ok", peer=limited).exists()
    assert not OutboxEntry.objects.filter(peer=upstream).exists()


def test_the_edge_stores_a_federated_webhook_with_its_entries_and_kicks_its_peers(client, team, peers):
    assert _stripe(client, team, event_id="evt_warm").status_code == 202  # the source and routes cached
    assert selectors.source_for_hook_copy(team.id, "stripe") is not None
    _clear_flags(peers)
    scope, raw = scope_and_body(team, "evt_edge")
    (status, _headers, answer), _ = run(lambda front: front.take(scope, raw))
    assert status == 202 and json.loads(answer) == {"id": "evt_edge", "duplicate": False}
    assert [e["peer_id"] for e in _entries("evt_edge")] == [peers[0].pk, peers[1].pk]
    assert _flags(peers) == [1, 1, 0]


def test_webhooks_the_edge_stores_together_get_one_set_of_entries_per_event(client, team, peers):
    """Five webhooks in one statement, one repeating another: each stored event gets its entries
    once; the repeat (not stored) gets none."""
    assert _stripe(client, team, event_id="evt_warm").status_code == 202

    async def five(front):
        events = []
        for event_id in ("b1", "b2", "b3", "b4", "b1"):
            copy = selectors.source_for_hook_copy(team.id, "stripe")
            draft = ingest_services.webhook_draft(copy, {}, json.dumps({"id": event_id, "type": "charge.paid"}).encode(),
                                                  None)  # fmt: skip
            events.append((copy, ingest_services.new_event(copy, draft)))
        return await asyncio.gather(*(front.store(copy, event) for copy, event in events))

    stored, _ = run(five, connections=1)
    assert stored == [True, True, True, True, False]
    for event_id in ("b1", "b2", "b3", "b4"):
        assert [e["peer_id"] for e in _entries(event_id)] == [peers[0].pk, peers[1].pk], event_id
    assert OutboxEntry.objects.filter(event__ce_id__in=["b1", "b2", "b3", "b4"]).count() == 8


def test_a_peer_revoked_while_the_edge_holds_its_copies_gets_nothing_and_django_takes_the_webhook(client, team, peers):
    assert _stripe(client, team, event_id="evt_warm").status_code == 202
    services.peer_revoke(peer=peers[0])  # the routes version moves on; this process's copy of the source still has the old one
    scope, raw = scope_and_body(team, "evt_late")
    answer, _ = run(lambda front: front.take(scope, raw))
    assert answer is None  # the statement's guard found the routes changed: nothing stored, Django's to answer
    assert not Event.objects.filter(ce_id="evt_late").exists() and not _entries("evt_late")


def test_children_of_a_statement_bind_the_same_text_for_one_event_or_many(team, peers):
    """The statement's text does not depend on how many events or entries it carries (one prepared
    statement); its parameters are one array per column."""
    source = _source_with_routes(team)
    texts = set()
    for count in (1, 3):
        events = [ingest_services.new_event(source, _draft(f"t{count}-{i}")) for i in range(count)]
        alone = enqueue.route_event.alone(source, events, None)
        statement = ingest_services.store_alone_statement_many(source, events, None, alone.children)
        texts.add(statement.sql)
        assert len(statement.params[-1]) == 2 * count  # provenance: one per entry
    assert len(texts) == 1


def _source_with_routes(team):
    from ingest.models import Source
    from tests.factories import SourceFactory

    SourceFactory(team=team, name="none", kind=Source.Kind.NONE)
    source = selectors.source_for_hook(team.id, "none")
    enqueue.routes_for(team.id, source.team_routes_version)
    return source


def _draft(event_id: str):
    from ingest import cloudevent

    return cloudevent.Draft(id=event_id, type="com.stripe.charge.paid", source="", time=timezone.now(),
                            data_json=json.dumps({"id": str(uuid.uuid4())}))  # fmt: skip


def test_with_tracing_on_no_copy_is_offered_and_routing_needs_the_transaction(client, team, peers, monkeypatch):
    """route_event's span needs the transaction: no cached copy is offered for a team with peers
    (its webhook would be verified twice: once with the copy, again when the statement steps
    aside), and routing writes nothing alone."""
    from kite import tracing

    assert _stripe(client, team, event_id="evt_warm").status_code == 202
    copy = selectors.source_for_hook_copy(team.id, "stripe")
    event = ingest_services.new_event(copy, _draft("traced"))
    assert copy is not None and enqueue.route_event.alone(copy, [event], None) is not None
    monkeypatch.setattr(tracing, "ENABLED", True)
    assert selectors.source_for_hook_copy(team.id, "stripe") is None
    assert enqueue.route_event.alone(copy, [event], None) is None
