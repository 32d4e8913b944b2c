"""Two live Kite instances federated entirely through the browser.

One pair of instances for the module; the tests run in order and build on each other as an
operator would: invitation to `active`, ping, delete, the manual peering (PEM and secrets pasted
between the two browsers), rotation, dead letters replayed, the audit log, the events tail, and
last the federated fleet with the peer down. Each screen is saved under screenshots/.
"""

import re
import secrets

import pytest

from tests.browser.conftest import Operator, stop_quietly
from tests.e2e.harness import wait_for
from tests.e2e.test_federation import Cluster

pytestmark = pytest.mark.e2e

ACTIVE_SECONDS = 60  # heartbeats every 2 s (FAST); generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def kites(tmp_path_factory):
    cluster = Cluster(tmp_path_factory)
    try:
        yield cluster.start_together("ui-a", "ui-b")
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def ops(chromium, kites):
    a, b = Operator(chromium, kites[0], "a").login(), Operator(chromium, kites[1], "b").login()
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def state():
    return {}


def _peer_id(op: Operator) -> int:
    return int(re.search(r"/peers/(\d+)/", op.page.url).group(1))


def _open_peer(op: Operator, name: str) -> int:
    op.go("/settings/federation/peers/")
    op.page.get_by_role("link", name=name, exact=True).click()
    op.page.wait_for_url(re.compile(r".*/peers/\d+/$"))
    return _peer_id(op)


def _wait_text(op: Operator, text: str, path: str, seconds: float = 20) -> None:
    """Reload `path` until it shows `text` (a server-rendered page has no push)."""

    def shown():
        op.go(path)
        return text in op.page.content()

    wait_for(shown, seconds, lambda: f"{text!r} on {op.label}{path}", interval=1)


def test_login_and_the_invitation_path_reaches_active_on_both_sides(ops, state):
    a, b = ops
    a.go("/login/")  # logged in already: the login page sends us on
    a.shot("events-empty")
    a.go("/settings/federation/invite/")
    a.page.fill("#id_name", "b-invited")
    a.page.fill("#id_scopes", "*")
    a.page.select_option("#id_ttl_seconds", "3600")
    a.submit()
    invitation = a.value("#reveal-invitation")
    assert invitation.startswith("kite-invite-v1.") and "Expires" in a.page.content()
    a.shot("invite")

    b.go("/settings/federation/accept/")
    b.page.fill("#id_invitation", "kite-invite-v1.broken")
    b.submit()
    assert "damaged" in b.page.locator(".errorlist").inner_text()
    b.shot("accept-bad-input")
    b.page.fill("#id_invitation", invitation)
    b.page.fill("#id_name", "a-invited")
    b.page.fill("#id_scopes", "*")
    b.submit()
    b.page.wait_for_selector("[data-progress-url]")
    for op in (b, a):  # A's invite page polls the same way
        op.page.wait_for_function("document.querySelector('[data-field=status]').textContent.startsWith('active')",
                                  timeout=ACTIVE_SECONDS * 1000)  # fmt: skip
    b.shot("accept-progress-active")
    a.shot("invite-progress-active")

    a.go("/settings/federation/peers/")
    row = a.page.locator("tr", has_text="b-invited")
    assert "active" in row.inner_text() and row.locator(".chip").inner_text() in ("Reachable", "Slow")
    a.shot("peers")
    b.go("/settings/federation/accept/")
    b.page.fill("#id_invitation", invitation)
    b.page.fill("#id_name", "a-again")
    b.submit()
    # B already peers with that instance: it says so, before calling A (which would refuse the used code).
    assert "already has a peer with instance ID" in b.page.locator(".errorlist").inner_text()


def test_ping_shows_the_verdict_of_each_factor(ops):
    a, _ = ops
    _open_peer(a, "b-invited")
    a.page.get_by_role("button", name="Ping").click()
    verdict = a.page.locator(".ping")
    assert "200 OK" in verdict.inner_text()
    for factor in ("tls", "certificate", "secret", "clock"):
        assert verdict.locator("tr", has_text=factor).locator(".verdict").inner_text() == "ok"
    a.shot("peer-detail-ping")


def test_delete_says_what_the_other_side_sees_and_it_sees_it(ops):
    a, b = ops
    _open_peer(a, "b-invited")
    a.page.get_by_role("link", name="Delete…").click()
    assert "is told at once" in a.page.content()
    a.shot("confirm-delete")
    a.page.get_by_role("button", name="Delete peer").click()
    assert "b-invited deleted" in a.page.locator(".messages").inner_text()
    _wait_text(b, "revoked", "/settings/federation/peers/?status=revoked&q=a-invited")


def test_the_manual_path_pastes_pem_and_secrets_between_the_two_browsers(ops, state):
    a, b = ops
    a.go("/settings/federation/certificates/")
    a.page.fill("#id_subject", "kite-a manual")
    a.submit("main form[method=post]")
    assert "Issued: kite-a manual" in a.page.content()
    a.shot("certificates")
    b.go("/settings/federation/peers/new/")
    b_side = {"hook": b.value("#copy-own-hook"), "tls": b.value("#copy-own-tls"), "pem": b.value("#copy-own-pem")}
    b.shot("peer-new")
    a.go("/settings/federation/peers/new/")
    a_side = {"hook": a.value("#copy-own-hook"), "tls": a.value("#copy-own-tls"), "pem": a.value("#copy-own-pem")}
    assert a_side["pem"].startswith("-----BEGIN CERTIFICATE-----") and b_side["hook"].endswith("/kite")

    a.page.fill("#id_name", "b-manual")
    a.page.fill("#id_peer_hook_url", b_side["hook"].replace("https://", "http://"))
    a.page.fill("#id_certificate_pem", b_side["pem"])
    a.page.fill("#id_tls_fingerprint", b_side["tls"])
    a.page.fill("#id_scopes", "*")
    a.submit()
    assert "must use https://" in a.page.locator(".errorlist").inner_text()  # refused, nothing created
    a.shot("peer-new-bad-input")
    a.page.fill("#id_peer_hook_url", b_side["hook"])
    a.submit()
    outbound, inbound = a.value("#reveal-1"), a.value("#reveal-2")
    assert outbound.startswith("whsec_") and inbound.startswith("whsec_")
    assert "paste this into the Inbound secret field" in a.page.content()
    a.shot("peer-created")

    b.page.fill("#id_name", "a-manual")
    b.page.fill("#id_peer_hook_url", a_side["hook"])
    b.page.fill("#id_certificate_pem", a_side["pem"])
    b.page.fill("#id_tls_fingerprint", a_side["tls"])
    b.page.fill("#id_outbound_token", inbound)  # the secret I use outbound is what you check inbound
    b.page.fill("#id_inbound_token", outbound)
    b.page.fill("#id_scopes", "*")
    b.submit()
    assert "Both secrets were pasted" in b.page.content()
    b_fingerprints = b.page.locator("table.kv").inner_text()
    a_fingerprints = a.page.locator("table.kv").inner_text()
    a_out = re.search(r"Outbound \(we sign with\)\s+(sha256:\w+)", a_fingerprints).group(1)
    b_in = re.search(r"Inbound \(we check\)\s+(sha256:\w+)", b_fingerprints).group(1)
    assert a_out == b_in

    for op, name in ((a, "b-manual"), (b, "a-manual")):
        state[f"{op.label}-peer"] = _open_peer(op, name)
        op.page.get_by_role("button", name="Ping").click()
        assert "200 OK" in op.page.locator(".ping").inner_text(), op.page.locator(".ping").inner_text()


def test_rotating_a_secret_is_carried_over_the_channel_and_keeps_ping_green(ops):
    """Both certificates are pinned and each side knows the other's instance: the rotation is
    carried over the signed channel (federation.channel), nothing is shown or pasted."""
    a, b = ops
    _open_peer(b, "a-manual")
    b.page.get_by_role("button", name="Rotate inbound secret").click()
    assert "switched itself" in b.page.locator(".messages").inner_text()
    assert b.page.locator("#reveal-rotated").count() == 0
    b.shot("peer-detail-rotated")
    _open_peer(a, "b-manual")
    a.page.get_by_role("button", name="Ping").click()
    assert "200 OK" in a.page.locator(".ping").inner_text()


def test_a_dead_letter_is_replayed_once_the_url_is_fixed(ops, kites, state):
    a, b = ops
    kite_a, kite_b = kites
    peer = state["a-peer"]
    a.go(f"/settings/federation/peers/{peer}/")
    good_url = a.value("#id_peer_hook_url")
    a.page.fill("#id_peer_hook_url", re.sub(r"/hooks/[^/]+/", "/hooks/tm_nope/", good_url))
    a.page.get_by_role("button", name="Save").click()
    event_id = f"evt_{secrets.token_hex(4)}"
    kite_a.post_event("plain", event_id)
    _wait_text(a, "Replay 1 dead letter", f"/settings/federation/peers/{peer}/?outbox=dead")
    a.go("/settings/federation/peers/")
    assert a.page.locator("tr", has_text="b-manual").locator("a.bad").inner_text() == "1"  # the dead count
    a.go(f"/settings/federation/peers/{peer}/?outbox=dead")
    a.page.fill("#id_peer_hook_url", good_url)
    a.page.get_by_role("button", name="Save").click()
    a.page.get_by_role("button", name=re.compile("Replay 1 dead letter")).click()
    assert "1 dead entry re-queued" in a.page.locator(".messages").inner_text()
    _wait_text(a, event_id, f"/settings/federation/peers/{peer}/?outbox=delivered")
    a.shot("peer-detail-outbox")
    wait_for(lambda: event_id in {e["id"] for e in kite_b.events(source="kite")}, 15, "the replayed event at B")


def test_tokens_and_trusted_senders(ops):
    a, _ = ops
    a.go("/settings/federation/tokens/")
    a.page.fill("#id_label", "peer-c-outbound")
    a.page.get_by_role("button", name="Generate token").click()
    assert a.value("#reveal-token").startswith("whsec_")
    a.shot("tokens")


def test_the_events_tail_shows_a_new_event_live(ops, kites):
    a, _ = ops
    a.go("/events/")
    a.page.wait_for_selector("[data-live-state] .badge.ok")  # the WebSocket is open
    event_id = f"live_{secrets.token_hex(4)}"
    kites[0].post_event("plain", event_id, event_type="com.example.live")
    a.page.wait_for_selector(f"table.events tr:has-text('{event_id}')")
    a.shot("events")


def test_the_audit_log_reads_what_was_done(ops):
    a, _ = ops
    a.go("/audit/")
    a.page.fill("#id_peer", "b-manual")
    a.page.get_by_role("button", name="Filter").click()
    text = a.page.locator("table.audit").inner_text()
    for action in ("Federation.PeerCreated", "Federation.SecretRotated", "Federation.DeadLettersReplayed",
                   "Federation.PeerCalled"):  # fmt: skip
        assert action in text, action
    assert "user admin" in text
    a.shot("audit")
    a.page.select_option("#id_action", "Federation.InvitationCreated")
    a.page.fill("#id_peer", "")
    a.page.get_by_role("button", name="Filter").click()
    assert "b-invited" in a.page.locator("table.audit").inner_text()


def test_the_federated_fleet_and_then_the_peer_down(ops, kites, state):
    a, b = ops
    kite_a, kite_b = kites
    for kite, name in ((kite_a, "a-worker"), (kite_b, "b-worker")):
        assert kite.api("POST", "/api/fleet/agents", json={"name": name, "version": "1.4", "host": "h"}).ok
    b.go(f"/settings/federation/peers/{state['b-peer']}/")
    b.page.get_by_text("Create a grant").click()
    b.page.get_by_role("button", name="Create grant").click()
    grant = b.value("#reveal-grant")
    assert grant.startswith("fg-")

    a.go("/fleet/")
    a.page.check("#id_federation")
    a.page.get_by_role("button", name="Show").click()
    card = a.page.locator(".peer-card", has_text="b-manual")
    card.locator("input[name=token]").fill(grant)
    card.get_by_role("button", name="Store grant").click()
    assert "Fleet access from b-manual stored" in a.page.locator(".messages").inner_text()
    assert "Includes federation" in a.page.content()
    remote = a.page.locator("tr.remote", has_text="b-worker")
    assert "peer:b-manual/" in remote.inner_text() and remote.locator("button, form, input").count() == 0
    assert "Reachable" in a.page.locator(".peer-card", has_text="b-manual").inner_text()
    a.shot("fleet-federation")

    stop_quietly(kite_b)
    a.page.reload()
    card = a.page.locator(".peer-card", has_text="b-manual")
    assert "Unreachable" in card.inner_text() and "Last contact: never" not in card.inner_text()
    assert "a-worker" in a.page.content()  # the rest of the list still renders
    assert "stale" in a.page.locator("tr.remote", has_text="b-worker").inner_text()
    a.shot("fleet-peer-down")
