"""An operator's maintenance pause (POST /api/federation/peers/{id}/pause and …/resume, the peer
screen's Pause/Resume, manage.py pause_peer / resume_peer): events keep queuing, no delivery is
attempted or burnt, heartbeats go on and never lift it, nor does a failure, a fixed token or a
down queue's recovery overwrite it; resume delivers the backlog now. Against a real HTTPS endpoint
on loopback (tests/federation/test_delivery.py) and this instance's own views."""

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from federation import audit, dispatch, heartbeat, outbox, services
from federation.forms import AUDIT_ACTIONS
from federation.models import AuditEvent, OutboxEntry, Peer, PeerHealth
from kite import services as kite_services
from tests.federation.test_delivery import SECRET, make_event, endpoint, peer  # noqa: F401  (fixtures)
from tests.federation.test_metrics import scrape, value
from tests.screens import member, outsider, owner  # noqa: F401  (fixtures)

API = "/api/federation/peers"
SCREEN = "/settings/federation/peers"


def _pause(api, peer_id, body=None):
    return api.post(f"{API}/{peer_id}/pause", body if body is not None else {}, format="json")


def _resume(api, peer_id, body=None):
    return api.post(f"{API}/{peer_id}/resume", body if body is not None else {}, format="json")


def _row(peer) -> Peer:
    return Peer.objects.get(pk=peer.pk)


def _snapshot(peer) -> tuple:
    """What a refused request must leave as it was."""
    row = _row(peer)
    entries = sorted(OutboxEntry.objects.filter(peer=peer).values_list("id", "status", "attempts"))
    return row.paused, row.status, row.consecutive_failures, entries, AuditEvent.objects.count()


def _refused(response, status: int, code: str) -> dict:
    body = response.json()
    assert (response.status_code, body["code"]) == (status, code), body
    assert body["detail"]
    return body


# --- the pause holds the queue --------------------------------------------------------------------


def test_a_paused_peer_keeps_queuing_and_no_delivery_is_attempted(api, team, peer, endpoint):
    response = _pause(api, peer.pk, {"reason": "B's database upgrade"})
    assert response.status_code == 200, response.content
    assert (response.json()["paused"], response.json()["changed"]) == ("operator", True)
    for n in range(3):
        make_event(team, f"e{n}")  # routing still writes an entry per event
    assert outbox.deliver_peer(peer.pk) == 0
    assert endpoint.requests == []
    assert sorted(OutboxEntry.objects.filter(peer=peer).values_list("status", "attempts")) == [("pending", 0)] * 3
    assert peer.pk not in outbox.due_peer_ids()  # the sweeper leaves it alone
    row = AuditEvent.objects.get(action=audit.PEER_PAUSED)
    assert (row.peer_id, row.detail, row.data, row.actor.startswith("api-key")) == (
        peer.pk, "B's database upgrade", {"previous": None}, True)  # fmt: skip
    listed = api.get(API).json()["results"]
    assert [(p["name"], p["paused"], p["outbox"]["pending"]) for p in listed] == [("b", "operator", 3)]


def test_pausing_a_paused_peer_is_200_and_changes_nothing(api, peer):
    assert _pause(api, peer.pk).json()["changed"] is True
    again = _pause(api, peer.pk)
    assert again.status_code == 200 and (again.json()["paused"], again.json()["changed"]) == ("operator", False)
    assert AuditEvent.objects.filter(action=audit.PEER_PAUSED).count() == 1


def test_resume_delivers_the_backlog_now(api, team, peer, endpoint, django_capture_on_commit_callbacks):
    from kite.ratelimit import redis_client

    _pause(api, peer.pk)
    for n in range(3):
        make_event(team, f"e{n}")
    redis_client().delete(dispatch.kick_key(peer.pk))
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = _resume(api, peer.pk)
    assert response.status_code == 200 and (response.json()["paused"], response.json()["changed"]) == ("", True)
    assert callbacks and redis_client().exists(dispatch.kick_key(peer.pk))  # a delivery task was queued at commit
    assert AuditEvent.objects.get(action=audit.PEER_RESUMED).data == {"pending": 3}
    assert outbox.deliver_peer(peer.pk) == 3  # what that task does
    assert sorted(OutboxEntry.objects.filter(peer=peer).values_list("status", "attempts")) == [("delivered", 1)] * 3
    assert len(endpoint.requests) == 3


def test_resuming_a_peer_not_paused_by_an_operator_changes_nothing(api, peer):
    response = _resume(api, peer.pk)
    assert response.status_code == 200 and (response.json()["paused"], response.json()["changed"]) == ("", False)
    Peer.objects.filter(pk=peer.pk).update(paused=Peer.Pause.DOWN)
    PeerHealth.record(peer, consecutive_failures=5)
    response = _resume(api, peer.pk)  # a down queue is the heartbeat's to lift, not resume's
    assert (response.json()["paused"], response.json()["changed"]) == ("down", False)
    assert (_row(peer).paused, _row(peer).consecutive_failures) == ("down", 5)
    assert not AuditEvent.objects.filter(action=audit.PEER_RESUMED).exists()


def test_a_pause_takes_the_place_of_auth_failed_and_a_fixed_token_does_not_lift_it(api, peer):
    Peer.objects.filter(pk=peer.pk).update(paused=Peer.Pause.AUTH_FAILED)
    PeerHealth.record(peer, consecutive_failures=1)
    assert _pause(api, peer.pk).json()["paused"] == "operator"
    assert AuditEvent.objects.get(action=audit.PEER_PAUSED).data == {"previous": "auth_failed"}
    fixed = api.patch(f"{API}/{peer.pk}", {"outbound_token": SECRET}, format="json")
    assert fixed.status_code == 200 and fixed.json()["paused"] == "operator"
    assert _row(peer).paused == "operator"
    assert _resume(api, peer.pk).json()["paused"] == ""


def test_a_change_to_a_peer_read_before_the_pause_does_not_undo_it(peer):
    """peer_update writes only the columns it changes: a settings form opened before the pause
    and saved after it leaves the pause alone."""
    read_before = _row(peer)
    services.peer_pause(peer=peer)
    services.peer_update(peer=read_before, scopes=["github.*"], outbound_token=SECRET)
    row = _row(peer)
    assert (row.paused, row.scopes) == ("operator", ["github.*"])


# --- heartbeats go on and never lift it ------------------------------------------------------------


def test_heartbeats_go_on_while_paused_and_a_success_does_not_resume(peer, endpoint):
    services.peer_pause(peer=peer)
    assert heartbeat.heartbeat(_row(peer)).ok
    row = _row(peer)
    assert row.last_success_at is not None and row.last_heartbeat_at == row.last_success_at
    assert (row.paused, row.status) == ("operator", "enrolled")
    assert [headers for headers, body in endpoint.requests if not body]  # the ping went out


def test_a_heartbeat_that_read_the_peer_down_before_the_pause_does_not_lift_it(peer, endpoint):
    Peer.objects.filter(pk=peer.pk).update(paused=Peer.Pause.DOWN)
    PeerHealth.record(peer, consecutive_failures=5)
    read_down = _row(peer)
    services.peer_pause(peer=peer)  # while that heartbeat's ping is out
    assert heartbeat.heartbeat(read_down).ok
    assert (_row(peer).paused, _row(peer).consecutive_failures) == ("operator", 5)


def test_a_heartbeat_still_lifts_a_down_queue(peer, endpoint):
    Peer.objects.filter(pk=peer.pk).update(paused=Peer.Pause.DOWN)
    PeerHealth.record(peer, consecutive_failures=5)
    assert heartbeat.heartbeat(_row(peer)).ok
    assert (_row(peer).paused, _row(peer).consecutive_failures) == ("", 0)


# --- a delivery already out when the pause lands -------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("status, answer", [
    (401, {"detail": "no", "code": "bad_secret"}),  # would pause the queue as auth_failed
    (503, {"detail": "busy"}),  # a transient failure: the counters move, the pause stays
])  # fmt: skip
def test_a_failure_answered_after_the_pause_does_not_overwrite_it(team, peer, endpoint, status, answer):
    def paused_meanwhile(body):  # the operator pauses while this delivery is out
        try:
            services.peer_pause(peer=Peer.objects.get(pk=peer.pk), actor="operator")
        finally:
            connection.close()  # this server thread's own connection
        return answer

    endpoint.answers = [(status, {}, paused_meanwhile)]
    make_event(team)
    assert outbox.deliver_peer(peer.pk) == 0
    row = _row(peer)
    assert (row.paused, row.consecutive_failures) == ("operator", 1)
    OutboxEntry.objects.update(next_attempt_at=timezone.now())  # its backoff has run out
    assert outbox.deliver_peer(peer.pk) == 0 and len(endpoint.requests) == 1  # held from then on
    assert OutboxEntry.objects.get().attempts == 1


# --- refusals: the request is refused and nothing changes -----------------------------------------


def test_a_trusted_sender_has_no_queue_to_pause(api, team):
    sender = services.trusted_sender_create(team=team, name="only-sends", inbound_token=SECRET).row
    before = _snapshot(sender)
    _refused(_pause(api, sender.pk), 400, "trusted_sender")
    _refused(_resume(api, sender.pk), 400, "trusted_sender")
    assert _snapshot(sender) == before


def test_a_revoked_peer_cannot_be_paused_or_resumed(api, team, peer):
    make_event(team)
    services.peer_revoke(peer=peer)
    before = _snapshot(peer)
    _refused(_pause(api, peer.pk), 409, "peer_revoked")
    _refused(_resume(api, peer.pk), 409, "peer_revoked")
    assert _snapshot(peer) == before


def test_another_teams_peer_is_not_found_and_stays_as_it_is(outsider_api, api, peer):
    before = _snapshot(peer)
    _refused(_pause(outsider_api, peer.pk), 404, "not_found")
    _refused(_resume(outsider_api, peer.pk), 404, "not_found")
    services.peer_pause(peer=peer)
    paused = _snapshot(peer)
    _refused(_resume(outsider_api, peer.pk), 404, "not_found")  # nor lifted from another team
    assert _snapshot(peer) == paused and before[0] == ""
    _refused(_pause(api, 999_999), 404, "not_found")


def test_a_field_the_pause_will_not_apply_is_refused_by_name(api, peer):
    before = _snapshot(peer)
    body = _refused(_pause(api, peer.pk, {"reason": "x", "until": "tomorrow"}), 400, "invalid")
    assert "until" in body["detail"]
    _refused(_pause(api, peer.pk, {"reason": "x" * 201}), 400, "invalid")
    _refused(_pause(api, peer.pk, ["reason"]), 400, "invalid")
    body = _refused(_resume(api, peer.pk, {"drain": True}), 400, "invalid")
    assert "drain" in body["detail"]
    assert _snapshot(peer) == before


def test_pause_needs_an_api_key_or_a_team_admin(anonymous_api, member, peer):  # noqa: F811
    before = _snapshot(peer)
    _refused(_pause(anonymous_api, peer.pk), 401, "not_authenticated")
    assert member.post(f"{SCREEN}/{peer.pk}/pause").status_code == 403
    assert member.post(f"{SCREEN}/{peer.pk}/resume").status_code == 403
    assert _snapshot(peer) == before


# --- seen: metric, audit screen, peer screen -------------------------------------------------------


def test_the_paused_gauge_names_the_reason_per_peer_and_team(client, team, peer):
    def gauge() -> list[float]:
        scraped, found = scrape(client), []
        for reason in ("operator", "down", "auth_failed"):  # every live peer has all three, 0 included
            labels = {"peer": "b", "team": team.id, "reason": reason}
            assert ("kite_peer_paused", tuple(sorted(labels.items()))) in scraped
            found.append(value(scraped, "kite_peer_paused", **labels))
        return found

    assert gauge() == [0, 0, 0]
    services.peer_pause(peer=peer)
    assert gauge() == [1, 0, 0]
    services.peer_resume(peer=peer)
    assert gauge() == [0, 0, 0]
    Peer.objects.filter(pk=peer.pk).update(paused=Peer.Pause.DOWN)
    assert gauge() == [0, 1, 0]


def test_the_audit_screen_filters_by_pause_and_resume(owner, peer):  # noqa: F811
    assert {audit.PEER_PAUSED, audit.PEER_RESUMED} <= set(AUDIT_ACTIONS)
    services.peer_pause(peer=peer, reason="upgrade", actor="user owner")
    page = owner.get("/audit/?action=Federation.PeerPaused").content.decode()
    assert "Federation.PeerPaused" in page and "upgrade" in page


def test_the_peer_screen_pauses_shows_paused_and_resumes(owner, peer):  # noqa: F811
    page = owner.get(f"{SCREEN}/{peer.pk}/").content.decode()
    assert f'action="{SCREEN}/{peer.pk}/pause"' in page and "/resume" not in page
    paused = owner.post(f"{SCREEN}/{peer.pk}/pause", {"reason": "maintenance window"}, follow=True)
    text = paused.content.decode()
    assert paused.redirect_chain == [(f"{SCREEN}/{peer.pk}/", 302)]
    assert 'class="chip chip-paused"' in text and "b paused: events queue here" in text
    assert f'action="{SCREEN}/{peer.pk}/resume"' in text and f'action="{SCREEN}/{peer.pk}/pause"' not in text
    assert AuditEvent.objects.get(action=audit.PEER_PAUSED).detail == "maintenance window"
    listed = owner.get(f"{SCREEN}/").content.decode()
    assert 'class="chip chip-paused"' in listed
    resumed = owner.post(f"{SCREEN}/{peer.pk}/resume", follow=True).content.decode()
    assert "b resumed: 0 queued entries are being delivered now." in resumed and "chip-paused" not in resumed
    assert _row(peer).paused == ""


def test_the_peer_screen_says_why_a_revoked_peer_is_not_paused(owner, peer):  # noqa: F811
    services.peer_revoke(peer=peer)
    before = _snapshot(peer)
    page = owner.post(f"{SCREEN}/{peer.pk}/pause", follow=True).content.decode()
    assert "This peer is revoked" in page
    assert _snapshot(peer) == before


# --- manage.py pause_peer / resume_peer / peers ----------------------------------------------------


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture
def default_team(db):
    return kite_services.team_create(name="default")


@pytest.fixture
def default_peer(default_team, endpoint):
    return services.peer_create(team=default_team, name="b", peer_hook_url=endpoint.url, outbound_token=SECRET,
                                scopes=["*"], tls_fingerprint=endpoint.fingerprint).row  # fmt: skip


def test_pause_peer_and_resume_peer_commands(default_team, default_peer):
    make_event(default_team)
    assert "b: paused." in run("pause_peer", "b", "--reason", "upgrade")
    assert "paused already; nothing changed" in run("pause_peer", str(default_peer.pk))
    header, row = run("peers").splitlines()
    assert row.split()[:6] == ["b", "accepted", "Unknown", "operator", "1", "0"]
    assert json.loads(run("peers", "--json"))[0]["paused"] == "operator"
    assert "b: resumed; 1 queued entry being delivered now." in run("resume_peer", "b")
    assert "not paused by an operator (it is not paused)" in run("resume_peer", "b")
    rows = AuditEvent.objects.filter(action__in=[audit.PEER_PAUSED, audit.PEER_RESUMED]).order_by("id")
    assert [(r.action, r.actor, r.detail) for r in rows] == [
        (audit.PEER_PAUSED, "manage.py", "upgrade"), (audit.PEER_RESUMED, "manage.py", "")]  # fmt: skip


def test_pause_peer_refuses_a_sender_a_revoked_peer_and_an_unknown_one(default_team, default_peer):
    services.trusted_sender_create(team=default_team, name="only-sends", inbound_token=SECRET)
    with pytest.raises(CommandError, match=r"trusted sender .*\(trusted_sender\)"):
        run("pause_peer", "only-sends")
    with pytest.raises(CommandError, match="no peer named 'nope'"):
        run("resume_peer", "nope")
    with pytest.raises(CommandError, match="No team with id or name 'other'"):
        run("pause_peer", "b", "--team", "other")
    services.peer_revoke(peer=default_peer)
    with pytest.raises(CommandError, match=r"revoked.*\(peer_revoked\)"):
        run("pause_peer", str(default_peer.pk))
    assert not AuditEvent.objects.filter(action__in=[audit.PEER_PAUSED, audit.PEER_RESUMED]).exists()
