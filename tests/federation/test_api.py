"""Federation configuration API: tokens, peers, trusted senders, identity (docs/architecture.md "Where each URL is served")."""

import pytest

from federation.models import FederationToken, OutboxEntry, Peer
from kite import crypto

PEER_URL = "https://127.0.0.1:9/hooks/tm_remote/kite"
SECRET = "whsec_c2hhcmVkLXNlY3JldC1mb3ItZmVkZXJhdGlvbi10ZXN0cyE="


def _peer(api, **overrides):
    body = {"name": "instance-b", "peer_hook_url": PEER_URL, "outbound_token": SECRET, "scopes": ["stripe.*"]}
    body.update(overrides)
    return api.post("/api/federation/peers", body, format="json")


def test_token_is_shown_once_and_listed_by_fingerprint_only(api):
    created = api.post("/api/federation/tokens", {"label": "peer-b-outbound"}, format="json")
    assert created.status_code == 201
    token = created.json()["token"]
    assert token.startswith("whsec_") and created.json()["fingerprint"] == crypto.fingerprint(token)
    listed = api.get("/api/federation/tokens").json()["results"]
    assert [row["label"] for row in listed] == ["peer-b-outbound"]
    assert token not in str(listed)
    assert token not in FederationToken.objects.get().secret_encrypted


def test_token_delete_is_team_scoped(api, outsider_api):
    token_id = api.post("/api/federation/tokens", {"label": "x"}, format="json").json()["id"]
    assert outsider_api.delete(f"/api/federation/tokens/{token_id}").status_code == 404
    assert api.delete(f"/api/federation/tokens/{token_id}").status_code == 204
    assert not FederationToken.objects.exists()


def test_peer_created_by_hand_shows_fingerprints_not_secrets(api):
    response = _peer(api, inbound_token=SECRET + "in")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["status"] == "accepted" and body["reachability"] == "Unknown"
    assert body["outbound_fingerprint"] == crypto.fingerprint(SECRET)
    assert body["inbound_fingerprint"] == crypto.fingerprint(SECRET + "in")
    assert SECRET not in str(body) and body["max_hops"] == 3
    assert body["outbox"] == {"pending": 0, "in_flight": 0, "dead": 0}


def test_secrets_left_out_are_generated_and_shown_once(api):
    body = api.post(
        "/api/federation/peers", {"name": "b", "peer_hook_url": PEER_URL, "scopes": ["*"]}, format="json"
    ).json()
    assert body["outbound_token"].startswith("whsec_") and body["inbound_token"].startswith("whsec_")
    again = api.get(f"/api/federation/peers/{body['id']}").json()
    assert "outbound_token" not in again and "inbound_token" not in again


@pytest.mark.parametrize(
    "url, code",
    [
        ("http://127.0.0.1:9/hooks/x/kite", "insecure_url"),
        ("https://169.254.169.254/latest/meta-data", "insecure_url"),
        ("https://[fe80::1]/hooks/x/kite", "insecure_url"),
        ("ftp://example/x", "insecure_url"),
    ],
)
def test_unsafe_peer_urls_are_refused_and_nothing_is_stored(api, url, code):
    response = _peer(api, peer_hook_url=url)
    assert response.status_code == 400 and response.json()["code"] == code
    assert not Peer.objects.exists()


@pytest.mark.parametrize(
    "override",
    [
        {"name": "bad name!"},
        {"scopes": "stripe.*"},
        {"scopes": [""]},
        {"max_hops": 0},
        {"tls_fingerprint": "sha256:abc"},
        {"outbound_token": "short"},
    ],
)
def test_invalid_peer_fields_get_a_clear_400_and_store_nothing(api, override):
    response = _peer(api, **override)
    assert response.status_code == 400 and set(response.json()) >= {"detail", "code"}
    assert not Peer.objects.exists()


def test_duplicate_peer_name_is_a_conflict(api):
    assert _peer(api).status_code == 201
    assert _peer(api).status_code == 409
    assert Peer.objects.count() == 1


def test_peer_is_invisible_and_untouchable_for_another_team(api, outsider_api):
    peer_id = _peer(api).json()["id"]
    assert outsider_api.get("/api/federation/peers").json()["results"] == []
    for call in (outsider_api.get, outsider_api.delete):
        assert call(f"/api/federation/peers/{peer_id}").status_code == 404
    assert outsider_api.patch(f"/api/federation/peers/{peer_id}", {"scopes": ["*"]}, format="json").status_code == 404
    assert outsider_api.post(f"/api/federation/peers/{peer_id}/replay-dead", {}, format="json").status_code == 404
    assert outsider_api.get(f"/api/federation/peers/{peer_id}/outbox").status_code == 404
    assert Peer.objects.get().scopes == ["stripe.*"] and Peer.objects.get().status == "accepted"


def test_anonymous_calls_are_refused(anonymous_api):
    for path in ("/api/federation/peers", "/api/federation/tokens", "/api/federation/identity"):
        response = anonymous_api.get(path)
        assert response.status_code == 401 and response.json()["code"] == "not_authenticated"


def test_patch_changes_scopes_and_refuses_http(api):
    peer_id = _peer(api).json()["id"]
    changed = api.patch(f"/api/federation/peers/{peer_id}", {"scopes": ["github.*"], "max_hops": 5}, format="json")
    assert changed.status_code == 200 and changed.json()["scopes"] == ["github.*"] and changed.json()["max_hops"] == 5
    refused = api.patch(f"/api/federation/peers/{peer_id}", {"peer_hook_url": "http://x/y"}, format="json")
    assert refused.status_code == 400 and Peer.objects.get().peer_hook_url == PEER_URL


def test_delete_revokes_and_dead_letters_the_queue(api, team):
    from ingest.models import Event, Source

    peer_id = _peer(api).json()["id"]
    event = Event.objects.create(
        team=team, source=Source.objects.get(team=team, name="kite"), ce_id="e", ce_source="s", ce_type="t",
        ce_time="2026-01-01T00:00:00Z", data="{}",
    )  # fmt: skip
    OutboxEntry.objects.create(team=team, peer_id=peer_id, event=event)
    assert api.delete(f"/api/federation/peers/{peer_id}").status_code == 204
    assert Peer.objects.get().status == "revoked"
    assert OutboxEntry.objects.get().status == "dead"
    # The name can be used again for a new peering.
    assert _peer(api).status_code == 201


def test_trusted_sender_lifecycle(api, outsider_api):
    created = api.post("/api/federation/trusted-senders", {"name": "instance-a", "inbound_token": SECRET}, format="json")
    assert created.status_code == 201 and created.json()["inbound_fingerprint"] == crypto.fingerprint(SECRET)
    assert [s["name"] for s in api.get("/api/federation/trusted-senders").json()["results"]] == ["instance-a"]
    assert api.get("/api/federation/peers").json()["results"] == []  # a sender is not a delivery target
    sender_id = created.json()["id"]
    assert outsider_api.delete(f"/api/federation/trusted-senders/{sender_id}").status_code == 404
    assert api.delete(f"/api/federation/trusted-senders/{sender_id}").status_code == 204
    assert Peer.objects.get().status == "revoked"


def test_identity_names_this_instance_and_the_team_hook(api, team, settings):
    body = api.get("/api/federation/identity").json()
    assert body["instance_id"] == settings.KITE_INSTANCE_ID and body["team_id"] == team.id
    assert body["hook_url"] == f"{settings.KITE_PUBLIC_URL}/hooks/{team.id}/kite"
    assert set(body) >= {"public_url", "tls_fingerprint", "certificates"}


def test_outbox_status_filter_is_validated(api):
    peer_id = _peer(api).json()["id"]
    assert api.get(f"/api/federation/peers/{peer_id}/outbox?status=nope").status_code == 400
    assert api.get(f"/api/federation/peers/{peer_id}/outbox?status=dead").json() == {"results": []}
    assert api.post(f"/api/federation/peers/{peer_id}/replay-dead", {"limit": 0}, format="json").status_code == 400
    assert api.post(f"/api/federation/peers/{peer_id}/replay-dead", {"limit": 5}, format="json").json() == {
        "requeued": 0
    }


# --- accepting an invitation: the handshake runs outside any transaction ---------------------


@pytest.fixture
def handshakes(monkeypatch):
    """Peer calls answered by this process's own views (tests.federation.loopback); each call is
    noted with whether a transaction of the code was open and whether our peer row existed then.
    `after` (a function), if set, runs once the inviting side has answered, as if meanwhile."""
    from federation import client
    from tests.conftest import in_a_transaction_of_the_code
    from tests.federation.loopback import django_send

    seen = {"calls": [], "after": None}

    def send(target, method, body, headers, timeout, **kwargs):
        seen["calls"].append((method, in_a_transaction_of_the_code(), Peer.objects.filter(name="a").exists()))
        answer = django_send(target, method, body, headers, timeout, **kwargs)
        if method == "POST" and seen["after"]:
            seen["after"]()
        return answer

    monkeypatch.setattr(client, "_send", send)
    return seen


def test_the_guard_fails_a_test_whose_code_calls_a_peer_inside_a_transaction(db, no_peer_call_inside_a_transaction):
    """tests/conftest.py's guard, which every test runs under, can fail: a call inside atomic()
    is caught (and would fail the test at teardown), the same call outside goes out."""
    from django.db import transaction

    from federation import client

    target = client.Target(url=PEER_URL, secret=SECRET, sender_id="kite-a")
    with pytest.raises(AssertionError, match=r"inside transaction\.atomic"), transaction.atomic():
        client.call(target, "GET")
    assert no_peer_call_inside_a_transaction == [f"GET {PEER_URL}"]
    no_peer_call_inside_a_transaction.clear()  # caught, as it should be: this test passes
    with pytest.raises(client.PeerCallError, match="ConnectionError"):  # outside: sent (nobody listens on 9)
        client.call(target, "GET")
    assert no_peer_call_inside_a_transaction == []


def _invitation_from(other_team) -> str:
    from federation import invitations

    return invitations.issue(team=other_team, name="b")[1]


def _accept(api, invitation):
    return api.post("/api/federation/invitations/accept", {"invitation": invitation, "name": "a"}, format="json")


def test_accepting_an_invitation_holds_no_transaction_while_the_inviting_instance_answers(api, team, other_team,
                                                                                          handshakes):  # fmt: skip
    from federation import grants

    response = _accept(api, _invitation_from(other_team))

    assert response.status_code == 201, response.json()
    assert handshakes["calls"] == [("POST", False, False)]  # no transaction open, our row not written yet
    ours, theirs = Peer.objects.get(team=team, name="a"), Peer.objects.get(team=other_team)
    assert (ours.status, theirs.status) == ("accepted", "accepted")
    # The grant token A stored names the row we wrote after the handshake, with the id taken before it.
    token = crypto.decrypt(theirs.remote_grant_encrypted)
    assert grants.check(token, resource_kind="fleet.agents").peer_id == ours.pk


def test_a_name_taken_while_the_handshake_ran_is_409_and_the_inviting_side_drops_its_half(api, team, other_team,
                                                                                          handshakes):  # fmt: skip
    from federation import audit, services
    from federation.models import AuditEvent, Grant

    handshakes["after"] = lambda: services.peer_create(team=team, name="a", peer_hook_url=PEER_URL)
    response = _accept(api, _invitation_from(other_team))

    assert (response.status_code, response.json()["code"]) == (409, "conflict")
    assert [method for method, *_ in handshakes["calls"]] == ["POST", "DELETE"]  # the handshake, then the withdrawal
    assert list(Peer.objects.filter(team=team).values_list("name", "peer_hook_url")) == [("a", PEER_URL)]
    assert not Grant.objects.filter(team=team).exists()
    assert not AuditEvent.objects.filter(team=team, action=audit.INVITATION_ACCEPTED).exists()
    assert Peer.objects.get(team=other_team).status == "revoked"  # withdrawn with the nonce its answer gave


def test_a_database_outage_storing_our_side_is_503_and_the_inviting_side_drops_its_half(api, team, other_team,
                                                                                        handshakes, monkeypatch):  # fmt: skip
    import psycopg
    from django.db import OperationalError

    from federation import invitations
    from federation.models import Grant

    def outage(*args, **kwargs):  # as Django raises it when the server went away mid-transaction
        raise OperationalError("server closed the connection unexpectedly") from psycopg.OperationalError()

    monkeypatch.setattr(invitations, "_store_accepted", outage)
    response = _accept(api, _invitation_from(other_team))

    assert (response.status_code, response.json()["code"]) == (503, "database_unavailable")
    assert int(response["Retry-After"]) > 0
    assert not Peer.objects.filter(team=team).exists() and not Grant.objects.filter(team=team).exists()
    assert Peer.objects.get(team=other_team).status == "revoked"


def test_a_team_cannot_accept_its_own_invitation_and_nothing_changes(api, team):
    created = api.post("/api/federation/invitations", {"name": "mirror"}, format="json").json()
    before = list(Peer.objects.values_list("id", "status"))
    refused = api.post("/api/federation/invitations/accept", {"invitation": created["invitation"]}, format="json")
    assert refused.status_code == 400 and "your own team's invitation" in refused.json()["detail"]
    assert list(Peer.objects.values_list("id", "status")) == before


def test_a_long_team_name_still_gets_an_identity_certificate_for_its_invitation(api, team):
    team.name = "t" * 100  # the longest a team name can be
    team.save()
    created = api.post("/api/federation/invitations", {"name": "x"}, format="json")
    assert created.status_code == 201, created.json()


@pytest.mark.parametrize("field, value, hint", [
    ("inbound_token", "whsec_" + "A" * 43, "rotate-secret"),
    ("status", "active", "heartbeats"),
    ("remote_instance_id", "someone", "peering again"),
    ("colour", "red", "not a field of a peer"),
])  # fmt: skip
def test_patching_a_field_a_peer_will_not_apply_is_a_400_naming_it_and_changes_nothing(api, field, value, hint):
    created = api.post("/api/federation/peers", {"name": "b", "peer_hook_url": "https://127.0.0.1:9/hooks/x/kite",
                                                 "outbound_token": "whsec_" + "B" * 43}, format="json").json()  # fmt: skip
    before = Peer.objects.values().get(pk=created["id"])
    refused = api.patch(f"/api/federation/peers/{created['id']}", {field: value, "scopes": ["x.*"]}, format="json")
    assert refused.status_code == 400 and field in refused.json()["detail"] and hint in refused.json()["detail"]
    assert Peer.objects.values().get(pk=created["id"]) == before
