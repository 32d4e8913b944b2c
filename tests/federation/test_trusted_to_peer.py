"""A trusted sender becomes a peer: PATCH /api/federation/trusted-senders/{id} (README "Federating two instances by hand"), so that
the side that only received (B, after the Kite guide's step 03) can send back to the same instance
under the same name, with the same inbound secret."""

import ipaddress

import pytest

from federation import audit, enqueue, peers, services
from federation.models import AuditEvent, OutboxEntry, Peer
from ingest import services as ingest_services
from tests.federation.test_api import SECRET
from tests.screens import member, outsider, owner  # noqa: F401  (fixtures)

A_HOOK = "https://127.0.0.1:9/hooks/tm_a/kite"
OUTBOUND = "whsec_" + "O" * 43
PIN = "sha256:" + "ab" * 32


@pytest.fixture
def sender(api):
    created = api.post("/api/federation/trusted-senders", {"name": "instance-a", "inbound_token": SECRET},
                       format="json")  # fmt: skip
    assert created.status_code == 201, created.json()
    return created.json()


def _row(sender_id) -> dict:
    return Peer.objects.values().get(pk=sender_id)


def test_adding_a_trusted_sender_as_a_peer_is_a_409_naming_it_and_the_patch_that_does_it(api, sender):
    refused = api.post("/api/federation/peers", {"name": "instance-a", "peer_hook_url": A_HOOK, "scopes": ["*"]},
                       format="json")  # fmt: skip
    assert refused.status_code == 409, refused.json()
    detail = refused.json()["detail"]
    assert refused.json()["code"] == "conflict"
    assert "Team already has a peer named 'instance-a'" in detail
    assert "trusted sender 'instance-a'" in detail and f"PATCH /api/federation/trusted-senders/{sender['id']}" in detail
    assert Peer.objects.count() == 1


def test_patch_makes_the_same_row_a_peer_listed_with_the_peers_and_audited(api, sender):
    before = _row(sender["id"])
    made = api.patch(f"/api/federation/trusted-senders/{sender['id']}", {
        "peer_hook_url": A_HOOK, "outbound_token": OUTBOUND, "scopes": ["stripe.*"], "max_hops": 2,
        "tls_fingerprint": PIN}, format="json")  # fmt: skip
    assert made.status_code == 200, made.json()
    body = made.json()
    assert body["id"] == sender["id"] and body["role"] == "peer" and body["name"] == "instance-a"
    assert body["peer_hook_url"] == A_HOOK and body["scopes"] == ["stripe.*"] and body["max_hops"] == 2
    assert body["tls_fingerprint"] == PIN and body["status"] == "accepted"
    assert body["inbound_fingerprint"] == sender["inbound_fingerprint"]  # the same inbound secret
    assert "outbound_token" not in body  # given, so not shown back
    after = _row(sender["id"])
    assert after["inbound_secret_encrypted"] == before["inbound_secret_encrypted"]
    assert peers.secret_of(Peer.objects.get(pk=sender["id"]), "outbound") == OUTBOUND
    assert [row["id"] for row in api.get("/api/federation/peers").json()["results"]] == [sender["id"]]
    assert api.get("/api/federation/trusted-senders").json()["results"] == []
    assert api.get(f"/api/federation/peers/{sender['id']}").status_code == 200
    event = AuditEvent.objects.get(action=audit.TRUSTED_SENDER_PROMOTED)
    assert event.peer_id == sender["id"] and event.data["role"] == "peer" and event.data["generated"] == []
    assert OUTBOUND not in str(event.data) and SECRET not in str(event.data)


def test_an_outbound_token_left_out_is_generated_and_shown_once(api, sender):
    made = api.patch(f"/api/federation/trusted-senders/{sender['id']}", {"peer_hook_url": A_HOOK, "scopes": []},
                     format="json")  # fmt: skip
    assert made.status_code == 200, made.json()
    token = made.json()["outbound_token"]
    assert token.startswith("whsec_") and made.json()["outbound_fingerprint"] == services.crypto.fingerprint(token)
    assert "outbound_token" not in api.get(f"/api/federation/peers/{sender['id']}").json()


def test_events_are_queued_for_it_once_it_is_a_peer(api, sender, team):
    ingest_services.source_create(team=team, name="plain", kind="none")
    api.patch(f"/api/federation/trusted-senders/{sender['id']}", {"peer_hook_url": A_HOOK, "scopes": ["*"]},
              format="json")  # fmt: skip
    source = team.sources.get(name="plain")
    ingest_services.webhook_receive(source=source, headers={}, body=b'{"id": "e1", "type": "stripe.charge"}')
    assert list(OutboxEntry.objects.values_list("peer_id", flat=True)) == [sender["id"]]
    assert enqueue.routes_for(team.id)  # the route cache knows it


@pytest.mark.parametrize("body, status, code, named", [
    ({"peer_hook_url": "http://127.0.0.1:9/hooks/x/kite", "scopes": []}, 400, "insecure_url", "https"),
    ({"peer_hook_url": "https://10.1.2.3/hooks/x/kite", "scopes": []}, 400, "insecure_url", "10.1.2.3"),
    ({"peer_hook_url": A_HOOK}, 400, "invalid", "scopes"),
    ({"scopes": ["*"]}, 400, "invalid", "peer_hook_url"),
    ({"peer_hook_url": A_HOOK, "scopes": [], "outbound_token": "short"}, 400, "invalid", "outbound_token"),
    ({"peer_hook_url": A_HOOK, "scopes": [], "tls_fingerprint": "sha1:x"}, 400, "invalid", "tls_fingerprint"),
    ({"peer_hook_url": A_HOOK, "scopes": [], "inbound_token": SECRET}, 400, "invalid", "rotate-secret"),
    ({"peer_hook_url": A_HOOK, "scopes": [], "name": "other"}, 400, "invalid", "PATCH /api/federation/peers/"),
    ({"peer_hook_url": A_HOOK, "scopes": [], "colour": "red"}, 400, "invalid", "colour: not a field"),
    ({"peer_hook_url": A_HOOK, "scopes": [], "role": "peer"}, 400, "invalid", "role: read-only"),
    ({"peer_hook_url": A_HOOK, "scopes": [], "id": 99}, 400, "invalid", "id: read-only"),
])  # fmt: skip
def test_a_bad_patch_is_refused_naming_the_field_and_changes_nothing(api, sender, settings, body, status, code, named):
    settings.KITE_PEER_ALLOWED_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"),)
    before, audited = _row(sender["id"]), AuditEvent.objects.count()
    refused = api.patch(f"/api/federation/trusted-senders/{sender['id']}", body, format="json")
    assert refused.status_code == status and refused.json()["code"] == code, refused.json()
    assert named in refused.json()["detail"]
    assert _row(sender["id"]) == before and AuditEvent.objects.count() == audited


def test_only_a_live_trusted_sender_of_the_team_can_be_made_a_peer(api, outsider_api, sender):
    body = {"peer_hook_url": A_HOOK, "scopes": []}
    assert outsider_api.patch(f"/api/federation/trusted-senders/{sender['id']}", body, format="json").status_code == 404
    peer = api.post("/api/federation/peers", {"name": "b", "peer_hook_url": A_HOOK}, format="json").json()
    assert api.patch(f"/api/federation/trusted-senders/{peer['id']}", body, format="json").status_code == 404
    assert api.patch(f"/api/federation/trusted-senders/{sender['id']}", body, format="json").status_code == 200
    again = api.patch(f"/api/federation/trusted-senders/{sender['id']}", body, format="json")
    assert again.status_code == 404  # it is a peer now: PATCH /api/federation/peers/{id} changes it
    revoked = api.post("/api/federation/trusted-senders", {"name": "gone"}, format="json").json()
    assert api.delete(f"/api/federation/trusted-senders/{revoked['id']}").status_code == 204
    refused = api.patch(f"/api/federation/trusted-senders/{revoked['id']}", body, format="json")
    assert refused.status_code == 404 and _row(revoked["id"])["role"] == "sender"


def test_anonymous_and_members_cannot_make_a_peer(anonymous_api, sender, team):
    body = {"peer_hook_url": A_HOOK, "scopes": []}
    assert anonymous_api.patch(f"/api/federation/trusted-senders/{sender['id']}", body,
                               format="json").status_code == 401  # fmt: skip
    assert _row(sender["id"])["role"] == "sender"


# --- on the screen: the trusted sender's row on the peers page -----------------------------------------

SCREEN = "/settings/federation/peers/"


def _make_peer_form(sender_id: int, **fields) -> dict:
    values = {"peer_hook_url": A_HOOK, "outbound_token": "", "scopes": "stripe.* demo.*", "max_hops": "3",
              "tls_fingerprint": "", **fields}  # fmt: skip
    return {f"s{sender_id}-{name}": value for name, value in values.items()}


def test_the_peers_screen_makes_a_trusted_sender_a_peer_and_shows_a_generated_secret_once(owner, sender):
    page = owner.get(SCREEN).content.decode()
    assert "Trusted senders" in page and "instance-a" in page and "Make it a peer" in page
    assert f"/settings/federation/senders/{sender['id']}/make-peer" in page
    done = owner.post(f"/settings/federation/senders/{sender['id']}/make-peer", _make_peer_form(sender["id"]))
    assert done.status_code == 302 and done["Location"] == f"/settings/federation/peers/{sender['id']}/created"
    shown = owner.get(done["Location"]).content.decode()
    row = Peer.objects.get(pk=sender["id"])
    secret = peers.secret_of(row, "outbound")
    assert row.role == "peer" and row.scopes == ["stripe.*", "demo.*"] and row.peer_hook_url == A_HOOK
    assert shown.count(secret) >= 1 and secret not in owner.get(done["Location"]).content.decode()  # once
    assert AuditEvent.objects.filter(action=audit.TRUSTED_SENDER_PROMOTED, peer_id=row.pk).count() == 1
    assert "Make it a peer" not in owner.get(SCREEN).content.decode()  # no trusted sender left
    assert "instance-a" in owner.get(SCREEN).content.decode()  # listed with the peers


def test_a_refused_make_it_a_peer_puts_the_error_on_its_field_and_changes_nothing(owner, sender, settings):
    settings.KITE_PEER_ALLOWED_NETWORKS = ()
    before = _row(sender["id"])
    refused = owner.post(f"/settings/federation/senders/{sender['id']}/make-peer", _make_peer_form(sender["id"]))
    assert refused.status_code == 400
    page = refused.content.decode()
    assert "127.0.0.1" in page and "KITE_PEER_ALLOWED_NETWORKS" in page and "<details open>" in page
    assert _row(sender["id"]) == before
    settings.KITE_PEER_ALLOWED_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"),)
    short = owner.post(f"/settings/federation/senders/{sender['id']}/make-peer",
                       _make_peer_form(sender["id"], outbound_token="short"))
    assert short.status_code == 400 and "outbound_token must be a secret" in short.content.decode()
    assert _row(sender["id"]) == before


def test_only_the_team_admins_make_a_trusted_sender_a_peer_on_the_screen(member, outsider, sender):
    url = f"/settings/federation/senders/{sender['id']}/make-peer"
    assert member.post(url, _make_peer_form(sender["id"])).status_code == 403
    assert outsider.post(url, _make_peer_form(sender["id"])).status_code == 404
    assert _row(sender["id"])["role"] == "sender"
