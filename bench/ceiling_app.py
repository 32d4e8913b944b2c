"""A minimal ASGI application without Django: the HTTP server's own ceiling in bench/ceiling.py.

bench/ceiling.py serves it with the uvicorn command `manage.py runkite` serves Kite's web with (the
same workers, HTTP implementation, event loop and flags), Kite's application swapped for this one:

- `GET /healthz`: 200;
- `POST /noop`: the body read, 202 and a small JSON body; no database;
- `POST /insert`: the body read, one INSERT into ingest_event of the row bench/scale.py's pgbench
  script inserts (the body as its data), one autocommit statement through psycopg's async API on one
  of CEILING_POOL connections of this process (opened at lifespan start-up, statements prepared on
  first use), then 202.

Environment: CEILING_DATABASE_URL, CEILING_TEAM_ID, CEILING_SOURCE_ID (without them /insert answers
503), CEILING_POOL (connections per process, default 16).
"""

from __future__ import annotations

import asyncio
import os

import psycopg

INSERT = (
    "INSERT INTO ingest_event (team_id, source_id, ce_id, ce_source, ce_type, ce_time, ce_subject, datacontenttype,"
    " data, extensions, agent, received_at) VALUES"
    " (%s, %s, 'asgi_' || md5(random()::text || clock_timestamp()::text), 'asgi-insert',"
    " 'com.stripe.payment_intent.succeeded', now(), '', 'application/json', %s, '{}'::jsonb, '', now())"
)
ANSWERS = {
    200: b'{"ok":true}',
    202: b'{"accepted":true}',
    404: b'{"detail":"not found"}',
    405: b'{"detail":"method not allowed"}',
    500: b'{"detail":"database error"}',
    503: b'{"detail":"no database configured"}',
}


class Pool:
    """Open autocommit connections in a queue: a request takes one, runs its statement, puts it back."""

    def __init__(self, url: str, size: int):
        self.url, self.size = url, size
        self.idle: asyncio.Queue[psycopg.AsyncConnection] = asyncio.Queue()

    async def connect(self) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(self.url, autocommit=True, prepare_threshold=0)

    async def open(self) -> None:
        for _ in range(self.size):
            self.idle.put_nowait(await self.connect())

    async def execute(self, query: str, params) -> None:
        connection = await self.idle.get()
        try:
            if connection.broken:
                connection = await self.connect()
            await connection.execute(query, params)
        finally:
            self.idle.put_nowait(connection)

    async def close(self) -> None:
        while not self.idle.empty():
            await self.idle.get_nowait().close()


pool: Pool | None = None
row: tuple[str, int] = ("", 0)  # team id, source id


async def startup() -> None:
    global pool, row
    url = os.environ.get("CEILING_DATABASE_URL")
    if url and os.environ.get("CEILING_TEAM_ID") and os.environ.get("CEILING_SOURCE_ID"):
        row = (os.environ["CEILING_TEAM_ID"], int(os.environ["CEILING_SOURCE_ID"]))
        pool = Pool(url, int(os.environ.get("CEILING_POOL", "16")))
        await pool.open()


async def shutdown() -> None:
    if pool is not None:
        await pool.close()


async def lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await startup()
            except (psycopg.Error, ValueError) as exc:  # said to uvicorn, which exits
                await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive) -> bytes | None:
    """The request's whole body; None if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def respond(scope, body: bytes) -> int:
    method, path = scope["method"], scope["path"]
    if method == "GET" and path == "/healthz":
        return 200
    if path not in ("/noop", "/insert"):
        return 404
    if method != "POST":
        return 405
    if path == "/noop":
        return 202
    if pool is None:
        return 503
    try:
        await pool.execute(INSERT, (*row, body.decode()))
    except psycopg.Error:
        return 500
    return 202


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    if body is None:
        return
    status = await respond(scope, body)
    answer = ANSWERS[status]
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})
