#!/usr/bin/env python3
"""A small, fast HTTPS webhook receiver for the benchmarks: answers every POST 200 and counts.

Not a Kite: it verifies no signature and stores nothing. It stands for the endpoint at the
other end of a webhook (a customer's service), so that what a benchmark measures is the
sender. One asyncio process (uvloop when installed), HTTP/1.1 keep-alive, TLS with the
certificate it is given.

- POST <any path>: one event (its body's first `"id"` and `"type"`), or, with a content type
  ending in `cloudevents-batch+json`, a JSON array of CloudEvents answered the way a Kite
  answers a batch (`[{"id", "result": "accepted"}, …]`). Each event is counted under its
  key (`--key type` or `id`): how many, first and last arrival (time.time()), on how many
  distinct paths.
- GET /_stats: those counts as JSON `{"keys": {key: [count, first, last, paths]}, "requests": n}`.
- GET <anything else>: 200 `{}` (a ping from a sender's heartbeat finds a live endpoint).

    .venv/bin/python bench/receiver.py --port 18700 --cert cert.pem --key key.pem --key-by type
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import ssl
import time

_FIRST = {"id": re.compile(rb'"id"\s*:\s*"?([^",}]*)'), "type": re.compile(rb'"type"\s*:\s*"([^"]*)"')}
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Counts:
    def __init__(self, key_by: str):
        self.pattern = _FIRST[key_by]
        self.key_by = key_by
        self.keys: dict[str, list] = {}  # key → [count, first, last, set of paths]
        self.requests = 0

    def note(self, key: str, path: str, at: float) -> None:
        entry = self.keys.get(key)
        if entry is None:
            self.keys[key] = [1, at, at, {path}]
        else:
            entry[0] += 1
            entry[2] = at
            entry[3].add(path)

    def single(self, path: str, body: bytes, at: float) -> None:
        match = self.pattern.search(body)
        self.note(match[1].decode(errors="replace") if match else "", path, at)

    def batch(self, path: str, body: bytes, at: float) -> bytes:
        items = json.loads(body)
        for item in items:
            self.note(str(item.get(self.key_by, "")), path, at)
        return json.dumps([{"id": item.get("id"), "result": "accepted"} for item in items]).encode()

    def as_json(self) -> bytes:
        keys = {key: [c, first, last, len(paths)] for key, (c, first, last, paths) in self.keys.items()}
        return json.dumps({"keys": keys, "requests": self.requests}).encode()


def _answer(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip


class Http(asyncio.Protocol):
    def __init__(self, counts: Counts):
        self.counts, self.buffer = counts, b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            length = 0
            batch = False
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "content-type":
                    batch = "cloudevents-batch" in value
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path = head.split(" ", 2)[:2]
            self.transport.write(self.handle(method, path, body, batch))

    def handle(self, method: str, path: str, body: bytes, batch: bool) -> bytes:
        at = time.time()
        if method != "POST":
            return _answer(self.counts.as_json()) if path.startswith("/_stats") else _OK
        self.counts.requests += 1
        if batch:
            return _answer(self.counts.batch(path, body, at))
        self.counts.single(path, body, at)
        return _OK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--key-by", choices=sorted(_FIRST), default="type")
    args = parser.parse_args()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    counts = Counts(args.key_by)

    async def serve():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Http(counts), args.host, args.port, ssl=context, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        print(f"receiver on https://{args.host}:{args.port}", flush=True)
        async with server:
            await stop.wait()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
