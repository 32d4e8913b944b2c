"""kite.bridge: Django's WSGI app under ASGI, one thread hop per request, driven here as a server would."""

import asyncio
import contextvars
import hashlib
import json
import logging
from pathlib import Path

import django
import pytest
from django.core.handlers.wsgi import WSGIRequest
from django.core.signals import request_finished
from django.core.wsgi import get_wsgi_application
from django.db import connections
from django.test import override_settings

from ingest.models import Event
from kite.bridge import WSGIBridge, environ_for
from tests.factories import SourceFactory

LIMIT = 64
REQUEST_ID = contextvars.ContextVar("request_id", default=None)


class Client:
    """The server's side of one request: hands out `messages`, records what the app sends."""

    def __init__(self, messages=()):
        self.messages = list(messages) or [{"type": "http.request", "body": b""}]
        self.received = 0
        self.sent = []

    async def receive(self):
        self.received += 1
        return self.messages.pop(0) if self.messages else {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append(message)

    def response(self):
        start, *bodies = self.sent
        assert start["type"] == "http.response.start" and bodies[-1].get("more_body", False) is False
        return start["status"], dict(start["headers"]), b"".join(m["body"] for m in bodies)


def scope(method="GET", path="/", query=b"", headers=(), **extra):
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
        "method": method, "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
        "headers": [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
        "client": ("203.0.113.7", 50123), "server": ("kite.test", 8000), **extra,
    }  # fmt: skip


def chunks(*parts: bytes):
    return [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]


def serve(app, request_scope, client=None, *, max_body=LIMIT) -> Client:
    client = client or Client()
    bridge = WSGIBridge(app, threads=2, max_body=max_body)
    try:
        asyncio.run(bridge(request_scope, client.receive, client.send))
    finally:
        bridge.executor.shutdown()
    return client


def echo(environ, start_response):
    """Answers what it saw: the body it read and the environ's strings."""
    seen = {k: v for k, v in environ.items() if isinstance(v, str | bool)}
    seen["body"] = environ["wsgi.input"].read().decode("latin-1")
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(seen).encode()]


def seen(client: Client) -> dict:
    status, _, body = client.response()
    assert status == 200
    return json.loads(body)


class Closing:
    """A streaming body that counts its chunks and remembers being closed."""

    def __init__(self, parts, fail_after=None):
        self.parts, self.fail_after, self.closed = parts, fail_after, False

    def __iter__(self):
        for n, part in enumerate(self.parts):
            if n == self.fail_after:
                raise RuntimeError("broke mid-stream")
            yield part

    def close(self):
        self.closed = True


# --- Requests in ------------------------------------------------------------------------


def test_get_is_answered_with_one_start_and_one_body():
    client = serve(echo, scope())

    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]
    assert client.response()[:2] == (200, {b"content-type": b"application/json"})


def test_a_plain_response_costs_one_trip_to_a_worker_thread_and_none_back(monkeypatch):
    hops = []
    threadsafe = asyncio.run_coroutine_threadsafe
    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", lambda *a: hops.append(a) or threadsafe(*a))
    bridge = WSGIBridge(echo, threads=1, max_body=LIMIT)
    submit = bridge.executor.submit
    trips = []
    bridge.executor.submit = lambda *a: trips.append(a) or submit(*a)
    client = Client(chunks(b"a", b"b"))

    asyncio.run(bridge(scope("POST", headers=[("content-length", "2")]), client.receive, client.send))

    assert (len(trips), len(hops), seen(client)["body"]) == (1, 0, "ab")
    bridge.executor.shutdown()


def test_body_in_several_chunks_reaches_the_app_whole():
    client = serve(echo, scope("POST", headers=[("content-length", "9")]), Client(chunks(b"one", b"two", b"six")))

    assert seen(client)["body"] == "onetwosix"


def test_chunked_body_without_content_length_reaches_the_app_whole():
    client = Client(chunks(b"x" * 40, b"y" * 20))

    serve(echo, scope("POST", headers=[("transfer-encoding", "chunked")]), client)

    assert seen(client)["body"] == "x" * 40 + "y" * 20


def test_body_past_max_body_is_received_only_when_the_app_reads_it():
    received_before_app = []

    def app(environ, start_response):
        received_before_app.append(client.received)
        return echo(environ, start_response)

    client = Client(chunks(b"a" * 40, b"b" * 40, b"c" * 40, b"d" * 40))

    serve(app, scope("POST", headers=[("transfer-encoding", "chunked")]), client)

    assert received_before_app == [2]  # 80 bytes > LIMIT: the bridge stopped reading there
    assert seen(client)["body"] == "a" * 40 + "b" * 40 + "c" * 40 + "d" * 40


def test_declared_length_over_max_body_is_left_unread_for_the_app_to_refuse():
    def refuse(environ, start_response):
        start_response("413 Content Too Large", [])
        return [b""]

    client = serve(refuse, scope("POST", headers=[("content-length", "65")]), Client(chunks(b"x" * 65)))

    assert (client.response()[0], client.received) == (413, 0)


def test_client_gone_before_its_body_is_in_never_runs_the_app():
    ran = []
    client = Client([{"type": "http.request", "body": b"half", "more_body": True}, {"type": "http.disconnect"}])

    serve(lambda environ, start_response: ran.append(1), scope("POST"), client)

    assert (ran, client.sent) == ([], [])


def test_environ_follows_pep_3333():
    request_scope = scope(
        "POST", "/kite/hooks/t/s", query=b"a=1&b=2", root_path="/kite", scheme="https",
        headers=[("content-type", "text/plain"), ("content-length", "2"), ("x-forwarded-proto", "https")],
    )  # fmt: skip

    expected = {
        "REQUEST_METHOD": "POST", "SCRIPT_NAME": "/kite", "PATH_INFO": "/hooks/t/s", "QUERY_STRING": "a=1&b=2",
        "CONTENT_TYPE": "text/plain", "CONTENT_LENGTH": "2", "HTTP_X_FORWARDED_PROTO": "https",
        "SERVER_NAME": "kite.test", "SERVER_PORT": "8000", "REMOTE_ADDR": "203.0.113.7", "REMOTE_PORT": "50123",
        "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "https", "wsgi.multithread": True,
        "wsgi.multiprocess": True, "wsgi.run_once": False, "body": "hi",
    }  # fmt: skip

    environ = seen(serve(echo, request_scope, Client(chunks(b"hi"))))

    assert {name: environ.get(name) for name in expected} == expected
    assert "HTTP_CONTENT_TYPE" not in environ and "HTTP_CONTENT_LENGTH" not in environ


def test_repeated_request_headers_are_joined_with_commas():
    headers = [("x-forwarded-for", "198.51.100.1"), ("Accept", "text/html"), ("x-forwarded-for", "10.0.0.1")]

    environ = seen(serve(echo, scope(headers=headers)))

    assert (environ["HTTP_X_FORWARDED_FOR"], environ["HTTP_ACCEPT"]) == ("198.51.100.1,10.0.0.1", "text/html")


def test_non_ascii_path_and_query_reach_django_as_utf8():
    environ = {}

    def app(env, start_response):
        environ.update(env)
        start_response("204 No Content", [])
        return []

    serve(app, scope(path="/hooks/café", query="q=café&r=%C3%A9".encode()))
    request = WSGIRequest(environ)

    assert (request.path, request.GET["q"], request.GET["r"]) == ("/hooks/café", "café", "é")


def test_the_app_runs_in_the_context_of_the_request():
    async def main(client):
        REQUEST_ID.set("req-1")
        bridge = WSGIBridge(app, threads=1, max_body=LIMIT)
        await bridge(scope(), client.receive, client.send)
        bridge.executor.shutdown()

    def app(environ, start_response):
        start_response("200 OK", [])
        return [REQUEST_ID.get().encode()]

    client = Client()
    asyncio.run(main(client))

    assert client.response()[2] == b"req-1"


# --- Responses out ----------------------------------------------------------------------


def test_response_headers_are_lowercased_latin_1_bytes():
    def app(environ, start_response):
        start_response("201 Created", [("X-Place ", " Zürich"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
        return [b"made"]

    client = serve(app, scope())

    assert client.response()[::2] == (201, b"made")
    assert client.sent[0]["headers"] == [(b"x-place", b"Z\xfcrich"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]


def test_write_callable_output_comes_before_the_returned_body():
    def app(environ, start_response):
        write = start_response("200 OK", [])
        write(b"written, ")
        return [b"returned"]

    assert serve(app, scope()).response()[2] == b"written, returned"


def test_streaming_response_is_sent_chunk_by_chunk_and_closed():
    body = Closing([b"one", b"", b"two"])

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return body

    client = serve(app, scope())

    assert [m.get("body") for m in client.sent] == [None, b"one", b"two", b""]
    assert client.response()[2] == b"onetwo" and body.closed


def test_generator_may_call_start_response_with_its_first_chunk():
    def app(environ, start_response):  # a generator: nothing of it runs until the bridge iterates it
        write = start_response("202 Accepted", [])
        write(b"early ")
        yield b"late"

    assert serve(app, scope()).response() == (202, {}, b"early late")


def test_head_is_answered_with_headers_and_no_body():
    def plain(environ, start_response):
        start_response("200 OK", [("Content-Length", "4")])
        return [b"body"]

    def streaming(environ, start_response):
        start_response("200 OK", [("Content-Length", "8")])
        return Closing([b"body", b"more"])

    for app in (plain, streaming):
        assert serve(app, scope("HEAD")).response() == (200, {b"content-length": b"4" if app is plain else b"8"}, b"")


def test_plain_body_is_closed_after_it_was_read():
    class Body(list):
        closed = False

        def close(self):
            self.closed = True

    body = Body([b"x"])

    def app(environ, start_response):
        start_response("200 OK", [])
        return body

    assert serve(app, scope()).response()[2] == b"x" and body.closed


# --- Failures ---------------------------------------------------------------------------


def test_app_raising_is_kites_json_500_and_logged(caplog):
    def app(environ, start_response):
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="kite.bridge"):
        status, headers, body = serve(app, scope(path="/x")).response()

    assert (status, headers[b"content-type"], json.loads(body)) == (
        500, b"application/json", {"detail": "Internal server error.", "code": "server_error"},
    )  # fmt: skip
    assert "GET /x" in caplog.text and "boom" in caplog.text


def never_starts(environ, start_response):
    yield b"no status"


@pytest.mark.parametrize("app", [lambda environ, start_response: [b"no status"], never_starts])
def test_app_that_never_starts_its_response_is_a_500(app):
    assert serve(app, scope()).response()[0] == 500


def test_body_failing_before_the_first_byte_is_a_500_and_still_closed():
    body = Closing([b"never"], fail_after=0)

    def app(environ, start_response):
        start_response("200 OK", [])
        return body

    assert serve(app, scope()).response()[0] == 500 and body.closed


def test_body_failing_mid_stream_cuts_the_response_short_and_is_closed():
    body = Closing([b"one", b"two"], fail_after=1)

    def app(environ, start_response):
        start_response("200 OK", [])
        return body

    client = Client()
    with pytest.raises(RuntimeError, match="broke mid-stream"):
        serve(app, scope(), client)

    assert [m.get("body") for m in client.sent] == [None, b"one"] and body.closed


# --- Kite's application -----------------------------------------------------------------


@pytest.fixture
def kite_app():
    """Kite's WSGI app behind a bridge with a 64-byte limit; its worker's connection is closed afterwards."""
    bridge = WSGIBridge(get_wsgi_application(), threads=1, max_body=LIMIT)

    def serve_kite(request_scope, client):
        asyncio.run(bridge(request_scope, client.receive, client.send))
        return client

    with override_settings(KITE_MAX_BODY_BYTES=LIMIT):
        yield serve_kite
    bridge.executor.submit(connections.close_all).result()
    bridge.executor.shutdown()


@pytest.fixture
def plain(team):
    return SourceFactory(team=team, name="plain", kind="none")


def assert_refused_413(client: Client):
    status, _, body = client.response()
    body = json.loads(body)
    assert (status, set(body), body["code"]) == (413, {"detail", "code"}, "payload_too_large")
    assert Event.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_webhook_in_chunks_is_stored_and_the_request_finishes(kite_app, team, plain):
    finished = []

    def receiver(**kwargs):
        finished.append(1)

    body = b'{"status": "deployed"}'
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    request_finished.connect(receiver)
    try:
        client = kite_app(scope("POST", f"/hooks/{team.id}/plain", headers=headers), Client(chunks(body[:5], body[5:])))
    finally:
        request_finished.disconnect(receiver)

    assert client.response()[0] == 202 and finished == [1]  # Django's request_finished: connections tidied
    assert Event.objects.get().ce_id == "sha256:" + hashlib.sha256(body).hexdigest()


@pytest.mark.django_db(transaction=True)
def test_chunked_webhook_without_content_length_is_stored(kite_app, team, plain):
    body = b'{"pad": "' + b"x" * 50 + b'"}'  # exactly the limit, in three chunks
    headers = [("content-type", "application/json"), ("transfer-encoding", "chunked")]

    client = Client(chunks(body[:20], body[20:40], body[40:]))

    kite_app(scope("POST", f"/hooks/{team.id}/plain", headers=headers), client)

    assert client.response()[0] == 202 and Event.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_chunked_webhook_over_the_limit_is_kites_413_and_nothing_stored(kite_app, team, plain):
    headers = [("content-type", "application/json"), ("transfer-encoding", "chunked")]
    parts = [b'{"pad": "', b"x" * 40, b"x" * 40, b"x" * 40, b'"}']

    assert_refused_413(kite_app(scope("POST", f"/hooks/{team.id}/plain", headers=headers), Client(chunks(*parts))))


@pytest.mark.django_db(transaction=True)
def test_declared_length_over_the_limit_is_kites_413_before_the_body_is_read(kite_app, team, plain):
    headers = [("content-type", "application/json"), ("content-length", "65")]
    client = Client(chunks(b"{" + b" " * 63 + b"}" + b" "))

    assert_refused_413(kite_app(scope("POST", f"/hooks/{team.id}/plain", headers=headers), client))
    assert client.received == 0


@pytest.mark.django_db(transaction=True)
def test_unknown_path_is_kites_json_404(kite_app):
    status, _, body = kite_app(scope(path="/nope"), Client()).response()

    assert (status, json.loads(body)["code"]) == (404, "not_found")


STATIC = Path(django.__file__).parent / "contrib/admin/static/admin/css/base.css"


@pytest.mark.django_db(transaction=True)
def test_static_file_is_streamed_in_several_chunks(kite_app):
    client = kite_app(scope(path="/static/admin/css/base.css"), Client())

    status, headers, body = client.response()
    assert (status, body) == (200, STATIC.read_bytes())
    assert headers[b"content-length"] == str(len(body)).encode() and len(client.sent) > 3


@pytest.mark.django_db(transaction=True)
def test_head_on_a_static_file_has_its_length_and_no_body(kite_app):
    status, headers, body = kite_app(scope("HEAD", "/static/admin/css/base.css"), Client()).response()

    assert (status, headers[b"content-length"], body) == (200, str(STATIC.stat().st_size).encode(), b"")


def test_header_names_with_underscores_are_dropped_so_they_cannot_pass_for_dashed_ones():
    environ = environ_for(
        {"type": "http", "method": "GET", "path": "/", "query_string": b"", "http_version": "1.1",
         "headers": [(b"x_forwarded_proto", b"https"), (b"x-real", b"1")]},
        None,
    )  # fmt: skip
    assert "HTTP_X_FORWARDED_PROTO" not in environ and environ["HTTP_X_REAL"] == "1"
