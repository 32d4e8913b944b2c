"""Attacks on the peer-facing endpoints of a live instance (runkite over HTTPS on loopback).

B is the target. A is a legitimate peer of B, peered by invitation (pinned certificates both
ways). The test itself plays the attackers: an anonymous internet client; Mallory, a peer B
trusts with a secret the test knows (a malicious or compromised peer, and the holder of a
leaked old secret once B rotated it); and Mallory's accomplice, a second trusted sender.

Each attack asserts the refusal ({detail, code}, the status) and that nothing changed on B:
peer rows (status, fingerprints, instance IDs), stored events.
"""

import json
import secrets
import time

import pytest
import requests

from federation import signing
from tests.e2e.conftest import Instances
from tests.e2e.harness import wait_for

pytestmark = pytest.mark.e2e

DEEP = b"[" * 200_000


@pytest.fixture(scope="module")
def kites(tmp_path_factory):
    started = Instances(tmp_path_factory)
    try:
        b, a = started.start_together("sec-b", "sec-a")
        for kite in (a, b):
            kite.team = kite.team_id()
        for kite in (a, b):
            created = kite.api("POST", "/api/federation/certificates", json={"subject": f"kite {kite.instance_id}"})
            assert created.status_code == 201, created.text
        invited = b.api("POST", "/api/federation/invitations", json={"name": "a", "scopes": ["*"]}).json()
        accepted = a.api("POST", "/api/federation/invitations/accept", json={"invitation": invited["invitation"],
                                                                              "name": "b", "scopes": ["*"]})  # fmt: skip
        assert accepted.status_code == 201, accepted.text
        wait_for(lambda: _peer(b, invited["peer_id"])["status"] == "active", 20, "A active on B")
        yield {"a": a, "b": b, "a_on_b": invited["peer_id"]}
    finally:
        started.close()


def _peer(kite, peer_id: int) -> dict:
    return kite.api("GET", f"/api/federation/peers/{peer_id}").json()


def _trusted(kite, name: str) -> tuple[dict, str]:
    """A trusted sender on `kite` whose inbound secret the test (the attacker) holds."""
    token = kite.api("POST", "/api/federation/tokens", json={"label": name}).json()["token"]
    row = kite.api("POST", "/api/federation/trusted-senders", json={"name": name, "inbound_token": token})
    assert row.status_code == 201, row.text
    return row.json(), token


STABLE = ("id", "name", "status", "inbound_fingerprint", "outbound_fingerprint", "remote_instance_id",
          "peer_hook_url", "scopes")  # fmt: skip


def rows(kite) -> list[dict]:
    """Every peer and trusted sender of the team, by what an attack could change."""
    found = []
    for path in ("/api/federation/peers", "/api/federation/trusted-senders"):
        listed = kite.api("GET", path).json()
        for row in listed["results"] if isinstance(listed, dict) else listed:
            found.append({key: row.get(key) for key in STABLE})
    return sorted(found, key=lambda row: row["id"])


def events(kite) -> list[str]:
    return [event["id"] for event in kite.api("GET", "/api/events", params={"limit": 500}).json()["results"]]


def signed(secret: str, method: str, path: str, team: str, body: bytes = b"", *, sender: str = "mallory-inst",
           msg_id: str | None = None) -> dict:
    return signing.sign_headers(secret=secret, msg_id=msg_id or f"msg_{secrets.token_hex(8)}",
                                timestamp=int(time.time()), body=body, sender_id=sender,
                                binding=signing.Binding(method, path, team))  # fmt: skip


def send(kite, method: str, path: str, body: bytes = b"", headers: dict | None = None, **kwargs) -> requests.Response:
    headers = {"content-type": "application/json", **(headers or {})}
    return requests.request(method, kite.url + path, data=body, headers=headers, verify=str(kite.cert), timeout=15,
                            **kwargs)  # fmt: skip


def refused(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.json()["code"] == code, response.text[:300]


# --- anonymous: withdrawal of a handshake ---------------------------------------------------------


def test_nobody_but_the_invitee_can_withdraw_a_handshake_row(kites):
    """The old DELETE /api/federation/handshake took an HMAC keyed by a code from the body: anyone
    signed with a code of their own and named a row by public headers. Now it needs the nonce the
    handshake answer gave the invitee and a v1a signature by the certificate it presented."""
    a, b = kites["a"], kites["b"]
    _trusted(b, "never-pinged")  # a trusted sender stays `accepted` forever: it was revocable too
    before, stored = rows(b), events(b)
    thumbprint = a.api("GET", "/api/federation/identity").json()["certificates"][0]["thumbprint"]
    for body in ({"code": "mine"}, {"nonce": "mine"}, {"code": "mine", "nonce": secrets.token_urlsafe(32)}):
        raw = json.dumps(body).encode()
        for sender in (a.instance_id, ""):
            headers = signing.sign_headers(secret="whsec_mine", msg_id=f"m{secrets.token_hex(4)}",
                                           timestamp=int(time.time()), body=raw, sender_id=sender,
                                           binding=signing.Binding("DELETE", "/api/federation/handshake",
                                                                   b.team))  # fmt: skip
            headers["kite-key"] = thumbprint
            # A code is no field of a withdrawal: refused by name (400), before anything is looked up.
            status, code = (400, "invalid") if "code" in body else (401, "unknown_handshake")
            refused(send(b, "DELETE", "/api/federation/handshake", raw, headers), status, code)
    assert rows(b) == before and events(b) == stored


# --- a malicious peer: replay and endpoint confusion ----------------------------------------------


def test_a_control_call_is_accepted_once_and_only_where_it_was_signed_for(kites):
    b = kites["b"]
    mallory, secret = _trusted(b, "mallory-replay")
    headers = signed(secret, "GET", "/api/federation/ping", b.team, sender="mallory-replay-inst")
    assert send(b, "GET", "/api/federation/ping", headers=headers).status_code == 200
    before = rows(b)
    refused(send(b, "GET", "/api/federation/ping", headers=headers), 401, "replayed")
    # The same signature on another endpoint (the old message was {id}.{ts}.{body} alone, so a
    # ping's headers were a valid terminate), another team, or as a delivery: worthless.
    fresh = signed(secret, "GET", "/api/federation/ping", b.team, sender="mallory-replay-inst")
    refused(send(b, "POST", "/api/federation/terminate", b"", fresh), 401, "bad_secret")
    refused(send(b, "POST", "/api/federation/rotate", b"", fresh), 401, "bad_secret")
    refused(send(b, "GET", "/api/federation/fleet/agents", headers=fresh), 401, "bad_secret")
    other_team = signed(secret, "POST", "/api/federation/terminate", "tm_someone_else", sender="mallory-replay-inst")
    refused(send(b, "POST", "/api/federation/terminate", b"", other_team), 401, "bad_secret")
    assert rows(b) == before
    # A terminate signed for terminate works once, and its replay finds nothing to do.
    terminate = signed(secret, "POST", "/api/federation/terminate", b.team, b"{}", sender="mallory-replay-inst")
    assert send(b, "POST", "/api/federation/terminate", b"{}", terminate).status_code == 200
    assert [r["status"] for r in rows(b) if r["id"] == mallory["id"]] == ["revoked"]
    assert send(b, "POST", "/api/federation/terminate", b"{}", terminate).status_code == 401


# --- the holder of a leaked old secret --------------------------------------------------------------


def test_a_leaked_secret_rotated_out_cannot_rotate_in_its_own_or_terminate(kites):
    b = kites["b"]
    mallory, leaked = _trusted(b, "mallory-leak")
    rotated = b.api("POST", f"/api/federation/peers/{mallory['id']}/rotate-secret", json={"direction": "inbound"})
    assert rotated.status_code == 200, rotated.text
    current = rotated.json()["secret"]
    before = rows(b)
    change = json.dumps({"outbound_secret": "whsec_" + "M" * 43}).encode()
    for path, body in (("/api/federation/rotate", change), ("/api/federation/terminate", b"{}")):
        headers = signed(leaked, "POST", path, b.team, body, sender="mallory-leak-inst")
        refused(send(b, "POST", path, body, headers), 401, "current_secret_required")
        deep = signed(leaked, "POST", path, b.team, DEEP, sender="mallory-leak-inst")
        assert send(b, "POST", path, DEEP, deep).status_code == 401  # authenticated first: nothing parsed
    assert rows(b) == before
    # Deliveries still pass with the old secret during its grace period...
    assert _deliver(b, leaked, "grace-1", sender="mallory-leak-inst").status_code == 202
    # ...unless the operator rotates now, with no grace: then only the newest secret works.
    now = b.api("POST", f"/api/federation/peers/{mallory['id']}/rotate-secret",
                json={"direction": "inbound", "grace": False}).json()  # fmt: skip
    assert now["previous_valid_until"] is None
    stored = events(b)
    for old in (leaked, current):
        refused(_deliver(b, old, f"after-{secrets.token_hex(2)}", sender="mallory-leak-inst"), 401, "bad_secret")
    assert events(b) == stored
    assert _deliver(b, now["secret"], "fresh-1", sender="mallory-leak-inst").status_code == 202


# --- a malicious peer: forged local events, provenance --------------------------------------------


def _deliver(kite, secret: str, event_id: str, *, sender: str, **attributes) -> requests.Response:
    event = {"specversion": "1.0", "id": event_id, "source": "kite://elsewhere/tm_x/stripe",
             "type": "com.stripe.payment_intent.succeeded", "data": {"amount": 1}, **attributes}  # fmt: skip
    body = json.dumps(event).encode()
    headers = signing.sign_headers(secret=secret, msg_id=f"m{secrets.token_hex(6)}", timestamp=int(time.time()),
                                   body=body, sender_id=sender, binding=signing.delivery_binding(kite.team))  # fmt: skip
    headers["content-type"] = "application/cloudevents+json"
    return requests.post(f"{kite.url}/hooks/{kite.team}/kite", data=body, headers=headers, verify=str(kite.cert),
                         timeout=15)  # fmt: skip


def test_a_peer_cannot_pass_off_an_event_as_received_here_and_provenance_names_it(kites):
    b = kites["b"]
    mallory, secret = _trusted(b, "mallory-forge")
    stored = events(b)
    for source in (f"kite://{b.instance_id}/{b.team}/stripe", f"kite://{b.instance_id}/other/github"):
        refused(_deliver(b, secret, "forged-1", sender="mallory-forge-inst", source=source), 400, "local_source")
    assert events(b) == stored
    # Without provenance (and claiming to know who handed it over): B fills both in itself.
    assert _deliver(b, secret, "plain-1", sender="mallory-forge-inst", kitefedpeer="a").status_code == 202
    shown = next(e for e in b.api("GET", "/api/events", params={"limit": 500}).json()["results"] if e["id"] == "plain-1")
    assert (shown["kitefedorigin"], shown["kitefedchain"], shown["kitefedhops"], shown["kitefedpeer"]) == (
        "mallory-forge-inst", '["mallory-forge-inst"]', 1, "mallory-forge")


# --- identities ------------------------------------------------------------------------------------


def test_a_peer_cannot_take_the_instance_id_of_another_peer(kites):
    a, b = kites["a"], kites["b"]
    accomplice, secret = _trusted(b, "accomplice")
    before, stored = rows(b), events(b)
    refused(_deliver(b, secret, "claim-1", sender=a.instance_id), 409, "instance_id_taken")
    headers = signed(secret, "GET", "/api/federation/ping", b.team, sender=a.instance_id)
    refused(send(b, "GET", "/api/federation/ping", headers=headers), 409, "instance_id_taken")
    assert rows(b) == before and events(b) == stored
    assert [r["remote_instance_id"] for r in rows(b) if r["id"] == accomplice["id"]] == [""]


# --- bad input on every peer-facing endpoint ----------------------------------------------------------


PEER_ENDPOINTS = [("GET", "/api/federation/ping"), ("POST", "/api/federation/terminate"),
                  ("POST", "/api/federation/rotate"), ("GET", "/api/federation/fleet/agents"),
                  ("POST", "/api/federation/handshake"), ("DELETE", "/api/federation/handshake"),
                  ("POST", "/hooks/{team}/kite")]  # fmt: skip


@pytest.mark.parametrize("method, path", PEER_ENDPOINTS)
def test_absurd_signature_headers_are_a_400_before_any_verification(kites, method, path):
    b = kites["b"]
    before, stored = rows(b), events(b)
    path = path.format(team=b.team)
    base = {"webhook-id": "m1", "webhook-timestamp": str(int(time.time())), "kite-peer": "x"}
    for extra in ({"webhook-signature": " ".join(["v1a," + "A" * 86] * 20)},
                  {"webhook-signature": "v1,AAAA", "kite-key": "sha256:" + "a" * 7000},
                  {"webhook-signature": "v1,AAAA", "webhook-id": "i" * 5000},
                  {"webhook-signature": "v1,AAAA", "webhook-timestamp": "1e9"}):  # fmt: skip
        response = send(b, method, path, b'{"code": "x", "nonce": "x"}', {**base, **extra})
        refused(response, 400, "malformed_signature")
    assert rows(b) == before and events(b) == stored


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_deep_json_to_the_handshake_is_a_400(kites, method):
    b = kites["b"]
    before = rows(b)
    headers = signed("whsec_mine", method, "/api/federation/handshake", b.team, DEEP)
    refused(send(b, method, "/api/federation/handshake", DEEP, headers), 400, "invalid")
    refused(send(b, method, "/api/federation/handshake", b'{"code": ' + b"[" * 5000 + b"}", headers), 400, "invalid")
    assert rows(b) == before
    assert send(b, "GET", "/healthz").status_code == 200


def test_an_oversized_body_is_a_413_in_the_error_shape(kites):
    b = kites["b"]
    big = b'{"code": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    for method, path in (("POST", "/api/federation/handshake"), ("POST", "/api/federation/rotate")):
        refused(send(b, method, path, big, signed("whsec_x", method, path, b.team)), 413, "payload_too_large")
