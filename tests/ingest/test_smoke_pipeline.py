import json

from ingest.models import Event
from tests.factories import SOURCE_SECRET, SourceFactory
from tests.signing import stripe_signature


def test_stripe_webhook_is_stored_once_and_duplicate_is_answered_200(client, team):
    SourceFactory(team=team, name="stripe", kind="stripe")
    body = json.dumps({"id": "evt_1", "type": "payment_intent.succeeded", "created": 1700000000}).encode()
    url = f"/hooks/{team.id}/stripe"
    headers = {"HTTP_STRIPE_SIGNATURE": stripe_signature(SOURCE_SECRET, body)}

    first = client.post(url, body, content_type="application/json", **headers)
    again = client.post(url, body, content_type="application/json", **headers)

    assert (first.status_code, first.json()) == (202, {"id": "evt_1", "duplicate": False})
    assert (again.status_code, again.json()) == (200, {"id": "evt_1", "duplicate": True})
    assert Event.objects.filter(team=team).count() == 1
