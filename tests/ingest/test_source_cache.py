"""The per-process source cache of the webhook path (ingest.selectors.source_for_hook_cached).

A webhook of a team without peers is verified with a cached copy of its source and stored by
one statement that checks the copy is still current. These tests commit for real
(transaction=True): the check compares the source row's xmin, which only a committed change
from another transaction moves — as in production, where every change is its own request.
"""

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from federation import services as federation_services
from federation.models import OutboxEntry
from ingest import selectors
from ingest.models import Event, Source
from kite import crypto
from tests.factories import SOURCE_SECRET, SourceFactory
from tests.signing import stripe_signature

pytestmark = pytest.mark.django_db(transaction=True)
NEW_SECRET = "whsec_bmV3LXNlY3JldC1mb3Ita2l0ZS10ZXN0cy0zMmJ5dGVzIQ=="


def body(event_id: str, kind: str = "payment_intent.succeeded") -> bytes:
    return json.dumps({"id": event_id, "type": kind, "created": 1700000000}).encode()


def post(client, team, event_id: str, secret: str = SOURCE_SECRET, name: str = "stripe"):
    raw = body(event_id)
    return client.post(
        f"/hooks/{team.id}/{name}", raw, content_type="application/json",
        HTTP_STRIPE_SIGNATURE=stripe_signature(secret, raw),
    )  # fmt: skip


@pytest.fixture
def stripe(team):
    return SourceFactory(team=team, name="stripe", kind="stripe")


def test_a_warm_webhook_of_a_team_without_peers_is_one_statement(client, team, stripe):
    assert post(client, team, "evt_warmup").status_code == 202
    with CaptureQueriesContext(connection) as queries:
        response = post(client, team, "evt_one_statement")
    assert response.status_code == 202
    assert len(queries) == 1, [q["sql"] for q in queries]
    assert queries[0]["sql"].startswith("WITH guard AS")
    stored = Event.objects.get(ce_id="evt_one_statement")
    assert stored.txid > 0 and stored.ce_type == "com.stripe.payment_intent.succeeded"


def test_a_duplicate_on_the_one_statement_path_is_answered_200_and_not_stored_again(client, team, stripe):
    assert post(client, team, "evt_dup").status_code == 202
    again = post(client, team, "evt_dup")
    assert again.status_code == 200 and again.json() == {"id": "evt_dup", "duplicate": True}
    assert Event.objects.filter(ce_id="evt_dup").count() == 1


def test_a_rotated_secret_is_honoured_at_once_despite_the_cached_copy(client, team, stripe):
    assert post(client, team, "evt_before").status_code == 202  # the old secret is now cached
    Source.objects.filter(pk=stripe.pk).update(secret_encrypted=crypto.encrypt(NEW_SECRET))
    refused = post(client, team, "evt_old_secret")
    assert refused.status_code == 401 and refused.json()["code"] == "bad_signature"
    assert not Event.objects.filter(ce_id="evt_old_secret").exists()
    assert post(client, team, "evt_new_secret", secret=NEW_SECRET).status_code == 202


def test_a_deleted_source_is_404_at_once_despite_the_cached_copy(client, team, stripe):
    assert post(client, team, "evt_cached").status_code == 202
    Event.objects.filter(source=stripe).delete()
    Source.objects.filter(pk=stripe.pk).delete()
    gone = post(client, team, "evt_after_delete")
    assert gone.status_code == 404 and gone.json()["code"] == "unknown_source"
    assert not Event.objects.filter(ce_id="evt_after_delete").exists()


def test_a_peer_added_after_caching_gets_the_next_event_in_its_outbox(client, team, stripe):
    assert post(client, team, "evt_no_peer_yet").status_code == 202
    issued = federation_services.peer_create(
        team=team, name="b", peer_hook_url="https://127.0.0.1:9/hooks/t/kite", scopes=["stripe.*"]
    )
    assert post(client, team, "evt_routed").status_code == 202
    assert OutboxEntry.objects.filter(peer=issued.row, event__ce_id="evt_routed").count() == 1
    assert not OutboxEntry.objects.filter(event__ce_id="evt_no_peer_yet").exists()


def test_a_team_with_peers_is_never_served_from_the_cache(team, stripe):
    federation_services.peer_create(team=team, name="b", peer_hook_url="https://127.0.0.1:9/hooks/t/kite")
    assert selectors.source_for_hook(team.id, "stripe") is not None  # cached now
    assert selectors.source_for_hook_cached(team.id, "stripe").from_cache is False


def test_a_rate_limit_set_after_caching_applies_to_the_next_webhooks(client, team, stripe):
    assert post(client, team, "evt_unlimited").status_code == 202
    Source.objects.filter(pk=stripe.pk).update(rate_limit_per_second=1)
    answers = [post(client, team, f"evt_limited_{i}").status_code for i in range(3)]
    assert answers[0] == 202 and 429 in answers[1:]
