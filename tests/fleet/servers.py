"""Real sockets for the fan-out: this Django app served over TLS on loopback (a second team of
this instance stands in for a peer instance), a black hole that accepts TCP and never answers,
and a port nobody listens on."""

import socket
import ssl
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from django.core.wsgi import get_wsgi_application
from django.db import connections

from kite import tls


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def _closing_connections(app):
    """Each request runs in a thread of its own: close its database connection after it, so the
    test database can be flushed and dropped."""

    def wrapped(environ, start_response):
        try:
            return list(app(environ, start_response))
        finally:
            connections.close_all()

    return wrapped


class KiteOverTls:
    """This process's Django app on https://127.0.0.1:<port> with a self-signed certificate."""

    def __init__(self, directory):
        cert, key = tls.ensure_server_certificate(directory, ["127.0.0.1"])
        self.fingerprint = tls.fingerprint_of_pem(cert.read_bytes())
        self.server = make_server("127.0.0.1", 0, _closing_connections(get_wsgi_application()),
                                  server_class=_ThreadingServer, handler_class=_QuietHandler)  # fmt: skip
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hook_url(self, team_id: str) -> str:
        return f"https://127.0.0.1:{self.port}/hooks/{team_id}/kite"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class BlackHole:
    """Accepts TCP connections and never says a word."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]
        self.held: list[socket.socket] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.held.append(connection)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/hooks/tm_hole/kite"

    def close(self):
        self.closed.set()
        self.socket.close()
        for connection in self.held:
            connection.close()


def closed_port_url() -> str:
    """A loopback port nobody listens on: connection refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"https://127.0.0.1:{port}/hooks/tm_gone/kite"
