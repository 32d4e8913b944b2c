"""Identity certificates (README "Identity certificates (the second factor)"): issued with an Ed25519 key encrypted at rest,
listed by thumbprint and PEM only, pinned on the other side; a pinned peer must sign v1a."""

import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from federation import certificates, inbound, peers, services, signing
from federation.models import AuditEvent, IdentityCertificate
from kite import crypto, tls
from kite.errors import ApiError
from tests.e2e.harness import wait_for
from tests.federation.test_api import PEER_URL, SECRET


def _issue(api, subject="kite-a identity", **extra):
    response = api.post("/api/federation/certificates", {"subject": subject, **extra}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()


def test_a_certificate_is_ed25519_with_its_key_encrypted_and_never_shown(api, team):
    body = _issue(api, validity_days=30)
    cert = x509.load_pem_x509_certificate(body["pem"].encode())
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    assert body["thumbprint"] == certificates.thumbprint_of(cert) and body["thumbprint"].startswith("sha256:")
    assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30
    row = IdentityCertificate.objects.get(pk=body["id"])
    assert "PRIVATE KEY" not in row.private_key_encrypted and "PRIVATE KEY" in crypto.decrypt(row.private_key_encrypted)
    listed = api.get("/api/federation/certificates").json()["results"]
    assert [c["thumbprint"] for c in listed] == [body["thumbprint"]]
    assert all("private" not in key for c in listed for key in c)
    assert [c["thumbprint"] for c in api.get("/api/federation/identity").json()["certificates"]] == [body["thumbprint"]]


@pytest.mark.parametrize("bad", [{"subject": ""}, {"subject": "x", "validity_days": 0}, {"subject": "x", "validity_days": 9999}])
def test_bad_certificate_requests_are_400_and_store_nothing(api, bad):
    response = api.post("/api/federation/certificates", bad, format="json")
    assert response.status_code == 400 and {"detail", "code"} <= set(response.json())
    assert not IdentityCertificate.objects.exists()


@pytest.mark.parametrize("subject", ["x" * 65, "é" * 33, "证" * 22])
def test_a_subject_longer_than_an_x509_common_name_is_400_and_stores_nothing(api, team, subject):
    """X.509 allows 64 bytes of UTF-8 in a common name: past that, cryptography raised a ValueError (a 500)."""
    audited = AuditEvent.objects.count()

    response = api.post("/api/federation/certificates", {"subject": subject}, format="json")

    assert response.status_code == 400, response.content
    assert response.json()["code"] == "invalid" and "subject" in response.json()["detail"]
    assert not IdentityCertificate.objects.exists() and AuditEvent.objects.count() == audited
    with pytest.raises(ApiError):  # the service refuses it for every caller (screen, manage.py)
        certificates.issue(team=team, subject=subject)
    assert not IdentityCertificate.objects.exists()


def test_a_subject_of_exactly_64_bytes_is_the_certificates_common_name(api):
    body = _issue(api, subject="é" * 32)

    cert = x509.load_pem_x509_certificate(body["pem"].encode())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "é" * 32


def test_certificates_stay_in_their_team(api, outsider_api):
    body = _issue(api)
    assert outsider_api.get("/api/federation/certificates").json()["results"] == []
    assert outsider_api.delete(f"/api/federation/certificates/{body['id']}").status_code == 404
    assert api.delete(f"/api/federation/certificates/{body['id']}").status_code == 204
    assert not IdentityCertificate.objects.exists()


def test_the_newest_valid_certificate_signs(api, team):
    first, second = _issue(api, "old"), _issue(api, "new")
    assert certificates.signer_for(team.id).thumbprint == second["thumbprint"]
    api.delete(f"/api/federation/certificates/{second['id']}")
    assert certificates.signer_for(team.id).thumbprint == first["thumbprint"]


def test_pasting_the_other_sides_pem_pins_it_and_junk_is_refused(api, team, tmp_path):
    other = certificates.issue(team=team, subject="kite-b")  # stands in for B's certificate
    created = api.post("/api/federation/peers", {"name": "b", "peer_hook_url": PEER_URL, "outbound_token": SECRET,
                                                 "certificate_pem": other.pem}, format="json")  # fmt: skip
    assert created.status_code == 201 and created.json()["certificate_thumbprint"] == other.thumbprint
    server_cert, _ = tls.ensure_server_certificate(tmp_path / "tls", ["127.0.0.1"])  # P-256: not an identity
    for junk in ("not a pem", server_cert.read_text()):
        refused = api.patch(f"/api/federation/peers/{created.json()['id']}", {"certificate_pem": junk}, format="json")
        assert refused.status_code == 400 and refused.json()["code"] == "invalid"
    assert api.get(f"/api/federation/peers/{created.json()['id']}").json()["certificate_thumbprint"] == other.thumbprint


# --- the receiving side ----------------------------------------------------------------


@pytest.fixture
def pinned_sender(team):
    """A trusted sender whose certificate is pinned here, and the Signer it signs with."""
    key_holder = certificates.issue(team=team, subject="sender identity")
    sender = services.trusted_sender_create(team=team, name="a", inbound_token=SECRET, certificate_pem=key_holder.pem).row
    signer = certificates.signer_for(team.id)
    IdentityCertificate.objects.filter(pk=key_holder.pk).delete()  # only the sender holds it
    return sender, signer


def _headers(body, signer=None, secret=SECRET, team_id=None, binding=None):
    """A delivery's headers (to `team_id`'s kite hook; the test's `team` unless named), or for `binding`."""
    from kite.models import Team

    team_id = team_id or Team.objects.get(name="owner-team").pk
    return signing.sign_headers(
        secret=secret, msg_id=f"m{time.monotonic_ns()}", timestamp=int(time.time()), body=body, sender_id="kite-a",
        ed25519_sign=signer.sign if signer else None, key_thumbprint=signer.thumbprint if signer else None,
        binding=binding or signing.delivery_binding(team_id),
    )  # fmt: skip


def test_a_pinned_sender_needs_both_factors_and_each_failure_is_named(team, pinned_sender):
    sender, signer = pinned_sender
    body = json.dumps({"id": "x"}).encode()
    assert inbound.authenticate(_headers(body, signer), body, team_id=team.id).pk == sender.pk
    with pytest.raises(inbound.Refusal) as missing:
        inbound.authenticate(_headers(body), body, team_id=team.id)  # HMAC only
    assert missing.value.code == "missing_certificate"
    impostor = certificates.Signer(thumbprint=signer.thumbprint, sign=ed25519.Ed25519PrivateKey.generate().sign,
                                   pinned_context=None)  # fmt: skip
    with pytest.raises(inbound.Refusal) as forged:
        inbound.authenticate(_headers(body, impostor), body, team_id=team.id)
    assert forged.value.code == "bad_certificate"
    other = certificates.Signer(thumbprint="sha256:" + "0" * 64, sign=signer.sign, pinned_context=None)
    with pytest.raises(inbound.Refusal) as wrong_pin:
        inbound.authenticate(_headers(body, other), body, team_id=team.id)
    assert wrong_pin.value.code == "bad_certificate" and "paste" in wrong_pin.value.detail
    with pytest.raises(inbound.Refusal) as bad_secret:
        inbound.authenticate(_headers(body, signer, secret="whsec_" + "A" * 43), body, team_id=team.id)
    assert bad_secret.value.code in ("bad_secret", "unknown_peer")  # the secret is checked first


def test_a_hook_request_missing_the_certificate_is_401_and_stores_nothing(client, team, pinned_sender):
    from ingest.models import Event

    body = json.dumps({"specversion": "1.0", "id": "e1", "source": "kite://a/t/s", "type": "com.x.y"}).encode()
    headers = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in _headers(body).items()}
    response = client.post(f"/hooks/{team.id}/kite", body, content_type="application/cloudevents+json", **headers)
    assert response.status_code == 401 and response.json()["code"] == "missing_certificate"
    assert not Event.objects.filter(ce_id="e1").exists()


def test_outbound_calls_sign_v1a_with_the_current_certificate(team):
    peer = services.peer_create(team=team, name="b", peer_hook_url=PEER_URL, outbound_token=SECRET).row
    assert peers.target_for(peer).signer is None
    row = certificates.issue(team=team, subject="a")
    target = peers.target_for(peer)
    assert target.signer.thumbprint == row.thumbprint
    headers = _headers(b"{}", target.signer)
    request = signing.parse_headers(headers, int(time.time()))
    assert request.key_thumbprint == row.thumbprint
    assert signing.ed25519_matches(certificates.verifier_for(row.pem), request,
                                   request.ed25519_message(b"{}", signing.delivery_binding(team.id)))  # fmt: skip
    assert not isinstance(x509.load_pem_x509_certificate(row.pem.encode()).public_key(), ec.EllipticCurvePublicKey)


# --- rotation and termination --------------------------------------------------------


def test_rotating_inbound_keeps_the_old_secret_for_24_hours(api, team):
    from datetime import timedelta

    from django.utils import timezone

    from federation.models import Peer

    sender = api.post("/api/federation/trusted-senders", {"name": "a", "inbound_token": SECRET}, format="json").json()
    rotated = api.post(f"/api/federation/peers/{sender['id']}/rotate-secret", {"direction": "inbound"}, format="json")
    assert rotated.status_code == 200, rotated.json()
    new = rotated.json()["secret"]
    assert new.startswith("whsec_") and rotated.json()["fingerprint"] == crypto.fingerprint(new)
    body = b"{}"
    for secret in (SECRET, new):  # both work during the grace period
        assert inbound.authenticate(_headers(body, secret=secret), body, team_id=team.id).pk == sender["id"]
    Peer.objects.filter(pk=sender["id"]).update(previous_inbound_expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(inbound.Refusal):
        inbound.authenticate(_headers(body, secret=SECRET), body, team_id=team.id)
    assert inbound.authenticate(_headers(body, secret=new), body, team_id=team.id).pk == sender["id"]


def test_rotating_outbound_with_the_other_sides_secret_resumes_an_auth_paused_queue(api, team):
    from federation.models import Peer

    peer = api.post("/api/federation/peers", {"name": "b", "peer_hook_url": PEER_URL, "outbound_token": SECRET},
                    format="json").json()  # fmt: skip
    Peer.objects.filter(pk=peer["id"]).update(paused="auth_failed")
    given = crypto.new_webhook_secret()
    rotated = api.post(f"/api/federation/peers/{peer['id']}/rotate-secret", {"direction": "outbound", "secret": given},
                       format="json")  # fmt: skip
    assert rotated.status_code == 200 and "secret" not in rotated.json()  # given, not generated: not echoed
    row = Peer.objects.get(pk=peer["id"])
    assert row.paused == "" and peers.target_for(row).secret == given


@pytest.mark.parametrize("body", [{"direction": "sideways"}, {"direction": "inbound", "secret": "not-a-secret"}])
def test_bad_rotation_requests_change_nothing(api, body):
    peer = api.post("/api/federation/peers", {"name": "b", "peer_hook_url": PEER_URL, "outbound_token": SECRET},
                    format="json").json()  # fmt: skip
    response = api.post(f"/api/federation/peers/{peer['id']}/rotate-secret", body, format="json")
    assert response.status_code == 400 and {"detail", "code"} <= set(response.json())
    assert api.get(f"/api/federation/peers/{peer['id']}").json()["inbound_fingerprint"] == peer["inbound_fingerprint"]


def test_rotation_of_another_teams_peer_is_404(api, outsider_api):
    peer = api.post("/api/federation/peers", {"name": "b", "peer_hook_url": PEER_URL, "outbound_token": SECRET},
                    format="json").json()  # fmt: skip
    response = outsider_api.post(f"/api/federation/peers/{peer['id']}/rotate-secret", {"direction": "inbound"},
                                 format="json")  # fmt: skip
    assert response.status_code == 404


def test_a_signed_terminate_revokes_the_sender_and_an_unsigned_one_changes_nothing(client, team):
    from federation.models import Peer

    sender = services.trusted_sender_create(team=team, name="a", inbound_token=SECRET).row
    body = json.dumps({"reason": "deleted"}).encode()
    unsigned = client.post("/api/federation/terminate", body, content_type="application/json")
    assert unsigned.status_code == 401 and Peer.objects.get(pk=sender.pk).status == "accepted"
    as_delivery = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in _headers(body).items()}
    misused = client.post("/api/federation/terminate", body, content_type="application/json", **as_delivery)
    assert misused.status_code == 401 and Peer.objects.get(pk=sender.pk).status == "accepted"  # bound elsewhere
    binding = signing.Binding("POST", "/api/federation/terminate", team.id)
    headers = {"HTTP_" + k.upper().replace("-", "_"): v for k, v in _headers(body, binding=binding).items()}
    signed = client.post("/api/federation/terminate", body, content_type="application/json", **headers)
    assert signed.status_code == 200 and signed.json()["revoked"] is True
    assert Peer.objects.get(pk=sender.pk).status == "revoked"


class MutualTlsServer:
    """A TLS server that demands a client certificate (an mTLS proxy in front of a peer, README "Identity certificates (the second factor)")
    and remembers the one each connection presented."""

    def __init__(self, directory, client_ca_pem: str):
        import socket
        import ssl
        import threading

        cert, key = tls.ensure_server_certificate(directory, ["127.0.0.1"])
        self.cert_path, self.fingerprint = cert, tls.fingerprint_of_pem(cert.read_bytes())
        (directory / "client-ca.pem").write_text(client_ca_pem)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(directory / "client-ca.pem")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}/api/federation/ping"
        self.presented: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import ssl

        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    self.presented.append(conn.getpeercert(binary_form=True))
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\n{}")  # fmt: skip
            except (ssl.SSLError, OSError):
                self.presented.append(b"")  # refused in the handshake: no (acceptable) certificate

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("verified_by", ["pin", "system CAs"])
def test_outbound_calls_present_the_identity_certificate_to_a_server_that_demands_one(team, tmp_path, monkeypatch,
                                                                                     verified_by):  # fmt: skip
    import hashlib

    from cryptography.hazmat.primitives import serialization

    from federation import client

    identity = certificates.issue(team=team, subject="mtls identity")
    server = MutualTlsServer(tmp_path, identity.pem)
    try:
        monkeypatch.setattr(client, "_pools", {})  # no keep-alive connection of an earlier test
        if verified_by == "system CAs":  # the server's self-signed certificate stands in for a public CA
            monkeypatch.setattr(client, "SYSTEM_CAS", str(server.cert_path))
        target = client.Target(url=server.url, secret=SECRET, sender_id="kite-a", signer=certificates.signer_for(team.id),
                               tls_fingerprint=server.fingerprint if verified_by == "pin" else "")  # fmt: skip
        answer = client.call(target, "GET")
        assert answer.status_code == 200
        (presented,) = server.presented
        assert "sha256:" + hashlib.sha256(presented).hexdigest() == identity.thumbprint
        # Without an identity certificate there is nothing to present: the server refuses the handshake.
        with pytest.raises(client.PeerCallError) as refused:
            client.call(client.Target(url=server.url, secret=SECRET, sender_id="kite-a",
                                      tls_fingerprint=target.tls_fingerprint), "GET")  # fmt: skip
        wait_for(lambda: len(server.presented) == 2, 5, "the server to note the second handshake")
        assert server.presented[1:] == [b""] and refused.value.code in ("tls", "connection")
        assert x509.load_der_x509_certificate(presented).public_bytes(serialization.Encoding.PEM).decode() == identity.pem
    finally:
        server.close()
