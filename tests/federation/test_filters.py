"""Per-peer filters (CloudEvents Subscriptions API dialects): the matcher, the validator, the API
and the peer screen that set them, and routing that applies them next to the scopes."""

import json
from datetime import UTC, datetime

import pytest
from django.core.management import call_command
from prometheus_client import REGISTRY

from federation import audit, enqueue, filters, routing, services
from federation.models import AuditEvent, OutboxEntry, Peer
from ingest.models import Event
from kite.models import Team
from tests.factories import SourceFactory
from tests.federation.test_api import PEER_URL, SECRET
from tests.federation.test_routing_inbound import signed_post
from tests.screens import owner  # noqa: F401  (fixture)

EXAMPLE = [{"prefix": {"type": "com.stripe."}}, {"not": {"exact": {"subject": "test"}}}]

# --- the matcher: expressions × events --------------------------------------------------------

STRIPE = filters.canonical({
    "specversion": "1.0", "id": "evt_1", "source": "kite://a/tm/stripe", "type": "com.stripe.charge.succeeded",
    "time": "2026-12-06T07:00:00Z", "datacontenttype": "application/json", "subject": "cus_42",
    "region": "eu", "kitefedhops": 2, "kiteunverified": True,
})  # fmt: skip
BARE = filters.canonical({"specversion": "1.0", "id": "gh_1", "source": "kite://a/tm/github",
                          "type": "com.github.push"})  # fmt: skip
TEST_SUBJECT = {**STRIPE, "subject": "test"}

EXACT_TYPE = {"exact": {"type": "com.stripe.charge.succeeded"}}
IS_GITHUB = {"prefix": {"type": "com.github."}}
IN_EU = {"exact": {"region": "eu"}}

MATCHES = [
    # (filters, event, matches)
    ([], STRIPE, True),
    ([], BARE, True),
    ([EXACT_TYPE], STRIPE, True),
    ([{"exact": {"type": "com.stripe.charge"}}], STRIPE, False),  # exact is not a prefix
    ([{"exact": {"type": "COM.STRIPE.CHARGE.SUCCEEDED"}}], STRIPE, False),  # case-sensitive
    ([{"prefix": {"type": "com.stripe."}}], STRIPE, True),
    ([{"prefix": {"type": "com.stripe.charge.succeeded"}}], STRIPE, True),  # the whole value is a prefix
    ([{"prefix": {"type": "stripe."}}], STRIPE, False),
    ([{"suffix": {"type": ".succeeded"}}], STRIPE, True),
    ([{"suffix": {"type": ".failed"}}], STRIPE, False),
    ([{"exact": {"type": "com.stripe.charge.succeeded", "subject": "cus_42"}}], STRIPE, True),
    ([{"exact": {"type": "com.stripe.charge.succeeded", "subject": "cus_7"}}], STRIPE, False),  # every attribute
    ([{"prefix": {"subject": "cus_", "source": "kite://a/"}}], STRIPE, True),
    ([{"exact": {"source": "kite://a/tm/stripe"}}], STRIPE, True),
    ([{"exact": {"id": "evt_1"}}], STRIPE, True),
    # extensions, an integer and a boolean one in their canonical string form
    ([IN_EU], STRIPE, True),
    ([{"exact": {"region": "us"}}], STRIPE, False),
    ([{"suffix": {"region": "u"}}], STRIPE, True),
    ([{"exact": {"kitefedhops": "2"}}], STRIPE, True),
    ([{"exact": {"kitefedhops": "02"}}], STRIPE, False),
    ([{"exact": {"kiteunverified": "true"}}], STRIPE, True),
    ([{"exact": {"kiteunverified": "True"}}], STRIPE, False),
    # an attribute the event lacks matches no exact / prefix / suffix, so `not` of one lets it through
    ([{"exact": {"subject": "cus_42"}}], BARE, False),
    ([{"prefix": {"subject": "c"}}], BARE, False),
    ([{"suffix": {"region": "eu"}}], BARE, False),
    ([{"exact": {"type": "com.github.push", "subject": "x"}}], BARE, False),
    ([{"not": {"exact": {"subject": "test"}}}], BARE, True),
    ([{"not": {"exact": {"subject": "test"}}}], STRIPE, True),
    ([{"not": {"exact": {"subject": "test"}}}], TEST_SUBJECT, False),
    # the list: every expression must match
    (EXAMPLE, STRIPE, True),
    (EXAMPLE, TEST_SUBJECT, False),
    (EXAMPLE, BARE, False),
    ([EXACT_TYPE, {"exact": {"region": "us"}}], STRIPE, False),
    # all / any / not, nested
    ([{"any": [IS_GITHUB, IN_EU]}], STRIPE, True),
    ([{"any": [IS_GITHUB, IN_EU]}], BARE, True),
    ([{"any": [{"exact": {"region": "us"}}, {"suffix": {"type": ".failed"}}]}], STRIPE, False),
    ([{"all": [{"prefix": {"type": "com.stripe."}}, IN_EU]}], STRIPE, True),
    ([{"all": [{"prefix": {"type": "com.stripe."}}, {"exact": {"region": "us"}}]}], STRIPE, False),
    ([{"not": {"any": [IS_GITHUB, {"exact": {"subject": "test"}}]}}], STRIPE, True),
    ([{"not": {"any": [IS_GITHUB, {"exact": {"subject": "test"}}]}}], TEST_SUBJECT, False),
    ([{"not": {"any": [IS_GITHUB, {"exact": {"subject": "test"}}]}}], BARE, False),
    ([{"not": {"all": [EXACT_TYPE, IN_EU]}}], STRIPE, False),
    ([{"not": {"all": [EXACT_TYPE, {"exact": {"region": "us"}}]}}], STRIPE, True),
    ([{"not": {"not": EXACT_TYPE}}], STRIPE, True),
    ([{"all": [{"any": [IS_GITHUB, {"all": [IN_EU, {"not": {"suffix": {"subject": "_7"}}}]}]}]}], STRIPE, True),
    ([{"all": [{"any": [IS_GITHUB, {"all": [IN_EU, {"not": {"suffix": {"subject": "42"}}}]}]}]}], STRIPE, False),
    ([{"all": [{"any": [IS_GITHUB, {"all": [IN_EU, {"not": {"suffix": {"subject": "42"}}}]}]}]}], BARE, True),
]


@pytest.mark.parametrize("expressions, event, expected", MATCHES, ids=[str(i) for i in range(len(MATCHES))])
def test_the_matcher_follows_the_subscriptions_api_dialects(expressions, event, expected):
    assert filters.validate(expressions) == expressions  # every case is a valid list
    assert filters.matches(expressions, event) is expected


def test_canonical_attributes_are_strings_and_leave_out_what_is_no_attribute_value():
    assert filters.canonical({"a": 2, "b": True, "c": False, "d": "x", "e": None, "f": [1], "g": {"h": 1}}) == {
        "a": "2", "b": "true", "c": "false", "d": "x"}  # fmt: skip


def test_filters_see_the_attributes_the_peer_receives_with_this_hops_provenance():
    event = Event(ce_id="e1", ce_source="kite://a/tm/x", ce_type="com.stripe.charge.succeeded",
                  ce_time=datetime(2026, 12, 6, 7, 0, tzinfo=UTC), ce_subject="cus_42",
                  extensions={"region": "eu", "kiteunverified": True, "kitecursor": "1-1", "kitefedpeer": "a",
                              "kitefedorigin": "inst-a", "kitefedchain": '["inst-a"]', "kitefedhops": 1})  # fmt: skip
    forward = routing.next_hop(routing.provenance_of(event.extensions), "inst-me")
    attributes = routing.wire_attributes(event, forward)
    assert attributes == {
        "specversion": "1.0", "id": "e1", "source": "kite://a/tm/x", "type": "com.stripe.charge.succeeded",
        "time": "2026-12-06T07:00:00Z", "datacontenttype": "application/json", "subject": "cus_42", "region": "eu",
        "kiteunverified": "true", "kitefedorigin": "inst-a", "kitefedchain": '["inst-a", "inst-me"]',
        "kitefedhops": "2",
    }  # fmt: skip
    bare = Event(ce_id="e2", ce_source="s", ce_type="t", ce_time=datetime(2026, 1, 1, tzinfo=UTC))
    assert "subject" not in routing.wire_attributes(bare, routing.next_hop(None, "inst-me"))


def test_decide_checks_filters_after_scopes_and_before_the_loop_rules():
    forward = routing.next_hop(None, "me")
    asked = []

    def attributes():
        asked.append(1)
        return STRIPE

    def decide(scopes, expressions, max_hops=3):
        return routing.decide(event_type=STRIPE["type"], forward=forward, peer_instance_id="b", scopes=scopes,
                              max_hops=max_hops, filters=expressions, attributes=attributes).reason  # fmt: skip

    assert decide(["github.*"], EXAMPLE) == "scope" and not asked  # not even built for a scope drop
    assert decide(["*"], [IS_GITHUB]) == "filter"
    assert decide(["*"], [IS_GITHUB], max_hops=0) == "filter"  # no delivery_failed for what the peer never wanted
    assert decide(["*"], EXAMPLE, max_hops=0) == "max_hops"
    assert decide(["*"], EXAMPLE) == ""
    asked.clear()
    assert decide(["*"], []) == "" and not asked  # a peer without filters costs nothing


# --- the validator ------------------------------------------------------------------------------

OK = {"exact": {"type": "com.stripe.x"}}


def _nested_nots(levels: int) -> dict:
    expression = OK
    for _ in range(levels - 1):
        expression = {"not": expression}
    return expression


INVALID = [
    # (filters, the path the refusal names, words of its reason)
    ("com.stripe.*", "filters", "must be a list"),
    (None, "filters", "must be a list"),
    ({"prefix": {"type": "com.stripe."}}, "filters", "must be a list"),
    ([1], "filters[0]", "exactly one dialect"),
    ([[OK]], "filters[0]", "exactly one dialect"),
    ([{}], "filters[0]", "exactly one dialect"),
    ([{"exact": {"type": "a"}, "prefix": {"type": "b"}}], "filters[0]", "exactly one dialect"),
    ([OK, {"regex": {"type": "a.*"}}], "filters[1]", "unknown dialect 'regex'"),
    ([{"Exact": {"type": "a"}}], "filters[0]", "unknown dialect 'Exact'"),
    ([{"sql": "type LIKE 'com.stripe.%'"}], "filters[0].sql", "not supported"),
    ([{"exact": "type"}], "filters[0].exact", "object of 1-16 attribute names"),
    ([{"exact": {}}], "filters[0].exact", "object of 1-16 attribute names"),
    ([{"prefix": ["type", "com."]}], "filters[0].prefix", "object of 1-16 attribute names"),
    ([{"suffix": {f"a{n}": "x" for n in range(17)}}], "filters[0].suffix", "object of 1-16 attribute names"),
    ([{"exact": {"type": 1}}], "filters[0].exact.type", "non-empty string"),
    ([{"exact": {"type": None}}], "filters[0].exact.type", "non-empty string"),
    ([{"prefix": {"type": ""}}], "filters[0].prefix.type", "non-empty string"),
    ([{"suffix": {"type": ["a"]}}], "filters[0].suffix.type", "non-empty string"),
    ([{"exact": {"kiteunverified": True}}], "filters[0].exact.kiteunverified", "non-empty string"),
    ([{"exact": {"type": "x" * 1001}}], "filters[0].exact.type", "at most 1000 characters"),
    ([{"exact": {"subject": "a\x00b"}}], "filters[0].exact.subject", "printable"),
    ([{"exact": {"subject": "a\ud800"}}], "filters[0].exact.subject", "printable"),
    ([{"exact": {"Subject": "x"}}], "filters[0].exact", "'Subject' is not a CloudEvents attribute name"),
    ([{"exact": {"my-ext": "x"}}], "filters[0].exact", "'my-ext' is not a CloudEvents attribute name"),
    ([{"exact": {"my_ext": "x"}}], "filters[0].exact", "'my_ext' is not a CloudEvents attribute name"),
    ([{"exact": {"": "x"}}], "filters[0].exact", "'' is not a CloudEvents attribute name"),
    ([{"exact": {"type\n": "x"}}], "filters[0].exact", "is not a CloudEvents attribute name"),
    ([{"exact": {"a" * 21: "x"}}], "filters[0].exact", "is not a CloudEvents attribute name"),
    ([OK, {"not": {"exact": {"Subject": "test"}}}], "filters[1].not.exact", "'Subject' is not"),
    ([OK, {"not": {"exact": {"subject": 5}}}], "filters[1].not.exact.subject", "non-empty string"),
    ([{"all": []}], "filters[0].all", "non-empty list"),
    ([{"any": []}], "filters[0].any", "non-empty list"),
    ([{"all": OK}], "filters[0].all", "non-empty list"),
    ([{"any": [OK, {"bogus": {}}]}], "filters[0].any[1]", "unknown dialect 'bogus'"),
    ([{"any": [OK, {"all": [OK, {"not": {"prefix": {"type": 3}}}]}]}], "filters[0].any[1].all[1].not.prefix.type",
     "non-empty string"),
    ([{"not": [OK]}], "filters[0].not", "one filter expression"),
    ([{"not": "x"}], "filters[0].not", "one filter expression"),
    ([{"not": {}}], "filters[0].not", "exactly one dialect"),
    ([_nested_nots(9)], "filters[0]" + ".not" * 8, "nested deeper than 8 levels"),
    ([{"all": [OK, {"any": [_nested_nots(7)]}]}], "filters[0].all[1].any[0]" + ".not" * 6, "deeper than 8"),
    ([OK] * 33, "filters[32]", "more than 32 filter expressions"),
    ([{"all": [OK] * 32}], "filters[0].all[31]", "more than 32 filter expressions in all (nested ones count)"),
    ([{"exact": {"type": "x" * 1000}}] * 17, "filters", "at most 16384 bytes"),
]


@pytest.mark.parametrize("value, path, reason", INVALID, ids=[path for _, path, _ in INVALID])
def test_the_validator_refuses_a_wrong_shape_naming_its_path(value, path, reason):
    with pytest.raises(filters.InvalidFilters) as refused:
        filters.validate(value)
    assert refused.value.path == path and reason in refused.value.reason, str(refused.value)
    assert str(refused.value) == f"{path}: {refused.value.reason}"


def test_the_validator_takes_what_is_at_its_limits():
    expressions = [
        _nested_nots(8),  # depth 8: 8 expressions
        {"exact": {f"a{n}": "x" for n in range(16)}},  # 16 attributes
        {"prefix": {"a" * 20: "y" * 1000}},  # a 20-character name, a 1000-character value
        {"any": [OK] * 20},  # 21 expressions: 31 in all
    ]
    assert filters.validate(expressions) == expressions
    assert filters.validate(expressions + [OK]) == expressions + [OK]  # 32
    with pytest.raises(filters.InvalidFilters):
        filters.validate(expressions + [OK, OK])  # 33
    assert filters.validate([]) == []


# --- the API: set, shown, refused with nothing changed --------------------------------------------


def _create(api, **fields):
    body = {"name": "instance-b", "peer_hook_url": PEER_URL, "outbound_token": SECRET, "scopes": ["*"], **fields}
    return api.post("/api/federation/peers", json.dumps(body), content_type="application/json")  # \ud800 escaped


def _routes_version(team) -> int:
    return Team.objects.get(pk=team.pk).routes_version


def test_filters_are_set_on_create_shown_and_changed_with_patch(api, team):
    created = _create(api, filters=EXAMPLE)
    assert created.status_code == 201, created.json()
    peer_id = created.json()["id"]
    assert created.json()["filters"] == EXAMPLE
    assert api.get(f"/api/federation/peers/{peer_id}").json()["filters"] == EXAMPLE
    assert api.get("/api/federation/peers").json()["results"][0]["filters"] == EXAMPLE
    assert Peer.objects.get(pk=peer_id).filters == EXAMPLE
    assert AuditEvent.objects.get(action=audit.PEER_CREATED).data["filters"] == EXAMPLE

    changed = [{"any": [IS_GITHUB, IN_EU]}]
    patched = api.patch(f"/api/federation/peers/{peer_id}", {"filters": changed}, format="json")
    assert patched.status_code == 200 and patched.json()["filters"] == changed
    assert Peer.objects.get(pk=peer_id).filters == changed
    assert AuditEvent.objects.get(action=audit.PEER_UPDATED).data["changed"] == {"filters": changed}
    cleared = api.patch(f"/api/federation/peers/{peer_id}", {"filters": []}, format="json")
    assert cleared.status_code == 200 and cleared.json()["filters"] == [] and Peer.objects.get().filters == []


def test_a_peer_made_without_filters_has_none(api):
    created = _create(api)
    assert created.status_code == 201 and created.json()["filters"] == []


def test_manage_py_peers_json_shows_the_filters(api, team, capsys):
    assert _create(api, filters=EXAMPLE).status_code == 201
    call_command("peers", "--team", team.name, "--json")
    assert json.loads(capsys.readouterr().out)[0]["filters"] == EXAMPLE


@pytest.mark.parametrize("value, path, reason", INVALID, ids=[path for _, path, _ in INVALID])
def test_a_wrong_filter_is_refused_on_create_naming_its_path_and_nothing_is_stored(api, team, value, path, reason):
    version = _routes_version(team)
    refused = _create(api, filters=value)
    assert refused.status_code == 400, refused.json()
    assert refused.json()["code"] == "invalid_filters" and refused.json()["detail"].startswith(f"{path}: ")
    assert reason in refused.json()["detail"]
    assert not Peer.objects.exists() and not AuditEvent.objects.exists() and _routes_version(team) == version


@pytest.mark.parametrize("value, path, reason", INVALID, ids=[path for _, path, _ in INVALID])
def test_a_wrong_filter_is_refused_on_patch_and_the_peer_is_unchanged(api, team, value, path, reason):
    peer_id = _create(api, filters=EXAMPLE).json()["id"]
    before, version, audited = Peer.objects.filter(pk=peer_id).values().get(), _routes_version(team), \
        AuditEvent.objects.count()  # fmt: skip
    refused = api.patch(f"/api/federation/peers/{peer_id}", json.dumps({"filters": value, "max_hops": 7}),
                        content_type="application/json")  # fmt: skip
    assert refused.status_code == 400, refused.json()
    assert refused.json()["code"] == "invalid_filters" and refused.json()["detail"].startswith(f"{path}: ")
    assert Peer.objects.filter(pk=peer_id).values().get() == before  # max_hops too: nothing of it applied
    assert _routes_version(team) == version and AuditEvent.objects.count() == audited


def test_an_unknown_field_next_to_filters_is_still_refused_by_name(api):
    refused = _create(api, filters=EXAMPLE, filter=EXAMPLE)
    assert refused.status_code == 400 and refused.json()["code"] == "invalid" and "filter:" in refused.json()["detail"]
    assert not Peer.objects.exists()


def test_another_teams_peer_filters_cannot_be_changed(api, outsider_api):
    peer_id = _create(api, filters=EXAMPLE).json()["id"]
    refused = outsider_api.patch(f"/api/federation/peers/{peer_id}", {"filters": []}, format="json")
    assert refused.status_code == 404 and Peer.objects.get(pk=peer_id).filters == EXAMPLE


def test_trusted_senders_take_no_filters_and_say_where_they_go(api):
    refused = api.post("/api/federation/trusted-senders", {"name": "s", "filters": EXAMPLE}, format="json")
    assert refused.status_code == 400 and "filters: a trusted sender only sends to us" in refused.json()["detail"]
    sender = api.post("/api/federation/trusted-senders", {"name": "s"}, format="json").json()
    promoted = api.patch(f"/api/federation/trusted-senders/{sender['id']}",
                         {"peer_hook_url": PEER_URL, "scopes": ["*"], "filters": EXAMPLE}, format="json")  # fmt: skip
    assert promoted.status_code == 400 and "filters: change it once it is a peer" in promoted.json()["detail"]
    assert Peer.objects.get(pk=sender["id"]).role == Peer.Role.SENDER


# --- routing: applied with the scopes, before the outbox; the route cache follows a change ------------------


def _dropped(peer: str, reason: str) -> float:
    return REGISTRY.get_sample_value("kite_federation_dropped_total", {"peer": peer, "reason": reason}) or 0


@pytest.fixture
def upstream(team):
    """A peer that delivers signed CloudEvents to this team (name instance-a), so events can carry a
    subject and extensions; it is never routed to itself."""
    return services.peer_create(team=team, name="instance-a", peer_hook_url="https://127.0.0.1:9/hooks/a/kite",
                                outbound_token=SECRET, inbound_token=SECRET, scopes=[]).row  # fmt: skip


def _deliver(client, team, event_id, event_type="com.stripe.charge.succeeded", **attributes):
    event = {"specversion": "1.0", "id": event_id, "source": "kite://instance-a/tm/stripe", "type": event_type,
             "data": {"n": 1}, **attributes}  # fmt: skip
    response = signed_post(client, team, event, msg_id=f"msg_{event_id}")
    assert response.status_code == 202, response.content


def _routed(peer) -> set[str]:
    return set(OutboxEntry.objects.filter(peer=peer).values_list("event__ce_id", flat=True))


def test_a_peer_gets_only_the_events_its_filters_match_and_drops_are_counted(client, team, upstream):
    peer = services.peer_create(team=team, name="filtered", peer_hook_url=PEER_URL, outbound_token=SECRET,
                                scopes=["*"], filters=[*EXAMPLE, {"any": [IN_EU, {"exact": {"tier": "gold"}}]}]).row
    before = _dropped("filtered", "filter")
    _deliver(client, team, "live-eu", subject="cus_1", region="eu")
    _deliver(client, team, "no-subject-gold", tier="gold")
    _deliver(client, team, "test-eu", subject="test", region="eu")  # not {subject: test}
    _deliver(client, team, "live-us", subject="cus_2", region="us")  # neither eu nor gold
    _deliver(client, team, "github-eu", event_type="com.github.push", region="eu")  # not com.stripe.
    _deliver(client, team, "missing-region")  # no region, no tier: any of them fails
    assert _routed(peer) == {"live-eu", "no-subject-gold"}
    assert _dropped("filtered", "filter") == before + 4
    assert OutboxEntry.objects.filter(peer=upstream).count() == 0


def test_scopes_keep_their_meaning_next_to_filters(client, team, upstream):
    peer = services.peer_create(team=team, name="both", peer_hook_url=PEER_URL, outbound_token=SECRET,
                                scopes=["github.*"], filters=[{"prefix": {"type": "com."}}]).row  # fmt: skip
    scope, filtered = _dropped("both", "scope"), _dropped("both", "filter")
    _deliver(client, team, "stripe-1")  # passes the filter, not the scope
    _deliver(client, team, "github-1", event_type="com.github.push")
    _deliver(client, team, "github-2", event_type="org.github.push")  # in scope (vendor prefix), not the filter
    assert _routed(peer) == {"github-1"}
    assert (_dropped("both", "scope"), _dropped("both", "filter")) == (scope + 1, filtered + 1)


def test_filters_match_the_provenance_the_event_is_forwarded_with(client, team, upstream, settings):
    second = services.peer_create(team=team, name="second-hop", peer_hook_url=PEER_URL, outbound_token=SECRET,
                                  scopes=["*"], filters=[{"exact": {"kitefedhops": "2"}}]).row  # fmt: skip
    first = services.peer_create(team=team, name="first-hop", peer_hook_url=PEER_URL + "x", outbound_token=SECRET,
                                 scopes=["*"], filters=[{"exact": {"kitefedhops": "1"}}]).row  # fmt: skip
    by_us = services.peer_create(team=team, name="from-us", peer_hook_url=PEER_URL + "y", outbound_token=SECRET,
                                 scopes=["*"], filters=[{"exact": {"kitefedorigin": settings.KITE_INSTANCE_ID}}]).row
    _deliver(client, team, "hop", kitefedorigin="origin-z", kitefedchain='["origin-z"]', kitefedhops=1)
    _deliver(client, team, "adopted")  # no provenance: it gets the sender's (instance-a) as it arrives
    SourceFactory(team=team, name="plain", kind="none")
    _post_plain(client, team, "born-here")  # the first hop: origin this instance, hops 1
    assert _routed(second) == {"hop", "adopted"}
    assert _routed(first) == {"born-here"} and _routed(by_us) == {"born-here"}


def _post_plain(client, team, event_id: str, event_type: str = "com.stripe.charge.succeeded"):
    response = client.post(f"/hooks/{team.id}/plain", json.dumps({"id": event_id, "type": event_type}),
                           content_type="application/json")  # fmt: skip
    assert response.status_code == 202, response.content


def test_changing_filters_reaches_the_route_cache_at_the_next_event(client, api, team):
    SourceFactory(team=team, name="plain", kind="none")
    peer_id = _create(api, name="cached", filters=[{"exact": {"kiteunverified": "true"}}]).json()["id"]
    _post_plain(client, team, "first")  # routes read and cached at the team's routes version
    assert enqueue._routes[team.id][1][0].filters == ({"exact": {"kiteunverified": "true"}},)
    assert api.patch(f"/api/federation/peers/{peer_id}", {"filters": [IS_GITHUB]}, format="json").status_code == 200
    _post_plain(client, team, "second")
    _post_plain(client, team, "third", event_type="com.github.push")
    assert api.patch(f"/api/federation/peers/{peer_id}", {"filters": []}, format="json").status_code == 200
    _post_plain(client, team, "fourth")
    assert _routed(Peer.objects.get(pk=peer_id)) == {"first", "third", "fourth"}


def test_the_settings_screen_edits_filters_as_json_and_puts_a_refusal_on_the_field(owner, team):  # noqa: F811
    peer = services.peer_create(team=team, name="b", peer_hook_url=PEER_URL, outbound_token=SECRET,
                                scopes=["stripe.*"], filters=EXAMPLE).row  # fmt: skip
    page = owner.get(f"/settings/federation/peers/{peer.pk}/")
    shown = page.context["settings_form"]["filters"].value()
    assert json.loads(shown) == EXAMPLE and 'name="filters"' in page.content.decode()
    assert '<div class="wide">\n    <label for="id_filters">' in page.content.decode()  # a row of its own
    url = f"/settings/federation/peers/{peer.pk}/settings"
    base = {"peer_hook_url": PEER_URL, "scopes": "stripe.*", "max_hops": 3}

    not_json = owner.post(url, {**base, "filters": "[{'prefix': 1}", "max_hops": 4})
    assert not_json.status_code == 400
    assert not_json.context["settings_form"].errors["filters"] == ["Enter a valid JSON."]
    wrong = owner.post(url, {**base, "filters": '[{"prefix": {"type": "com."}}, {"not": {"exact": {"Subject": "x"}}}]',
                             "max_hops": 4})  # fmt: skip
    assert wrong.status_code == 400
    assert wrong.context["settings_form"].errors["filters"][0].startswith("filters[1].not.exact: 'Subject'")
    assert "max_hops" not in wrong.context["settings_form"].errors
    peer.refresh_from_db()
    assert (peer.filters, peer.max_hops) == (EXAMPLE, 3)
    assert not AuditEvent.objects.filter(action=audit.PEER_UPDATED).exists()

    saved = owner.post(url, {**base, "filters": json.dumps([IN_EU])})
    assert saved.status_code == 302
    peer.refresh_from_db()
    assert peer.filters == [IN_EU]
    cleared = owner.post(url, {**base, "filters": "  "})
    assert cleared.status_code == 302 and Peer.objects.get(pk=peer.pk).filters == []
    assert owner.get(f"/settings/federation/peers/{peer.pk}/").context["settings_form"]["filters"].value() == ""


def test_saving_other_settings_keeps_the_filters(owner, team):  # noqa: F811
    peer = services.peer_create(team=team, name="b", peer_hook_url=PEER_URL, outbound_token=SECRET,
                                scopes=["stripe.*"], filters=EXAMPLE).row  # fmt: skip
    page = owner.get(f"/settings/federation/peers/{peer.pk}/")
    shown = page.context["settings_form"]["filters"].value()
    saved = owner.post(f"/settings/federation/peers/{peer.pk}/settings",
                       {"peer_hook_url": PEER_URL, "scopes": "stripe.*", "max_hops": 5, "filters": shown})
    assert saved.status_code == 302
    peer.refresh_from_db()
    assert (peer.filters, peer.max_hops) == (EXAMPLE, 5)
    assert AuditEvent.objects.get(action=audit.PEER_UPDATED).data["changed"] == {"max_hops": 5}
