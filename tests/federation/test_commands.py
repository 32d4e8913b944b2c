"""Operating without a browser: the federation manage.py commands succeed with exit code 0 and
fail with a clear message and exit code 1, through the same services as the API (audited as
`manage.py`)."""

import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from federation import audit, invitations, services
from federation.models import AuditEvent, IdentityCertificate, OutboxEntry, Peer
from kite import services as kite_services
from tests.federation.loopback import loopback, pair  # noqa: F401  (fixtures)
from tests.federation.test_api import PEER_URL
from tests.federation.test_delivery import make_event

REPO = Path(__file__).resolve().parents[2]


def run(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def _by_command(action: str) -> AuditEvent:
    row = AuditEvent.objects.get(action=action)
    assert row.actor == "manage.py"
    return row


@pytest.fixture
def default_team(db):
    return kite_services.team_create(name="default")


@pytest.mark.parametrize(
    "command",
    [["peers"], ["ping_peer", "b"], ["replay_dead", "b"], ["issue_certificate", "--subject", "x"],
     ["create_invitation"], ["accept_invitation", "kite-invite-v1.x"]],  # fmt: skip
)
def test_every_command_refuses_an_unknown_team(db, command):
    with pytest.raises(CommandError, match="No team with id or name 'nope'"):
        run(*command, "--team", "nope")
    assert not AuditEvent.objects.exists()


# --- peers ------------------------------------------------------------------------------


def test_peers_lists_status_reachability_outbox_and_last_contact(default_team):
    peer = services.peer_create(team=default_team, name="b", peer_hook_url=PEER_URL, scopes=["*"]).row
    make_event(default_team)
    OutboxEntry.objects.filter(peer=peer).update(status="dead")
    make_event(default_team, "e2")
    out, _ = run("peers")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "STATUS", "REACHABILITY", "PAUSED", "PENDING", "DEAD", "LAST", "CONTACT"]
    assert row.split() == ["b", "accepted", "Unknown", "-", "1", "1", "never"]
    listed = json.loads(run("peers", "--json")[0])
    assert [(p["name"], p["outbox"]["dead"], p["reachability"]) for p in listed] == [("b", 1, "Unknown")]


def test_peers_of_a_team_without_peers_says_so(team):
    assert run("peers", "--team", team.name)[0].strip() == f"Team {team.name} has no peers."


@pytest.mark.django_db(transaction=True)
def test_manage_py_peers_exits_0_and_an_unknown_team_exits_1():
    team = kite_services.team_create(name="cli-team")
    services.peer_create(team=team, name="b", peer_hook_url=PEER_URL)
    db = connection.settings_dict
    url = f"postgres://{db['USER']}:{db['PASSWORD'] or ''}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    env = {**os.environ, "DATABASE_URL": url}  # the test database, where this test's rows are committed

    def manage(*args):
        return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    listed = manage("peers", "--team", "cli-team")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:2] == ["b", "accepted"]
    unknown = manage("peers", "--team", "no-such-team")
    assert unknown.returncode == 1 and "No team with id or name 'no-such-team'" in unknown.stderr


# --- ping_peer ------------------------------------------------------------------------------


def test_ping_peer_prints_each_factor_and_exits_0_when_ok(pair, team, loopback):
    peer, _ = pair
    out, _ = run("ping_peer", "b", "--team", team.name)
    assert out.splitlines()[0].startswith("b: ok (HTTP 200 in ")
    assert {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]} == {
        "tls": "ok", "certificate": "not_configured", "secret": "ok", "clock": "ok",
    }  # fmt: skip
    assert _by_command(audit.PEER_CALLED).outcome == "ok"
    assert Peer.objects.get(pk=peer.pk).last_success_at is not None  # recorded like a heartbeat


def test_ping_peer_fails_with_the_reason_when_the_peer_is_unreachable(default_team):
    services.peer_create(team=default_team, name="b", peer_hook_url=PEER_URL)
    with pytest.raises(CommandError, match="Ping of b failed: ConnectionError"):
        run("ping_peer", "b")
    assert _by_command(audit.PEER_CALLED).outcome == "connection"


def test_ping_peer_refuses_unknown_peers_and_trusted_senders(default_team):
    sender = services.trusted_sender_create(team=default_team, name="s").row
    with pytest.raises(CommandError, match="has no peer named 'nope'"):
        run("ping_peer", "nope")
    for ref in ("s", str(sender.pk)):  # a trusted sender is no peer to ping, by name or id
        with pytest.raises(CommandError, match=f"has no peer named '{ref}'"):
            run("ping_peer", ref)


# --- replay_dead --------------------------------------------------------------------------------


def test_replay_dead_requeues_by_peer_name_or_id(default_team):
    peer = services.peer_create(team=default_team, name="b", peer_hook_url=PEER_URL, scopes=["*"]).row
    for n in range(3):
        make_event(default_team, f"e{n}")
    OutboxEntry.objects.update(status="dead")
    assert run("replay_dead", "b", "--limit", "2")[0].strip() == "Re-queued 2 dead entries for b."
    assert run("replay_dead", str(peer.pk))[0].strip() == "Re-queued 1 dead entry for b."
    assert OutboxEntry.objects.filter(status="pending").count() == 3
    assert AuditEvent.objects.filter(action=audit.DEAD_LETTERS_REPLAYED, actor="manage.py").count() == 2


def test_replay_dead_refuses_a_bad_limit_and_an_unknown_peer(default_team):
    services.peer_create(team=default_team, name="b", peer_hook_url=PEER_URL)
    with pytest.raises(CommandError, match="--limit"):
        run("replay_dead", "b", "--limit", "0")
    with pytest.raises(CommandError, match="no peer named 'c'"):
        run("replay_dead", "c")
    assert not AuditEvent.objects.filter(action=audit.DEAD_LETTERS_REPLAYED).exists()


def test_a_peer_named_in_non_ascii_digits_is_looked_up_by_name_not_as_an_id(default_team):
    """str.isdigit() admits "²" (int() refused it: a traceback) and "٣" (int() read it as an id)."""
    peer = services.peer_create(team=default_team, name="b", peer_hook_url=PEER_URL, scopes=["*"]).row
    make_event(default_team, "e0")
    OutboxEntry.objects.update(status="dead")
    arabic = str(peer.pk).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    for ref in (arabic, "²", "¹" + str(peer.pk)):
        with pytest.raises(CommandError, match="has no peer named"):
            run("replay_dead", ref)
    assert OutboxEntry.objects.get().status == "dead"
    assert not AuditEvent.objects.filter(action=audit.DEAD_LETTERS_REPLAYED).exists()


# --- issue_certificate ----------------------------------------------------------------------------


def test_issue_certificate_prints_the_pem_and_its_thumbprint(default_team):
    out, err = run("issue_certificate", "--subject", "kite-eu production", "--validity-days", "30")
    row = IdentityCertificate.objects.get(team=default_team)
    assert out.strip() == row.pem.strip() and f"thumbprint: {row.thumbprint}" in err
    assert _by_command(audit.CERTIFICATE_ISSUED).data["thumbprint"] == row.thumbprint


def test_issue_certificate_refuses_a_bad_validity_and_issues_nothing(default_team):
    with pytest.raises(CommandError, match=r"validity_days must be between 1 and 825\. \(invalid\)"):
        run("issue_certificate", "--subject", "x", "--validity-days", "0")
    assert not IdentityCertificate.objects.exists() and not AuditEvent.objects.exists()


# --- invitations ------------------------------------------------------------------------------------


def test_create_invitation_prints_it_once_on_stdout(default_team):
    out, err = run("create_invitation", "--name", "b", "--scopes", "stripe.*, github.*", "--ttl-seconds", "600")
    offer = invitations.parse(out.strip())
    peer = Peer.objects.get(team=default_team, name="b")
    assert (peer.status, peer.scopes) == ("proposed", ["stripe.*", "github.*"])
    assert offer["code"] not in err and "shown once" in err
    assert _by_command(audit.INVITATION_CREATED).peer_id == peer.pk


def test_create_invitation_refuses_a_bad_ttl(default_team):
    with pytest.raises(CommandError, match="ttl_seconds must be between 60"):
        run("create_invitation", "--ttl-seconds", "5")
    assert not Peer.objects.exists() and not AuditEvent.objects.filter(action=audit.INVITATION_CREATED).exists()


def test_accept_invitation_runs_the_handshake_and_prints_the_peer(default_team, other_team, loopback):
    _, invitation = invitations.issue(team=other_team, name="b-side")
    out, _ = run("accept_invitation", invitation, "--name", "a-side", "--scopes", "stripe.*")
    peer = Peer.objects.get(team=default_team, name="a-side")
    assert out.strip() == f"Peer a-side (id {peer.pk}) is accepted; the first heartbeats enrol it."
    assert peer.scopes == ["stripe.*"] and Peer.objects.get(team=other_team).status == "accepted"
    assert _by_command(audit.INVITATION_ACCEPTED).peer_id == peer.pk


def test_accept_invitation_refuses_a_damaged_one_with_the_reason(default_team):
    with pytest.raises(CommandError, match="Not a Kite invitation"):
        run("accept_invitation", "hello")
    assert not Peer.objects.exists()
