"""A peer that answers with 64 MiB, against a live instance (runkite over HTTPS on loopback).

The "peer" is an HTTPS server of this test on 127.0.0.1 (self-signed, pinned by the instance): it
answers Ping, the fleet call and event deliveries with 64 MiB, once with Content-Length and once
chunked (no length up front). The instance must report a named failure (`answer_too_large`) and
its web processes must not grow: their VmRSS, summed over uvicorn and its workers, is read from
/proc before and after.
"""

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kite import tls
from tests.e2e.conftest import Instances
from tests.e2e.harness import wait_for

pytestmark = pytest.mark.e2e

HUGE_PIECE, HUGE_PIECES = b" " * (64 * 1024), 1024  # 64 MiB of JSON whitespace, never held by the server
GROWTH_ALLOWED_KIB = 8 * 1024
# Slow shared CI cores must not turn a 16 MiB read into a timeout: the limit is what is tested.
ROOMY = {"KITE_FLEET_PEER_TIMEOUT_SECONDS": "15", "KITE_FLEET_DEADLINE_SECONDS": "16"}


class Flood:
    """HTTPS peer on 127.0.0.1: answers every request with a small JSON body, or with 64 MiB when
    `huge` (with Content-Length when `declare`, else chunked). Counts the requests it got."""

    def __init__(self, directory: Path):
        cert, key = tls.ensure_server_certificate(directory, ["127.0.0.1"])
        self.fingerprint = tls.fingerprint_of_pem(cert.read_bytes())
        self.huge, self.declare, self.requests = False, True, []
        flood = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                flood.requests.append((self.command, self.path))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                try:
                    if not flood.huge:
                        self._small()
                    elif flood.declare:
                        self.send_header("Content-Length", str(len(HUGE_PIECE) * HUGE_PIECES))
                        self.end_headers()
                        for _ in range(HUGE_PIECES):
                            self.wfile.write(HUGE_PIECE)
                    else:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        for _ in range(HUGE_PIECES):
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(HUGE_PIECE), HUGE_PIECE))
                        self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    self.close_connection = True  # the instance stopped reading: as it should

            def _small(self):
                body = json.dumps({"results": []} if "fleet" in self.path else {"ok": True}).encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.hook_url = f"https://127.0.0.1:{self.server.server_address[1]}/hooks/tm_flood/kite"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    started, flood = Instances(tmp_path_factory), Flood(tmp_path_factory.mktemp("flood"))
    try:
        kite = started.start("bounded", extra_env=ROOMY)
        made = kite.api("POST", "/api/federation/peers", json={
            "name": "flood", "peer_hook_url": flood.hook_url, "tls_fingerprint": flood.fingerprint, "scopes": ["*"]})
        assert made.status_code == 201, made.text
        peer_id = made.json()["id"]
        # A grant it "gave" us, so that the fleet list asks it.
        stored = kite.api("PUT", f"/api/fleet/peers/{peer_id}/remote-grant", json={"token": "fg-1." + "h" * 43})
        assert stored.status_code == 200, stored.text
        yield kite, flood, peer_id
    finally:
        flood.close()
        started.close()


def _ping(kite, peer_id: int) -> dict:
    answer = kite.api("POST", f"/api/federation/peers/{peer_id}/ping")
    assert answer.status_code == 200, answer.text
    return answer.json()


def _fleet_entry(kite) -> dict:
    answer = kite.api("GET", "/api/fleet/agents", params={"federation": "true"})
    assert answer.status_code == 200, answer.text
    return {entry["name"]: entry for entry in answer.json()["peers"]}["flood"]


def _web_rss_kib(kite) -> int:
    """VmRSS of uvicorn and every process under it, in the runkite process group."""
    group: dict[int, tuple[int, bytes]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == kite.process.pid:
            group[int(entry.name)] = (int(fields[1]), command)
    web = {pid for pid, (_, command) in group.items() if b"uvicorn" in command}
    assert web, f"no uvicorn process in the group of {kite.process.pid}: {group}"
    while True:
        children = {pid for pid, (parent, _) in group.items() if parent in web} - web
        if not children:
            break
        web |= children
    total = 0
    for pid in web:
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    return total


def test_ping_and_fleet_answered_with_64_mib_are_named_failures_and_the_web_does_not_grow(setup):
    kite, flood, peer_id = setup
    for _ in range(6):  # warm both web workers: their pools, imports and first allocations
        assert _ping(kite, peer_id)["ok"] is True
        assert _fleet_entry(kite)["outcome"] == "ok"
    before = _web_rss_kib(kite)

    flood.huge = True
    for declare in (True, False, True, False):
        flood.declare = declare
        pinged = _ping(kite, peer_id)
        assert (pinged["ok"], pinged["status_code"]) == (False, None), pinged
        assert pinged["error"].startswith("answer_too_large: the peer's HTTP 200 answer is over 1,048,576 bytes")
        fleet = _fleet_entry(kite)
        assert fleet["outcome"] == "error", fleet
        assert fleet["detail"].startswith("answer_too_large: the peer's HTTP 200 answer is over 16,777,216 bytes")
    grown = _web_rss_kib(kite) - before

    assert grown < GROWTH_ALLOWED_KIB, f"the web processes grew by {grown} KiB reading 8 answers of 64 MiB"
    # Still a working peer for the instance once it answers sensibly again (the connections were closed).
    flood.huge = False
    assert _ping(kite, peer_id)["ok"] is True


def test_a_delivery_answered_with_64_mib_is_a_failed_attempt_named_and_the_worker_lives_on(setup):
    kite, flood, peer_id = setup
    flood.huge, flood.declare = True, False
    created = kite.api("POST", "/api/sources", json={"name": "plain", "kind": "none"})
    assert created.status_code == 201, created.text
    kite.post_plain(kite.team_id(), "plain", "flooded-1")

    def failed_attempts():
        rows = kite.api("GET", f"/api/federation/peers/{peer_id}/deliveries").json()["results"]
        return [row for row in rows if row["outcome"] != "delivered"]

    attempt = wait_for(failed_attempts, 30, "a failed delivery attempt to the flood peer")[0]
    assert attempt["outcome"] == "transient" and attempt["status_code"] is None, attempt
    assert attempt["error"].startswith("answer_too_large: the peer's HTTP 200 answer is over 1,048,576 bytes")
    pending = kite.api("GET", f"/api/federation/peers/{peer_id}/outbox", params={"status": "pending"}).json()
    assert len(pending["results"]) == 1  # kept for the next attempt, not dead
    # The worker survived: once the peer answers sensibly, the retry delivers.
    flood.huge = False
    wait_for(lambda: not kite.api("GET", f"/api/federation/peers/{peer_id}/outbox",
                                  params={"status": "pending"}).json()["results"], 30, "the retry to deliver")  # fmt: skip
    assert kite.process.poll() is None
