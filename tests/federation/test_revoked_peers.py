"""A revoked peer is no longer pinged: no reachability anywhere (API, `manage.py peers`, screens),
and `manage.py ping_peer` says it is revoked rather than that it does not exist. An enrolled peer's
screen says what enrolled means and what makes it active."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from federation import services
from federation.models import Peer, PeerHealth
from tests.federation.test_api import PEER_URL
from tests.screens import client_for


@pytest.fixture
def revoked(team):
    """A peer that answered a ping seconds ago (its chip would say Reachable), then revoked."""
    peer = services.peer_create(team=team, name="gone", peer_hook_url=PEER_URL).row
    now = timezone.now()
    PeerHealth.record(peer, last_attempt_at=now, last_success_at=now, last_latency_ms=12)
    services.peer_revoke(peer=Peer.objects.get(pk=peer.pk), reason="test")
    return Peer.objects.get(pk=peer.pk)


def test_the_api_shows_no_reachability_for_a_revoked_peer(api, revoked):
    shown = api.get(f"/api/federation/peers/{revoked.pk}").json()

    assert shown["status"] == "revoked" and shown["reachability"] is None
    listed = {row["name"]: row for row in api.get("/api/federation/peers").json()["results"]}
    assert listed["gone"]["reachability"] is None


def test_peers_lists_a_revoked_peer_without_reachability(team, revoked):
    out = StringIO()
    call_command("peers", "--team", team.name, stdout=out)

    row = next(line.split() for line in out.getvalue().splitlines() if line.startswith("gone"))
    assert row[:3] == ["gone", "revoked", "-"] and "Reachable" not in out.getvalue()


def test_ping_peer_says_a_revoked_peer_is_revoked(team, revoked):
    for ref in ("gone", str(revoked.pk)):
        with pytest.raises(CommandError, match="Peer gone is revoked"):
            call_command("ping_peer", ref, "--team", team.name, stdout=StringIO())
    assert Peer.objects.get(pk=revoked.pk).last_attempt_at == revoked.last_attempt_at  # not pinged


def test_an_unknown_name_is_still_no_such_peer(team, revoked):
    with pytest.raises(CommandError, match="has no peer named 'nope'"):
        call_command("ping_peer", "nope", "--team", team.name, stdout=StringIO())


def test_the_screens_show_no_reachability_chip_for_a_revoked_peer(team, revoked):
    owner = client_for("owner", team)

    listed = owner.get(reverse("federation:peers") + "?status=revoked").content.decode()
    detail = owner.get(reverse("federation:peer", args=[revoked.pk])).content.decode()

    table = listed[listed.index("<tbody>") : listed.index("</tbody>")]  # (the filter form offers Reachable)
    detail = detail[detail.index("<h1>") : detail.index("</main>")]
    assert "gone" in table
    for shown in (table, detail):
        assert "revoked, not pinged" in shown
        assert "chip-reachable" not in shown and ">Reachable<" not in shown


def test_an_enrolled_peer_screen_says_what_makes_it_active(team):
    peer = services.peer_create(team=team, name="one-way", peer_hook_url=PEER_URL).row
    Peer.objects.filter(pk=peer.pk).update(status=Peer.Status.ENROLLED)
    owner = client_for("owner", team)

    page = owner.get(reverse("federation:peer", args=[peer.pk])).content.decode()

    assert 'id="status-explained"' in page
    assert "becomes <strong>active</strong>" in page and "trusted sender" in page
    Peer.objects.filter(pk=peer.pk).update(status=Peer.Status.ACTIVE)
    assert 'id="status-explained"' not in owner.get(reverse("federation:peer", args=[peer.pk])).content.decode()
