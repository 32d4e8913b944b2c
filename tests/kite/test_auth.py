"""Who is calling: Bearer API keys and logged-in browser users, always scoped to one team."""

import hashlib

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.test import APIClient

from ingest.models import Source
from kite import services
from kite.models import ApiKey, Membership


def bearer(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


def assert_error(response, status: int, code: str):
    body = response.json()
    assert (response.status_code, set(body), body["code"]) == (status, {"detail", "code"}, code)
    assert body["detail"]


def test_me_with_an_api_key_names_the_keys_team(api, team):
    response = api.get("/api/me")

    assert response.status_code == 200
    assert response.json() == {
        "team": {"id": team.id, "name": "owner-team"},
        "instance_id": settings.KITE_INSTANCE_ID,
        "public_url": settings.KITE_PUBLIC_URL,
    }


def test_each_key_sees_only_its_own_team(api, outsider_api, team, other_team):
    assert api.get("/api/me").json()["team"]["id"] == team.id
    assert outsider_api.get("/api/me").json()["team"]["id"] == other_team.id


def test_bearer_scheme_is_case_insensitive(api_key, team):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"bearer {api_key}")

    assert client.get("/api/me").status_code == 200


def test_revoked_key_is_refused(team):
    issued = services.apikey_create(team=team)
    client = bearer(issued.raw_key)
    assert client.get("/api/me").status_code == 200

    services.apikey_revoke(api_key=issued.api_key)
    response = client.get("/api/me")

    assert_error(response, 401, "authentication_failed")
    assert response["WWW-Authenticate"] == 'Bearer realm="kite"'


def test_unknown_key_is_refused(team):
    assert_error(bearer("kite_ak_" + "x" * 43).get("/api/me"), 401, "authentication_failed")


@pytest.mark.parametrize("header", ["Token abc", "Bearer", "Bearer    ", "Basic YWRtaW46YWRtaW4=", "abc"])
def test_malformed_authorization_header_is_refused(team, header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)

    response = client.get("/api/me")

    assert_error(response, 401, "authentication_failed")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_no_credentials_is_401_not_authenticated(anonymous_api, team):
    response = anonymous_api.get("/api/me")

    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_key_of_a_deleted_team_stops_working(team):
    raw = services.apikey_create(team=team).raw_key

    team.delete()

    assert bearer(raw).get("/api/me").status_code == 401


def test_only_the_sha256_digest_of_a_key_is_stored(team):
    issued = services.apikey_create(team=team, label="ci")

    stored = ApiKey.objects.filter(pk=issued.api_key.pk).values().get()

    assert stored["digest"] == hashlib.sha256(issued.raw_key.encode()).hexdigest()
    assert all(issued.raw_key not in str(value) for value in stored.values())
    assert len(stored["prefix"]) < len(issued.raw_key) // 2


def test_keys_are_unique_and_unguessable(team):
    keys = {services.apikey_create(team=team).raw_key for _ in range(20)}

    assert len(keys) == 20
    assert all(key.startswith("kite_ak_") and len(key) >= 40 for key in keys)


# --- Browser sessions ---------------------------------------------------------------


@pytest.fixture
def member(team):
    user = get_user_model().objects.create_user("mia", password="pw-mia-123")
    services.membership_add(team=team, user=user, role=Membership.Role.MEMBER)
    return user


def test_logged_in_member_uses_the_api_as_their_team(member, team):
    client = APIClient()
    client.force_login(member)

    response = client.get("/api/me")

    assert (response.status_code, response.json()["team"]["id"]) == (200, team.id)
    assert client.get("/api/sources").json()["results"][0]["name"] == "kite"


def test_logged_in_user_without_membership_is_refused(team):
    user = get_user_model().objects.create_user("drifter", password="pw")
    client = APIClient()
    client.force_login(user)

    for path in ("/api/me", "/api/sources", "/api/events"):
        assert_error(client.get(path), 403, "permission_denied")


def test_superuser_without_membership_is_refused_too(team):
    user = get_user_model().objects.create_superuser("root", "", "pw")
    client = APIClient()
    client.force_login(user)

    assert_error(client.get("/api/me"), 403, "permission_denied")


def test_session_writes_need_a_csrf_token(member, team):
    client = Client(enforce_csrf_checks=True)
    client.force_login(member)

    response = client.post("/api/sources", {"name": "forged", "kind": "none"}, content_type="application/json")

    assert_error(response, 403, "permission_denied")
    assert not Source.objects.filter(name="forged").exists()


def test_api_key_writes_need_no_csrf_token(api_key, team):
    client = APIClient(enforce_csrf_checks=True)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")

    response = client.post("/api/sources", {"name": "fine", "kind": "none"}, format="json")

    assert response.status_code == 201


def test_bad_bearer_is_refused_even_with_a_valid_session(member, team):
    client = APIClient()
    client.force_login(member)
    client.credentials(HTTP_AUTHORIZATION="Bearer not-a-key")

    assert_error(client.get("/api/me"), 401, "authentication_failed")
