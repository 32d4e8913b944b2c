"""Django's WSGI app under ASGI with one thread hop per request.

The body (up to `max_body`) is read on the event loop before the app runs; the
app runs in a thread; a plain response goes back to the loop whole and is sent
from there. Only a streaming response (FileResponse from WhiteNoise,
StreamingHttpResponse) hops to the loop once per chunk. a2wsgi, which served
HTTP before, hops for the body, the response start, each chunk and the end; the
one-hop experiment (then a patch in bench/experiment.py) served +43 % Stripe webhooks/s
in bench/RESULTS.md's 18:45 A/B.

A body larger than `max_body` is left to the app to refuse: what was not read
up front stays readable from `wsgi.input` (a2wsgi's `Body`, fed from the loop
on demand), so Django and ingest's `_read_body` answer 413 exactly as before.
"""

import asyncio
import contextvars
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

from a2wsgi.wsgi import Body

log = logging.getLogger(__name__)

# Kite's one error shape (kite.errors.handler500), for a failure Django did not turn into a response.
_SERVER_ERROR = b'{"detail": "Internal server error.", "code": "server_error"}'
_SERVER_ERROR_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_SERVER_ERROR))]


class WSGIBridge:
    def __init__(self, app, *, threads: int, max_body: int):
        self.app = app
        self.max_body = max_body
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="WSGI")
        # Set by a serving process (kite.asgi): a coroutine (scope, body bytes) that may answer a
        # request whose whole body is in, on the event loop: (status, headers, body), or None for the app.
        self.front = None

    async def __call__(self, scope, receive, send):
        loop = asyncio.get_running_loop()
        body = await self._read_body(scope, receive, loop)
        if body is None:
            return  # the client left before its body was in: nobody to answer
        if self.front is not None and not body._has_more:
            answer = await self.front(scope, bytes(body.buffer))
            if answer is not None:
                status, headers, content = answer
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": content})
                return
        response = _Response(loop, send, head=scope["method"] == "HEAD")
        run = contextvars.copy_context().run
        try:
            await loop.run_in_executor(self.executor, run, self._run, environ_for(scope, body), response)
        except Exception:
            if response.sent:
                raise  # the status line is out: let the server cut the connection short
            log.exception("%s %s failed outside Django's error handling", scope["method"], scope["path"])
            response.status, response.headers, response.chunks = 500, _SERVER_ERROR_HEADERS, [_SERVER_ERROR]
        if not response.sent:
            await send({"type": "http.response.start", "status": response.status, "headers": response.headers})
            await send({"type": "http.response.body", "body": b"" if response.head else b"".join(response.chunks)})

    async def _read_body(self, scope, receive, loop) -> Body | None:
        body = Body(loop, receive)
        if _declared_length(scope) > self.max_body:
            # Refused unread, as before: the client is not even sent `100 Continue`.
            return body
        chunks, size, more = [], 0, True
        while more and size <= self.max_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        body.buffer.extend(b"".join(chunks))
        body._has_more = more  # the rest, if any, is received when the app reads it
        return body

    def _run(self, environ, response: "_Response") -> None:
        """In a worker thread: run the app; keep a plain response for the loop, stream the others."""
        iterable = self.app(environ, response.start_response)
        try:
            if isinstance(iterable, (list, tuple)) or getattr(iterable, "streaming", None) is False:
                response.chunks.extend(iterable)
                response.check_started()
                return
            for chunk in iterable:
                response.stream(chunk)
            response.stream(b"", more=False)
        finally:
            if hasattr(iterable, "close"):
                iterable.close()  # Django's request_finished: database connections go back


class _Response:
    """One response as the WSGI app builds it; `sent` once its start went out from the worker thread."""

    def __init__(self, loop, send, *, head: bool):
        self.loop, self.send, self.head = loop, send, head
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []  # what write() and a plain iterable produced, not yet sent
        self.sent = False

    def start_response(self, status: str, headers, exc_info=None):
        if exc_info is not None and self.sent:
            raise exc_info[1].with_traceback(exc_info[2])  # PEP 3333: too late to change the status
        self.status = int(status.split(" ", 1)[0])
        self.headers = [(n.strip().encode("latin-1").lower(), v.strip().encode("latin-1")) for n, v in headers]
        return self.chunks.append  # write(): buffered with the body, sent before the next chunk

    def check_started(self) -> None:
        if self.status is None:
            raise RuntimeError("the WSGI app did not call start_response")

    def stream(self, chunk: bytes, *, more: bool = True) -> None:
        if not self.sent:  # a generator may call start_response as late as its first chunk
            self.check_started()
            self.sent = True
            self._hop({"type": "http.response.start", "status": self.status, "headers": self.headers})
        self.chunks.append(chunk)
        body, self.chunks = b"".join(self.chunks), []
        if (body and not self.head) or not more:
            self._hop({"type": "http.response.body", "body": b"" if self.head else body, "more_body": more})

    def _hop(self, message) -> None:
        asyncio.run_coroutine_threadsafe(self.send(message), self.loop).result()


def _declared_length(scope) -> int:
    value = next((v for n, v in scope["headers"] if n == b"content-length"), b"")
    return int(value) if value.isdigit() else 0  # not a number: the app says so (400)


def environ_for(scope, body) -> dict:
    """PEP 3333 environ for an ASGI HTTP scope; strings are latin-1 "bytes as str" throughout."""
    script_name = scope.get("root_path", "").encode().decode("latin-1")
    path = scope["path"].encode().decode("latin-1")  # percent-decoded by the server, as PATH_INFO must be
    server_name, server_port = scope.get("server") or ("localhost", 80)
    environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": script_name,
        "PATH_INFO": path.removeprefix(script_name),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": server_name,
        "SERVER_PORT": str(server_port or 0),
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),  # from a trusted proxy's X-Forwarded-Proto (uvicorn)
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if scope.get("client"):
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = scope["client"][0], str(scope["client"][1])
    for name, value in scope["headers"]:
        if b"_" in name:
            continue  # X_Forwarded_Proto must not pass for X-Forwarded-Proto (as gunicorn and runserver do)
        key = name.decode("latin-1").upper().replace("-", "_")
        if name not in (b"content-type", b"content-length"):
            key = f"HTTP_{key}"
        value = value.decode("latin-1")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ
