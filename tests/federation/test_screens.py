"""Settings → Federation and Audit in the browser, with Django's test client:
permissions (owner, member, outsider), bad input re-rendered with field errors and nothing
stored, secrets shown once, query counts and render time at scale."""

from datetime import timedelta

import pytest
from django.utils import timezone

from federation import audit, certificates, heartbeat, invitations, peers, services
from federation.heartbeat import PingResult
from federation.models import AuditEvent, FederationToken, Grant, IdentityCertificate, OutboxEntry, Peer, PeerHealth
from ingest.models import Event, Source
from kite import crypto
from tests.federation.loopback import loopback  # noqa: F401  (fixture)
from tests.federation.test_api import PEER_URL, SECRET
from tests.screens import median_ms, member, outsider, owner, teamless  # noqa: F401  (fixtures)

BASE = "/settings/federation"


@pytest.fixture
def peer(team):
    return services.peer_create(team=team, name="b", peer_hook_url=PEER_URL, outbound_token=SECRET,
                                inbound_token=SECRET + "in", scopes=["stripe.*"]).row  # fmt: skip


def _events(team, count: int, prefix: str = "e") -> list[Event]:
    source = Source.objects.get(team=team, name="kite")
    now = timezone.now()
    return Event.objects.bulk_create(
        Event(team=team, source=source, ce_id=f"{prefix}{n}", ce_source="kite://x",
              ce_type="com.stripe.charge.succeeded", ce_time=now, data='{"n": 1}')
        for n in range(count)
    )  # fmt: skip


def _outbox(team, peer, events, status=OutboxEntry.Status.DEAD):
    OutboxEntry.objects.bulk_create(OutboxEntry(team=team, peer=peer, event=event, status=status, last_error="404")
                                    for event in events)  # fmt: skip


def _text(response) -> str:
    return response.content.decode()


def _redirected(client, response, status: int = 302):
    """A form's success redirects (Post/Redirect/Get): the page it leads to, read once."""
    assert response.status_code == status, response.status_code
    return client.get(response["Location"])


# --- who may see what ----------------------------------------------------------------------

TEAM_PAGES = ["/peers/", "/peers/new/", "/invite/", "/accept/", "/certificates/", "/tokens/"]


@pytest.mark.parametrize("page", TEAM_PAGES)
def test_federation_screens_need_a_login_and_the_admin_role(page, owner, member, teamless, client):
    assert owner.get(BASE + page).status_code == 200
    refused = member.get(BASE + page)
    assert refused.status_code == 403 and "team admins have it" in _text(refused)
    assert teamless.get(BASE + page).status_code == 403
    anonymous = client.get(BASE + page)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/?next=")


def test_another_teams_peer_is_not_found_on_any_of_its_pages(peer, outsider):
    for path in ("/", "/delete", "/progress", f"/grants/{1}/revoke"):
        assert outsider.get(f"{BASE}/peers/{peer.pk}{path}").status_code == 404, path
    for path in ("/ping", "/settings", "/rotate", "/replay", "/grants", "/delete"):
        assert outsider.post(f"{BASE}/peers/{peer.pk}{path}", {"limit": 1}).status_code == 404, path
    assert Peer.objects.get(pk=peer.pk).status == Peer.Status.ACCEPTED
    assert "No such peer in your team" in _text(outsider.get(f"{BASE}/peers/{peer.pk}/"))


def test_mutations_are_post_only_and_csrf_checked(peer, team):
    from tests.screens import client_for

    strict = client_for("strict", team)
    strict.handler.enforce_csrf_checks = True
    assert strict.get(f"{BASE}/peers/{peer.pk}/ping").status_code == 405
    refused = strict.post(f"{BASE}/peers/{peer.pk}/delete")
    assert refused.status_code == 403 and "This form has expired" in _text(refused)
    assert Peer.objects.get(pk=peer.pk).status == Peer.Status.ACCEPTED


def test_member_and_outsider_cannot_mutate_and_nothing_changes(peer, member, outsider):
    for client, status in ((member, 403), (outsider, 404)):
        assert client.post(f"{BASE}/peers/{peer.pk}/rotate", {"inbound-direction": "inbound"}).status_code == status
        assert client.post(f"{BASE}/peers/{peer.pk}/delete").status_code == status
    assert member.post(BASE + "/tokens/", {"label": "x"}).status_code == 403
    assert member.post(BASE + "/invite/", {"max_hops": 3, "ttl_seconds": 3600}).status_code == 403
    peer.refresh_from_db()
    assert peer.status == Peer.Status.ACCEPTED and peer.inbound_fingerprint == crypto.fingerprint(SECRET + "in")
    assert not FederationToken.objects.exists() and Peer.objects.count() == 1


# --- peers list ------------------------------------------------------------------------------


def test_peer_list_shows_status_chip_outbox_and_dead_count_and_filters(owner, team, peer):
    other = services.peer_create(team=team, name="c-eu", peer_hook_url=PEER_URL).row
    now = timezone.now()
    PeerHealth.record(peer, last_attempt_at=now, last_success_at=now, last_latency_ms=42)
    events = _events(team, 5)
    _outbox(team, peer, events[:3])
    _outbox(team, peer, events[3:], status=OutboxEntry.Status.PENDING)
    page = _text(owner.get(BASE + "/peers/"))
    assert "chip-reachable" in page and "42 ms" in page and "?outbox=dead\">3</a>" in page
    assert "Unknown" in page  # c-eu was never pinged
    found = _text(owner.get(BASE + "/peers/", {"q": "c-e"}))
    assert "c-eu" in found and f"/peers/{peer.pk}/" not in found
    reachable = _text(owner.get(BASE + "/peers/", {"reachability": "Reachable"}))
    assert f"/peers/{peer.pk}/" in reachable and f"/peers/{other.pk}/" not in reachable
    services.peer_revoke(peer=other)
    assert f"/peers/{other.pk}/" not in _text(owner.get(BASE + "/peers/"))
    assert f"/peers/{other.pk}/" in _text(owner.get(BASE + "/peers/", {"status": "revoked"}))


# --- new peer by hand ----------------------------------------------------------------------------


def test_new_peer_generates_both_secrets_shown_once_with_where_they_go(owner, team):
    pem = certificates.issue(team=team, subject="other side").pem
    response = owner.post(BASE + "/peers/new/", {"name": "us-region", "peer_hook_url": PEER_URL,
                                                  "certificate_pem": pem, "scopes": "stripe.*, com.kite.agent.message",
                                                  "max_hops": 3})  # fmt: skip
    peer = Peer.objects.get(name="us-region")
    assert response["Location"] == f"{BASE}/peers/{peer.pk}/created"
    response = _redirected(owner, response)
    assert response.status_code == 200
    page = _text(response)
    outbound, inbound = peers.secret_of(peer, "outbound"), peers.secret_of(peer, "inbound")
    assert page.count(outbound) == 1 and page.count(inbound) == 1
    assert "paste this into the Inbound secret field" in page and "paste this into the Outbound secret field" in page
    assert peer.outbound_fingerprint in page and peer.inbound_fingerprint in page
    assert peer.scopes == ["stripe.*", "com.kite.agent.message"] and peer.certificate_thumbprint
    assert response["Cache-Control"].startswith("max-age=0")
    again = _text(owner.get(f"{BASE}/peers/{peer.pk}/created"))  # a reload: shown once, then gone
    assert outbound not in again and inbound not in again and "was shown once" in again
    detail = _text(owner.get(f"{BASE}/peers/{peer.pk}/"))
    assert outbound not in detail and inbound not in detail and peer.outbound_fingerprint in detail


def test_new_peer_with_pasted_secrets_reveals_nothing(owner):
    response = owner.post(BASE + "/peers/new/", {"name": "eu", "peer_hook_url": PEER_URL, "outbound_token": SECRET,
                                                  "inbound_token": SECRET + "in", "max_hops": 3})  # fmt: skip
    response = _redirected(owner, response)
    assert response.status_code == 200 and SECRET not in _text(response)
    assert "Both secrets were pasted" in _text(response)


@pytest.mark.parametrize(
    "changes, field, message",
    [
        ({"peer_hook_url": "http://127.0.0.1:9/hooks/x/kite"}, "peer_hook_url", "must use https://"),
        ({"peer_hook_url": "https://169.254.169.254/x"}, "peer_hook_url", "link-local"),
        ({"certificate_pem": "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----"}, "certificate_pem",
         "not a PEM X.509 certificate"),
        ({"outbound_token": "short"}, "outbound_token", "at least 16 characters"),
        ({"name": "no spaces"}, "name", "letters, digits"),
        ({"tls_fingerprint": "sha256:xyz"}, "tls_fingerprint", "64 hex digits"),
        ({"max_hops": "0"}, "max_hops", "greater than or equal to 1"),
    ],
)
def test_new_peer_bad_input_re_renders_with_the_field_error_and_stores_nothing(owner, changes, field, message):
    data = {"name": "b", "peer_hook_url": PEER_URL, "max_hops": 3, **changes}
    response = owner.post(BASE + "/peers/new/", data)
    assert response.status_code == 400
    assert message in " ".join(response.context["form"].errors[field])
    assert 'class="errorlist"' in _text(response) and 'value="b"' in _text(response) or field == "name"
    assert not Peer.objects.exists() and not AuditEvent.objects.exists()


def test_new_peer_name_taken_is_a_field_error(owner, peer):
    response = owner.post(BASE + "/peers/new/", {"name": "b", "peer_hook_url": PEER_URL, "max_hops": 3})
    assert response.status_code == 400 and "already has a peer named" in response.context["form"].errors["name"][0]
    assert Peer.objects.count() == 1


def test_new_peer_page_shows_what_to_give_the_other_side(owner, team):
    row = certificates.issue(team=team, subject="eu")
    page = _text(owner.get(BASE + "/peers/new/"))
    assert peers.hook_url_for(team) in page and row.thumbprint in page and "BEGIN CERTIFICATE" in page


# --- peer detail: ping, settings, rotate, replay, grants, delete ----------------------------------


def test_ping_shows_the_verdict_of_each_factor(owner, peer, monkeypatch):
    result = PingResult(False, 401, None, {"tls": "ok", "certificate": "not_configured", "secret": "mismatch",
                                           "clock": "ok"}, "bad_secret: the signature does not match")  # fmt: skip
    monkeypatch.setattr(heartbeat, "heartbeat", lambda peer, actor: result)
    response = _redirected(owner, owner.post(f"{BASE}/peers/{peer.pk}/ping"))
    page = _text(response)
    assert response.status_code == 200 and "Ping: failed (401)" in page
    assert 'verdict-mismatch">mismatch' in page and "bad_secret: the signature does not match" in page


def test_ping_through_loopback_is_ok_and_audited(owner, team, other_team, loopback):  # noqa: F811
    peer = services.peer_create(team=team, name="b", peer_hook_url=f"https://127.0.0.1:8443/hooks/{other_team.id}/kite",
                                outbound_token=SECRET).row  # fmt: skip
    services.trusted_sender_create(team=other_team, name="a", inbound_token=SECRET)
    page = _text(_redirected(owner, owner.post(f"{BASE}/peers/{peer.pk}/ping")))
    assert "200 OK" in page and 'verdict-ok">ok' in page
    assert AuditEvent.objects.filter(team=team, action=audit.PEER_CALLED, actor="user owner").exists()


def test_settings_change_scopes_hops_and_limit_and_refuse_http(owner, peer):
    url = f"{BASE}/peers/{peer.pk}/settings"
    saved = owner.post(url, {"peer_hook_url": PEER_URL, "scopes": "github.* stripe.*", "max_hops": 5,
                             "rate_limit_per_second": 20})  # fmt: skip
    assert saved.status_code == 302
    peer.refresh_from_db()
    assert (peer.scopes, peer.max_hops, peer.rate_limit_per_second) == (["github.*", "stripe.*"], 5, 20)
    refused = owner.post(url, {"peer_hook_url": "http://x.example/hooks/t/kite", "scopes": "", "max_hops": 1})
    assert refused.status_code == 400 and "https://" in refused.context["settings_form"].errors["peer_hook_url"][0]
    peer.refresh_from_db()
    assert peer.max_hops == 5 and peer.peer_hook_url == PEER_URL


def test_rotate_inbound_shows_the_new_secret_once_and_keeps_the_old_valid(owner, peer):
    response = owner.post(f"{BASE}/peers/{peer.pk}/rotate", {"inbound-direction": "inbound", "inbound-secret": ""})
    response = _redirected(owner, response)
    assert response.status_code == 200
    peer.refresh_from_db()
    new = peers.secret_of(peer, "inbound")
    page = _text(response)
    assert page.count(new) == 1 and "paste this as the new outbound secret" in page
    assert peer.previous_inbound_fingerprint == crypto.fingerprint(SECRET + "in")
    assert new not in _text(owner.get(f"{BASE}/peers/{peer.pk}/"))


def test_rotate_outbound_with_a_pasted_secret_and_a_too_short_one(owner, peer):
    url = f"{BASE}/peers/{peer.pk}/rotate"
    refused = owner.post(url, {"outbound-direction": "outbound", "outbound-secret": "short"})
    assert refused.status_code == 400
    assert "at least 16" in refused.context["rotate_outbound"].errors["secret"][0]
    peer.refresh_from_db()
    assert peer.outbound_fingerprint == crypto.fingerprint(SECRET)
    pasted = _redirected(owner, owner.post(url, {"outbound-direction": "outbound", "outbound-secret": SECRET + "new"}))
    assert pasted.status_code == 200 and SECRET + "new" not in _text(pasted)
    peer.refresh_from_db()
    assert peer.outbound_fingerprint == crypto.fingerprint(SECRET + "new")


def test_replay_requeues_dead_letters(owner, team, peer):
    _outbox(team, peer, _events(team, 3))
    page = _text(owner.get(f"{BASE}/peers/{peer.pk}/?outbox=dead"))
    assert "Replay 3 dead letters" in page
    response = owner.post(f"{BASE}/peers/{peer.pk}/replay", {"limit": 2})
    assert response.status_code == 302 and response["Location"].endswith("?outbox=pending")
    assert OutboxEntry.objects.filter(status="dead").count() == 1
    assert "2 dead entries re-queued" in _text(owner.get(response["Location"]))
    assert owner.post(f"{BASE}/peers/{peer.pk}/replay", {"limit": 0}).status_code == 400


def test_grant_token_is_shown_once_and_a_bad_network_is_a_field_error(owner, peer):
    url = f"{BASE}/peers/{peer.pk}/grants"
    refused = owner.post(url, {"resource_kind": "fleet.agents", "permission_scopes": "read", "source_cidrs": "nope",
                               "ttl_days": 30})  # fmt: skip
    assert refused.status_code == 400 and refused.context["grant_form"].errors["source_cidrs"]
    assert not Grant.objects.exists()
    created = owner.post(url, {"resource_kind": "fleet.agents", "permission_scopes": "read",
                               "source_cidrs": "10.0.0.0/8", "ttl_days": 7})  # fmt: skip
    grant = Grant.objects.get()
    created = _redirected(owner, created)
    token = created.context["shown_once"][0].value
    assert created.status_code == 200 and token.startswith(f"fg-{grant.pk}.") and _text(created).count(token) == 1
    assert grant.source_cidrs == ["10.0.0.0/8"] and token not in _text(owner.get(f"{BASE}/peers/{peer.pk}/"))
    confirm = owner.get(f"{url}/{grant.pk}/revoke")
    assert "can no longer read fleet.agents" in _text(confirm)
    assert owner.post(f"{url}/{grant.pk}/revoke").status_code == 302 and not Grant.objects.exists()


def test_delete_says_what_the_other_side_sees_then_revokes_and_tells_it(owner, team, peer, monkeypatch):
    _outbox(team, peer, _events(team, 2), status=OutboxEntry.Status.PENDING)
    told = []
    monkeypatch.setattr(services, "terminate", lambda peer, reason, actor: told.append(reason) or PingResult(True))
    confirm = _text(owner.get(f"{BASE}/peers/{peer.pk}/delete"))
    assert "b is told at once" in confirm and "becomes revoked" in confirm and "2 queued entries" in confirm
    response = owner.post(f"{BASE}/peers/{peer.pk}/delete")
    assert response.status_code == 302 and told == ["deleted by the other side"]
    peer.refresh_from_db()
    assert peer.status == Peer.Status.REVOKED and OutboxEntry.objects.filter(status="dead").count() == 2
    page = _text(owner.get(f"{BASE}/peers/{peer.pk}/"))
    assert "Rotate inbound secret" not in page and "Delete…" not in page  # read-only once revoked


def test_delete_when_the_other_side_cannot_be_told_warns(owner, peer, monkeypatch):
    refused = PingResult(False, error="connection refused")
    monkeypatch.setattr(services, "terminate", lambda peer, reason, actor: refused)
    response = owner.post(f"{BASE}/peers/{peer.pk}/delete", follow=True)
    assert "could not be told: connection refused" in _text(response)


# --- invitations ----------------------------------------------------------------------------------


def test_invite_shows_the_invitation_once_with_its_expiry_and_progress(owner, team):
    response = owner.post(BASE + "/invite/", {"name": "eu", "scopes": "*", "max_hops": 3, "ttl_seconds": 86400})
    peer = Peer.objects.get(team=team, name="eu")
    assert response["Location"] == f"{BASE}/invite/{peer.pk}/"
    response = _redirected(owner, response)
    invitation = response.context["shown_once"][0].value
    assert invitation.startswith(invitations.PREFIX) and _text(response).count(invitation) == 1
    assert peer.status == Peer.Status.PROPOSED and f"{peer.invitation_expires_at:%Y-%m-%d %H:%M}" in _text(response)
    assert owner.get(f"{BASE}/peers/{peer.pk}/progress").json()["status"] == "proposed"
    again = _text(owner.get(f"{BASE}/invite/{peer.pk}/"))
    assert invitation not in again and "was shown once" in again and "data-progress-url" in again


def test_invite_name_taken_is_a_field_error(owner, peer):
    response = owner.post(BASE + "/invite/", {"name": "b", "max_hops": 3, "ttl_seconds": 3600})
    assert response.status_code == 400 and response.context["form"].errors["name"]
    assert Peer.objects.count() == 1


@pytest.mark.parametrize(
    "invitation, message",
    [
        ("hello", "Not a Kite invitation"),
        ("kite-invite-v1.%%%", "damaged"),
    ],
)
def test_accept_refuses_what_is_not_an_invitation(owner, invitation, message):
    response = owner.post(BASE + "/accept/", {"invitation": invitation})
    assert response.status_code == 400 and message in response.context["form"].errors["invitation"][0]
    assert not Peer.objects.exists()


def test_accept_refuses_an_expired_invitation_before_calling(owner, other_team, monkeypatch):
    peer, invitation = invitations.issue(team=other_team, name="b", ttl_seconds=60)
    monkeypatch.setattr(timezone, "now", lambda: peer.invitation_expires_at + timedelta(seconds=1))
    response = owner.post(BASE + "/accept/", {"invitation": invitation})
    assert response.status_code == 400 and "expired at" in response.context["form"].errors["invitation"][0]
    assert Peer.objects.filter(team__memberships__user__username="owner").count() == 0


def test_accept_through_loopback_then_the_reused_invitation_is_refused(owner, team, other_team, loopback):  # noqa: F811
    _, invitation = invitations.issue(team=other_team, name="b")
    response = owner.post(BASE + "/accept/", {"invitation": invitation, "name": "a"})
    assert response.status_code == 302, response.context["form"].errors
    peer = Peer.objects.get(team=team, name="a")
    assert response["Location"] == f"{BASE}/accept/{peer.pk}/"
    response = _redirected(owner, response)
    assert peer.status == Peer.Status.ACCEPTED and "data-progress-url" in _text(response)
    # While "a" lives, this team refuses a second peer for the same instance before calling; once
    # it is gone, the inviting side refuses the used code.
    taken = owner.post(BASE + "/accept/", {"invitation": invitation, "name": "a2"})
    assert taken.status_code == 400 and "instance ID" in taken.context["form"].errors["invitation"][0]
    services.peer_revoke(peer=peer)
    again = owner.post(BASE + "/accept/", {"invitation": invitation, "name": "a2"})
    assert again.status_code == 400
    assert "Unknown, expired or already used invitation" in again.context["form"].errors["invitation"][0]
    assert not Peer.objects.filter(team=team, name="a2").exists()


# --- certificates, tokens, trusted senders ---------------------------------------------------------


def test_certificate_issue_shows_the_pem_and_warns_of_expiry(owner, team):
    response = _redirected(owner, owner.post(BASE + "/certificates/", {"subject": "kite-eu", "validity_days": 10}))
    row = IdentityCertificate.objects.get()
    assert "Issued: kite-eu" in _text(response) and row.pem.strip() in _text(response).replace("&#x27;", "'")
    assert "expires in" in _text(owner.get(BASE + "/certificates/"))
    IdentityCertificate.objects.filter(pk=row.pk).update(not_after=timezone.now() - timedelta(days=1))
    assert 'badge bad">expired' in _text(owner.get(BASE + "/certificates/"))
    refused = owner.post(BASE + "/certificates/", {"subject": "x", "validity_days": 9000})
    assert refused.status_code == 400 and refused.context["form"].errors["validity_days"]
    assert IdentityCertificate.objects.count() == 1
    assert "Peers that pinned it refuse" in _text(owner.get(f"{BASE}/certificates/{row.pk}/revoke"))
    assert owner.post(f"{BASE}/certificates/{row.pk}/revoke").status_code == 302
    assert not IdentityCertificate.objects.exists()


def test_certificate_of_another_team_is_not_found(outsider, team):
    row = certificates.issue(team=team, subject="mine")
    assert outsider.post(f"{BASE}/certificates/{row.pk}/revoke").status_code == 404
    assert IdentityCertificate.objects.filter(pk=row.pk).exists()


def test_token_shown_once_then_listed_by_fingerprint_and_deleted(owner, outsider):
    response = _redirected(owner, owner.post(BASE + "/tokens/", {"label": "peer-b-outbound"}))
    token = response.context["shown_once"][0].value
    row = FederationToken.objects.get()
    assert response.status_code == 200 and _text(response).count(token) == 1
    listing = _text(owner.get(BASE + "/tokens/"))
    assert row.fingerprint in listing and token not in listing
    assert owner.post(BASE + "/tokens/", {"label": ""}).status_code == 400
    assert outsider.post(f"{BASE}/tokens/{row.pk}/delete").status_code == 404
    assert owner.post(f"{BASE}/tokens/{row.pk}/delete").status_code == 302 and not FederationToken.objects.exists()


def test_trusted_sender_added_with_generated_secret_and_bad_pem_refused(owner):
    refused = owner.post(BASE + "/senders/", {"name": "a", "certificate_pem": "garbage"})
    assert refused.status_code == 400 and refused.context["sender_form"].errors["certificate_pem"]
    assert not Peer.objects.exists()
    created = _redirected(owner, owner.post(BASE + "/senders/", {"name": "a"}))
    sender = Peer.objects.get(role=Peer.Role.SENDER)
    assert created.status_code == 200 and _text(created).count(peers.secret_of(sender, "inbound")) == 1
    assert owner.post(f"{BASE}/senders/{sender.pk}/revoke").status_code == 302
    sender.refresh_from_db()
    assert sender.status == Peer.Status.REVOKED


# --- audit -------------------------------------------------------------------------------------------


def test_audit_log_filters_by_action_peer_and_date(owner, member, outsider, team, peer):
    services.token_create(team=team, label="t", actor="user owner")
    old = audit.record(audit.PEER_UPDATED, peer=peer, actor="user owner")
    AuditEvent.objects.filter(pk=old.pk).update(at=timezone.now() - timedelta(days=10))
    assert member.get("/audit/").status_code == 403
    assert "<td>Federation.PeerCreated" not in _text(outsider.get("/audit/"))
    page = _text(owner.get("/audit/"))
    assert "<td>Federation.PeerCreated" in page and "<td>Federation.TokenCreated" in page
    by_action = _text(owner.get("/audit/", {"action": audit.TOKEN_CREATED}))
    assert "<td>Federation.TokenCreated" in by_action and "<td>Federation.PeerCreated" not in by_action
    by_peer = _text(owner.get("/audit/", {"peer": "b"}))
    assert "<td>Federation.PeerCreated" in by_peer and "<td>Federation.TokenCreated" not in by_peer
    day = (timezone.now() - timedelta(days=10)).date().isoformat()
    by_date = _text(owner.get("/audit/", {"since": day, "until": day}))
    assert "<td>Federation.PeerUpdated" in by_date and "<td>Federation.PeerCreated" not in by_date
    assert owner.get("/audit/", {"since": "yesterday"}).status_code == 400


def test_audit_log_pages_to_older_events(owner, team):
    for n in range(105):
        audit.record(audit.TOKEN_CREATED, team=team, actor=f"user n{n}")
    first = owner.get("/audit/")
    assert len(first.context["rows"]) == 100 and first.context["older"]
    second = owner.get("/audit/" + first.context["older"])
    assert len(second.context["rows"]) == 5 and not second.context["older"]


# --- at scale: 50 peers, 10,000 outbox entries ----------------------------------------------------------


@pytest.fixture
def fifty_peers(team):
    peers = Peer.objects.bulk_create(
        Peer(team=team, name=f"peer-{n:02}", peer_hook_url=PEER_URL, outbound_fingerprint="sha256:x",
             inbound_fingerprint="sha256:y", scopes=["*"], status=Peer.Status.ACTIVE)
        for n in range(50)
    )  # fmt: skip
    events = _events(team, 200, prefix="scale")
    statuses = [OutboxEntry.Status.DELIVERED] * 3 + [OutboxEntry.Status.PENDING, OutboxEntry.Status.DEAD]
    OutboxEntry.objects.bulk_create(
        (OutboxEntry(team=team, peer=peers[n % 50], event=events[n % 200], status=statuses[n % 5])
         for n in range(10_000)), batch_size=2000,
    )  # fmt: skip
    for n in range(300):
        audit.record(audit.PEER_CALLED, peer=peers[n % 50], actor="system")
    return peers


@pytest.mark.parametrize("page", ["/peers/", "/peers/{first}/", "/peers/{first}/?outbox=dead", "/certificates/",
                                  "/tokens/", "/peers/new/", "/invite/", "/accept/", "AUDIT"])  # fmt: skip
def test_every_screen_renders_fast_at_scale_without_n_plus_one(page, owner, fifty_peers,
                                                                django_assert_max_num_queries):  # fmt: skip
    url = "/audit/" if page == "AUDIT" else BASE + page.format(first=fifty_peers[0].pk)
    with django_assert_max_num_queries(10) as queries:
        response = owner.get(url)
    count = len(queries)
    assert response.status_code == 200
    if page == "/peers/":
        assert _text(response).count("chip-unknown") == 50
    elapsed = median_ms(lambda: owner.get(url))
    print(f"{url}: {elapsed:.1f} ms, {count} queries")
    assert elapsed <= 100, f"{url} took {elapsed:.1f} ms"
