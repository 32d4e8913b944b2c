"""Where peer calls may go and what they read (federation.client): the destination policy's
classification of every address form, the allow-list, a connection made to the very address that
was checked (TLS and Host by the URL's name), and answers read up to a limit.

The classification tests are pure; the connection tests talk HTTPS to a server of this test on
127.0.0.1 whose certificate names `peer.test` only, with the resolver replaced by a script."""

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation import client, heartbeat, outbox, services
from federation.models import Delivery, OutboxEntry, Peer
from fleet import federated
from tests.federation.test_delivery import SECRET, Endpoint, make_entry, make_event, make_due

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def ip(text: str):
    return ipaddress.ip_address(text)


def networks(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# --- the classification (pure) ------------------------------------------------------------

REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.5", "private"),
    ("172.16.3.4", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "shared (CGNAT)"),
    ("100.127.255.254", "shared (CGNAT)"),
    ("169.254.169.254", "link-local (cloud metadata)"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "unique local (ULA)"),
    ("fd12:3456::1", "unique local (ULA)"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.0.8", "reserved"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.1", "benchmarking"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.9", "documentation"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("2001::1", "reserved"),  # Teredo and the other IETF protocol assignments
    ("100::1", "discard-only"),
    ("fec0::1", "site-local"),
    ("5f00::1", "reserved"),  # outside 2000::/3, the only global unicast space
    ("4000::1", "reserved"),
    # IPv4-mapped: a socket to it reaches the IPv4 address itself
    ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.5", "private"),
    ("::ffff:0.0.0.0", "unspecified"),
    # IPv4-compatible, 6to4 and NAT64 forms carry the IPv4 address the packets end up at
    ("::a00:5", "private (IPv4-compatible form of 10.0.0.5)"),
    ("::7f00:1", "loopback (IPv4-compatible form of 127.0.0.1)"),
    ("2002:a9fe:a9fe::1", "link-local (cloud metadata) (6to4 form of 169.254.169.254)"),
    ("2002:7f00:1::", "loopback (6to4 form of 127.0.0.1)"),
    ("2002:c0a8:101::1", "private (6to4 form of 192.168.1.1)"),
    ("64:ff9b::a00:5", "private (NAT64 form of 10.0.0.5)"),
    ("64:ff9b::7f00:1", "loopback (NAT64 form of 127.0.0.1)"),
    ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata) (NAT64 form of 169.254.169.254)"),
    ("64:ff9b::6440:1", "shared (CGNAT) (NAT64 form of 100.64.0.1)"),
    ("64:ff9b:1::a00:5", "local-use NAT64"),
    ("64:ff9b:1::808:808", "local-use NAT64"),
]


@pytest.mark.parametrize(("address", "why"), REFUSED)
def test_non_global_addresses_in_every_form_are_refused_and_named(address, why):
    assert client.refusal(ip(address)) == why


PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "11.0.0.1", "100.63.255.255", "100.128.0.1", "172.32.0.1",
          "192.0.3.1", "192.169.0.1", "223.255.255.254", "2606:4700:4700::1111", "2a00:1450:4001::1",
          "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]  # fmt: skip


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass_in_every_form(address):
    assert client.refusal(ip(address)) is None


def test_an_allowed_network_lets_its_own_addresses_through_and_nothing_else():
    assert [client.refusal(ip(a), LOOPBACK) for a in ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1")] == [None] * 4
    assert client.refusal(ip("10.0.0.5"), LOOPBACK) == "private"
    assert client.refusal(ip("169.254.169.254"), LOOPBACK) == "link-local (cloud metadata)"
    # A NAT64 translator is another box: the IPv4 loopback it would reach is not ours to allow.
    assert client.refusal(ip("64:ff9b::7f00:1"), LOOPBACK) == "loopback (NAT64 form of 127.0.0.1)"
    assert client.refusal(ip("0.0.0.0"), LOOPBACK) == "unspecified"


def test_an_allowed_private_network_is_exactly_that_network():
    assert client.refusal(ip("10.1.2.3"), networks("10.0.0.0/8")) is None
    assert client.refusal(ip("10.1.0.5"), networks("10.0.0.0/16")) == "private"
    assert client.refusal(ip("fd00::5"), networks("fd00::/64")) is None
    assert client.refusal(ip("fd00:0:0:1::5"), networks("fd00::/64")) == "unique local (ULA)"


# --- the policy on URLs: every resolved address must pass ---------------------------------


class Resolver:
    """socket.getaddrinfo by a script: {name: [answer of the 1st lookup, of the 2nd, ...]} (the last
    repeats); every other name or literal goes to the real resolver. Records what was asked."""

    def __init__(self, monkeypatch, script: dict[str, list[list[str]]]):
        self.script, self.asked, self.real = script, [], socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self)
        monkeypatch.setattr(client, "_resolved", {})  # no resolution cached by an earlier test

    def __call__(self, host, port, *args, **kwargs):
        self.asked.append(host)
        if host not in self.script:
            return self.real(host, port, *args, **kwargs)
        answers = self.script[host]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port, 0, 0) if ":" in a else (a, port)) for a in addresses]  # fmt: skip

    def lookups_of(self, name: str) -> int:
        return self.asked.count(name)


def test_a_name_is_refused_when_any_address_it_resolves_to_is_refused(monkeypatch, settings):
    settings.KITE_PEER_ALLOWED_NETWORKS = ()
    Resolver(monkeypatch, {"mixed.test": [["8.8.8.8", "127.0.0.1"]], "public.test": [["8.8.8.8", "2606:4700::1"]]})

    with pytest.raises(client.UnsafeUrl) as refused:
        client.check_url("https://mixed.test/hooks/x/kite")
    assert str(refused.value).startswith("mixed.test resolves to 127.0.0.1, a loopback address")
    assert "KITE_PEER_ALLOWED_NETWORKS" in str(refused.value)
    assert client.destination("https://public.test:8443/x").addresses == ("8.8.8.8", "2606:4700::1")


@pytest.mark.parametrize("url", ["http://8.8.8.8/x", "https:///x", "https://8.8.8.8:99999/x", "ftp://8.8.8.8/x"])
def test_a_url_that_is_not_https_to_a_host_is_refused(url):
    with pytest.raises(client.UnsafeUrl):
        client.check_url(url)


BAD_PEER_URLS = [
    ("https://127.0.0.1:8443/hooks/x/kite", "127.0.0.1 is a loopback address"),
    ("https://[::1]:8443/hooks/x/kite", "::1 is a loopback address"),
    ("https://10.0.0.5/hooks/x/kite", "10.0.0.5 is a private address"),
    ("https://[::ffff:169.254.169.254]/latest/meta-data", "::ffff:169.254.169.254 is a link-local (cloud metadata)"),
    ("https://0.0.0.0:8443/hooks/x/kite", "0.0.0.0 is a unspecified address"),
    ("https://localhost:8443/hooks/x/kite", "localhost resolves to 127.0.0.1, a loopback address"),
    ("https://[64:ff9b::a00:5]/hooks/x/kite", "64:ff9b::a00:5 is a private (NAT64 form of 10.0.0.5) address"),
    ("https://rebind.test/hooks/x/kite", "rebind.test resolves to 10.1.2.3, a private address"),
]


@pytest.mark.parametrize(("url", "named"), BAD_PEER_URLS)
def test_an_admin_cannot_configure_a_peer_at_an_internal_address(api, team, settings, monkeypatch, url, named):
    settings.KITE_PEER_ALLOWED_NETWORKS = ()
    Resolver(monkeypatch, {"rebind.test": [["10.1.2.3"]], "localhost": [["127.0.0.1", "::1"]]})
    kept = services.peer_create(team=team, name="kept", peer_hook_url="https://8.8.8.8/hooks/x/kite").row
    before = list(Peer.objects.values_list("pk", "peer_hook_url"))

    created = api.post("/api/federation/peers", {"name": "b", "peer_hook_url": url}, format="json")
    patched = api.patch(f"/api/federation/peers/{kept.pk}", {"peer_hook_url": url}, format="json")

    for answer in (created, patched):
        assert (answer.status_code, answer.json()["code"]) == (400, "insecure_url")
        assert named in answer.json()["detail"] and "KITE_PEER_ALLOWED_NETWORKS" in answer.json()["detail"]
    assert list(Peer.objects.values_list("pk", "peer_hook_url")) == before


def test_allowed_networks_is_read_from_the_environment_and_a_bad_value_stops_kite(tmp_path):
    probe = "import django; django.setup(); from django.conf import settings; print(settings.KITE_PEER_ALLOWED_NETWORKS)"

    def start(value):
        env = {key: item for key, item in os.environ.items() if not key.startswith("KITE_")}
        env.update(DJANGO_SETTINGS_MODULE="kite.settings", KITE_DATA_DIR=str(tmp_path / "data"),
                   KITE_PEER_ALLOWED_NETWORKS=value)  # fmt: skip
        return subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip

    good = start(" 127.0.0.0/8, ::1/128 ,10.0.0.0/8")
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == ("(IPv4Network('127.0.0.0/8'), IPv6Network('::1/128'), "
                                   "IPv4Network('10.0.0.0/8'))")  # fmt: skip
    for bad in ("10.0.0.0/8,intranet", "10.0.0.5/8", "127.0.0.0/33"):
        refused = start(bad)
        assert refused.returncode != 0
        assert "ImproperlyConfigured: KITE_PEER_ALLOWED_NETWORKS:" in refused.stderr


# --- the connection goes to the checked address ------------------------------------------


def _certificate(directory: Path) -> tuple[Path, Path, Path, str]:
    """A CA of the test, and a server certificate it signed for `peer.test` only (no IP address)."""
    now = datetime.datetime.now(datetime.UTC)

    def issue(subject, issuer, key, issuer_key, *extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=2)))  # fmt: skip
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "destinations test CA")])
    ca = issue(ca_name, ca_name, ca_key, ca_key, (x509.BasicConstraints(ca=True, path_length=None), True))
    leaf = issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer.test")]), ca_name, key, ca_key,
                 (x509.SubjectAlternativeName([x509.DNSName("peer.test")]), False),
                 (x509.BasicConstraints(ca=False, path_length=None), True))  # fmt: skip
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return *paths, "sha256:" + leaf.fingerprint(hashes.SHA256()).hex()


class PeerTest:
    """HTTPS on 127.0.0.1 for `peer.test`, keep-alive on. Records per request (SNI, Host, path) and
    counts connections. `body`: what it answers with; `declare`: send Content-Length (else chunked)."""

    def __init__(self, directory: Path):
        self.ca, cert, key, self.fingerprint = _certificate(directory)
        self.requests: list[tuple[str | None, str, str]] = []
        self.connections = 0
        self.body, self.declare = b'{"ok": true}', True
        served = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                served.connections += 1

            def do_GET(self):
                served.requests.append((getattr(self.connection, "sni", None), self.headers["Host"], self.path))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                body = served.body
                if served.declare:
                    size = len(body) if isinstance(body, bytes) else len(body[0]) * body[1]
                    self.send_header("Content-Length", str(size))
                else:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    served.write(self.wfile, body, chunked=not served.declare)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    self.close_connection = True  # the client stopped reading: what it should do

            def log_message(self, *args):
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.sni_callback = lambda sock, name, _: setattr(sock, "sni", name)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def write(out, body, *, chunked: bool):
        """`body` is bytes, or (piece, count): count times piece, never held whole."""
        pieces = [body] if isinstance(body, bytes) else (body[0] for _ in range(body[1]))
        for piece in pieces:
            out.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            out.write(b"0\r\n\r\n")

    def url(self, host: str = "peer.test") -> str:
        return f"https://{host}:{self.port}/api/federation/ping?team=x"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def peer_test(tmp_path, monkeypatch):
    served = PeerTest(tmp_path)
    # Unpinned calls verify by "the system CAs": here, the CA of the test.
    monkeypatch.setattr(client, "SYSTEM_CAS", str(served.ca))
    monkeypatch.setattr(client, "_pools", {})
    yield served
    served.close()


def _target(url: str, fingerprint: str = "") -> client.Target:
    return client.Target(url=url, secret=SECRET, sender_id="kite-a", tls_fingerprint=fingerprint)


def test_the_call_connects_to_the_address_checked_with_the_urls_name_for_tls_and_host(peer_test, monkeypatch):
    # First lookup: loopback (allowed); every later one: a private address (DNS rebinding).
    resolver = Resolver(monkeypatch, {"peer.test": [["127.0.0.1"], ["10.0.0.5"]]})

    first = client.call(_target(peer_test.url()), "GET")
    second = client.call(_target(peer_test.url()), "GET")

    assert first.body == second.body == {"ok": True}
    host = f"peer.test:{peer_test.port}"
    assert peer_test.requests == [("peer.test", host, "/api/federation/ping?team=x")] * 2
    assert peer_test.connections == 1  # the keep-alive pool still works
    # Resolved once (the check); urllib3 was handed the address and never looked the name up.
    assert resolver.lookups_of("peer.test") == 1
    # Once the resolution is stale the name is looked up and checked again: now it is refused, unsent.
    monkeypatch.setattr(client, "_resolved", {})
    with pytest.raises(client.PeerCallError) as refused:
        client.call(_target(peer_test.url()), "GET")
    assert (refused.value.kind, refused.value.code) == ("permanent", "insecure_url")
    assert "peer.test resolves to 10.0.0.5, a private address" in refused.value.detail
    assert len(peer_test.requests) == 2


def test_the_certificate_must_name_the_urls_host_not_merely_sit_at_its_address(peer_test, monkeypatch):
    Resolver(monkeypatch, {"other.test": [["127.0.0.1"]]})

    for url in (peer_test.url("other.test"), peer_test.url("127.0.0.1")):
        with pytest.raises(client.PeerCallError) as refused:
            client.call(_target(url), "GET")
        assert refused.value.code == "tls"
    assert peer_test.requests == []


def test_a_pinned_peer_is_reached_at_the_checked_address_with_its_name_in_sni(peer_test, monkeypatch):
    Resolver(monkeypatch, {"peer.test": [["127.0.0.1"]]})

    answer = client.call(_target(peer_test.url(), peer_test.fingerprint), "GET")

    assert answer.body == {"ok": True}
    assert peer_test.requests == [("peer.test", f"peer.test:{peer_test.port}", "/api/federation/ping?team=x")]
    with pytest.raises(client.PeerCallError) as refused:
        client.call(_target(peer_test.url(), "sha256:" + "0" * 64), "GET")
    assert refused.value.code == "tls"


def test_each_checked_address_is_tried_in_turn_and_no_other(peer_test, monkeypatch):
    # Nobody listens on 127.0.0.2 at that port: refused at once, then the next checked address.
    resolver = Resolver(monkeypatch, {"peer.test": [["127.0.0.2", "127.0.0.1"]]})

    assert client.call(_target(peer_test.url()), "GET").body == {"ok": True}
    assert [host for host in resolver.asked if host != "peer.test"] == ["127.0.0.2", "127.0.0.1"]


# --- answers read up to a limit ---------------------------------------------------------


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "chunked"])
def test_an_answer_over_the_limit_is_a_named_failure_read_no_further(peer_test, monkeypatch, declare):
    Resolver(monkeypatch, {"peer.test": [["127.0.0.1"]]})
    peer_test.body, peer_test.declare = (b"x" * (64 * 1024), 1024), declare  # 64 MiB, never held by the server

    tracemalloc.start()
    try:
        with pytest.raises(client.PeerCallError) as refused:
            client.call(_target(peer_test.url()), "GET")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    failure = refused.value
    assert (failure.kind, failure.code, failure.status_code) == ("transient", "answer_too_large", None)
    assert failure.detail.startswith("answer_too_large: the peer's HTTP 200 answer is over 1,048,576 bytes")
    assert peak < client.MAX_ANSWER_BYTES + 2 * MiB  # the limit and a chunk: not the 64 MiB sent
    # That connection was closed, not reused: the next call opens another and is answered.
    peer_test.body, peer_test.declare = b'{"ok": true}', True
    assert client.call(_target(peer_test.url()), "GET").body == {"ok": True}
    assert peer_test.connections == 2


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "chunked"])
def test_the_limit_is_inclusive(peer_test, monkeypatch, declare):
    Resolver(monkeypatch, {"peer.test": [["127.0.0.1"]]})
    peer_test.declare = declare
    peer_test.body = b'"' + b"x" * 998 + b'"'

    assert client.call(_target(peer_test.url()), "GET", max_answer_bytes=1000).body == "x" * 998
    peer_test.body = b'"' + b"x" * 999 + b'"'
    with pytest.raises(client.PeerCallError) as refused:
        client.call(_target(peer_test.url()), "GET", max_answer_bytes=1000)
    assert refused.value.code == "answer_too_large"


def test_a_fleet_answer_may_be_larger_than_a_control_calls_but_is_bounded_too(peer_test, monkeypatch):
    Resolver(monkeypatch, {"peer.test": [["127.0.0.1"]]})
    target = _target(peer_test.url(), peer_test.fingerprint)
    call = federated.Call(peer_id=1, target=target, grant="fg-1." + "h" * 43)
    padding = b"x" * (2 * MiB)
    peer_test.body = b'{"results": [], "padding": "' + padding + b'"}'

    assert federated.fetch(call, 5.0).outcome == "ok"  # 2 MiB: over a control call's limit, fine for a fleet
    with pytest.raises(client.PeerCallError):
        client.call(target, "GET")
    peer_test.body, peer_test.declare = (b" " * (64 * 1024), 17 * 16), False  # 17 MiB of JSON whitespace
    over = federated.fetch(call, 5.0)
    assert over.outcome == "error" and over.detail.startswith("answer_too_large:")
    assert "16,777,216 bytes" in over.detail


# --- what the callers make of a refusal: a named failure, never a crash -------------------


@pytest.fixture
def endpoint(tmp_path):
    started = Endpoint(tmp_path)
    yield started
    started.close()


@pytest.fixture
def peer(team, endpoint):
    return services.peer_create(team=team, name="b", peer_hook_url=endpoint.url, outbound_token=SECRET, scopes=["*"],
                                tls_fingerprint=endpoint.fingerprint).row  # fmt: skip


def test_a_delivery_answered_2xx_with_too_large_a_body_is_a_failed_attempt_retried(team, peer, endpoint):
    endpoint.answers = [(200, {}, "x" * (2 * MiB))]
    make_event(team)

    assert outbox.deliver_peer(peer.pk) == 0

    entry = make_entry()
    assert (entry.status, entry.attempts) == ("pending", 1)
    assert entry.last_error.startswith("answer_too_large: the peer's HTTP 200 answer is over 1,048,576 bytes")
    delivery = Delivery.objects.get()
    assert (delivery.outcome, delivery.error) == ("transient", entry.last_error)
    make_due()
    assert outbox.deliver_peer(peer.pk) == 1  # the next attempt, answered normally, delivers
    assert make_entry().status == "delivered"


def test_a_peer_whose_address_is_no_longer_allowed_is_not_called_and_says_why(team, peer, endpoint, settings):
    make_event(team)
    settings.KITE_PEER_ALLOWED_NETWORKS = ()

    assert outbox.deliver_peer(peer.pk) == 0
    pinged = heartbeat.ping(peer)

    assert endpoint.requests == []
    entry = make_entry()
    assert entry.status == OutboxEntry.Status.DEAD and "127.0.0.1 is a loopback address" in entry.last_error
    assert Delivery.objects.get().outcome == "permanent"
    assert not pinged.ok and "KITE_PEER_ALLOWED_NETWORKS" in pinged.error
