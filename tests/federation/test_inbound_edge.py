"""A peer's event delivery stored on the web process's event loop (ingest.edge), judged from this
process's copies of the sender's rows alone (federation.inbound.verify_kite_source_on_loop).

The edge may only say yes, and only where Django would: whatever it cannot judge from the copies
without the database — and every refusal — is left to Django (the edge answers None), with
nothing stored, nothing audited and the cache not grown. Each attack asserts both.
"""

import json
import time

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation import inbound, services, signing
from federation.models import AuditEvent, Peer
from ingest.models import Event
from tests.federation.test_inbound_cache import _warm
from tests.federation.test_routing_inbound import OTHER, SECRET, make_ce
from tests.ingest.test_edge import hook_request, run

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def sender(team):
    return services.trusted_sender_create(team=team, name="instance-a", inbound_token=SECRET).row


def delivery(team, event, *, secret=SECRET, sender="kite-a", timestamp=None, hook_team=None,
             content_type="application/cloudevents+json", raw: bytes | None = None):  # fmt: skip
    """A signed delivery of `event` (or a list: a batch; or `raw` bytes) as the ASGI scope and body the edge sees."""
    body = raw if raw is not None else json.dumps(event).encode()
    signed = signing.sign_headers(secret=secret, msg_id=f"msg_{time.monotonic_ns()}", body=body, sender_id=sender,
                                  timestamp=timestamp or int(time.time()), binding=signing.delivery_binding(team.id))  # fmt: skip
    return hook_request(f"/hooks/{(hook_team or team).id}/kite", content_type, body, signed.items(), scheme="https")


def take(scope, body):
    """The edge's answer to one request (tests/ingest/test_edge.py::run: in an event loop)."""
    return run(lambda front: front.take(scope, body), connections=2)[0]


def contact_just_noted(team, sender_id="kite-a") -> Peer:
    """As right after Django recorded the sender's contact (last_inbound_at, once a second)."""
    named, _ = inbound._inbound_peers[(team.id, sender_id)]
    named[0].vitals.last_inbound_at = timezone.now()
    return named[0]


def stored(team) -> set[str]:
    return set(Event.objects.filter(team=team).values_list("ce_id", flat=True))


def test_a_warm_delivery_is_stored_on_the_loop_with_the_provenance_django_would_give_it(client, team, sender):
    _warm(client, team)
    contact_just_noted(team)
    status, headers, answer = take(*delivery(team, make_ce("on-loop")))
    assert status == 202 and json.loads(answer) == {"id": "on-loop", "duplicate": False}
    assert (b"kite-instance", settings.KITE_INSTANCE_ID.encode()) in headers
    event, by_django = Event.objects.get(team=team, ce_id="on-loop"), Event.objects.get(team=team, ce_id="warm3")
    assert event.extensions == by_django.extensions  # origin, chain, hops from the sender, and kitefedpeer
    assert event.extensions["kitefedpeer"] == "instance-a" and event.extensions["kitefedorigin"] == "kite-a"
    assert (event.source_id, event.ce_type, event.data) == (by_django.source_id, by_django.ce_type, by_django.data)


def test_what_the_loop_cannot_judge_or_would_refuse_is_left_to_django_with_nothing_changed(client, team, other_team,
                                                                                            sender):  # fmt: skip
    services.trusted_sender_create(team=other_team, name="instance-a", inbound_token=OTHER)
    _warm(client, team)
    _warm(client, other_team, secret=OTHER)
    peer = contact_just_noted(team)
    contact_just_noted(other_team)
    before = (stored(team), stored(other_team), AuditEvent.objects.count(), dict(inbound._inbound_peers))
    local = make_ce("local")
    local["source"] = f"kite://{settings.KITE_INSTANCE_ID}/{team.id}/stripe"
    attacks = {
        "forged (the other team's secret)": delivery(team, make_ce("forged"), secret=OTHER),
        "unknown sender": delivery(team, make_ce("mallory"), sender="mallory"),
        "another team's hook": delivery(team, make_ce("cross"), hook_team=other_team),
        "stale": delivery(team, make_ce("stale"), timestamp=int(time.time()) - 3600),
        "from the future": delivery(team, make_ce("future"), timestamp=int(time.time()) + 3600),
        "a replay (stored already)": delivery(team, make_ce("warm1")),
        "a batch with the same event twice": delivery(team, [make_ce("twice"), make_ce("twice")],
                                                      content_type="application/cloudevents-batch+json"),
        "a batch too large for one statement": delivery(team, [make_ce(f"big{i}") for i in range(17)],
                                                        content_type="application/cloudevents-batch+json"),
        "a forged batch": delivery(team, [make_ce("forged-batch")], secret=OTHER,
                                   content_type="application/cloudevents-batch+json"),
        "a batch of no valid event": delivery(team, [{"id": "x"}], content_type="application/cloudevents-batch+json"),
        "naming this instance as its source": delivery(team, local),
        "deeply nested": delivery(team, None, raw=json.dumps(make_ce("nested")).replace('{"n": 1}', "[" * 5000 + "]" * 5000).encode()),
        "not a CloudEvent": delivery(team, {"id": "x"}),
    }
    for name, (scope, body) in attacks.items():
        assert take(scope, body) is None, name
    tampered_scope, tampered_body = delivery(team, make_ce("tampered"))
    assert take(tampered_scope, tampered_body.replace(b'"n": 1', b'"n": 2')) is None

    # Accepting would need a write or a read of its own: Django's.
    peer.vitals.last_inbound_at = timezone.now() - inbound.LAST_SEEN_RESOLUTION * 2  # the second's contact is due
    assert take(*delivery(team, make_ce("contact-due"))) is None
    peer.vitals.last_inbound_at, peer.rate_limit_per_second = timezone.now(), 5
    assert take(*delivery(team, make_ce("rate-limited"))) is None
    peer.rate_limit_per_second, peer.remote_instance_id = None, ""  # instance ID not learned: a read decides
    assert take(*delivery(team, make_ce("unlearned"))) is None
    peer.remote_instance_id = "kite-a"
    inbound._inbound_peers.pop((team.id, "kite-a"))
    assert take(*delivery(team, make_ce("cold"))) is None  # nothing copied

    assert (stored(team), stored(other_team), AuditEvent.objects.count()) == before[:3]
    assert set(inbound._inbound_peers) <= set(before[3])


def test_the_loop_verifier_never_touches_the_database(client, team, sender):
    _warm(client, team)
    contact_just_noted(team)
    cases = [delivery(team, make_ce("fine")), delivery(team, make_ce("bad"), secret=OTHER),
             delivery(team, make_ce("who"), sender="mallory")]  # fmt: skip
    with CaptureQueriesContext(connection) as queries:
        judged = [inbound.verify_kite_source_on_loop(dict((k.decode(), v.decode()) for k, v in scope["headers"]), body,
                                                     team.id) for scope, body in cases]  # fmt: skip
    assert queries.captured_queries == []
    assert judged[0] is not None and judged[0].pk == sender.pk and judged[0].store_guard is not None
    assert judged[1:] == [None, None]


def test_a_sender_revoked_behind_the_copy_stores_nothing_on_the_loop_and_django_refuses_it(client, team, sender):
    _warm(client, team)
    contact_just_noted(team)
    Peer.objects.filter(pk=sender.pk).update(status=Peer.Status.REVOKED)  # another process; the copy is not told
    scope, body = delivery(team, make_ce("after-revoke"))
    assert take(scope, body) is None  # the statement's guard found the row changed
    assert stored(team) == {"warm1", "warm2", "warm3"}
    wsgi = {"HTTP_" + name.decode().upper().replace("-", "_"): value.decode() for name, value in scope["headers"]
            if name.startswith(b"webhook-") or name.startswith(b"kite-")}  # fmt: skip
    refused = client.post(scope["path"], body, content_type="application/cloudevents+json", **wsgi)
    assert refused.status_code == 401 and refused.json()["code"] == "unknown_peer", refused.json()
    assert stored(team) == {"warm1", "warm2", "warm3"}


BATCH = "application/cloudevents-batch+json"


def test_a_warm_batch_is_stored_on_the_loop_with_a_result_per_event_as_django_answers_it(client, team, sender):
    """One statement for the batch's valid events; a stored one is a duplicate, an invalid one
    rejected — the answer Django's events_store_batch gives, with the same provenance stored."""
    _warm(client, team)
    contact_just_noted(team)
    before = AuditEvent.objects.count()
    status, headers, answer = take(*delivery(team, [make_ce("b1"), {"id": "bad"}, make_ce("warm1"), make_ce("b2")],
                                             content_type=BATCH))  # fmt: skip
    assert status == 200 and (b"kite-instance", settings.KITE_INSTANCE_ID.encode()) in headers
    results = json.loads(answer)
    assert [r["result"] for r in results] == ["accepted", "rejected", "duplicate", "accepted"]
    assert [r["id"] for r in results[2:]] == ["warm1", "b2"] and results[1]["detail"]
    by_django = Event.objects.get(team=team, ce_id="warm3")
    for event_id in ("b1", "b2"):
        event = Event.objects.get(team=team, ce_id=event_id)
        assert event.extensions == by_django.extensions and event.source_id == by_django.source_id
    assert Event.objects.filter(team=team, ce_id="warm1").count() == 1 and AuditEvent.objects.count() == before
    txids = set(Event.objects.filter(team=team, ce_id__in=["b1", "b2"]).values_list("txid", flat=True))
    assert len(txids) == 1  # one statement


def test_a_batch_whose_sender_was_revoked_behind_the_copy_stores_nothing_on_the_loop(client, team, sender):
    _warm(client, team)
    contact_just_noted(team)
    services.peer_revoke(peer=sender)
    assert take(*delivery(team, [make_ce("late1"), make_ce("late2")], content_type=BATCH)) is None
    assert not {"late1", "late2"} & stored(team)
