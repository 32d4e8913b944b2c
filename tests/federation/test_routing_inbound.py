"""Routing into the outbox (in the event's transaction) and verifying inbound peer requests."""

import json
import time

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from prometheus_client import REGISTRY

from federation import certificates, outbox, services, signing
from federation.models import OutboxEntry, Peer
from ingest.models import Event, Source
from kite.models import Team
from tests.factories import SOURCE_SECRET, SourceFactory
from tests.signing import stripe_signature

SECRET = "whsec_c2hhcmVkLXNlY3JldC1mb3ItZmVkZXJhdGlvbi10ZXN0cyE="
OTHER = "whsec_YW5vdGhlci1zZWNyZXQtZm9yLWZlZGVyYXRpb24tdGVzdHM="


def _peer(team, name="instance-b", scopes=("stripe.*",), remote="", max_hops=3):
    peer = services.peer_create(
        team=team, name=name, peer_hook_url="https://127.0.0.1:9/hooks/x/kite", outbound_token=SECRET,
        inbound_token=SECRET, scopes=list(scopes), max_hops=max_hops,
    ).row  # fmt: skip
    if remote:
        peer.remote_instance_id = remote
        peer.save()
    return peer


def _stripe(client, team, event_type="payment_intent.succeeded", event_id="evt_1"):
    SourceFactory(team=team, name="stripe", kind="stripe") if not team.sources.filter(name="stripe").exists() else None
    body = json.dumps({"id": event_id, "type": event_type}).encode()
    return client.post(
        f"/hooks/{team.id}/stripe", body, content_type="application/json",
        HTTP_STRIPE_SIGNATURE=stripe_signature(SOURCE_SECRET, body),
    )  # fmt: skip


def _dropped(peer, reason):
    return REGISTRY.get_sample_value("kite_federation_dropped_total", {"peer": peer, "reason": reason}) or 0


def signed_post(client, team, event, secret=SECRET, sender="instance-a", msg_id="msg_1", timestamp=None):
    body = json.dumps(event).encode()
    headers = signing.sign_headers(
        secret=secret, msg_id=msg_id, timestamp=timestamp or int(time.time()), body=body, sender_id=sender,
        binding=signing.delivery_binding(team.id),
    )
    wsgi = {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}
    return client.post(f"/hooks/{team.id}/kite", body, content_type="application/cloudevents+json", **wsgi)


def make_ce(event_id="e1", event_type="com.stripe.charge.succeeded", **extensions):
    return {"specversion": "1.0", "id": event_id, "source": "kite://a/tm/stripe", "type": event_type,
            "data": {"n": 1}, **extensions}  # fmt: skip


# --- routing -------------------------------------------------------------------


def test_matching_event_gets_one_outbox_entry_with_first_hop_provenance(client, team, settings):
    peer = _peer(team)
    assert _stripe(client, team).status_code == 202
    entry = OutboxEntry.objects.get()
    assert entry.peer_id == peer.pk and entry.status == "pending" and entry.event.ce_id == "evt_1"
    me = settings.KITE_INSTANCE_ID
    assert entry.provenance == {"kitefedorigin": me, "kitefedchain": json.dumps([me]), "kitefedhops": 1}


def test_scope_mismatch_stays_local_and_is_counted(client, team):
    _peer(team, name="only-github", scopes=["github.*"])
    before = _dropped("only-github", "scope")
    assert _stripe(client, team).status_code == 202
    assert not OutboxEntry.objects.exists()
    assert _dropped("only-github", "scope") == before + 1


def test_duplicate_webhook_writes_no_second_outbox_entry(client, team):
    _peer(team)
    _stripe(client, team)
    assert _stripe(client, team).status_code == 200
    assert OutboxEntry.objects.count() == 1


def test_other_teams_peers_never_get_this_teams_events(client, team, other_team):
    _peer(other_team, scopes=["*"])
    _stripe(client, team)
    assert not OutboxEntry.objects.exists()


def test_revoked_peer_gets_nothing(client, team):
    services.peer_revoke(peer=_peer(team))
    _stripe(client, team)
    assert not OutboxEntry.objects.exists()


# --- inbound -------------------------------------------------------------------


@pytest.fixture
def sender(team):
    return services.trusted_sender_create(team=team, name="instance-a", inbound_token=SECRET).row


def test_signed_event_from_a_trusted_sender_is_stored_and_its_instance_id_learned(client, team, sender):
    response = signed_post(client, team, make_ce(kitefedorigin="kite-a", kitefedchain='["kite-a"]', kitefedhops=1),
                            sender="kite-a")  # fmt: skip
    assert response.status_code == 202, response.json()
    event = Event.objects.get(team=team, ce_id="e1")
    assert event.ce_source == "kite://a/tm/stripe"
    assert event.extensions == {"kitefedorigin": "kite-a", "kitefedchain": '["kite-a"]', "kitefedhops": 1,
                                "kitefedpeer": "instance-a"}  # fmt: skip
    assert Peer.objects.get(pk=sender.pk).remote_instance_id == "kite-a"


def test_an_event_without_provenance_gets_it_from_the_authenticated_sender(client, team, sender):
    forged = make_ce("p1", kitefedpeer="someone-else")  # a body cannot name who handed it over either
    assert signed_post(client, team, forged, sender="kite-a").status_code == 202
    event = Event.objects.get(team=team, ce_id="p1")
    assert event.extensions == {"kitefedorigin": "kite-a", "kitefedchain": '["kite-a"]', "kitefedhops": 1,
                                "kitefedpeer": "instance-a"}  # fmt: skip
    assert event.to_cloudevent()["kitefedpeer"] == "instance-a"  # what /api/events and listeners show
    entry = OutboxEntry(event=event, provenance={"kitefedorigin": "kite-a"})
    sent = json.loads(outbox.wire_json(entry))
    assert "kitefedpeer" not in sent and "kitecursor" not in sent  # never carried on to the next peer
    assert sent["kitefedorigin"] == "kite-a" and sent["id"] == "p1" and sent["data"] == event.to_cloudevent()["data"]


@pytest.mark.parametrize("claimed", [
    f"kite://{django_settings.KITE_INSTANCE_ID}/tm_x/stripe", f"kite://{django_settings.KITE_INSTANCE_ID}/",
], ids=["a-source-here", "this-instance"])  # fmt: skip
def test_a_peer_cannot_deliver_an_event_as_if_it_had_been_received_here(client, team, sender, claimed):
    event = {**make_ce("forged"), "source": claimed, "type": "com.stripe.payment_intent.succeeded"}
    response = signed_post(client, team, event, sender="kite-a")
    assert response.status_code == 400 and response.json()["code"] == "local_source", response.json()
    assert not Event.objects.filter(team=team).exists()
    batch = signed_batch(client, team, [event, make_ce("fine")], sender="kite-a")
    assert [r["result"] for r in batch.json()] == ["rejected", "accepted"]
    assert list(Event.objects.filter(team=team).values_list("ce_id", flat=True)) == ["fine"]


def test_the_same_delivery_again_has_no_second_effect(client, team, sender):
    assert signed_post(client, team, make_ce()).status_code == 202
    again = signed_post(client, team, make_ce())
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert Event.objects.filter(team=team, ce_id="e1").count() == 1


@pytest.mark.parametrize(
    "kwargs, code",
    [
        ({"secret": OTHER}, "bad_secret"),
        ({"secret": OTHER, "sender": "somebody-else"}, "unknown_peer"),
        ({"timestamp": int(time.time()) - 600}, "stale_timestamp"),
    ],
)
def test_refused_requests_name_the_failing_factor_and_store_nothing(client, team, sender, kwargs, code):
    response = signed_post(client, team, make_ce(), **kwargs)
    assert response.status_code == 401 and response.json()["code"] == code
    assert not Event.objects.filter(team=team, ce_id="e1").exists()


def test_unsigned_post_to_the_kite_source_is_refused(client, team, sender):
    response = client.post(f"/hooks/{team.id}/kite", json.dumps(make_ce()), content_type="application/json")
    assert response.status_code == 401 and response.json()["code"] == "missing_signature"


def test_a_sender_of_another_team_is_unknown_here(client, team, other_team):
    services.trusted_sender_create(team=other_team, name="instance-a", inbound_token=SECRET)
    response = signed_post(client, team, make_ce())
    assert response.status_code == 401 and response.json()["code"] == "unknown_peer"


def test_revoked_sender_is_refused(client, team, sender):
    services.peer_revoke(peer=sender)
    assert signed_post(client, team, make_ce()).json()["code"] == "unknown_peer"


def test_inbound_rate_limit_answers_429_with_retry_after(client, team, sender):
    Peer.objects.filter(pk=sender.pk).update(rate_limit_per_second=1)
    first = signed_post(client, team, make_ce("r1"), msg_id="m1")
    second = signed_post(client, team, make_ce("r2"), msg_id="m2")
    assert first.status_code == 202
    assert second.status_code == 429 and second["Retry-After"] and second.json()["code"] == "rate_limited"
    assert not Event.objects.filter(ce_id="r2").exists()


def test_event_from_a_peer_goes_onward_but_never_back(client, team, sender):
    onward = _peer(team, name="instance-c", scopes=["*"], remote="kite-c")
    back = _peer(team, name="instance-a-out", scopes=["*"], remote="kite-a")
    arrived = make_ce(kitefedorigin="kite-a", kitefedchain='["kite-a"]', kitefedhops=1)
    assert signed_post(client, team, arrived, sender="kite-a").status_code == 202
    entry = OutboxEntry.objects.get()
    assert entry.peer_id == onward.pk and entry.provenance["kitefedhops"] == 2
    assert json.loads(entry.provenance["kitefedchain"])[0] == "kite-a"
    assert back.pk != entry.peer_id


def test_hop_limit_drop_emits_an_internal_event_that_never_leaves(client, team, sender):
    peer = _peer(team, name="instance-c", scopes=["*"], remote="kite-c", max_hops=2)
    before = _dropped("instance-c", "max_hops")
    arrived = make_ce(kitefedorigin="kite-x", kitefedchain='["kite-x", "kite-a"]', kitefedhops=2)
    assert signed_post(client, team, arrived, sender="kite-a").status_code == 202
    assert not OutboxEntry.objects.filter(peer=peer).exists()
    failed = Event.objects.get(team=team, ce_type="kite.federation.delivery_failed")
    assert json.loads(failed.data)["peer"] == "instance-c" and json.loads(failed.data)["reason"] == "max_hops"
    assert _dropped("instance-c", "max_hops") == before + 1


def signed_batch(client, team, events, secret=SECRET, sender="instance-a"):
    body = json.dumps(events).encode()
    headers = signing.sign_headers(secret=secret, msg_id="batch_1", timestamp=int(time.time()), body=body,
                                   sender_id=sender, binding=signing.delivery_binding(team.id))  # fmt: skip
    wsgi = {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}
    return client.post(f"/hooks/{team.id}/kite", body, content_type="application/cloudevents-batch+json", **wsgi)


def test_a_batch_answers_one_result_per_event(client, team, sender):
    assert signed_post(client, team, make_ce("b1")).status_code == 202
    response = signed_batch(client, team, [make_ce("b1"), make_ce("b2"), {"specversion": "0.3", "id": "x"}, make_ce("b3")])
    assert response.status_code == 200
    assert [(item["id"], item["result"]) for item in response.json()] == [
        ("b1", "duplicate"), ("b2", "accepted"), ("", "rejected"), ("b3", "accepted"),
    ]  # fmt: skip
    assert "specversion" in response.json()[2]["detail"]
    assert sorted(Event.objects.filter(team=team).values_list("ce_id", flat=True)) == ["b1", "b2", "b3"]


@pytest.mark.parametrize("body", [[], {"not": "a list"}, [make_ce(f"n{i}") for i in range(1001)]])
def test_a_malformed_batch_is_refused_whole(client, team, sender, body):
    response = signed_batch(client, team, body)
    assert response.status_code == 400 and response.json()["code"] == "invalid_event"
    assert not Event.objects.filter(team=team, source__name="kite").exists()


def test_a_batch_with_a_bad_signature_stores_nothing(client, team, sender):
    response = signed_batch(client, team, [make_ce("s1")], secret=OTHER)
    assert response.status_code == 401 and not Event.objects.filter(ce_id="s1").exists()


def test_hook_answers_name_this_instance(client, team, sender, settings):
    assert signed_post(client, team, make_ce())["kite-instance"] == settings.KITE_INSTANCE_ID
    assert client.post(f"/hooks/{team.id}/kite", b"{}", content_type="application/json")["kite-instance"]


def test_a_sender_row_not_yet_identified_is_tried_but_cannot_take_a_pinned_peers_instance_id(client, team):
    # The team's peer row for B knows B's instance id, pins B's certificate and holds another
    # inbound secret. A second, unidentified row signing as "kite-b" without that certificate would
    # take the id (which loop rules, provenance and grants key on): refused, nothing stored,
    # nothing learned. Under its own id it is fine.
    b_cert = certificates.issue(team=Team.objects.create(name="b-holder"), subject="kite-b")
    services.peer_create(team=team, name="b-out", peer_hook_url="https://127.0.0.1:9/hooks/x/kite",
                         outbound_token=SECRET, inbound_token=OTHER, scopes=["*"],
                         certificate_pem=b_cert.pem)  # fmt: skip
    Peer.objects.filter(name="b-out").update(remote_instance_id="kite-b")
    inbound = services.trusted_sender_create(team=team, name="b-in", inbound_token=SECRET).row
    claimed = signed_post(client, team, make_ce("fb"), sender="kite-b")
    assert claimed.status_code == 409 and claimed.json()["code"] == "instance_id_taken"
    assert not Event.objects.filter(team=team).exists()
    assert Peer.objects.get(pk=inbound.pk).remote_instance_id == ""
    assert signed_post(client, team, make_ce("fc"), sender="kite-c").status_code == 202
    assert Peer.objects.get(pk=inbound.pk).remote_instance_id == "kite-c"


def test_a_peer_and_a_trusted_sender_made_by_hand_for_one_instance_share_its_id(client, team):
    # The by-hand bidirectional set-up: a peer row (we send to B) and a trusted sender (B sends to
    # us), neither pinning a certificate. Their ID is proven by nothing but secrets either way.
    services.peer_create(team=team, name="b-out", peer_hook_url="https://127.0.0.1:9/hooks/x/kite",
                         outbound_token=SECRET, inbound_token=OTHER, scopes=["*"])  # fmt: skip
    Peer.objects.filter(name="b-out").update(remote_instance_id="kite-b")
    inbound = services.trusted_sender_create(team=team, name="b-in", inbound_token=SECRET).row
    assert signed_post(client, team, make_ce("fb"), sender="kite-b").status_code == 202
    assert Peer.objects.get(pk=inbound.pk).remote_instance_id == "kite-b"


def test_a_scope_change_applies_to_the_next_event_at_once(client, team):
    peer = _peer(team, scopes=["github.*"])
    _stripe(client, team, event_id="before")
    services.peer_update(peer=peer, scopes=["stripe.*"])
    _stripe(client, team, event_id="after")
    assert list(OutboxEntry.objects.values_list("event__ce_id", flat=True)) == ["after"]
    services.peer_revoke(peer=Peer.objects.get(pk=peer.pk))
    _stripe(client, team, event_id="revoked")
    assert list(OutboxEntry.objects.filter(status="pending").values_list("event__ce_id", flat=True)) == []


def test_a_peer_change_made_by_another_process_is_seen_by_the_next_event(team):
    from federation import enqueue

    peer = _peer(team, scopes=["github.*"])
    assert [r.scopes for r in enqueue.routes_for(team.id)] == [("github.*",)]
    # Another web process changed the peer and, in the same transaction, bumped the team's version.
    Peer.objects.filter(pk=peer.pk).update(scopes=["stripe.*"])
    assert [r.scopes for r in enqueue.routes_for(team.id)] == [("github.*",)]  # cached here
    Team.objects.filter(pk=team.id).update(routes_version=F("routes_version") + 1)
    assert [r.scopes for r in enqueue.routes_for(team.id)] == [("stripe.*",)]


def test_a_webhook_reads_the_routes_version_with_its_source_and_nothing_else(client, team):
    """Routes cached in this process: the routing hook costs no query of its own; a peer
    added later bumps the version, and the next webhook reloads and routes."""
    Source.objects.create(team=team, name="plain", kind="none")

    def post(event_id):
        with CaptureQueriesContext(connection) as captured:
            answer = client.post(f"/hooks/{team.id}/plain", data=json.dumps({"id": event_id, "type": "com.x.y"}),
                                 content_type="application/json")  # fmt: skip
        assert answer.status_code == 202, answer.content
        return [q["sql"] for q in captured.captured_queries]

    post("warm")  # loads this process's (empty) routes for the team
    queries = post("quiet")
    assert not [q for q in queries if "federation_peer" in q or "federation_outboxentry" in q], queries
    assert sum("routes_version" in q for q in queries) == 1  # read with the source, once
    peer = _peer(team, scopes=["x.*"])
    queries = post("routed")
    assert sum("federation_peer" in q for q in queries) == 1  # reloaded once
    assert list(OutboxEntry.objects.filter(peer=peer).values_list("event__ce_id", flat=True)) == ["routed"]
