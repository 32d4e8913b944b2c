"""`kite listen` against a server that completes TLS and then never answers the WebSocket handshake:
websockets' connect ends its handshake at the deadline and then waited for its reading thread,
blocked in a TLS read (the server's session tickets made the socket readable) until the server hung
up. The stream's opening must fail within a second of its deadline, the server still silent."""

import socket
import ssl
import threading
import time

from ingest import cli
from kite import tls


def test_a_server_that_never_answers_the_handshake_fails_the_opening_soon_after_its_deadline(tmp_path):
    cert, key = tls.ensure_server_certificate(tmp_path, ["127.0.0.1"])
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)  # TLS 1.3: two session tickets after the handshake
    listener = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def serve():
        conn, _ = listener.accept()
        tls_conn = server_context.wrap_socket(conn, server_side=True)  # the handshake, then silence
        held.append(tls_conn)
        stop.wait(60)
        tls_conn.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client_context = ssl.create_default_context(cafile=str(cert))
    outcome = []

    def opening():
        started = time.monotonic()
        try:
            cli.open_stream(f"wss://127.0.0.1:{listener.getsockname()[1]}/ws/events", client_context, "kite_ak_x",
                            open_timeout=1)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 — the test reads which
            outcome.append((time.monotonic() - started, exc))

    client = threading.Thread(target=opening, daemon=True)
    client.start()
    client.join(10)
    try:
        assert outcome, "open_stream still waiting 10 s after a 1 s handshake deadline"
        took, exc = outcome[0]
        assert isinstance(exc, TimeoutError | OSError), repr(exc)
        assert took < 3.5, took
        assert held and not stop.is_set()  # the server never hung up: the opening ended on its own
    finally:
        stop.set()
        listener.close()
