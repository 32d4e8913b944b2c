"""GET /api/events/{id}/journey and the journey screen: how an event arrived, each peer's outbox
entry with its delivery attempts, the instances it crossed. Webhooks come in over the real hook
endpoint; deliveries go over real HTTPS to a loopback endpoint that answers what a test needs."""

import json
import time
from datetime import timedelta
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation import outbox, services, signing
from federation.models import Delivery, OutboxEntry, Peer
from ingest.models import Event
from tests.factories import SOURCE_SECRET, SourceFactory
from tests.federation.test_delivery import Endpoint
from tests.screens import member, outsider, owner  # noqa: F401  (fixtures)
from tests.signing import stripe_signature

SECRET = "whsec_c2hhcmVkLXNlY3JldC1mb3ItZmVkZXJhdGlvbi10ZXN0cyE="
ATTEMPTS_SHOWN = 50


def journey_of(api, event_id: str, **query):
    return api.get(f"/api/events/{quote(event_id, safe='')}/journey", query)


def post_stripe(client, team, event_id, source="stripe", event_type="payment_intent.succeeded"):
    if not team.sources.filter(name=source).exists():
        SourceFactory(team=team, name=source, kind="stripe")
    body = json.dumps({"id": event_id, "type": event_type, "created": 1700000000}).encode()
    answer = client.post(f"/hooks/{team.id}/{source}", body, content_type="application/json",
                         HTTP_STRIPE_SIGNATURE=stripe_signature(SOURCE_SECRET, body))  # fmt: skip
    assert answer.status_code == 202, answer.content
    return Event.objects.get(team=team, ce_id=event_id, source__name=source)


def post_plain(client, team, event_id, source="plain"):
    if not team.sources.filter(name=source).exists():
        SourceFactory(team=team, name=source, kind="none")
    answer = client.post(f"/hooks/{team.id}/{source}", {"id": event_id, "type": "com.example.ping"},
                         content_type="application/json")  # fmt: skip
    assert answer.status_code == 202, answer.content
    return Event.objects.get(team=team, ce_id=event_id, source__name=source)


def deliver_signed(client, team, event: dict, sender="instance-a", secret=SECRET):
    """What a peer's outbox sends: a signed structured CloudEvent to the team's kite hook."""
    body = json.dumps(event).encode()
    headers = signing.sign_headers(secret=secret, msg_id=f"m{time.monotonic_ns()}", timestamp=int(time.time()),
                                   body=body, sender_id=sender, binding=signing.delivery_binding(team.id))  # fmt: skip
    wsgi = {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}
    return client.post(f"/hooks/{team.id}/kite", body, content_type="application/cloudevents+json", **wsgi)


@pytest.fixture
def endpoint(tmp_path):
    started = Endpoint(tmp_path)
    yield started
    started.close()


@pytest.fixture
def peer(team, endpoint):
    return services.peer_create(team=team, name="b", peer_hook_url=endpoint.url, outbound_token=SECRET,
                                scopes=["stripe.*"], tls_fingerprint=endpoint.fingerprint).row  # fmt: skip


@pytest.fixture
def sender(team):
    return services.trusted_sender_create(team=team, name="a", inbound_token=SECRET).row


def _make_due():
    OutboxEntry.objects.filter(status="pending").update(next_attempt_at=timezone.now())


# --- what the journey says ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # GET /api/events reads committed events only
def test_a_local_event_sent_to_no_peer_shows_its_arrival_and_no_peers(api, client, team):
    stored = post_stripe(client, team, "evt_local")
    answer = journey_of(api, "evt_local")
    assert answer.status_code == 200, answer.content
    body = answer.json()
    deadline = time.monotonic() + 10
    while not (listed := api.get("/api/events").json()["results"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert body["event"] == listed[0]  # the event exactly as /api/events shows it
    assert body["arrival"] == {
        "source": "stripe", "kind": "stripe", "ce_source": stored.ce_source, "verification": "verified",
        "verified_by": "Stripe-Signature (the source's secret)", "peer": None,
        "received_at": stored.received_at.isoformat().replace("+00:00", "Z"),
    }  # fmt: skip
    assert body["peers"] == []
    here = settings.KITE_INSTANCE_ID
    assert body["provenance"] == {"origin": None, "chain": [], "hops": 0, "here": here, "path": [here],
                                  "extensions": {}}  # fmt: skip


def test_an_unverified_source_says_verification_none(api, client, team):
    post_plain(client, team, "evt_open")
    arrival = journey_of(api, "evt_open").json()["arrival"]
    assert (arrival["kind"], arrival["verification"]) == ("none", "none")
    assert "unverified" in arrival["verified_by"]


def test_another_teams_event_is_404_exactly_like_a_missing_one(api, outsider_api, anonymous_api, client, team):
    post_stripe(client, team, "evt_owned")
    theirs, missing = journey_of(outsider_api, "evt_owned"), journey_of(outsider_api, "evt_nowhere")
    assert (theirs.status_code, missing.status_code) == (404, 404)
    assert theirs.json() == {"detail": "No event 'evt_owned' in your team.", "code": "event_not_found"}
    assert missing.json() == {"detail": "No event 'evt_nowhere' in your team.", "code": "event_not_found"}
    assert journey_of(outsider_api, "evt_owned", source="stripe").json() == theirs.json()
    assert journey_of(anonymous_api, "evt_owned").status_code == 401
    assert journey_of(api, "evt_owned").status_code == 200


def test_a_member_session_reads_it_and_an_outsiders_gets_404(member, outsider, client, team):  # noqa: F811
    post_stripe(client, team, "evt_member")
    assert member.get("/api/events/evt_member/journey").json()["arrival"]["source"] == "stripe"
    answer = outsider.get("/api/events/evt_member/journey")
    assert answer.status_code == 404 and answer.json()["code"] == "event_not_found"


def test_an_id_several_sources_have_is_409_naming_them_until_source_picks_one(api, client, team):
    stripe = post_stripe(client, team, "evt_twice")
    plain = post_plain(client, team, "evt_twice")
    answer = journey_of(api, "evt_twice")
    assert answer.status_code == 409
    body = answer.json()
    assert body["code"] == "ambiguous_event" and body["sources"] == [stripe.ce_source, plain.ce_source]
    assert stripe.ce_source in body["detail"] and plain.ce_source in body["detail"] and "?source=" in body["detail"]
    by_ce_source = journey_of(api, "evt_twice", source=plain.ce_source)
    assert by_ce_source.status_code == 200 and by_ce_source.json()["arrival"]["source"] == "plain"
    by_name = journey_of(api, "evt_twice", source="stripe")
    assert by_name.status_code == 200 and by_name.json()["arrival"]["ce_source"] == stripe.ce_source
    assert journey_of(api, "evt_twice", source="").status_code == 409  # empty: not given
    unknown = journey_of(api, "evt_twice", source="kite://elsewhere/tm/x")
    assert unknown.status_code == 404 and unknown.json()["code"] == "event_not_found"


def test_two_producers_with_one_id_on_a_cloudevents_source_are_told_apart_by_their_source(api, client, team):
    token = api.post("/api/sources", {"name": "producers", "kind": "cloudevents", "auth": "token"},
                     format="json").json()["token"]  # fmt: skip
    for producer in ("urn:shop:orders", "urn:shop:billing"):
        event = {"specversion": "1.0", "id": "42", "source": producer, "type": "com.shop.x", "data": {}}
        answer = client.post(f"/hooks/{team.id}/producers", json.dumps(event),
                             content_type="application/cloudevents+json", headers={"authorization": f"Bearer {token}"})
        assert answer.status_code == 202, answer.content
    ambiguous = journey_of(api, "42")
    assert ambiguous.status_code == 409 and ambiguous.json()["sources"] == ["urn:shop:orders", "urn:shop:billing"]
    assert journey_of(api, "42", source="producers").status_code == 409  # the Kite source has both
    billing = journey_of(api, "42", source="urn:shop:billing").json()
    assert billing["event"]["source"] == "urn:shop:billing"
    assert (billing["arrival"]["kind"], billing["arrival"]["verification"]) == ("cloudevents", "verified")
    assert billing["arrival"]["verified_by"] == "the source's bearer token"


def test_ids_no_event_can_have_are_404_and_an_id_with_a_slash_is_found(api, client, team):
    post_plain(client, team, "orders/42")
    assert journey_of(api, "orders/42").json()["event"]["id"] == "orders/42"  # sent as orders%2F42
    for impossible in ("a\x00b", "x" * 256):
        answer = journey_of(api, impossible)
        assert answer.status_code == 404 and answer.json()["code"] == "event_not_found", impossible
    assert journey_of(api, "orders/42", source="a\x00b").status_code == 404


def test_a_delivered_entry_shows_every_attempt_with_the_webhook_id_the_peer_saw(api, client, team, peer, endpoint):
    endpoint.answers = [(503, {}, {"detail": "busy", "code": "x"})]
    post_stripe(client, team, "evt_retry")
    assert outbox.deliver_peer(peer.pk) == 0
    (first,) = journey_of(api, "evt_retry").json()["peers"]
    assert (first["peer"], first["peer_id"], first["status"], first["attempt_count"]) == ("b", peer.pk, "pending", 1)
    assert first["attempts"][0]["status_code"] == 503 and first["attempts"][0]["outcome"] == "transient"
    assert "503" in first["attempts"][0]["error"] and "503" in first["last_error"]
    assert first["next_attempt_at"] is not None and first["delivered_at"] is None

    _make_due()
    assert outbox.deliver_peer(peer.pk) == 1
    (done,) = journey_of(api, "evt_retry").json()["peers"]
    assert (done["status"], done["attempt_count"], done["next_attempt_at"]) == ("delivered", 2, None)
    assert [(a["status_code"], a["outcome"]) for a in done["attempts"]] == [(503, "transient"), (202, "delivered")]
    assert all(isinstance(a["latency_ms"], int) for a in done["attempts"])
    entry = OutboxEntry.objects.get()
    assert done["delivered_at"] == entry.delivered_at.isoformat().replace("+00:00", "Z")
    assert done["webhook_id"] == str(entry.msg_id) == endpoint.requests[-1][0]["webhook-id"]
    me = settings.KITE_INSTANCE_ID
    assert done["sent_provenance"] == {"kitefedorigin": me, "kitefedchain": json.dumps([me]), "kitefedhops": 1}


def test_a_dead_entry_says_dead_with_the_refusal(api, client, team, peer, endpoint):
    endpoint.answers = [(422, {}, {"detail": "unsupported contract", "code": "x"})]
    post_stripe(client, team, "evt_dead")
    outbox.deliver_peer(peer.pk)
    (dead,) = journey_of(api, "evt_dead").json()["peers"]
    assert (dead["status"], dead["attempt_count"], dead["next_attempt_at"]) == ("dead", 1, None)
    (attempt,) = dead["attempts"]
    assert (attempt["status_code"], attempt["outcome"]) == (422, "permanent")
    assert "unsupported contract" in attempt["error"] and "unsupported contract" in dead["last_error"]


def test_thousands_of_attempts_show_the_newest_fifty_and_a_count_in_a_few_queries(api, client, team, peer):
    post_stripe(client, team, "evt_many")
    entry = OutboxEntry.objects.get()
    start = timezone.now() - timedelta(hours=5)
    Delivery.objects.bulk_create(
        Delivery(peer=peer, entry=entry, attempted_at=start + timedelta(seconds=n), status_code=503,
                 outcome="transient", latency_ms=n, error=f"attempt {n}")
        for n in range(3000)
    )  # fmt: skip
    with CaptureQueriesContext(connection) as queries:
        answer = journey_of(api, "evt_many")
    (shown,) = answer.json()["peers"]
    assert shown["attempt_count"] == 3000 and len(shown["attempts"]) == ATTEMPTS_SHOWN
    assert [a["error"] for a in shown["attempts"]] == [f"attempt {n}" for n in range(2950, 3000)]  # oldest first
    assert len(queries) <= 8, [q["sql"] for q in queries.captured_queries]


def test_an_entry_per_peer_each_with_its_own_attempts(api, client, team, peer, endpoint, tmp_path):
    other = Endpoint(tmp_path / "c")
    try:
        other.answers = [(404, {}, {"detail": "no such team", "code": "unknown_team"})]
        second = services.peer_create(team=team, name="c", peer_hook_url=other.url, outbound_token=SECRET,
                                      scopes=["stripe.*"], tls_fingerprint=other.fingerprint).row  # fmt: skip
        post_stripe(client, team, "evt_two_peers")
        outbox.deliver_peer(peer.pk)
        outbox.deliver_peer(second.pk)
    finally:
        other.close()
    peers = journey_of(api, "evt_two_peers").json()["peers"]
    assert [(p["peer"], p["status"], [a["status_code"] for a in p["attempts"]]) for p in peers] == [
        ("b", "delivered", [202]), ("c", "dead", [404])]  # fmt: skip


def test_a_federated_event_shows_the_sending_peer_and_the_chain_it_crossed(api, client, team, sender):
    event = {"specversion": "1.0", "id": "evt_far", "source": "kite://kite-o/tm_o/stripe", "type": "com.stripe.x",
             "data": {"n": 1}, "kitefedorigin": "kite-o", "kitefedchain": json.dumps(["kite-o", "kite-m"]),
             "kitefedhops": 2}  # fmt: skip
    assert deliver_signed(client, team, event, sender="kite-m").status_code == 202
    body = journey_of(api, "evt_far").json()
    arrival, provenance = body["arrival"], body["provenance"]
    seen = (arrival["source"], arrival["kind"], arrival["verification"], arrival["peer"])
    assert seen == ("kite", "kite", "verified", "a")
    assert arrival["verified_by"] == "the sending peer's signature"
    here = settings.KITE_INSTANCE_ID
    assert provenance == {"origin": "kite-o", "chain": ["kite-o", "kite-m"], "hops": 2, "here": here,
                          "path": ["kite-o", "kite-m", here],
                          "extensions": {"kitefedorigin": "kite-o", "kitefedchain": '["kite-o", "kite-m"]',
                                         "kitefedhops": 2}}  # fmt: skip
    assert body["event"]["kitefedpeer"] == "a"


def test_a_federated_event_without_provenance_gets_the_sender_as_origin(api, client, team, sender):
    event = {"specversion": "1.0", "id": "evt_near", "source": "kite://kite-n/tm_n/stripe", "type": "com.x.y",
             "data": {}}  # fmt: skip
    assert deliver_signed(client, team, event, sender="kite-n").status_code == 202
    provenance = journey_of(api, "evt_near").json()["provenance"]
    assert (provenance["origin"], provenance["chain"], provenance["hops"]) == ("kite-n", ["kite-n"], 1)


def test_an_event_unverified_where_it_was_first_received_stays_verification_none(api, client, team, sender):
    event = {"specversion": "1.0", "id": "evt_anyone", "source": "kite://kite-u/tm_u/open", "type": "com.x.y",
             "data": {}, "kiteunverified": True}  # fmt: skip
    assert deliver_signed(client, team, event, sender="kite-u").status_code == 202
    arrival = journey_of(api, "evt_anyone").json()["arrival"]
    assert (arrival["verification"], arrival["peer"]) == ("none", "a")
    assert "it came in unverified there" in arrival["verified_by"]


def test_a_malformed_chain_is_null_and_shown_as_carried(api, client, team, sender):
    event = {"specversion": "1.0", "id": "evt_odd", "source": "kite://kite-x/tm/s", "type": "com.x.y", "data": {},
             "kitefedorigin": "kite-x", "kitefedchain": "not json", "kitefedhops": "many"}  # fmt: skip
    assert deliver_signed(client, team, event, sender="kite-x").status_code == 202
    provenance = journey_of(api, "evt_odd").json()["provenance"]
    assert (provenance["origin"], provenance["chain"], provenance["hops"]) == ("kite-x", None, None)
    assert provenance["path"] == ["kite-x", settings.KITE_INSTANCE_ID]
    assert provenance["extensions"]["kitefedchain"] == "not json"


def test_nothing_changes_when_the_journey_is_read(api, client, team, peer, endpoint):
    post_stripe(client, team, "evt_read")
    outbox.deliver_peer(peer.pk)
    before = (list(OutboxEntry.objects.values()), list(Delivery.objects.values()), list(Peer.objects.values()))
    for _ in range(3):
        assert journey_of(api, "evt_read").status_code == 200
    assert (list(OutboxEntry.objects.values()), list(Delivery.objects.values()), list(Peer.objects.values())) == before


# --- the screen ----------------------------------------------------------------------------


def _page(response) -> str:
    return response.content.decode()


def test_each_event_on_the_events_screen_links_to_its_journey(owner, client, team):  # noqa: F811
    stored = post_plain(client, team, "orders/7")
    page = _page(owner.get("/events/"))
    assert f'href="/events/journey/?id=orders%2F7&amp;source={quote(stored.ce_source, safe="")}"' in page


def test_the_screen_shows_arrival_peers_attempts_and_provenance(owner, client, team, peer, endpoint):  # noqa: F811
    endpoint.answers = [(503, {}, {"detail": "busy", "code": "x"})]
    stored = post_stripe(client, team, "evt_screen")
    outbox.deliver_peer(peer.pk)
    _make_due()
    outbox.deliver_peer(peer.pk)
    answer = owner.get("/events/journey/", {"id": "evt_screen", "source": stored.ce_source})
    assert answer.status_code == 200
    page = _page(answer)
    assert 'data-verification="verified"' in page and "Stripe-Signature" in page
    assert 'data-peer="b"' in page and '<span class="status status-delivered">delivered</span>' in page
    assert page.count("<td>transient</td>") == 1 and page.count("<td>delivered</td>") == 1
    assert ">503<" in page and ">202<" in page and "busy" in page
    assert f'href="/settings/federation/peers/{peer.pk}/"' in page  # team admins reach the peer's page
    assert "Born here" in page


def test_a_member_sees_the_journey_without_links_to_peer_settings(member, client, team, peer, endpoint):  # noqa: F811
    post_stripe(client, team, "evt_seen")
    outbox.deliver_peer(peer.pk)
    page = _page(member.get("/events/journey/", {"id": "evt_seen"}))
    assert 'data-peer="b"' in page and f'href="/settings/federation/peers/{peer.pk}/"' not in page


def test_the_journey_screen_of_a_federated_event_draws_its_chain(owner, client, team, sender):  # noqa: F811
    event = {"specversion": "1.0", "id": "evt_chain", "source": "kite://kite-o/tm_o/stripe", "type": "com.x.y",
             "data": {}, "kitefedorigin": "kite-o", "kitefedchain": json.dumps(["kite-o"]),
             "kitefedhops": 1}  # fmt: skip
    assert deliver_signed(client, team, event, sender="kite-o").status_code == 202
    page = _page(owner.get("/events/journey/", {"id": "evt_chain"}))
    assert '<li class="done">kite-o</li><li class="current">' + settings.KITE_INSTANCE_ID + " (here)</li>" in page
    assert '<td class="arrival-peer">a</td>' in page
    assert "Sent to no peer" in page


def test_the_journey_screen_lists_the_sources_of_an_ambiguous_id(owner, client, team):  # noqa: F811
    stripe, plain = post_stripe(client, team, "evt_dup"), post_plain(client, team, "evt_dup")
    answer = owner.get("/events/journey/", {"id": "evt_dup"})
    assert answer.status_code == 409
    for stored in (stripe, plain):
        assert f'href="/events/journey/?id=evt_dup&amp;source={quote(stored.ce_source, safe="")}"' in _page(answer)


def test_the_journey_screen_is_404_for_another_teams_event_and_needs_a_login(outsider, client, team):  # noqa: F811
    post_stripe(client, team, "evt_private")
    answer = outsider.get("/events/journey/", {"id": "evt_private"})
    assert answer.status_code == 404 and "No event &#x27;evt_private&#x27; in your team." in _page(answer)
    assert outsider.get("/events/journey/").status_code == 404
    assert client.get("/events/journey/", {"id": "evt_private"})["Location"].startswith("/login/")
