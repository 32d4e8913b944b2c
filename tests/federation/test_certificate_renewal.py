"""Identity certificates watched and renewed (federation.renewal): the expiry metric and warning,
a renewal announced over the signed channel, acknowledged per peer, retried on later beats, and
the old certificate retired only once every peer acknowledged the new one — signing working for
a peer pinned to either meanwhile. Two teams of this instance stand in for two instances (peer
calls over tests.federation.loopback); tests/e2e/test_certificate_renewal.py runs it between two."""

import time
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from federation import certificates, channel, client, inbound, renewal, services, signing
from federation.models import AuditEvent, CertificateAcknowledgement, IdentityCertificate, Peer
from tests.federation.loopback import django_send
from tests.federation.test_api import PEER_URL, SECRET
from tests.federation.test_metrics import scrape
from tests.kite.test_settings import start
from tests.screens import owner  # noqa: F401  (fixture)

# Committed rows: the announcement's calls run in threads of their own, with their own connections.
pytestmark = pytest.mark.django_db(transaction=True)

CLOSED_PORT_URL = "https://127.0.0.1:9/hooks/{team}/kite"  # discard: nothing listens, connection refused


def audited(action: str, team) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action, team_id=team.id).order_by("id"))


@pytest.fixture
def linked(team, other_team):
    """Team A (`team`) delivers to team B (`other_team`) over a signed channel: A's peer `b` pins B's
    certificate and knows its instance; B's row `a` pins A's certificate, which expires in 5 days.
    Calls go nowhere (a closed port) until a test lets them through (`reachable`)."""
    old = certificates.issue(team=team, subject="kite-a identity", validity_days=5)
    theirs = certificates.issue(team=other_team, subject="kite-b identity")
    a_side = services.peer_create(team=team, name="b", peer_hook_url=CLOSED_PORT_URL.format(team=other_team.id),
                                  outbound_token=SECRET, scopes=["*"], certificate_pem=theirs.pem).row  # fmt: skip
    Peer.objects.filter(pk=a_side.pk).update(remote_instance_id="kite-b")
    b_side = services.trusted_sender_create(team=other_team, name="a", inbound_token=SECRET,
                                            certificate_pem=old.pem).row  # fmt: skip
    a_side.refresh_from_db()
    assert channel.has_channel(a_side)
    return a_side, b_side, old


@pytest.fixture
def reachable(monkeypatch):
    """Let A's calls through: answered by this process's views (B's side)."""
    return lambda: monkeypatch.setattr(client, "_send", django_send)


def _verified_by(receiver_team_id: str, sender_team_id: str) -> Peer:
    """Sign a delivery as A does now (certificates.signer_for) and authenticate it as B does."""
    signer = certificates.signer_for(sender_team_id)
    body = b'{"specversion": "1.0"}'
    headers = signing.sign_headers(
        secret=SECRET, msg_id=f"m{time.monotonic_ns()}", timestamp=int(time.time()), body=body,
        sender_id=django_settings.KITE_INSTANCE_ID, ed25519_sign=signer.sign, key_thumbprint=signer.thumbprint, also_signed_by=signer.also_signed_by,
        binding=signing.delivery_binding(receiver_team_id),
    )  # fmt: skip
    return inbound.authenticate(headers, body, team_id=receiver_team_id)


def test_a_due_certificate_is_renewed_announced_and_retired_once_the_peer_acknowledged(team, other_team, linked,
                                                                                       reachable):  # fmt: skip
    a_side, b_side, old = linked
    reachable()

    done = renewal.check()

    assert done == {"warned": 1, "renewed": 1, "announced": 1, "retired": 1}
    (new,) = IdentityCertificate.objects.filter(team=team)
    assert new.pk != old.pk and new.subject == old.subject and new.replaces_id is None  # retired: the link is gone
    assert (new.not_after - timezone.now()).days >= certificates.DEFAULT_VALIDITY_DAYS - 1
    b_side.refresh_from_db()
    assert b_side.certificate_thumbprint == new.thumbprint  # B pinned it over the channel
    ack = CertificateAcknowledgement.objects.get(certificate=new, peer=a_side)
    assert ack.acknowledged_at is not None and ack.pinned and ack.attempts == 1 and ack.last_error == ""
    assert certificates.signer_for(team.id).thumbprint == new.thumbprint
    assert certificates.signer_for(team.id).also_signed_by == ()
    assert _verified_by(other_team.id, team.id).pk == b_side.pk
    (expiring,) = audited(renewal.CERTIFICATE_EXPIRING, team)
    assert expiring.data["thumbprint"] == old.thumbprint and expiring.outcome == "ok"
    (renewed,) = audited(renewal.CERTIFICATE_RENEWED, team)
    assert (renewed.data["old"]["thumbprint"], renewed.data["new"]["thumbprint"]) == (old.thumbprint, new.thumbprint)
    (revoked,) = audited("Federation.CertificateRevoked", team)
    assert revoked.data["thumbprint"] == old.thumbprint and revoked.actor == renewal.ACTOR
    # The next beats find nothing to do: no second renewal, warning or announcement.
    rows_before = AuditEvent.objects.count()
    assert renewal.check() == {"warned": 0, "renewed": 0, "announced": 0, "retired": 0}
    assert AuditEvent.objects.count() == rows_before


def test_a_peer_that_is_down_keeps_the_old_certificate_signing_until_a_later_beat_reaches_it(team, other_team, linked,
                                                                                            reachable):  # fmt: skip
    a_side, b_side, old = linked

    assert renewal.check() == {"warned": 1, "renewed": 1, "announced": 0, "retired": 0}

    new = IdentityCertificate.objects.get(team=team, replaces=old)
    assert IdentityCertificate.objects.filter(pk=old.pk).exists()
    ack = CertificateAcknowledgement.objects.get(certificate=new, peer=a_side)
    assert ack.acknowledged_at is None and ack.attempts == 1 and "Connection" in ack.last_error
    (waiting,) = renewal.status(new)["waiting_for"]
    assert waiting["peer"] == "b" and waiting["peer_id"] == a_side.pk and "not acknowledged after 1" in waiting["reason"]
    # Meanwhile the old certificate, the one B knows, is presented first; the new one signs too.
    signer = certificates.signer_for(team.id)
    assert signer.thumbprint == old.thumbprint and [t for t, _ in signer.also_signed_by] == [new.thumbprint]
    assert certificates.current(team.id).pk == old.pk  # what a handshake gives a new peer meanwhile
    assert _verified_by(other_team.id, team.id).pk == b_side.pk  # B, still pinned to the old one, accepts
    renewal.check()  # another beat, B still down: retried, nothing retired, nothing renewed twice
    ack.refresh_from_db()
    assert ack.attempts == 2 and ack.acknowledged_at is None
    assert IdentityCertificate.objects.filter(team=team).count() == 2

    reachable()  # B is back
    assert renewal.check() == {"warned": 0, "renewed": 0, "announced": 1, "retired": 1}
    assert list(IdentityCertificate.objects.filter(team=team)) == [new]
    b_side.refresh_from_db()
    assert b_side.certificate_thumbprint == new.thumbprint
    assert certificates.signer_for(team.id).thumbprint == new.thumbprint
    assert _verified_by(other_team.id, team.id).pk == b_side.pk


def test_during_a_renewal_the_tls_client_certificate_is_the_old_one_every_peer_knows(team, linked, tmp_path,
                                                                                     monkeypatch):  # fmt: skip
    """An mTLS proxy in front of a peer that has not pinned the new certificate still lets us in."""
    import hashlib

    from tests.federation.test_certificates import MutualTlsServer

    _, _, old = linked
    renewal.check()  # B is down: the renewal waits
    new = IdentityCertificate.objects.get(replaces=old)
    server = MutualTlsServer(tmp_path, old.pem)
    try:
        monkeypatch.setattr(client, "_pools", {})
        target = client.Target(url=server.url, secret=SECRET, sender_id="kite-a", tls_fingerprint=server.fingerprint,
                               signer=certificates.signer_for(team.id))  # fmt: skip
        assert client.call(target, "GET").status_code == 200
        (presented,) = server.presented
        assert "sha256:" + hashlib.sha256(presented).hexdigest() == old.thumbprint != new.thumbprint
    finally:
        server.close()


def test_a_peer_without_a_signed_channel_keeps_the_old_certificate_and_is_named(team, reachable):
    old = certificates.issue(team=team, subject="kite-a", validity_days=3)
    manual = services.peer_create(team=team, name="by-hand", peer_hook_url=PEER_URL, outbound_token=SECRET).row
    services.trusted_sender_create(team=team, name="only-sends", inbound_token=SECRET)  # verifies nothing of ours
    reachable()

    renewal.check()
    renewal.check()

    new = IdentityCertificate.objects.get(replaces=old)
    assert IdentityCertificate.objects.filter(pk=old.pk).exists()
    assert not CertificateAcknowledgement.objects.exists()  # nothing to tell it over
    (waiting,) = renewal.status(new)["waiting_for"]
    assert waiting["peer_id"] == manual.pk and "no signed channel" in waiting["reason"]
    # The operator gave it the PEM and revokes the old one: the renewal is then an ordinary certificate.
    certificates.revoke(certificate=old)
    new.refresh_from_db()
    assert new.replaces_id is None and renewal.status(new)["waiting_for"] == []


def test_an_invitation_not_yet_redeemed_keeps_the_old_certificate_it_names(api, team):
    old = certificates.issue(team=team, subject="kite-a", validity_days=3)
    created = api.post("/api/federation/invitations", {"name": "pending"}, format="json").json()

    renewal.check()

    new = IdentityCertificate.objects.get(replaces=old)
    (waiting,) = renewal.status(new)["waiting_for"]
    assert waiting["peer_id"] == created["peer_id"] and "invitation not redeemed yet" in waiting["reason"]
    assert certificates.current(team.id).pk == old.pk  # what the handshake's answer gives the invitee meanwhile
    Peer.objects.filter(pk=created["peer_id"]).update(invitation_expires_at=timezone.now() - timedelta(seconds=1))
    assert renewal.check()["retired"] == 1
    assert list(IdentityCertificate.objects.filter(team=team)) == [new]


def test_a_team_without_peers_renews_and_retires_at_once(team):
    old = certificates.issue(team=team, subject="kite-a", validity_days=1)
    assert renewal.check() == {"warned": 1, "renewed": 1, "announced": 0, "retired": 1}
    (new,) = IdentityCertificate.objects.filter(team=team)
    assert new.pk != old.pk


def test_a_certificate_far_from_expiry_is_neither_warned_nor_renewed(team):
    certificates.issue(team=team, subject="kite-a", validity_days=15)
    assert renewal.check() == {"warned": 0, "renewed": 0, "announced": 0, "retired": 0}
    assert IdentityCertificate.objects.count() == 1 and not audited(renewal.CERTIFICATE_EXPIRING, team)


def test_only_the_newest_certificate_is_renewed(team):
    """An older one that expires soon, beside a newer one issued by hand: warned, never renewed."""
    older = certificates.issue(team=team, subject="older", validity_days=2)
    certificates.issue(team=team, subject="newer", validity_days=90)
    assert renewal.check()["renewed"] == 0
    assert [w["certificate"].pk for w in renewal.warnings(team.id)] == [older.pk]
    assert renewal.warnings(team.id)[0]["newer"].subject == "newer"


@pytest.mark.parametrize(("renew_days", "lifetime", "expected"), [(14, 1, 90), (14, 365, 365), (100, 90, 201),
                                                                  (365, 800, 800), (365, 30, 731)])
def test_a_renewal_is_valid_as_long_as_the_old_one_and_well_past_the_window(settings, team, renew_days, lifetime,
                                                                            expected):  # fmt: skip
    settings.KITE_CERTIFICATE_RENEW_DAYS = renew_days
    old = certificates.issue(team=team, subject="x", validity_days=lifetime)
    assert renewal.validity_days(old) == expected
    new = renewal.renew(team.id, old.not_after - timedelta(days=1))  # a day before it expires
    assert new is not None and round((new.not_after - new.not_before).total_seconds() / 86400) == expected
    assert renewal.renew(team.id, timezone.now()) is None  # the new one is not due: never renewed twice


def test_renewal_off_at_zero_still_warns_once_within_fourteen_days(settings, team):
    settings.KITE_CERTIFICATE_RENEW_DAYS = 0
    soon = certificates.issue(team=team, subject="soon", validity_days=13)
    certificates.issue(team=team, subject="later", validity_days=20)
    certificates.issue(team=team, subject="newest soon", validity_days=10)

    assert renewal.check() == {"warned": 2, "renewed": 0, "announced": 0, "retired": 0}
    renewal.check()

    assert IdentityCertificate.objects.filter(team=team).count() == 3  # nothing issued
    assert sorted(row.data["subject"] for row in audited(renewal.CERTIFICATE_EXPIRING, team)) == ["newest soon", "soon"]
    soon.refresh_from_db()
    assert soon.expiry_warned_at is not None


def test_the_warning_window_follows_the_renewal_setting(settings, team):
    settings.KITE_CERTIFICATE_RENEW_DAYS = 30
    certificates.issue(team=team, subject="in 20 days", validity_days=20)
    certificates.issue(team=team, subject="in 40 days", validity_days=40)
    assert [w["certificate"].subject for w in renewal.warnings(team.id)] == ["in 20 days"]
    assert renewal.warning_days() == 30


@pytest.mark.parametrize(("body", "acknowledged", "pinned", "error"), [
    ({"applied": "certificate_pem", "pinned": True, "thumbprint": "THIS"}, True, True, ""),
    ({"applied": None, "pinned": False}, True, False, ""),  # the peer pins nothing of ours: nothing to break
    ({"applied": "certificate_pem", "pinned": True, "thumbprint": "sha256:" + "0" * 64}, False, True, "not sha256"),
    ({"ok": True}, False, True, "does not say"),
    ("<html>proxy</html>", False, True, "does not say"),
    (None, False, True, "HTTP 502"),
])  # fmt: skip
def test_only_an_answer_that_pinned_this_certificate_or_pins_none_acknowledges_it(team, linked, body, acknowledged,
                                                                                   pinned, error):  # fmt: skip
    a_side, _, old = linked
    if isinstance(body, dict) and body.get("thumbprint") == "THIS":
        body = {**body, "thumbprint": old.thumbprint}
    channel._note_acknowledgement(old, a_side, body, "HTTP 502: bad gateway" if body is None else "")
    ack = CertificateAcknowledgement.objects.get(certificate=old, peer=a_side)
    assert (ack.acknowledged_at is not None, ack.pinned) == (acknowledged, pinned)
    assert error in ack.last_error if error else ack.last_error == ""


def test_an_acknowledgement_is_kept_when_a_later_announcement_fails(team, linked):
    a_side, _, old = linked
    channel._note_acknowledgement(old, a_side, {"pinned": True, "thumbprint": old.thumbprint}, "")
    channel._note_acknowledgement(old, a_side, None, "ConnectionError: refused")
    ack = CertificateAcknowledgement.objects.get(certificate=old, peer=a_side)
    assert ack.acknowledged_at is not None and ack.attempts == 2 and ack.last_error == "ConnectionError: refused"


def test_the_expiry_metric_has_one_series_per_certificate_at_scrape_time(client, team, other_team):
    mine = certificates.issue(team=team, subject="kite-a identity", validity_days=30)
    theirs = certificates.issue(team=other_team, subject="kite-b identity")
    scraped = scrape(client)
    for row in (mine, theirs):
        labels = (("subject", row.subject), ("team", row.team_id), ("thumbprint", row.thumbprint))
        assert scraped[("kite_certificate_expiry_timestamp_seconds", labels)] == row.not_after.timestamp()
    certificates.revoke(certificate=mine)
    assert not any(key[0] == "kite_certificate_expiry_timestamp_seconds" and ("team", team.id) in key[1]
                   for key in scrape(client))  # fmt: skip


def test_the_api_and_the_screens_say_which_peer_has_not_acknowledged(api, owner, team, linked):  # noqa: F811
    a_side, _, old = linked
    renewal.check()  # B is down
    new = IdentityCertificate.objects.get(replaces=old)

    listed = {row["id"]: row["renewal"] for row in api.get("/api/federation/certificates").json()["results"]}
    assert listed[old.pk]["expiring"] is True and listed[old.pk]["renewed_by"] == new.pk
    assert listed[new.pk]["replaces"] == old.pk and listed[new.pk]["expiring"] is False
    assert [w["peer"] for w in listed[new.pk]["waiting_for"]] == ["b"]
    assert listed[new.pk]["acknowledged_by"] == []

    peers_page = owner.get("/settings/federation/peers/").content.decode()
    assert "certificate-warning" in peers_page and "kite-a identity expires in 4 days" in peers_page
    assert f'href="/settings/federation/peers/{a_side.pk}/">b</a>: not acknowledged after 1 attempt' in peers_page
    certificates_page = owner.get("/settings/federation/certificates/").content.decode()
    assert "renewal under way: not acknowledged yet by" in certificates_page and "certificate-warning" in certificates_page
    assert "renewed: retired once every peer has acknowledged the new one" in certificates_page


def test_no_warning_on_the_screens_when_nothing_expires_soon(owner, team):  # noqa: F811
    certificates.issue(team=team, subject="kite-a", validity_days=90)
    assert "certificate-warning" not in owner.get("/settings/federation/peers/").content.decode()
    assert "certificate-warning" not in owner.get("/settings/federation/certificates/").content.decode()


def test_another_teams_renewal_is_not_shown(api, owner, other_team):  # noqa: F811
    certificates.issue(team=other_team, subject="theirs", validity_days=2)
    renewal.check()
    assert "theirs" not in owner.get("/settings/federation/peers/").content.decode()
    assert api.get("/api/federation/certificates").json()["results"] == []


BAD_SETTINGS = ["-1", "366", "soon", "1.5"]


@pytest.mark.parametrize("value", BAD_SETTINGS)
def test_a_bad_renewal_setting_fails_at_start_naming_the_variable(tmp_path, value):
    started = start(tmp_path, KITE_CERTIFICATE_RENEW_DAYS=value)
    assert started.returncode != 0
    last_line = started.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured:") and "KITE_CERTIFICATE_RENEW_DAYS" in last_line


def test_the_renewal_setting_and_its_beat_entry_are_read(tmp_path):
    import subprocess
    import sys

    from tests.kite.test_settings import REPO

    probe = ("import django; django.setup(); from django.conf import settings; "
             "print(settings.KITE_CERTIFICATE_RENEW_DAYS, settings.CELERY_BEAT_SCHEDULE['certificates'])")  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("KITE_")}
    env.update(DJANGO_SETTINGS_MODULE="kite.settings", KITE_DATA_DIR=str(tmp_path / "data"),
               KITE_CERTIFICATE_RENEW_DAYS="0", KITE_HEARTBEAT_SECONDS="7")  # fmt: skip
    started = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "0 {'task': 'federation.tasks.certificates_check', 'schedule': 7.0}"


def test_the_beat_task_runs_the_check(team):
    from federation import tasks

    certificates.issue(team=team, subject="kite-a", validity_days=1)
    assert tasks.certificates_check() == {"warned": 1, "renewed": 1, "announced": 0, "retired": 1}
    assert timezone.now() + timedelta(days=80) < IdentityCertificate.objects.get(team=team).not_after
