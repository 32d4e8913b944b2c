"""A hook URL that names a team the peer does not have: Ping (API, screen, manage.py ping_peer) blames
the URL, not the secret; the peer-facing endpoints answer 404 `unknown_team` and change nothing."""

import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse

from federation import heartbeat, services, signing
from federation.models import AuditEvent, InboundReceipt, Peer
from tests.federation.loopback import loopback, pair, peer_signed  # noqa: F401  (fixtures)
from tests.federation.test_api import SECRET
from tests.screens import client_for


@pytest.fixture
def typo(pair, other_team):
    """A's peer `b`, its hook URL naming a team B does not have (everything else right)."""
    peer, sender = pair
    peer = services.peer_update(peer=peer, peer_hook_url="https://127.0.0.1:8443/hooks/tm_typo/kite")
    AuditEvent.objects.all().delete()
    return peer, sender


def _unchanged(sender: Peer) -> dict:
    return Peer.objects.values("status", "health__last_inbound_at", "remote_instance_id").get(pk=sender.pk)


def test_ping_names_the_url_not_the_secret(typo, loopback):
    peer, sender = typo
    before = _unchanged(sender)

    result = heartbeat.ping(peer)

    assert (result.ok, result.status_code) == (False, 404)
    assert result.factors["url"] == "unknown_team"
    assert result.factors["secret"] != "mismatch"
    assert "tm_typo" in result.error and "hook URL" in result.error
    assert _unchanged(sender) == before


def test_the_api_ping_answers_the_url_factor(typo, api, loopback):
    peer, _ = typo
    answer = api.post(f"/api/federation/peers/{peer.pk}/ping").json()

    assert not answer["ok"] and answer["status_code"] == 404
    assert answer["factors"]["url"] == "unknown_team" and answer["factors"]["secret"] == "unknown"
    assert Peer.objects.get(pk=peer.pk).last_error.startswith("HTTP 404: No team 'tm_typo'")


def test_ping_peer_prints_the_url_factor_and_fails(typo, team, loopback):
    out = StringIO()
    with pytest.raises(CommandError, match="No team 'tm_typo'"):
        call_command("ping_peer", "b", "--team", team.name, stdout=out)

    factors = {line.split()[0]: line.split()[1] for line in out.getvalue().splitlines()[1:]}
    assert factors["url"] == "unknown_team" and factors["secret"] == "unknown"


def test_the_peer_screen_shows_the_url_factor(typo, team, loopback):
    peer, _ = typo
    owner = client_for("owner", team)

    page = owner.post(reverse("federation:peer-ping", args=[peer.pk]), follow=True).content.decode()

    assert ">url<" in page and "unknown_team" in page and "tm_typo" in page


# --- the peer-facing side: abuse ------------------------------------------------------------


def _ping(client, team: str, **signed):
    binding = signing.Binding("GET", "/api/federation/ping", team)
    return client.get(f"/api/federation/ping?team={team}", **peer_signed(b"", binding=binding, **signed))


def _nothing_changed(sender: Peer, receipts: int) -> None:
    assert InboundReceipt.objects.count() == receipts
    assert not AuditEvent.objects.exists()
    assert Peer.objects.get(pk=sender.pk).last_inbound_at is None


@pytest.mark.parametrize(
    "signed",
    [
        {},  # validly signed by a known sender, for a team that does not exist
        {"secret": "whsec_" + "F" * 43},  # forged
        {"timestamp": int(time.time()) - 3600},  # stale
    ],
)
def test_an_unknown_team_is_404_whoever_signs_and_nothing_changes(client, pair, signed):
    _, sender = pair
    AuditEvent.objects.all().delete()
    receipts = InboundReceipt.objects.count()

    answer = _ping(client, "tm_nope", sender="kite-a", **signed)

    assert answer.status_code == 404 and answer.json()["code"] == "unknown_team"
    _nothing_changed(sender, receipts)


def test_a_replayed_request_for_an_unknown_team_is_404_each_time(client, pair):
    _, sender = pair
    AuditEvent.objects.all().delete()
    headers = peer_signed(b"", binding=signing.Binding("GET", "/api/federation/ping", "tm_nope"))
    for _ in range(2):
        answer = client.get("/api/federation/ping?team=tm_nope", **headers)
        assert answer.status_code == 404
    _nothing_changed(sender, 0)


def test_an_oversized_team_is_no_hint_and_the_signature_decides_as_before(client, pair):
    _, sender = pair
    AuditEvent.objects.all().delete()
    answer = _ping(client, "t" * 65, secret="whsec_" + "F" * 43)

    assert answer.status_code == 401  # not a team lookup: refused for its signature, as before


def test_a_known_team_still_authenticates(client, pair, other_team):
    _, sender = pair
    answer = _ping(client, other_team.id, secret=SECRET, sender="kite-a")

    assert answer.status_code == 200, answer.content
    assert Peer.objects.get(pk=sender.pk).last_inbound_at is not None


def test_a_wrong_team_is_not_a_way_in_to_another_team(client, pair, team, other_team):
    """The sender is known to other_team only; naming `team` (which exists) is refused for its signature."""
    _, sender = pair
    answer = _ping(client, team.id, secret=SECRET, sender="kite-a")

    assert answer.status_code == 401
    assert Peer.objects.get(pk=sender.pk).last_inbound_at is None
