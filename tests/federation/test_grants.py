"""Grants (README "Grants and permissions"): a token shown once, digest stored; checked by kind, scope, TTL and CIDR."""

from datetime import timedelta

import pytest
from django.utils import timezone

from federation import grants
from federation.models import Grant
from tests.federation.test_api import PEER_URL, SECRET


@pytest.fixture
def peer_id(api):
    return api.post("/api/federation/peers", {"name": "b", "peer_hook_url": PEER_URL, "outbound_token": SECRET},
                    format="json").json()["id"]  # fmt: skip


def _grant(api, peer_id, **body):
    response = api.post(f"/api/federation/peers/{peer_id}/grants", {"resource_kind": "fleet.agents", **body},
                        format="json")  # fmt: skip
    assert response.status_code == 201, response.json()
    return response.json()


def test_a_grant_token_is_shown_once_and_only_its_digest_is_kept(api, peer_id):
    created = _grant(api, peer_id)
    token = created["token"]
    assert token.startswith(f"fg-{created['id']}.")
    row = Grant.objects.get(pk=created["id"])
    assert token.split(".", 1)[1] not in row.secret_sha256
    assert 29 <= (row.expires_at - timezone.now()).days <= 30  # 30 days by default
    listed = api.get(f"/api/federation/peers/{peer_id}/grants").json()["results"]
    assert [g["id"] for g in listed] == [created["id"]] and "token" not in listed[0]
    assert grants.check(token, resource_kind="fleet.agents", client_ip="203.0.113.9").pk == created["id"]


def test_expired_out_of_network_wrong_kind_or_forged_tokens_are_refused(api, peer_id):
    token = _grant(api, peer_id, source_cidrs=["10.0.0.0/8"])["token"]
    assert grants.check(token, resource_kind="fleet.agents", client_ip="10.1.2.3")
    cases = [
        (dict(client_ip="192.168.0.1"), "grant_source"),
        (dict(client_ip="10.1.2.3", scope="write"), "grant_scope"),
    ]
    for kwargs, code in cases:
        with pytest.raises(grants.Refused) as refused:
            grants.check(token, resource_kind="fleet.agents", **kwargs)
        assert refused.value.code == code
    with pytest.raises(grants.Refused) as forged:
        grants.check(token[:-2] + "xx", resource_kind="fleet.agents", client_ip="10.1.2.3")
    assert forged.value.code == "bad_grant"
    Grant.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(grants.Refused) as expired:
        grants.check(token, resource_kind="fleet.agents", client_ip="10.1.2.3")
    assert expired.value.code == "grant_expired"


@pytest.mark.parametrize("spelling", ["arabic-indic", "fullwidth", "superscript", "19 digits", "5000 digits"])
def test_a_grant_token_whose_id_is_not_ascii_digits_of_a_bigint_is_a_bad_grant(api, peer_id, spelling):
    """str.isdigit() admits all of these: int() read the first two as the grant's id (its secret
    then matched), refused the superscript and the 5000 digits with a ValueError (a 500)."""
    created = _grant(api, peer_id)
    secret = created["token"].split(".", 1)[1]
    grant_id = str(created["id"])
    spelled = {
        "arabic-indic": grant_id.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")),
        "fullwidth": grant_id.translate(str.maketrans("0123456789", "０１２３４５６７８９")),
        "superscript": grant_id.translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")),
        "19 digits": grant_id.zfill(19),
        "5000 digits": grant_id.zfill(5000),
    }[spelling]

    with pytest.raises(grants.Refused) as refused:
        grants.check(f"fg-{spelled}.{secret}", resource_kind="fleet.agents", client_ip="203.0.113.9")

    assert refused.value.code == "bad_grant"
    assert grants.check(created["token"], resource_kind="fleet.agents", client_ip="203.0.113.9").pk == created["id"]
    assert list(Grant.objects.values_list("pk", flat=True)) == [created["id"]]


@pytest.mark.parametrize("body", [{"resource_kind": "secrets"}, {"resource_kind": "fleet.agents", "source_cidrs": ["nope"]},
                                  {"resource_kind": "fleet.agents", "ttl_seconds": 5}])
def test_bad_grant_requests_are_400_and_create_nothing(api, peer_id, body):
    response = api.post(f"/api/federation/peers/{peer_id}/grants", body, format="json")
    assert response.status_code == 400 and {"detail", "code"} <= set(response.json())
    assert not Grant.objects.exists()


def test_grants_stay_in_their_team_and_can_be_revoked(api, outsider_api, peer_id):
    created = _grant(api, peer_id)
    assert outsider_api.get(f"/api/federation/peers/{peer_id}/grants").status_code == 404
    assert outsider_api.delete(f"/api/federation/peers/{peer_id}/grants/{created['id']}").status_code == 404
    assert api.delete(f"/api/federation/peers/{peer_id}/grants/{created['id']}").status_code == 204
    with pytest.raises(grants.Refused):
        grants.check(created["token"], resource_kind="fleet.agents")


# --- permissions: federation.manage_peer / federation.invite_peer -------------------------


@pytest.fixture
def browser(team):
    """Logged-in browser users of the team: a member and an admin."""
    from django.contrib.auth import get_user_model
    from rest_framework.test import APIClient

    from kite import services
    from kite.models import Membership

    clients = {}
    for role in (Membership.Role.MEMBER, Membership.Role.ADMIN):
        user = get_user_model().objects.create_user(f"{role}-user", password="x")
        services.membership_add(team=team, user=user, role=role)
        client = APIClient()
        client.force_authenticate(user)
        clients[role] = client
    return clients


@pytest.mark.parametrize(
    ("method", "path", "body", "permission"),
    [
        ("get", "/api/federation/peers", None, "federation.manage_peer"),
        ("post", "/api/federation/peers", {"name": "x", "peer_hook_url": PEER_URL}, "federation.manage_peer"),
        ("post", "/api/federation/certificates", {"subject": "x"}, "federation.manage_peer"),
        ("post", "/api/federation/invitations", {"name": "x"}, "federation.invite_peer"),
        ("post", "/api/federation/invitations/accept", {"invitation": "kite-invite-v1.x"}, "federation.invite_peer"),
    ],
)
def test_members_may_not_manage_or_invite_peers_admins_may(browser, method, path, body, permission):
    from federation.models import Peer

    refused = getattr(browser["member"], method)(path, body, format="json")
    assert refused.status_code == 403 and refused.json()["code"] == "permission_denied", refused.json()
    assert permission in refused.json()["detail"]
    assert not Peer.objects.exists()
    allowed = getattr(browser["admin"], method)(path, body, format="json")
    assert allowed.status_code != 403, allowed.json()


def test_members_still_see_the_instance_identity(browser):
    assert browser["member"].get("/api/federation/identity").status_code == 200
