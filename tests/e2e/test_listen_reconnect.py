"""`kite listen` against WebSocket servers that misbehave the way restarts and proxies do."""

import json
import socket
import subprocess
import threading

import pytest
from websockets.sync.server import serve

from tests.e2e.harness import KITE_CLI

pytestmark = pytest.mark.e2e


def event(n: int) -> str:
    return json.dumps(
        {"specversion": "1.0", "id": f"e{n}", "source": "s", "type": "t", "kitecursor": f"0-{n}", "data": {}}
    )


def run_listen(handler, process_request=None) -> subprocess.CompletedProcess:
    with serve(handler, "127.0.0.1", 0, process_request=process_request) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        try:
            return subprocess.run(
                [str(KITE_CLI), "listen", "--instance", f"http://127.0.0.1:{port}", "--api-key", "k", "--after", "0-0"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        finally:
            server.shutdown()


def printed_ids(result) -> list[str]:
    return [json.loads(line)["id"] for line in result.stdout.splitlines()]


def test_listen_resumes_after_a_normal_closure_and_stops_on_a_refusal():
    requested = []

    def handler(websocket):
        requested.append(websocket.request.path)
        n = len(requested)
        websocket.send(event(n))
        websocket.close(1001 if n == 1 else 4401, "going away" if n == 1 else "key revoked")

    result = run_listen(handler)

    assert printed_ids(result) == ["e1", "e2"]
    assert requested[1].endswith("after=0-1")  # resumed after the last printed event
    assert result.returncode == 2, result.stderr
    assert "4401" in result.stderr


def test_listen_retries_when_the_server_hangs_up_during_the_handshake():
    handshakes = []

    def hang_up_on_the_first(connection, request):
        handshakes.append(request.path)
        if len(handshakes) == 1:
            connection.socket.shutdown(socket.SHUT_RDWR)

    def handler(websocket):
        websocket.send(event(1))
        websocket.close(4401, "done")

    result = run_listen(handler, process_request=hang_up_on_the_first)

    assert printed_ids(result) == ["e1"], result.stderr
    assert len(handshakes) == 2
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
