"""GET /api/events and /api/events/head: the store, oldest first, after a cursor.

These tests commit for real (transactional_db): the API only shows events whose
transaction is older than every running one, so rows written inside a test's
own open transaction would stay invisible.
"""

import json
import time

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.v1.http import from_json as sdk_v1_from_json
from django.conf import settings

from tests.factories import SOURCE_SECRET, SourceFactory
from tests.signing import as_wsgi_headers, github_signature, standard_webhook_headers, stripe_signature

pytestmark = pytest.mark.django_db(transaction=True)


def send_stripe(client, team, event_id, event_type="payment_intent.succeeded", source="stripe"):
    body = json.dumps({"id": event_id, "type": event_type, "created": 1700000000}).encode()
    response = client.post(
        f"/hooks/{team.id}/{source}",
        body,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=stripe_signature(SOURCE_SECRET, body),
    )
    assert response.status_code == 202, response.content
    return response.json()["id"]


def send_plain(client, team, payload, source="plain"):
    response = client.post(f"/hooks/{team.id}/{source}", json.dumps(payload).encode(), content_type="application/json")
    assert response.status_code == 202, response.content
    return response.json()["id"]


def visible(api, expected: int, query: str = "") -> list[dict]:
    """Committed events become readable once no older transaction is running anywhere on the server."""
    deadline = time.monotonic() + 15
    while True:
        results = api.get(f"/api/events?limit=1000{query}").json()["results"]
        if len(results) >= expected or time.monotonic() > deadline:
            assert len(results) == expected
            return results
        time.sleep(0.05)


@pytest.fixture
def sources(team):
    SourceFactory(team=team, name="stripe", kind="stripe")
    SourceFactory(team=team, name="gh", kind="github")
    SourceFactory(team=team, name="std", kind="standard")
    SourceFactory(team=team, name="plain", kind="none")


def test_every_kind_comes_back_as_a_cloudevent_1_0_the_sdk_parses(api, client, team, sources):
    send_stripe(client, team, "evt_1")
    gh_body = json.dumps({"action": "closed", "number": 3}).encode()
    github = client.post(
        f"/hooks/{team.id}/gh",
        gh_body,
        content_type="application/json",
        HTTP_X_GITHUB_EVENT="pull_request",
        HTTP_X_GITHUB_DELIVERY="d-1",
        HTTP_X_HUB_SIGNATURE_256=github_signature(SOURCE_SECRET, gh_body),
    )
    std_body = json.dumps({"type": "invoice.created", "timestamp": "2024-05-01T10:00:00Z", "data": {"a": 1}}).encode()
    standard = client.post(
        f"/hooks/{team.id}/std",
        std_body,
        content_type="application/json",
        **as_wsgi_headers(standard_webhook_headers(SOURCE_SECRET, "msg_1", std_body)),
    )
    send_plain(client, team, {"hello": "world"})
    assert (github.status_code, standard.status_code) == (202, 202)

    results = visible(api, 4)

    parsed = [JSONFormat().read(None, json.dumps(event)) for event in results]
    legacy = [sdk_v1_from_json(json.dumps(event)) for event in results]  # the SDK's other reader agrees
    assert [(e["specversion"], e["id"], e["type"]) for e in legacy] == [
        ("1.0", e.get_id(), e.get_type()) for e in parsed
    ]
    assert all(event.get_specversion() == "1.0" for event in parsed)
    assert [(e.get_type(), e.get_id()) for e in parsed] == [
        ("com.stripe.payment_intent.succeeded", "evt_1"),
        ("com.github.pull_request.closed", "d-1"),
        ("invoice.created", "msg_1"),
        ("com.kite.webhook", results[3]["id"]),
    ]
    assert results[3]["id"].startswith("sha256:")
    prefix = f"kite://{settings.KITE_INSTANCE_ID}/{team.id}/"
    assert [e.get_source() for e in parsed] == [prefix + name for name in ("stripe", "gh", "std", "plain")]
    assert parsed[0].get_data() == {"id": "evt_1", "type": "payment_intent.succeeded", "created": 1700000000}
    assert parsed[2].get_time().isoformat() == "2024-05-01T10:00:00+00:00"
    assert all(e.get_extension("kitecursor") for e in parsed)


def test_source_filter_returns_only_that_sources_events(api, client, team, sources):
    send_stripe(client, team, "evt_1")
    send_plain(client, team, {"n": 1})
    visible(api, 2)

    results = api.get("/api/events?source=plain").json()["results"]

    assert [event["source"].rsplit("/", 1)[1] for event in results] == ["plain"]


def test_type_glob_filter_matches_like_a_shell_glob(api, client, team, sources):
    send_stripe(client, team, "evt_1", "payment_intent.succeeded")
    send_stripe(client, team, "evt_2", "charge.failed")
    send_plain(client, team, {"type": "com.stripe_like.thing"})
    send_plain(client, team, {"type": "com.stripeXpayment_intent.succeeded"})
    visible(api, 4)

    def types(glob):
        return [e["type"] for e in api.get("/api/events", {"type": glob}).json()["results"]]

    assert types("com.stripe.*") == ["com.stripe.payment_intent.succeeded", "com.stripe.charge.failed"]
    # `_` and `%` are literal characters, not SQL wildcards; `?` is one character.
    assert types("com.stripe.payment_intent.*") == ["com.stripe.payment_intent.succeeded"]
    assert types("com.stripe_like.*") == ["com.stripe_like.thing"]
    assert types("com.stripe?payment_intent.succeeded") == [
        "com.stripe.payment_intent.succeeded",
        "com.stripeXpayment_intent.succeeded",
    ]
    assert types("*.failed") == ["com.stripe.charge.failed"]
    assert types("charge.*") == []


def test_agent_filter_shows_broadcasts_and_that_agents_messages_only(api, client, team, sources):
    send_plain(client, team, {"type": "deploy.done"})
    send_plain(client, team, {"type": "com.kite.agent.message", "to": "https://kite.example.com/agents/alice", "n": 1})
    send_plain(client, team, {"type": "com.kite.agent.message", "to": "https://kite.example.com/agents/bob", "n": 2})
    visible(api, 3)

    def seen_by(agent):
        return [(e["type"], e["data"].get("n")) for e in api.get("/api/events", {"agent": agent}).json()["results"]]

    assert seen_by("alice") == [("deploy.done", None), ("com.kite.agent.message", 1)]
    assert seen_by("bob") == [("deploy.done", None), ("com.kite.agent.message", 2)]
    assert seen_by("carol") == [("deploy.done", None)]


def test_following_next_returns_every_event_exactly_once_in_order(api, client, team, sources):
    sent = [send_plain(client, team, {"n": n}) for n in range(7)]
    visible(api, 7)

    seen, after, pages = [], "", 0
    while True:
        page = api.get("/api/events", {"limit": 3, "after": after}).json()
        pages += 1
        if not page["results"]:
            assert page["next"] == after
            break
        seen += [event["id"] for event in page["results"]]
        assert page["next"] == page["results"][-1]["kitecursor"]
        after = page["next"]

    assert seen == sent
    assert pages == 4  # 3 + 3 + 1, then an empty page that keeps the cursor


def test_cursor_resumes_after_new_events_arrive(api, client, team, sources):
    send_plain(client, team, {"n": 1})
    first = visible(api, 1)
    cursor = api.get("/api/events").json()["next"]

    later = send_plain(client, team, {"n": 2})
    visible(api, 2)

    assert [e["id"] for e in api.get("/api/events", {"after": cursor}).json()["results"]] == [later]
    assert cursor == first[0]["kitecursor"]


def test_empty_store_answers_no_results_and_a_start_cursor(api, team):
    assert api.get("/api/events").json() == {"results": [], "next": "0-0"}


@pytest.mark.parametrize("after", ["abc", "1", "1-", "-1-2", "1-2-3", "x-1", "9" * 20 + "-1", "1-" + "1" * 60])
def test_bad_cursor_is_400_bad_cursor(api, team, after):
    response = api.get("/api/events", {"after": after})

    assert (response.status_code, response.json()["code"]) == (400, "bad_cursor")
    assert response.json()["detail"]


def test_cursor_beyond_every_event_is_an_empty_page_not_an_error(api, client, team, sources):
    send_plain(client, team, {"n": 1})
    visible(api, 1)

    response = api.get("/api/events", {"after": "9" * 19 + "-" + "9" * 19})

    assert (response.status_code, response.json()["results"]) == (200, [])


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "many"])
def test_limit_outside_1_to_1000_is_400(api, team, limit):
    response = api.get("/api/events", {"limit": limit})

    assert (response.status_code, response.json()["code"]) == (400, "invalid")


def test_limit_caps_the_page(api, client, team, sources):
    for n in range(3):
        send_plain(client, team, {"n": n})
    visible(api, 3)

    assert len(api.get("/api/events", {"limit": 1}).json()["results"]) == 1
    assert len(api.get("/api/events", {"limit": 1000}).json()["results"]) == 3


def test_outsider_sees_nothing_of_the_owners_events(api, outsider_api, client, team, other_team, sources):
    send_stripe(client, team, "evt_secret")
    visible(api, 1)
    owner_cursor = api.get("/api/events/head").json()["cursor"]

    assert outsider_api.get("/api/events").json() == {"results": [], "next": "0-0"}
    assert outsider_api.get("/api/events", {"source": "stripe"}).json()["results"] == []
    assert outsider_api.get("/api/events/head").json() == {"cursor": "0-0"}
    assert owner_cursor != "0-0"


def test_outsider_events_do_not_leak_into_the_owners_stream(api, outsider_api, client, team, other_team, sources):
    SourceFactory(team=other_team, name="plain", kind="none")
    send_plain(client, other_team, {"team": "outsider"})
    send_plain(client, team, {"team": "owner"})
    visible(outsider_api, 1)

    assert [e["data"]["team"] for e in visible(api, 1)] == ["owner"]


def test_head_is_where_only_newer_events_start(api, client, team, sources):
    assert api.get("/api/events/head").json() == {"cursor": "0-0"}
    send_plain(client, team, {"n": 1})
    visible(api, 1)

    head = api.get("/api/events/head").json()["cursor"]
    newer = send_plain(client, team, {"n": 2})
    visible(api, 2)

    assert [e["id"] for e in api.get("/api/events", {"after": head}).json()["results"]] == [newer]


def test_events_need_authentication(anonymous_api, team):
    for path in ("/api/events", "/api/events/head"):
        response = anonymous_api.get(path)
        assert (response.status_code, response.json()["code"]) == (401, "not_authenticated")


@pytest.mark.parametrize("source", [None, "plain", "stripe"])
@pytest.mark.parametrize("type_glob", [None, "com.stripe.*", "deploy.?one", "100%_*"])
@pytest.mark.parametrize("agent,all_agents", [(None, False), ("alice", False), (None, True)])
def test_the_stores_plain_read_answers_as_the_orms_query_for_every_filter(client, team, sources, source, type_glob,
                                                                          agent, all_agents):  # fmt: skip
    """events_after on PostgreSQL is SQL built once per shape of filter; the ORM's query (what
    SQLite runs) is the reference: same events, same order, same fields, after a cursor too."""
    from ingest import selectors

    send_stripe(client, team, "evt_1")
    send_plain(client, team, {"type": "deploy.done"})
    send_plain(client, team, {"type": "100%_sure"})
    send_plain(client, team, {"type": "100Xsure"})
    send_plain(client, team, {"type": "com.kite.agent.message", "to": "https://kite.example.com/agents/alice"})
    send_plain(client, team, {"type": "com.kite.agent.message", "to": "https://kite.example.com/agents/bob"})
    send_stripe(client, team, "evt_2", "charge.failed")
    filters = selectors.EventFilter(source=source, type_glob=type_glob, agent=agent, all_agents=all_agents)
    everything = selectors._events_after_orm(team.id, selectors.START, selectors.EventFilter(all_agents=True), 100)
    assert len(everything) == 7
    for after in (selectors.START, selectors.Cursor(everything[2].txid, everything[2].id)):
        for limit in (100, 2):
            expected = selectors._events_after_orm(team.id, after, filters, limit)
            found = selectors.events_after(team_id=team.id, after=after, filters=filters, limit=limit)
            assert [(e.pk, e.ce_type, e.agent, e.data, e.source_id) for e in found] == [
                (e.pk, e.ce_type, e.agent, e.data, e.source_id) for e in expected]  # fmt: skip
