"""POST/GET /api/sources: one team's webhook senders."""

import base64
import json
import time

import pytest
from django.conf import settings

from django.test import Client
from django.utils import timezone

from ingest.models import Event, Source
from ingest.services import ce_source_for
from kite import crypto
from tests.federation.test_grants import browser  # noqa: F401  (fixture: a member's and an admin's session)
from tests.screens import client_for
from tests.signing import as_wsgi_headers, github_signature, standard_webhook_headers, stripe_signature

SIGNED_KINDS = ["stripe", "github", "standard"]


def assert_error(response, status: int, code: str):
    body = response.json()
    assert (response.status_code, body["code"]) == (status, code)
    assert isinstance(body["detail"], str) and body["detail"]


@pytest.mark.parametrize("kind", SIGNED_KINDS)
def test_signed_source_without_secret_gets_a_generated_whsec_secret_shown_once(api, team, kind):
    response = api.post("/api/sources", {"name": f"{kind}-main", "kind": kind}, format="json")

    assert response.status_code == 201
    body = response.json()
    secret = body["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[len("whsec_") :])) == 32
    assert body["secret_fingerprint"] == crypto.fingerprint(secret)
    assert body["hook_url"] == f"{settings.KITE_PUBLIC_URL}/hooks/{team.id}/{kind}-main"
    assert (body["name"], body["kind"]) == (f"{kind}-main", kind)
    listed = api.get("/api/sources").json()["results"]
    assert secret not in json.dumps(listed)
    assert all("secret" not in source for source in listed)
    stored = Source.objects.get(team=team, name=f"{kind}-main")
    assert secret not in stored.secret_encrypted and crypto.decrypt(stored.secret_encrypted) == secret


@pytest.mark.parametrize("kind", SIGNED_KINDS)
def test_source_with_a_given_secret_shows_only_its_fingerprint(api, kind):
    response = api.post("/api/sources", {"name": "mine", "kind": kind, "secret": "whsec_provided"}, format="json")

    assert response.status_code == 201
    assert "secret" not in response.json()
    assert response.json()["secret_fingerprint"] == crypto.fingerprint("whsec_provided")
    assert response.json()["secret_fingerprint"].startswith("sha256:") and len(response.json()["secret_fingerprint"]) == 19


def test_none_source_has_no_secret(api):
    response = api.post("/api/sources", {"name": "open", "kind": "none"}, format="json")

    assert response.status_code == 201
    assert "secret" not in response.json() and response.json()["secret_fingerprint"] == ""


def test_none_source_refuses_a_secret(api, team):
    response = api.post("/api/sources", {"name": "open", "kind": "none", "secret": "s"}, format="json")

    assert_error(response, 400, "invalid")
    assert not Source.objects.filter(team=team, name="open").exists()


def test_generated_secret_verifies_the_providers_signatures(api, client, team):
    created = {
        kind: api.post("/api/sources", {"name": kind, "kind": kind}, format="json").json() for kind in SIGNED_KINDS
    }
    body = b'{"id": "evt_9", "type": "charge.failed", "action": "opened"}'

    stripe = client.post(
        f"/hooks/{team.id}/stripe",
        body,
        content_type="application/json",
        HTTP_STRIPE_SIGNATURE=stripe_signature(created["stripe"]["secret"], body),
    )
    github = client.post(
        f"/hooks/{team.id}/github",
        body,
        content_type="application/json",
        HTTP_X_GITHUB_EVENT="issues",
        HTTP_X_HUB_SIGNATURE_256=github_signature(created["github"]["secret"], body),
    )
    standard = client.post(
        f"/hooks/{team.id}/standard",
        body,
        content_type="application/json",
        **as_wsgi_headers(standard_webhook_headers(created["standard"]["secret"], "m1", body, int(time.time()))),
    )

    assert [stripe.status_code, github.status_code, standard.status_code] == [202, 202, 202]


def test_rate_limit_is_kept(api):
    response = api.post("/api/sources", {"name": "busy", "kind": "none", "rate_limit_per_second": 5}, format="json")

    assert response.status_code == 201 and response.json()["rate_limit_per_second"] == 5


def test_list_shows_the_builtin_kite_source_and_created_ones_by_name(api, team):
    api.post("/api/sources", {"name": "stripe", "kind": "stripe"}, format="json")

    listed = api.get("/api/sources")

    assert listed.status_code == 200
    assert [(s["name"], s["kind"]) for s in listed.json()["results"]] == [("kite", "kite"), ("stripe", "stripe")]


@pytest.mark.parametrize("name", ["", "Stripe", "has space", "-lead", "a" * 51, "ünï", "../x", "a/b"])
def test_invalid_source_name_is_400_and_nothing_created(api, team, name):
    before = Source.objects.count()

    response = api.post("/api/sources", {"name": name, "kind": "none"}, format="json")

    assert_error(response, 400, "invalid")
    assert Source.objects.count() == before


@pytest.mark.parametrize("kind", ["kite", "paypal", "", None, "STRIPE"])
def test_invalid_kind_is_400_and_nothing_created(api, kind):
    before = Source.objects.count()

    response = api.post("/api/sources", {"name": "x", "kind": kind}, format="json")

    assert_error(response, 400, "invalid")
    assert Source.objects.count() == before


def test_a_second_kite_source_cannot_be_created(api, team):
    response = api.post("/api/sources", {"name": "kite", "kind": "none"}, format="json")

    assert_error(response, 400, "invalid")
    assert Source.objects.filter(team=team, name="kite").get().kind == "kite"


def test_duplicate_source_name_is_409(api, team):
    assert api.post("/api/sources", {"name": "dup", "kind": "none"}, format="json").status_code == 201

    response = api.post("/api/sources", {"name": "dup", "kind": "stripe"}, format="json")

    assert_error(response, 409, "conflict")
    assert Source.objects.get(team=team, name="dup").kind == "none"


def test_same_source_name_in_two_teams_is_fine(api, outsider_api):
    assert api.post("/api/sources", {"name": "stripe", "kind": "stripe"}, format="json").status_code == 201
    assert outsider_api.post("/api/sources", {"name": "stripe", "kind": "stripe"}, format="json").status_code == 201


def test_malformed_json_body_is_400(api):
    response = api.post("/api/sources", '{"name": ', content_type="application/json")

    assert_error(response, 400, "malformed_json")


def test_unauthenticated_list_and_create_are_401(anonymous_api, team):
    before = Source.objects.count()

    for response in (
        anonymous_api.get("/api/sources"),
        anonymous_api.post("/api/sources", {"name": "x", "kind": "none"}, format="json"),
    ):
        assert_error(response, 401, "not_authenticated")
        assert response["WWW-Authenticate"].startswith("Bearer")
    assert Source.objects.count() == before


def test_outsider_never_sees_the_owners_sources(api, outsider_api, team, other_team):
    api.post("/api/sources", {"name": "owner-stripe", "kind": "stripe"}, format="json")

    listed = outsider_api.get("/api/sources").json()["results"]

    assert [source["name"] for source in listed] == ["kite"]
    assert all(team.id not in source["hook_url"] for source in listed)


def test_outsider_creates_sources_in_its_own_team_only(outsider_api, team, other_team):
    outsider_api.post("/api/sources", {"name": "theirs", "kind": "none"}, format="json")

    assert Source.objects.get(name="theirs").team_id == other_team.id
    assert not Source.objects.filter(team=team, name="theirs").exists()



# --- who may write sources; unverified sources are marked ------------------------------------


def _sources(team) -> list[tuple]:
    return sorted(Source.objects.filter(team=team).values_list("name", "kind", "secret_fingerprint"))


@pytest.mark.parametrize("kind", ["none", *SIGNED_KINDS])
def test_a_member_may_not_create_a_source_and_nothing_is_stored(browser, team, kind):
    before = _sources(team)

    response = browser["member"].post("/api/sources", {"name": "open", "kind": kind}, format="json")

    assert_error(response, 403, "permission_denied")
    assert "ingest.manage_source" in response.json()["detail"]
    assert _sources(team) == before


@pytest.mark.parametrize("method", ["put", "patch", "delete"])
def test_a_member_is_refused_any_write_to_sources_before_anything_else(browser, team, method):
    before = _sources(team)

    response = getattr(browser["member"], method)("/api/sources", {"name": "kite", "kind": "none"}, format="json")

    assert_error(response, 403, "permission_denied")
    assert _sources(team) == before


def test_a_member_still_reads_the_teams_sources_and_a_team_admin_creates_them(browser, api, team):
    api.post("/api/sources", {"name": "stripe", "kind": "stripe"}, format="json")

    listed = browser["member"].get("/api/sources")
    created = browser["admin"].post("/api/sources", {"name": "open", "kind": "none"}, format="json")

    assert listed.status_code == 200
    assert [source["name"] for source in listed.json()["results"]] == ["kite", "stripe"]
    assert created.status_code == 201 and Source.objects.get(team=team, name="open").kind == "none"


def test_only_a_none_source_is_marked_unverified(api, team):
    created = {
        kind: api.post("/api/sources", {"name": kind, "kind": kind}, format="json").json()
        for kind in ["none", *SIGNED_KINDS]
    }

    listed = {source["name"]: source["verified"] for source in api.get("/api/sources").json()["results"]}

    assert {kind: body["verified"] for kind, body in created.items()} == {
        "none": False, "stripe": True, "github": True, "standard": True,
    }  # fmt: skip
    assert listed == {"kite": True, "none": False, "stripe": True, "github": True, "standard": True}


def test_the_events_screen_marks_unverified_sources_and_their_events(team):
    member = client_for("watcher", team, role="member")
    open_source = Source.objects.create(team=team, name="open", kind="none")
    signed = Source.objects.create(team=team, name="signed", kind="standard")
    posted = Client().post(f"/hooks/{team.id}/open", json.dumps({"id": "from-open"}), content_type="application/json")
    assert posted.status_code == 202
    Event.objects.create(team=team, source=signed, ce_id="from-signed", ce_source=ce_source_for(signed),
                         ce_type="com.x.y", ce_time=timezone.now(), data="{}")  # fmt: skip

    page = member.get("/events/").content.decode()

    rows = [row.split("</tr>")[0] for row in page.split("<tr data-cursor=")[1:]]
    open_row = next(row for row in rows if "from-open" in row)
    signed_row = next(row for row in rows if "from-signed" in row)
    assert ">unverified</span>" in open_row and "unverified" not in signed_row
    assert '<option value="open">open (unverified)</option>' in page
    assert '<option value="signed">signed</option>' in page
    assert f'data-unverified="{ce_source_for(open_source)}"' in page  # the live tail marks its events too
