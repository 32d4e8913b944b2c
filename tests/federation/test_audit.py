"""The audit trail (README "Audit log and metrics"): one row per admin action, per peer call either way and per
refusal, none for a failed action; read through GET /api/audit; purged after the retention."""

import json
import secrets
import time
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation import audit, grants, heartbeat, invitations, services
from federation.models import AuditEvent, Delivery, Grant, IdentityCertificate, OutboxEntry, Peer
from kite import crypto
from kite.models import ApiKey
from tests.federation.loopback import WRONG, deliver, loopback, pair, peer_signed  # noqa: F401  (fixtures)
from tests.federation.test_api import PEER_URL, SECRET
from tests.federation.test_delivery import make_event
from tests.federation.test_grants import browser  # noqa: F401  (fixture)
from tests.federation.test_metrics import scrape, value
from tests.kite.test_settings import start

def _actions(team) -> list[str]:
    return list(AuditEvent.objects.filter(team=team).order_by("id").values_list("action", flat=True))


def _only(action: str, **filters) -> AuditEvent:
    rows = list(AuditEvent.objects.filter(action=action, **filters))
    assert len(rows) == 1, [(row.action, row.team_id, row.outcome) for row in AuditEvent.objects.all()]
    return rows[0]


def _ok(response, status=201):
    assert response.status_code == status, response.content
    return response.json() if response.content else None


# --- admin actions ------------------------------------------------------------------------


def test_every_admin_action_through_the_api_is_audited_once_with_its_actor_and_no_secret(api, team):
    shown = []  # every secret the API showed once: none may be in the trail
    token = _ok(api.post("/api/federation/tokens", {"label": "for-b"}, format="json"))
    shown.append(token["token"])
    _ok(api.delete(f"/api/federation/tokens/{token['id']}"), 204)
    peer = _ok(api.post("/api/federation/peers", {"name": "b", "peer_hook_url": PEER_URL}, format="json"))
    shown += [peer["outbound_token"], peer["inbound_token"]]
    _ok(api.patch(f"/api/federation/peers/{peer['id']}", {"scopes": ["stripe.*"], "outbound_token": SECRET},
                  format="json"), 200)  # fmt: skip
    shown.append(SECRET)
    rotate = {"direction": "inbound"}
    rotated = _ok(api.post(f"/api/federation/peers/{peer['id']}/rotate-secret", rotate, format="json"), 200)
    shown.append(rotated["secret"])
    certificate = _ok(api.post("/api/federation/certificates", {"subject": "kite-a"}, format="json"))
    invitation = _ok(api.post("/api/federation/invitations", {"name": "c"}, format="json"))
    shown.append(invitations.parse(invitation["invitation"])["code"])
    _ok(api.delete(f"/api/federation/certificates/{certificate['id']}"), 204)
    sender = _ok(api.post("/api/federation/trusted-senders", {"name": "s"}, format="json"))
    shown.append(sender["inbound_token"])
    grant = _ok(api.post(f"/api/federation/peers/{peer['id']}/grants", {"resource_kind": "fleet.agents"}, format="json"))
    shown.append(grant["token"])
    _ok(api.delete(f"/api/federation/peers/{peer['id']}/grants/{grant['id']}"), 204)
    assert _ok(api.post(f"/api/federation/peers/{peer['id']}/replay-dead", {"limit": 5}, format="json"), 200)
    _ok(api.delete(f"/api/federation/trusted-senders/{sender['id']}"), 204)
    _ok(api.delete(f"/api/federation/peers/{peer['id']}"), 204)  # tells the peer first: nobody there

    assert _actions(team) == [
        audit.TOKEN_CREATED, audit.TOKEN_DELETED, audit.PEER_CREATED, audit.PEER_UPDATED, audit.SECRET_ROTATED,
        audit.CERTIFICATE_ISSUED, audit.INVITATION_CREATED, audit.CERTIFICATE_REVOKED, audit.TRUSTED_SENDER_CREATED,
        audit.GRANT_CREATED, audit.GRANT_REVOKED, audit.DEAD_LETTERS_REPLAYED, audit.PEER_REVOKED,
        audit.PEER_CALLED, audit.PEER_REVOKED,
    ]  # fmt: skip
    key = ApiKey.objects.get(team=team)
    rows = list(AuditEvent.objects.filter(team=team))
    assert {row.actor for row in rows} == {f"api-key {key.prefix}… (id {key.pk})"}
    trail = json.dumps([[row.detail, row.data, row.endpoint] for row in rows])
    assert not [secret for secret in shown if secret.split(".")[-1] in trail]
    updated = _only(audit.PEER_UPDATED)
    assert updated.data["changed"] == {"scopes": ["stripe.*"], "outbound_fingerprint": crypto.fingerprint(SECRET)}
    assert _only(audit.SECRET_ROTATED).data == {"direction": "inbound", "generated": True, "grace": True,
                                                 "fingerprint": crypto.fingerprint(rotated["secret"])}  # fmt: skip
    terminate = _only(audit.PEER_CALLED)
    assert (terminate.endpoint, terminate.outcome, terminate.peer_name) == (
        "/api/federation/terminate", "connection", "b",
    )  # fmt: skip
    assert terminate.data["method"] == "POST" and "latency_ms" in terminate.data


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/federation/peers", {"name": "bad name!", "peer_hook_url": PEER_URL}),
        ("/api/federation/peers", {"name": "b", "peer_hook_url": "http://127.0.0.1:9/hooks/x/kite"}),
        ("/api/federation/peers", {"name": "b", "peer_hook_url": PEER_URL, "certificate_pem": "junk"}),
        ("/api/federation/trusted-senders", {"name": "s", "inbound_token": "short"}),
        ("/api/federation/certificates", {"subject": "x", "validity_days": 0}),
        ("/api/federation/invitations", {"name": "c", "ttl_seconds": 5}),
        ("/api/federation/invitations/accept", {"invitation": "kite-invite-v1.broken"}),
    ],
)
def test_a_refused_admin_action_leaves_no_audit_row_and_stores_nothing(api, path, body):
    response = api.post(path, body, format="json")
    assert 400 <= response.status_code < 500 and {"detail", "code"} <= set(response.json())
    assert not AuditEvent.objects.exists()
    assert not Peer.objects.exists() and not IdentityCertificate.objects.exists()


def test_a_conflict_or_bad_grant_or_bad_rotation_adds_no_row_to_the_trail(api, team):
    peer = _ok(api.post("/api/federation/peers", {"name": "b", "peer_hook_url": PEER_URL}, format="json"))
    assert api.post("/api/federation/peers", {"name": "b", "peer_hook_url": PEER_URL}, format="json").status_code == 409
    bad_pin = {"tls_fingerprint": "sha256:x"}
    assert api.patch(f"/api/federation/peers/{peer['id']}", bad_pin, format="json").status_code == 400
    bad_grant = {"resource_kind": "fleet.agents", "source_cidrs": ["nope"]}
    assert api.post(f"/api/federation/peers/{peer['id']}/grants", bad_grant, format="json").status_code == 400
    bad_rotation = {"direction": "outbound", "secret": "short"}
    assert api.post(f"/api/federation/peers/{peer['id']}/rotate-secret", bad_rotation, format="json").status_code == 400
    assert _actions(team) == [audit.PEER_CREATED]
    assert not Grant.objects.exists()


def test_a_failed_handshake_leaves_no_peer_and_no_acceptance_but_the_call_is_audited(api, team, other_team, settings):
    settings.KITE_PUBLIC_URL = "https://127.0.0.1:9"  # the inviting instance is not there
    _, invitation = invitations.issue(team=other_team, name="b")
    response = api.post("/api/federation/invitations/accept", {"invitation": invitation, "name": "a"}, format="json")
    assert response.status_code == 502 and response.json()["code"] == "connection"
    assert not Peer.objects.filter(team=team).exists() and not Grant.objects.filter(team=team).exists()
    assert audit.INVITATION_ACCEPTED not in _actions(team) and audit.GRANT_CREATED not in _actions(team)
    called = _only(audit.PEER_CALLED, team=team)
    assert (called.endpoint, called.outcome, called.peer_name, called.peer_id) == (
        "/api/federation/handshake", "connection", "a", None,
    )  # fmt: skip


def test_an_accepted_invitation_is_audited_on_both_sides(api, outsider_api, team, other_team, loopback):
    invitation = _ok(outsider_api.post("/api/federation/invitations", {"name": "b"}, format="json"))["invitation"]
    accepted = _ok(api.post("/api/federation/invitations/accept", {"invitation": invitation, "name": "a"}, format="json"))

    b_side = AuditEvent.objects.filter(team=team)
    assert set(_actions(team)) == {audit.CERTIFICATE_ISSUED, audit.GRANT_CREATED, audit.INVITATION_ACCEPTED,
                                   audit.PEER_CALLED}  # fmt: skip
    called = b_side.get(action=audit.PEER_CALLED)
    assert (called.peer_id, called.endpoint, called.outcome, called.data["status_code"]) == (
        accepted["id"], "/api/federation/handshake", "ok", 200,
    )  # fmt: skip
    a_peer = Peer.objects.get(team=other_team)
    served = _only(audit.REMOTE_REQUEST, team=other_team)
    assert (served.peer_id, served.endpoint, served.outcome, served.data["method"]) == (
        a_peer.pk, "/api/federation/handshake", "ok", "POST",
    )  # fmt: skip
    assert audit.INVITATION_CREATED in _actions(other_team) and audit.GRANT_CREATED in _actions(other_team)


# --- peer calls, both sides ---------------------------------------------------------------


def test_a_ping_is_audited_as_called_here_and_as_a_remote_request_there(pair, team, other_team, loopback):
    peer, sender = pair
    assert heartbeat.ping(peer).ok
    called = _only(audit.PEER_CALLED, team=team)
    assert (called.peer_id, called.endpoint, called.outcome, called.actor) == (
        peer.pk, "/api/federation/ping", "ok", "system",
    )  # fmt: skip
    assert called.data["status_code"] == 200 and called.data["latency_ms"] >= 0
    served = _only(audit.REMOTE_REQUEST, team=other_team)
    assert (served.peer_id, served.endpoint, served.outcome, served.actor) == (
        sender.pk, "/api/federation/ping", "ok", django_settings.KITE_INSTANCE_ID,
    )  # fmt: skip

    peer = services.peer_update(peer=peer, outbound_token=WRONG)
    assert not heartbeat.ping(peer).ok
    refused = _only(audit.AUTH_FAILED, team=other_team)
    assert (refused.peer_id, refused.outcome, refused.endpoint) == (sender.pk, "bad_secret", "/api/federation/ping")
    assert AuditEvent.objects.filter(team=team, action=audit.PEER_CALLED, outcome="bad_secret").count() == 1


def test_deliveries_are_audited_only_when_refused_with_the_failing_factor(client, team):
    services.trusted_sender_create(team=team, name="kite-a", inbound_token=SECRET)
    AuditEvent.objects.all().delete()
    event = {"specversion": "1.0", "id": "e1", "source": "kite://a/t/s", "type": "com.x.y"}
    assert deliver(client, team, json.dumps(event).encode()).status_code == 202
    assert not AuditEvent.objects.exists()  # the hot path writes no audit row
    cases = [
        (dict(secret=WRONG), "bad_secret", "kite-a"),
        (dict(secret=WRONG, sender="nobody"), "unknown_peer", ""),
        (dict(timestamp=int(time.time()) - 3600), "stale_timestamp", ""),
    ]
    for kwargs, factor, peer_name in cases:
        body = json.dumps({**event, "id": factor}).encode()
        response = deliver(client, team, body, **kwargs)
        assert response.status_code == 401 and response.json()["code"] == factor
        row = _only(audit.AUTH_FAILED, outcome=factor)
        assert (row.team_id, row.peer_name, row.endpoint) == (team.id, peer_name, f"/hooks/{team.id}/kite")


def test_a_refusal_flood_is_counted_but_audited_at_a_bounded_rate(client, team, monkeypatch):
    monkeypatch.setattr(audit, "REFUSALS_AUDITED_PER_SECOND", 2)
    for n in range(10):
        deliver(client, team, json.dumps({"id": f"x{n}"}).encode(), secret=WRONG, sender="nobody")
    assert 2 <= AuditEvent.objects.filter(action=audit.AUTH_FAILED).count() <= 4  # one or two one-second windows


REASONS = ("factor_rate", "team_rate", "team_daily", "teamless_rate", "teamless_daily")
OUTCOMES = ("missing_signature", "unknown_peer", "bad_secret", "stale_timestamp")


def _suppressed(client) -> dict[str, float]:
    scraped = scrape(client)
    return {reason: value(scraped, "kite_audit_refusals_suppressed_total", reason=reason) for reason in REASONS}


def _refused_calls(client) -> float:
    scraped = scrape(client)
    return sum(value(scraped, "kite_federation_calls_total", peer="unknown", direction="inbound", outcome=outcome)
               for outcome in OUTCOMES)  # fmt: skip


def _refuse(n: int, team_id: str | None) -> int:
    """n refusals, round robin over OUTCOMES, from the top of a second; how many one-second
    windows they spanned (a loaded machine may need two)."""
    time.sleep(1.005 - time.time() % 1)
    started = time.time()
    for i in range(n):
        audit.auth_failed(outcome=OUTCOMES[i % len(OUTCOMES)], endpoint="/hooks/t/kite", team_id=team_id)
    return int(time.time()) - int(started) + 1


def _delta(before: dict, after: dict) -> dict:
    return {reason: after[reason] - before[reason] for reason in after if after[reason] != before[reason]}


@pytest.fixture
def fresh_teamless_budget(monkeypatch):
    """Refusals naming no team share one budget (per second and per day) across the instance: this
    test gets one of its own, and leaves the shared one to the tests after it."""
    monkeypatch.setattr(audit, "TEAMLESS", f"test-{secrets.token_hex(4)}")


def test_refusals_of_many_factors_are_capped_per_team_and_the_rest_counted_as_suppressed(client, team, monkeypatch):
    monkeypatch.setattr(audit, "REFUSALS_AUDITED_PER_SECOND", 3)
    monkeypatch.setattr(audit, "REFUSALS_AUDITED_PER_TEAM_PER_SECOND", 5)
    suppressed, calls = _suppressed(client), _refused_calls(client)

    windows = _refuse(40, team.id)

    rows = AuditEvent.objects.filter(team=team, action=audit.AUTH_FAILED)
    assert 5 <= rows.count() <= 5 * windows  # 4 factors x 3 would be 12 a second: the team's cap holds
    for outcome in OUTCOMES:
        assert rows.filter(outcome=outcome).count() <= 3 * windows
    held_back = _delta(suppressed, _suppressed(client))
    assert set(held_back) == {"factor_rate", "team_rate"} and sum(held_back.values()) == 40 - rows.count()
    assert _refused_calls(client) - calls == 40  # every refusal is still counted
    assert not AuditEvent.objects.exclude(team=team).exists()


def test_a_teams_daily_budget_caps_its_rows_and_other_teams_keep_theirs(client, team, other_team, monkeypatch):
    monkeypatch.setattr(audit, "REFUSALS_AUDITED_PER_SECOND", 1000)
    monkeypatch.setattr(audit, "REFUSALS_AUDITED_PER_TEAM_PER_SECOND", 1000)
    monkeypatch.setattr(audit, "REFUSALS_AUDITED_PER_TEAM_PER_DAY", 4)
    suppressed = _suppressed(client)

    _refuse(10, team.id)
    _refuse(2, other_team.id)

    assert AuditEvent.objects.filter(team=team, action=audit.AUTH_FAILED).count() == 4  # across two seconds
    assert AuditEvent.objects.filter(team=other_team, action=audit.AUTH_FAILED).count() == 2
    assert _delta(suppressed, _suppressed(client)) == {"team_daily": 6}


def test_refusals_naming_no_team_share_one_capped_rate(client, team, monkeypatch, fresh_teamless_budget):
    monkeypatch.setattr(audit, "REFUSALS_AUDITED_PER_SECOND", 1000)
    monkeypatch.setattr(audit, "REFUSALS_AUDITED_PER_TEAM_PER_SECOND", 2)
    suppressed = _suppressed(client)

    windows = _refuse(12, None)
    audit.auth_failed(outcome="bad_secret", endpoint="/hooks/t/kite", team_id=team.id)

    teamless = AuditEvent.objects.filter(team__isnull=True, action=audit.AUTH_FAILED).count()
    assert 2 <= teamless <= 2 * windows
    assert _delta(suppressed, _suppressed(client)) == {"teamless_rate": 12 - teamless}
    assert AuditEvent.objects.filter(team=team).count() == 1  # a flood naming nobody leaves a team's room alone


def test_refusals_naming_no_team_share_one_daily_budget(client, db, monkeypatch, fresh_teamless_budget):
    monkeypatch.setattr(audit, "REFUSALS_AUDITED_PER_SECOND", 1000)
    monkeypatch.setattr(audit, "REFUSALS_AUDITED_PER_TEAM_PER_SECOND", 1000)
    monkeypatch.setattr(audit, "REFUSALS_AUDITED_PER_TEAM_PER_DAY", 3)
    suppressed = _suppressed(client)

    _refuse(8, None)
    _refuse(1, None)

    assert AuditEvent.objects.filter(team__isnull=True, action=audit.AUTH_FAILED).count() == 3
    assert _delta(suppressed, _suppressed(client)) == {"teamless_daily": 6}


def test_the_default_limits_bound_a_team_to_at_most_100k_rows_a_day():
    assert audit.REFUSALS_AUDITED_PER_SECOND < audit.REFUSALS_AUDITED_PER_TEAM_PER_SECOND  # one factor leaves room
    assert audit.REFUSALS_AUDITED_PER_TEAM_PER_SECOND * audit.DAY > audit.REFUSALS_AUDITED_PER_TEAM_PER_DAY
    assert audit.REFUSALS_AUDITED_PER_TEAM_PER_DAY <= 100_000


def test_refused_peer_endpoints_are_audited_even_when_no_team_is_known(client, api):
    assert client.get("/api/federation/ping").status_code == 401
    unsigned = _only(audit.AUTH_FAILED, endpoint="/api/federation/ping")
    assert (unsigned.team_id, unsigned.outcome) == (None, "missing_signature")
    body = json.dumps({"code": "not-an-invitation"}).encode()
    refused = client.post("/api/federation/handshake", body, content_type="application/json",
                          **peer_signed(body, secret=WRONG, sender="x"))  # fmt: skip
    assert refused.status_code == 401 and refused.json()["code"] == "unknown_invitation"
    assert _only(audit.AUTH_FAILED, outcome="unknown_invitation").team_id is None
    assert api.get("/api/audit").json()["results"] == []  # belongs to no team: the admin shows it


def test_grant_refusals_are_audited_against_the_grants_peer_unless_the_caller_records_them(team):
    peer = services.peer_create(team=team, name="b", peer_hook_url=PEER_URL).row
    grant, token = grants.create(peer=peer, resource_kind="fleet.agents", source_cidrs=["10.0.0.0/8"])
    AuditEvent.objects.all().delete()
    with pytest.raises(grants.Refused):
        grants.check(token, resource_kind="fleet.agents", client_ip="192.0.2.1", endpoint="/api/federation/fleet/agents")
    row = _only(audit.AUTH_FAILED)
    assert (row.team_id, row.peer_id, row.outcome, row.endpoint) == (
        team.id, peer.pk, "grant_source", "/api/federation/fleet/agents",
    )  # fmt: skip
    Grant.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(grants.Refused):
        grants.check(token, resource_kind="fleet.agents", client_ip="10.0.0.1")
    assert _only(audit.AUTH_FAILED, outcome="grant_expired").peer_id == peer.pk
    with pytest.raises(grants.Refused):
        grants.check(token, resource_kind="fleet.agents", client_ip="10.0.0.1", audit_refusal=False)
    with pytest.raises(grants.Refused):
        grants.check(f"fg-{grant.pk}.forged", resource_kind="fleet.agents")
    assert _only(audit.AUTH_FAILED, outcome="bad_grant").team_id is None  # a guess names nobody's grant
    assert AuditEvent.objects.count() == 3


# --- GET /api/audit --------------------------------------------------------------------


def _record(team, n: int, **fields) -> list[AuditEvent]:
    return [audit.record("Federation.Test", team=team, **fields) for _ in range(n)]


def test_audit_pages_newest_first_with_a_cursor(api, team):
    rows = _record(team, 5, peer_name="b")
    first = api.get("/api/audit?limit=2").json()
    assert [r["id"] for r in first["results"]] == [rows[4].pk, rows[3].pk]
    assert set(first["results"][0]) >= {"id", "at", "action", "peer", "actor", "endpoint", "outcome", "detail", "data"}
    second = api.get(f"/api/audit?limit=2&before={first['next']}").json()
    assert [r["id"] for r in second["results"]] == [rows[2].pk, rows[1].pk]
    last = api.get(f"/api/audit?limit=2&before={second['next']}").json()
    assert [r["id"] for r in last["results"]] == [rows[0].pk] and last["next"] is None
    newer = api.get(f"/api/audit?after={rows[3].pk}").json()
    assert [r["id"] for r in newer["results"]] == [rows[4].pk]


def test_audit_filters_by_action_peer_outcome_and_time(api, team):
    peer = services.peer_create(team=team, name="b", peer_hook_url=PEER_URL).row
    audit.record(audit.PEER_CALLED, peer=peer, outcome="bad_secret")
    old = audit.record(audit.PEER_CALLED, team=team, peer_name="gone", outcome="ok")
    AuditEvent.objects.filter(pk=old.pk).update(at=timezone.now() - timedelta(days=2))

    def ids(query):
        response = api.get(f"/api/audit?{query}")
        assert response.status_code == 200, response.json()
        return [row["id"] for row in response.json()["results"]]

    created = AuditEvent.objects.get(action=audit.PEER_CREATED).pk
    called = AuditEvent.objects.get(action=audit.PEER_CALLED, outcome="bad_secret").pk
    assert ids(f"action={audit.PEER_CALLED}") == [old.pk, called]
    assert ids("peer=b") == [called, created] == ids(f"peer={peer.pk}")
    assert ids("peer=gone") == [old.pk]
    assert ids("outcome=bad_secret") == [called]
    day_ago = (timezone.now() - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    assert ids(f"before={day_ago}") == [old.pk]
    assert old.pk not in ids(f"after={day_ago}")


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=many", "after=yesterday",
                                   "before=2026-13-45T00:00:00", "action=no+spaces", "before=" + "9" * 30])  # fmt: skip
def test_bad_audit_queries_are_a_clear_400(api, team, query):
    response = api.get(f"/api/audit?{query}")
    assert response.status_code == 400 and response.json()["code"] == "invalid" and response.json()["detail"]


# str.isdigit() also admits superscripts ("²": int() refuses it, was a 500) and other scripts'
# digits ("٣", "１２": int() reads them, were ids): only ASCII digits are an id.
NON_ASCII_DIGITS = ["²", "³¹", "٣", "１２", "𝟗"]


@pytest.mark.parametrize("bound", ["after", "before"])
@pytest.mark.parametrize("digits", NON_ASCII_DIGITS)
def test_an_audit_cursor_in_non_ascii_digits_is_a_clear_400_not_an_id(api, team, bound, digits):
    rows = _record(team, 4)

    response = api.get("/api/audit", {bound: digits})

    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid" and bound in response.json()["fields"]
    assert list(AuditEvent.objects.filter(team=team).order_by("id")) == rows  # a read: nothing written either


def test_an_audit_peer_in_non_ascii_digits_is_a_name_not_an_id(api, team):
    peer = services.peer_create(team=team, name="b", peer_hook_url=PEER_URL).row
    before = AuditEvent.objects.filter(team=team).count()
    spelled = [str(peer.pk).translate(str.maketrans("0123456789", digits)) for digits in ("٠١٢٣٤٥٦٧٨٩", "０１２３４５６７８９")]

    for peer_filter in [*spelled, *NON_ASCII_DIGITS]:
        response = api.get("/api/audit", {"peer": peer_filter})
        assert response.status_code == 200, (peer_filter, response.content)
        assert response.json()["results"] == [], peer_filter  # no peer has that name; it is not peer.pk
    assert [row["peer_id"] for row in api.get("/api/audit", {"peer": str(peer.pk)}).json()["results"]] == [peer.pk]
    assert AuditEvent.objects.filter(team=team).count() == before


def test_audit_is_team_scoped_and_for_team_admins(api, outsider_api, anonymous_api, browser, team, other_team):
    mine = _record(team, 1)[0]
    theirs = _record(other_team, 1)[0]
    assert [r["id"] for r in api.get("/api/audit").json()["results"]] == [mine.pk]
    assert [r["id"] for r in outsider_api.get("/api/audit").json()["results"]] == [theirs.pk]
    assert [r["id"] for r in outsider_api.get("/api/audit?after=0&peer=&action=Federation.Test").json()["results"]] == [
        theirs.pk
    ]  # no filter or cursor opens another team's rows
    refused = browser["member"].get("/api/audit")
    assert refused.status_code == 403 and "federation.view_audit" in refused.json()["detail"]
    assert browser["admin"].get("/api/audit").status_code == 200
    assert anonymous_api.get("/api/audit").status_code == 401


def test_audit_is_in_the_openapi_schema(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert schema.status_code == 200 and "/api/audit" in schema.content.decode()


# --- retention ---------------------------------------------------------------------------


def test_retention_purges_old_audit_rows_and_deliveries_in_batches(team):
    peer = services.peer_create(team=team, name="b", peer_hook_url=PEER_URL, scopes=["*"]).row
    old = timezone.now() - timedelta(days=91)
    keep = _record(team, 2)
    AuditEvent.objects.filter(pk__in=[row.pk for row in _record(team, 5)]).update(at=old)
    make_event(team)
    entry = OutboxEntry.objects.get(peer=peer)
    for attempted_at in (old, old, old, timezone.now()):
        Delivery.objects.create(peer=peer, entry=entry, attempted_at=attempted_at, outcome="transient")

    with CaptureQueriesContext(connection) as captured:
        assert services.retention_purge(days=90, batch=2) == {"audit": 5, "deliveries": 3}
    deletes = [q["sql"] for q in captured.captured_queries if q["sql"].startswith('DELETE FROM "federation_auditevent"')]
    assert len(deletes) == 3  # 2 + 2 + 1
    assert set(AuditEvent.objects.filter(at__lt=old + timedelta(days=1)).values_list("pk", flat=True)) == set()
    assert {row.pk for row in keep} <= set(AuditEvent.objects.values_list("pk", flat=True))
    assert Delivery.objects.count() == 1
    assert services.retention_purge(days=0) == {"audit": 0, "deliveries": 0}


def test_retention_runs_daily_from_beat_with_the_configured_days(team, settings):
    from federation import tasks

    schedule = settings.CELERY_BEAT_SCHEDULE.values()
    assert [e["schedule"] for e in schedule if e["task"] == "federation.tasks.retention_purge"] == [24 * 3600.0]
    assert settings.KITE_AUDIT_RETENTION_DAYS == 90
    row = _record(team, 1)[0]
    AuditEvent.objects.filter(pk=row.pk).update(at=timezone.now() - timedelta(days=3))
    settings.KITE_AUDIT_RETENTION_DAYS = 5
    assert tasks.retention_purge() == {"audit": 0, "deliveries": 0}
    settings.KITE_AUDIT_RETENTION_DAYS = 2
    assert tasks.retention_purge()["audit"] == 1


@pytest.mark.parametrize("value", ["-1", "quarter"])
def test_a_bad_retention_fails_at_start_naming_the_variable(tmp_path, value):
    started = start(tmp_path, KITE_AUDIT_RETENTION_DAYS=value)
    assert started.returncode != 0
    assert "KITE_AUDIT_RETENTION_DAYS" in started.stderr.strip().splitlines()[-1]
