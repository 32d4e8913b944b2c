"""Attacks on the destination policy of live instances (runkite over HTTPS on loopback): an admin,
or an instance on the other end of an invitation, points this instance's peer calls at its own
loopback, a private network, the cloud metadata service or a name resolving there.

`strict` runs as installed (no KITE_PEER_ALLOWED_NETWORKS); `local` allows loopback, as two
instances on one machine do. Every refusal is 400 insecure_url naming the address and the
setting, and changes nothing: the peer rows of both instances are compared before and after.
"""

import base64
import ipaddress
import json
import socket
from types import SimpleNamespace

import pytest

from tests.e2e.conftest import Instances

pytestmark = pytest.mark.e2e

STRICT = {"KITE_PEER_ALLOWED_NETWORKS": ""}


@pytest.fixture(scope="module")
def kites(tmp_path_factory):
    started = Instances(tmp_path_factory)
    try:
        strict, local = started.start_together(("dest-strict", {"extra_env": STRICT}), "dest-local")
        yield SimpleNamespace(strict=strict, local=local)
    finally:
        started.close()


def _peers(kite) -> list[tuple]:
    rows = kite.api("GET", "/api/federation/peers").json()["results"]
    return sorted((row["id"], row["name"], row["status"], row["peer_hook_url"], row["tls_fingerprint"]) for row in rows)


def _own_name_resolving_inside() -> str:
    """This machine's host name: /etc/hosts maps it to loopback (Debian) or a container's private address."""
    name = socket.gethostname()
    address = ipaddress.ip_address(socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)[0][4][0])
    assert not address.is_global, f"{name} resolves to {address}: the test needs a name resolving inside"
    return name


def _internal_urls(kites) -> list[tuple[str, str]]:
    """(URL, what the refusal must name)."""
    live = kites.local.port  # a real Kite listens there: the SSRF would reach it
    return [
        (f"https://127.0.0.1:{live}/hooks/x/kite", "127.0.0.1 is a loopback address"),
        (f"https://[::1]:{live}/hooks/x/kite", "::1 is a loopback address"),
        ("https://10.0.0.5/hooks/x/kite", "10.0.0.5 is a private address"),
        ("https://[::ffff:169.254.169.254]/latest/meta-data", "169.254.169.254 is a link-local (cloud metadata) address"),
        (f"https://0.0.0.0:{live}/hooks/x/kite", "0.0.0.0 is a unspecified address"),
        (f"https://localhost:{live}/hooks/x/kite", "localhost resolves to"),
        ("https://[64:ff9b::a00:5]/hooks/x/kite", "64:ff9b::a00:5 is a private (NAT64 form of 10.0.0.5) address"),
        (f"https://{_own_name_resolving_inside()}:{live}/hooks/x/kite", f"{socket.gethostname()} resolves to"),
    ]


def _refused(answer, named: str) -> None:
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == "insecure_url", answer.text
    assert named in answer.json()["detail"] and "KITE_PEER_ALLOWED_NETWORKS" in answer.json()["detail"], answer.text


def test_an_admin_cannot_point_a_peer_at_internal_addresses(kites):
    strict = kites.strict
    kept = strict.api("POST", "/api/federation/peers", json={"name": "kept", "peer_hook_url": "https://8.8.8.8/x"})
    assert kept.status_code == 201, kept.text
    before = _peers(strict)

    for number, (url, named) in enumerate(_internal_urls(kites)):
        _refused(strict.api("POST", "/api/federation/peers", json={"name": f"evil{number}", "peer_hook_url": url}),
                 named.replace("::ffff:", ""))  # fmt: skip
        _refused(strict.api("PATCH", f"/api/federation/peers/{kept.json()['id']}", json={"peer_hook_url": url}),
                 named.replace("::ffff:", ""))  # fmt: skip

    assert _peers(strict) == before


def test_an_instance_that_allows_loopback_reaches_it_and_still_nothing_else(kites):
    local, strict = kites.local, kites.strict
    identity = strict.api("GET", "/api/federation/identity").json()
    made = local.api("POST", "/api/federation/peers", json={"name": "strict", "peer_hook_url": identity["hook_url"],
                                                            "tls_fingerprint": identity["tls_fingerprint"]})  # fmt: skip
    assert made.status_code == 201, made.text
    # The call reached the strict instance, which does not know us: its answer proves the connection.
    pinged = local.api("POST", f"/api/federation/peers/{made.json()['id']}/ping").json()
    assert (pinged["ok"], pinged["status_code"]) == (False, 401), pinged
    before = _peers(local)

    for url, named in [("https://10.0.0.5/hooks/x/kite", "10.0.0.5 is a private address"),
                       ("https://[::ffff:169.254.169.254]/x", "169.254.169.254 is a link-local (cloud metadata)"),
                       ("https://[64:ff9b::7f00:1]/x", "loopback (NAT64 form of 127.0.0.1)")]:  # fmt: skip
        _refused(local.api("POST", "/api/federation/peers", json={"name": "evil", "peer_hook_url": url}), named)
    assert _peers(local) == before


def test_a_strict_instance_refuses_an_invitation_to_a_loopback_url(kites):
    local, strict = kites.local, kites.strict
    invited = local.api("POST", "/api/federation/invitations", json={"name": "strict-inv", "scopes": []})
    assert invited.status_code == 201, invited.text
    before = _peers(local), _peers(strict)

    accepted = strict.api("POST", "/api/federation/invitations/accept",
                          json={"invitation": invited.json()["invitation"], "name": "local-inv"})  # fmt: skip

    _refused(accepted, "127.0.0.1 is a loopback address")
    assert (_peers(local), _peers(strict)) == before  # the invitation is still unused, nothing stored here


def test_a_strict_inviter_refuses_an_invitees_loopback_hook_url_in_the_handshake(kites):
    local, strict = kites.local, kites.strict
    invited = strict.api("POST", "/api/federation/invitations", json={"name": "local-hs", "scopes": []})
    assert invited.status_code == 201, invited.text
    before = _peers(local), _peers(strict)

    # `local` allows loopback, so it calls the strict inviter, which refuses the hook URL it is sent.
    accepted = local.api("POST", "/api/federation/invitations/accept",
                         json={"invitation": invited.json()["invitation"], "name": "strict-hs"})  # fmt: skip

    # invitations.accept answers the inviter's refusal with its status and code.
    assert (accepted.status_code, accepted.json()["code"]) == (400, "insecure_url"), accepted.text
    assert "127.0.0.1 is a loopback address" in accepted.json()["detail"], accepted.text
    assert (_peers(local), _peers(strict)) == before


def test_a_crafted_invitation_cannot_send_the_handshake_to_an_internal_address(kites):
    """An invitation is plain base64 JSON anyone can write: its hook URL public, its URL (where the
    handshake is POSTed) the metadata service."""
    local, strict = kites.local, kites.strict
    offer = {"contract_version": 1, "url": "https://[::ffff:169.254.169.254]", "instance_id": "mallory",
             "team_id": "tm_x", "hook_url": "https://8.8.8.8/hooks/tm_x/kite", "certificate_thumbprint": "sha256:" + "a" * 64,
             "code": "c" * 32}  # fmt: skip
    before = _peers(local), _peers(strict)

    for kite in (strict, local):
        accepted = kite.api("POST", "/api/federation/invitations/accept", json={"invitation": _invitation(offer)})
        _refused(accepted, "169.254.169.254 is a link-local (cloud metadata) address")
    assert (_peers(local), _peers(strict)) == before


def _invitation(payload: dict) -> str:
    return "kite-invite-v1." + base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
