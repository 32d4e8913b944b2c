"""Rotation carried over the signed channel (federation.channel) and signing with several
certificates while one is rotated. The two-instance flows are in tests/e2e/test_federation.py."""

import json
import time

import pytest

from federation import certificates, channel, inbound, peers, services, signing
from federation.models import IdentityCertificate, Peer
from kite.errors import ApiError
from tests.federation.test_api import PEER_URL, SECRET

NEW_SECRET = "whsec_bmV3LXNlY3JldC1mb3Ita2l0ZS10ZXN0cy0zMmJ5dGVzIQ=="


def _signed(body: bytes, signer, team_id: str) -> dict:
    """A delivery's headers, to `team_id`'s kite hook."""
    return signing.sign_headers(
        secret=SECRET, msg_id=f"m{time.monotonic_ns()}", timestamp=int(time.time()), body=body, sender_id="kite-a",
        ed25519_sign=signer.sign, key_thumbprint=signer.thumbprint, also_signed_by=signer.also_signed_by,
        binding=signing.delivery_binding(team_id),
    )  # fmt: skip


def test_while_two_certificates_are_valid_both_sign_and_a_peer_pinned_to_either_verifies(team, other_team):
    old = certificates.issue(team=team, subject="old")
    new = certificates.issue(team=team, subject="new")
    signer = certificates.signer_for(team.id)
    assert signer.thumbprint == new.thumbprint and [t for t, _ in signer.also_signed_by] == [old.thumbprint]
    body = b'{"x": 1}'
    headers = _signed(body, signer, other_team.id)
    assert headers["kite-key"] == f"{new.thumbprint} {old.thumbprint}"
    assert headers["webhook-signature"].count("v1a,") == 2
    for pem in (old.pem, new.pem):  # as seen by a receiver pinned to one or the other
        Peer.objects.filter(team=other_team).delete()
        sender = services.trusted_sender_create(team=other_team, name="a", inbound_token=SECRET,
                                                certificate_pem=pem).row  # fmt: skip
        assert inbound.authenticate(headers, body, team_id=other_team.id).pk == sender.pk
    stranger = certificates.issue(team=other_team, subject="someone else")
    Peer.objects.filter(team=other_team).update(certificate_pem=stranger.pem, certificate_thumbprint=stranger.thumbprint)
    with pytest.raises(inbound.Refusal) as refused:
        inbound.authenticate(headers, body, team_id=other_team.id)
    assert refused.value.code == "bad_certificate"
    # Deleting the old certificate: only the new one signs from then on.
    IdentityCertificate.objects.filter(pk=old.pk).delete()
    certificates.forget(old.pk)
    assert certificates.signer_for(team.id).also_signed_by == ()


@pytest.fixture
def peer(team):
    pem = certificates.issue(team=team, subject="stands in for the other side").pem
    return services.peer_create(team=team, name="b", peer_hook_url=PEER_URL, outbound_token=SECRET,
                                inbound_token=SECRET, certificate_pem=pem).row  # fmt: skip


def test_the_receiver_applies_each_change_the_peer_sends(team, peer):
    answer = channel.apply(peer, {"inbound_secret": NEW_SECRET})
    peer.refresh_from_db()
    assert answer["applied"] == "inbound_secret" and peers.inbound_secrets(peer) == [NEW_SECRET, SECRET]
    channel.apply(peer, {"outbound_secret": NEW_SECRET})
    peer.refresh_from_db()
    assert peers.secret_of(peer, "outbound") == NEW_SECRET
    rotated = certificates.issue(team=team, subject="their next certificate")
    assert channel.apply(peer, {"certificate_pem": rotated.pem}) == {
        "applied": "certificate_pem", "pinned": True, "thumbprint": rotated.thumbprint,
    }  # fmt: skip
    peer.refresh_from_db()
    assert peer.certificate_thumbprint == rotated.thumbprint


def test_a_certificate_is_only_repinned_where_one_was_pinned(team):
    unpinned = services.peer_create(team=team, name="c", peer_hook_url=PEER_URL, outbound_token=SECRET).row
    pem = certificates.issue(team=team, subject="x").pem
    assert channel.apply(unpinned, {"certificate_pem": pem}) == {"applied": None, "pinned": False}
    unpinned.refresh_from_db()
    assert unpinned.certificate_thumbprint == ""


@pytest.mark.parametrize("change", [
    {}, {"inbound_secret": NEW_SECRET, "outbound_secret": NEW_SECRET}, {"password": "x"}, ["inbound_secret"],
    {"inbound_secret": "too short"}, {"outbound_secret": 42}, {"certificate_pem": "not a pem"},
])  # fmt: skip
def test_a_bad_change_is_400_and_changes_nothing(peer, change):
    before = Peer.objects.values().get(pk=peer.pk)
    with pytest.raises(ApiError) as refused:
        channel.apply(peer, change)
    assert refused.value.status == 400 and refused.value.code == "invalid"
    assert Peer.objects.values().get(pk=peer.pk) == before


def test_the_signed_rotate_endpoint_refuses_an_unsigned_or_wrongly_signed_request(client, team, peer):
    before = Peer.objects.values().get(pk=peer.pk)
    body = json.dumps({"inbound_secret": NEW_SECRET}).encode()
    unsigned = client.post("/api/federation/rotate", body, content_type="application/json")
    assert unsigned.status_code == 401 and unsigned.json()["code"] == "missing_signature"
    forged = signing.sign_headers(secret=NEW_SECRET, msg_id="m1", timestamp=int(time.time()), body=body,
                                  sender_id="kite-a", binding=signing.Binding("POST", "/api/federation/rotate",
                                                                              team.id))  # fmt: skip
    refused = client.post("/api/federation/rotate", body, content_type="application/json",
                          **{"HTTP_" + k.upper().replace("-", "_"): v for k, v in forged.items()})  # fmt: skip
    assert refused.status_code == 401
    assert Peer.objects.values().get(pk=peer.pk) == before


def test_a_manual_peer_is_not_told_by_default_and_gets_the_secret_to_paste(api, team):
    created = api.post("/api/federation/peers", {"name": "m", "peer_hook_url": PEER_URL, "outbound_token": SECRET},
                       format="json").json()  # fmt: skip
    rotated = api.post(f"/api/federation/peers/{created['id']}/rotate-secret", {"direction": "inbound"}, format="json")
    assert rotated.status_code == 200
    assert rotated.json()["propagated"] is False and rotated.json()["secret"].startswith("whsec_")
    assert channel.has_channel(Peer.objects.get(pk=created["id"])) is False


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
def test_propagating_to_a_pending_invitation_or_a_trusted_sender_is_400_and_changes_nothing(api, team, direction):
    """Neither has a URL to call nor a secret to sign with: telling them raised on the empty secret (a 500)."""
    pending = api.post("/api/federation/invitations", {"name": "pending"}, format="json").json()["peer_id"]
    sender = services.trusted_sender_create(team=team, name="s", inbound_token=SECRET).row.pk
    for peer_id in (pending, sender):
        before = Peer.objects.values().get(pk=peer_id)
        response = api.post(f"/api/federation/peers/{peer_id}/rotate-secret",
                            {"direction": direction, "propagate": True}, format="json")  # fmt: skip
        assert response.status_code == 400, response.content
        assert response.json()["code"] == "invalid" and "propagate=false" in response.json()["detail"]
        assert Peer.objects.values().get(pk=peer_id) == before
