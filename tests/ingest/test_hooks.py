"""POST /hooks/{team}/{source}: verify → CloudEvent → dedup → store, and every way it refuses."""

import hashlib
import json
import time
from urllib.parse import urlencode

import pytest
from django.conf import settings
from django.test import override_settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from ingest.models import Event, Source
from tests.factories import SOURCE_SECRET, SourceFactory
from tests.signing import as_wsgi_headers, github_signature, standard_webhook_headers, stripe_signature

STRIPE_BODY = json.dumps({"id": "evt_1Nq", "type": "payment_intent.succeeded", "created": 1700000000}).encode()
GITHUB_DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"


def ingested(source: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("kite_events_ingested_total", {"source": source, "outcome": outcome}) or 0.0


@pytest.fixture
def sources(team):
    return {
        kind: SourceFactory(team=team, name=name, kind=kind)
        for kind, name in [("stripe", "stripe"), ("github", "gh"), ("standard", "std"), ("none", "plain")]
    }


def hook_url(team, source: str) -> str:
    return f"/hooks/{team.id}/{source}"


def post_stripe(client, team, body=STRIPE_BODY, secret=SOURCE_SECRET, timestamp=None, source="stripe"):
    return client.post(
        hook_url(team, source),
        body,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=stripe_signature(secret, body, timestamp),
    )


def post_github(client, team, body, event="issues", secret=SOURCE_SECRET, content_type="application/json"):
    return client.post(
        hook_url(team, "gh"),
        body,
        content_type=content_type,
        HTTP_X_GITHUB_EVENT=event,
        HTTP_X_GITHUB_DELIVERY=GITHUB_DELIVERY,
        HTTP_X_HUB_SIGNATURE_256=github_signature(secret, body),
    )


def post_standard(client, team, body, msg_id="msg_2Lh9", secret=SOURCE_SECRET, timestamp=None, source="std"):
    headers = standard_webhook_headers(secret, msg_id, body, timestamp)
    return client.post(hook_url(team, source), body, content_type="application/json", **as_wsgi_headers(headers))


def refusals(source: str) -> float:
    """Every counted outcome of `source` but accepted and duplicate."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "kite_events_ingested"
        for sample in metric.samples
        if sample.name == "kite_events_ingested_total"
        and sample.labels["source"] == source
        and sample.labels["outcome"] not in {"accepted", "duplicate"}
    )


def assert_refused(send, *, status: int, code: str, label: str):
    """The request is answered {detail, code} with `status`, counted, and nothing is stored."""
    rows, counted = Event.objects.count(), ingested(label, code)

    response = send()

    body = response.json()
    assert (response.status_code, set(body), body["code"]) == (status, {"detail", "code"}, code)
    assert isinstance(body["detail"], str) and body["detail"]
    assert Event.objects.count() == rows
    assert ingested(label, code) == counted + 1
    return response


# --- Accepted, per kind ----------------------------------------------------------------


def test_signed_stripe_event_is_stored_as_com_stripe_cloudevent_with_the_stripe_id(client, team, sources):
    counted = ingested("stripe", "accepted")

    response = post_stripe(client, team)

    assert (response.status_code, response.json()) == (202, {"id": "evt_1Nq", "duplicate": False})
    event = Event.objects.get(team=team)
    assert (event.ce_id, event.ce_type, event.source.name) == ("evt_1Nq", "com.stripe.payment_intent.succeeded", "stripe")
    assert event.ce_source == f"kite://{settings.KITE_INSTANCE_ID}/{team.id}/stripe"
    assert json.loads(event.data) == json.loads(STRIPE_BODY)
    assert ingested("stripe", "accepted") == counted + 1


def test_signed_github_event_is_typed_by_event_and_action_and_identified_by_delivery(client, team, sources):
    response = post_github(client, team, json.dumps({"action": "opened", "issue": {"number": 7}}).encode())

    assert (response.status_code, response.json()) == (202, {"id": GITHUB_DELIVERY, "duplicate": False})
    assert Event.objects.get(team=team).ce_type == "com.github.issues.opened"


def test_form_encoded_github_delivery_is_verified_and_stored_as_its_payload(client, team, sources):
    payload = {"action": "created", "comment": {"body": "a & b = c"}}
    form = urlencode({"payload": json.dumps(payload)}).encode()

    response = post_github(client, team, form, event="issue_comment", content_type="application/x-www-form-urlencoded")

    assert response.status_code == 202
    event = Event.objects.get(team=team)
    assert (event.ce_type, json.loads(event.data)) == ("com.github.issue_comment.created", payload)


def test_standard_webhook_signed_by_the_reference_library_is_stored_under_its_webhook_id(client, team, sources):
    body = json.dumps({"type": "invoice.created", "data": {"amount": 5}}).encode()

    response = post_standard(client, team, body)

    assert (response.status_code, response.json()) == (202, {"id": "msg_2Lh9", "duplicate": False})
    assert Event.objects.get(team=team).ce_type == "invoice.created"


def test_unsigned_post_to_a_none_source_is_accepted_with_a_body_digest_id(client, team, sources):
    body = b'{"status": "deployed"}'

    response = client.post(hook_url(team, "plain"), body, content_type="application/json")

    expected_id = "sha256:" + hashlib.sha256(body).hexdigest()
    assert (response.status_code, response.json()) == (202, {"id": expected_id, "duplicate": False})
    assert Event.objects.get(team=team).ce_type == "com.kite.webhook"


def test_body_exactly_at_the_size_limit_is_accepted(client, team, sources):
    body = b'{"pad": "' + b"x" * 50 + b'"}'

    with override_settings(KITE_MAX_BODY_BYTES=len(body)):
        response = client.post(hook_url(team, "plain"), body, content_type="application/json")

    assert response.status_code == 202


# --- Dedup -------------------------------------------------------------------------


def test_same_stripe_event_twice_is_stored_once_and_answered_duplicate(client, team, sources):
    accepted, duplicates = ingested("stripe", "accepted"), ingested("stripe", "duplicate")

    first = post_stripe(client, team)
    again = post_stripe(client, team)

    assert (first.status_code, first.json()) == (202, {"id": "evt_1Nq", "duplicate": False})
    assert (again.status_code, again.json()) == (200, {"id": "evt_1Nq", "duplicate": True})
    assert Event.objects.filter(team=team).count() == 1
    assert (ingested("stripe", "accepted"), ingested("stripe", "duplicate")) == (accepted + 1, duplicates + 1)


def test_same_unsigned_body_twice_is_a_duplicate_by_its_digest(client, team, sources):
    responses = [client.post(hook_url(team, "plain"), b"[1, 2]", content_type="application/json") for _ in range(2)]

    assert [r.status_code for r in responses] == [202, 200]
    assert responses[0].json()["id"] == responses[1].json()["id"]
    assert Event.objects.filter(team=team).count() == 1


def test_same_provider_id_in_two_sources_is_two_events(client, team, sources):
    SourceFactory(team=team, name="stripe-eu", kind="stripe")

    first = post_stripe(client, team)
    second = post_stripe(client, team, source="stripe-eu")

    assert (first.status_code, second.status_code) == (202, 202)
    assert sorted(Event.objects.filter(team=team).values_list("source__name", flat=True)) == ["stripe", "stripe-eu"]


def test_same_provider_id_in_two_teams_is_two_events(client, team, other_team, sources):
    SourceFactory(team=other_team, name="stripe", kind="stripe")

    assert post_stripe(client, team).status_code == 202
    assert post_stripe(client, other_team).status_code == 202
    assert Event.objects.filter(ce_id="evt_1Nq").count() == 2
    assert set(Event.objects.values_list("team_id", flat=True)) == {team.id, other_team.id}


def test_same_webhook_id_with_a_fresh_signature_is_still_a_duplicate(client, team, sources):
    body = b'{"type": "invoice.created"}'

    first = post_standard(client, team, body, timestamp=int(time.time()) - 60)
    retry = post_standard(client, team, body)

    assert (first.status_code, retry.status_code, retry.json()["duplicate"]) == (202, 200, True)


# --- Refusals: signatures ---------------------------------------------------------------


def test_stale_stripe_signature_is_refused_and_nothing_stored(client, team, sources):
    assert_refused(
        lambda: post_stripe(client, team, timestamp=int(time.time()) - 301),
        status=401,
        code="stale_timestamp",
        label="stripe",
    )


def test_stripe_signature_with_wrong_secret_is_refused_and_nothing_stored(client, team, sources):
    assert_refused(
        lambda: post_stripe(client, team, secret="whsec_not_ours"), status=401, code="bad_signature", label="stripe"
    )


def test_stripe_event_without_signature_header_is_refused_and_nothing_stored(client, team, sources):
    assert_refused(
        lambda: client.post(hook_url(team, "stripe"), STRIPE_BODY, content_type="application/json"),
        status=401,
        code="missing_signature",
        label="stripe",
    )


def test_stripe_signature_with_several_v1_entries_one_good_is_accepted(client, team, sources):
    now = int(time.time())
    good = stripe_signature(SOURCE_SECRET, STRIPE_BODY, now).split(",")[1]
    other = stripe_signature("whsec_rolled", STRIPE_BODY, now).split(",")[1]

    response = client.post(
        hook_url(team, "stripe"), STRIPE_BODY, content_type="application/json", HTTP_STRIPE_SIGNATURE=f"t={now},{other},{good}"
    )

    assert response.status_code == 202


def test_github_signature_with_wrong_secret_is_refused_and_nothing_stored(client, team, sources):
    assert_refused(
        lambda: post_github(client, team, b'{"action": "opened"}', secret="not-ours"),
        status=401,
        code="bad_signature",
        label="gh",
    )


def test_github_delivery_without_signature_is_refused_and_nothing_stored(client, team, sources):
    assert_refused(
        lambda: client.post(
            hook_url(team, "gh"), b"{}", content_type="application/json", HTTP_X_GITHUB_EVENT="ping"
        ),
        status=401,
        code="missing_signature",
        label="gh",
    )


def test_github_signature_with_non_ascii_text_is_refused_not_crashed(client, team, sources):
    assert_refused(
        lambda: client.post(
            hook_url(team, "gh"),
            b"{}",
            content_type="application/json",
            HTTP_X_GITHUB_EVENT="ping",
            HTTP_X_HUB_SIGNATURE_256="sha256=" + "ü" * 64,
        ),
        status=401,
        code="bad_signature",
        label="gh",
    )


def test_standard_webhook_with_wrong_secret_is_refused_and_nothing_stored(client, team, sources):
    assert_refused(
        lambda: post_standard(client, team, b"{}", secret="whsec_" + "A" * 43 + "="),
        status=401,
        code="bad_signature",
        label="std",
    )


def test_stale_standard_webhook_is_refused_and_nothing_stored(client, team, sources):
    assert_refused(
        lambda: post_standard(client, team, b"{}", timestamp=int(time.time()) + 400),
        status=401,
        code="stale_timestamp",
        label="std",
    )


def test_unsigned_standard_webhook_is_refused_and_nothing_stored(client, team, sources):
    assert_refused(
        lambda: client.post(hook_url(team, "std"), b"{}", content_type="application/json", HTTP_WEBHOOK_ID="m1"),
        status=401,
        code="missing_signature",
        label="std",
    )


def test_kite_source_exists_in_every_team_and_refuses_unsigned_posts(client, team, other_team):
    event = {"specversion": "1.0", "id": "e1", "source": "kite://elsewhere/tm/x", "type": "com.example.x", "data": {}}
    for each in (team, other_team):
        assert Source.objects.filter(team=each, name="kite", kind="kite").exists()
        rows, refused = Event.objects.count(), refusals("kite")

        response = client.post(hook_url(each, "kite"), json.dumps(event).encode(), content_type="application/json")

        assert (response.status_code, set(response.json())) == (401, {"detail", "code"})
        assert Event.objects.count() == rows
        assert refusals("kite") == refused + 1


def test_kite_source_refuses_a_structured_cloudevent_signed_as_a_standard_webhook(client, team):
    event = {"specversion": "1.0", "id": "e1", "source": "kite://elsewhere/tm/stripe", "type": "com.stripe.x", "data": {}}
    body = json.dumps(event).encode()
    rows, refused = Event.objects.count(), refusals("kite")

    response = client.post(
        hook_url(team, "kite"),
        body,
        content_type="application/json",
        **as_wsgi_headers(standard_webhook_headers(SOURCE_SECRET, "m1", body)),
    )

    assert (response.status_code, set(response.json())) == (401, {"detail", "code"})
    assert Event.objects.count() == rows
    assert refusals("kite") == refused + 1


# --- Refusals: body, routing, method, size, rate ----------------------------------------------


def test_malformed_json_is_refused_400_and_nothing_stored(client, team, sources):
    assert_refused(
        lambda: client.post(hook_url(team, "plain"), b'{"oops', content_type="application/json"),
        status=400,
        code="malformed_json",
        label="plain",
    )


def test_signed_but_malformed_stripe_body_is_refused_400(client, team, sources):
    assert_refused(lambda: post_stripe(client, team, body=b"not json"), status=400, code="malformed_json", label="stripe")


def test_signed_stripe_event_without_type_is_refused_400_invalid_event(client, team, sources):
    assert_refused(
        lambda: post_stripe(client, team, body=b'{"id": "evt_9", "object": "event"}'),
        status=400,
        code="invalid_event",
        label="stripe",
    )


def test_signed_github_delivery_without_event_header_is_refused_400(client, team, sources):
    body = b'{"zen": "hi"}'
    assert_refused(
        lambda: client.post(
            hook_url(team, "gh"), body, content_type="application/json", HTTP_X_HUB_SIGNATURE_256=github_signature(SOURCE_SECRET, body)
        ),
        status=400,
        code="invalid_event",
        label="gh",
    )


def test_json_with_nan_is_refused_so_stored_events_always_render(client, team, sources):
    assert_refused(
        lambda: client.post(hook_url(team, "plain"), b'{"amount": NaN}', content_type="application/json"),
        status=400,
        code="malformed_json",
        label="plain",
    )


def test_nul_character_in_event_id_is_refused_400_not_a_database_error(client, team, sources):
    assert_refused(
        lambda: client.post(hook_url(team, "plain"), b'{"id": "a\\u0000b"}', content_type="application/json"),
        status=400,
        code="invalid_event",
        label="plain",
    )


def test_unknown_team_is_404_and_nothing_stored(client, team, sources):
    assert_refused(
        lambda: client.post("/hooks/tm_doesnotexist/stripe", STRIPE_BODY, content_type="application/json"),
        status=404,
        code="unknown_team",
        label="unknown",
    )


def test_unknown_source_is_404_and_nothing_stored(client, team, sources):
    assert_refused(
        lambda: client.post(hook_url(team, "paypal"), STRIPE_BODY, content_type="application/json"),
        status=404,
        code="unknown_source",
        label="unknown",
    )


def test_another_teams_source_name_is_not_found_under_this_team(client, team, other_team):
    SourceFactory(team=other_team, name="theirs", kind="none")

    assert_refused(
        lambda: client.post(hook_url(team, "theirs"), b"{}", content_type="application/json"),
        status=404,
        code="unknown_source",
        label="unknown",
    )


def test_get_on_a_hook_is_405_with_allow_post(client, team, sources):
    response = assert_refused(
        lambda: client.get(hook_url(team, "plain")), status=405, code="method_not_allowed", label="unknown"
    )

    assert response["Allow"] == "POST"


@override_settings(KITE_MAX_BODY_BYTES=64)
def test_declared_content_length_over_the_limit_is_413_before_reading(client, team, sources):
    assert_refused(
        lambda: client.post(hook_url(team, "plain"), b"{}", content_type="application/json", CONTENT_LENGTH="65"),
        status=413,
        code="payload_too_large",
        label="plain",
    )


@override_settings(KITE_MAX_BODY_BYTES=64)
def test_body_over_the_limit_is_413_and_nothing_stored(client, team, sources):
    body = json.dumps({"pad": "x" * 64}).encode()

    assert_refused(
        lambda: client.post(hook_url(team, "plain"), body, content_type="application/json"),
        status=413,
        code="payload_too_large",
        label="plain",
    )


@override_settings(KITE_MAX_BODY_BYTES=64)
def test_oversized_body_is_413_even_with_a_valid_signature(client, team, sources):
    body = json.dumps({"id": "evt_big", "type": "charge.failed", "pad": "x" * 64}).encode()

    assert_refused(lambda: post_stripe(client, team, body=body), status=413, code="payload_too_large", label="stripe")


def test_content_length_that_is_not_a_number_is_400(client, team, sources):
    assert_refused(
        lambda: client.post(hook_url(team, "plain"), b"{}", content_type="application/json", CONTENT_LENGTH="lots"),
        status=400,
        code="invalid",
        label="plain",
    )


def test_source_over_its_rate_limit_gets_429_with_retry_after_and_nothing_more_is_stored(client, team):
    assert settings.REDIS_URL  # the limiter under test is the shared Redis one
    SourceFactory(team=team, name="limited", kind="none", rate_limit_per_second=1)
    rows, refused_before = Event.objects.count(), ingested("limited", "rate_limited")

    started = time.monotonic()
    responses = [
        client.post(hook_url(team, "limited"), json.dumps({"n": n}).encode(), content_type="application/json")
        for n in range(5)
    ]
    elapsed = time.monotonic() - started

    assert elapsed < 1, "five requests must fall in at most two one-second windows"
    accepted = [r for r in responses if r.status_code == 202]
    limited = [r for r in responses if r.status_code == 429]
    assert len(accepted) + len(limited) == 5
    assert 1 <= len(accepted) <= 2
    for response in limited:
        assert response.json()["code"] == "rate_limited" and set(response.json()) == {"detail", "code"}
        assert int(response["Retry-After"]) >= 1
    assert Event.objects.count() == rows + len(accepted)
    assert ingested("limited", "rate_limited") == refused_before + len(limited)


def test_rate_limit_is_per_source(client, team, sources):
    SourceFactory(team=team, name="limited", kind="none", rate_limit_per_second=1)
    statuses = [
        client.post(hook_url(team, "limited"), json.dumps({"n": n}).encode(), content_type="application/json").status_code
        for n in range(3)
    ]
    assert 429 in statuses

    response = client.post(hook_url(team, "plain"), b'{"other": 1}', content_type="application/json")

    assert response.status_code == 202


# --- Property: arbitrary bodies ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
objects_with_ids = st.fixed_dictionaries(
    {"id": st.text() | st.integers(), "type": st.text() | st.just("com.kite.agent.message")},
    optional={"to": st.text() | st.just("https://kite.example.com/agents/a1"), "data": json_values},
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(
        lambda v, encoding: json.dumps(v, ensure_ascii=False).encode(encoding, "surrogatepass"),
        objects_with_ids,
        st.sampled_from(["utf-8", "utf-16", "utf-32", "utf-8-sig"]),
    ),
)


@hypothesis_settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies)
def test_any_body_to_an_unverified_source_gets_a_4xx_or_is_stored_and_renderable(client, team, body):
    Source.objects.get_or_create(team=team, name="anything", defaults={"kind": "none"})
    rows = Event.objects.count()

    response = client.post(hook_url(team, "anything"), body, content_type="application/json")

    assert response.status_code in {200, 202, 400}, response.content
    if response.status_code == 202:
        assert Event.objects.count() == rows + 1
        stored = Event.objects.get(team=team, source__name="anything", ce_id=response.json()["id"])
        json.dumps(stored.to_cloudevent(), allow_nan=False)  # what GET /api/events will have to render
    else:
        assert Event.objects.count() == rows


def test_unsigned_junk_does_not_use_up_a_sources_rate_limit(client, team):
    SourceFactory(team=team, name="limited", kind="stripe", rate_limit_per_second=2)
    url = hook_url(team, "limited")
    for _ in range(5):
        junk = client.post(url, b"{}", content_type="application/json", HTTP_STRIPE_SIGNATURE="t=1,v1=00")
        assert junk.status_code == 401
    body = json.dumps({"id": "evt_real", "type": "charge.succeeded"}).encode()
    real = client.post(url, body, content_type="application/json",
                       HTTP_STRIPE_SIGNATURE=stripe_signature(SOURCE_SECRET, body))  # fmt: skip
    assert real.status_code == 202
    assert Source.objects.get(team=team, name="limited").events.count() == 1
