"""A listener that stops reading: closed 4008 with the cursor to resume from, nobody else delayed.

An ASGI server sends with flow control: once its buffer for a client that does not read is full,
each further send waits. `Stalled` plays that server in front of such a client: the first
`takes` bytes pass (what the client and the buffers held), then sends wait until the client
reads again. The consumer, Redis channel layer and PostgreSQL are the real ones.
"""

import asyncio
import json
import threading
import time

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from websockets.sync.server import serve

from ingest import cli, consumers
from ingest.models import Event
from kite.asgi import application
from tests.ingest.test_ws import async_test, communicator_for, hook, ids, listening, receive_events

pytestmark = pytest.mark.django_db(transaction=True)

PADDING = "x" * 1000  # ~1.1 KB an event on the wire
STORED = 120
TAKES = 16 * 1024


@pytest.fixture(autouse=True)
def quick_limits(monkeypatch):
    monkeypatch.setattr(consumers, "IDLE_POLL_SECONDS", 600.0)  # an event that arrives at all was pushed
    monkeypatch.setattr(consumers, "SLOW_LISTENER_SECONDS", 0.5)
    monkeypatch.setattr(consumers, "CLOSE_WAIT_SECONDS", 1.0)


class Stalled:
    """Flow control in front of a client that reads `takes` bytes, then nothing until `read_again`."""

    def __init__(self, takes: int):
        self.room = takes
        self.reading = asyncio.Event()
        self.waited = 0  # sends that had to wait

    def around(self, app):
        async def server(scope, receive, send):
            async def flow_controlled(message):
                if message["type"] in ("websocket.send", "websocket.close") and not self.reading.is_set():
                    if self.room <= 0:
                        self.waited += 1
                        await self.reading.wait()
                    self.room -= len(message.get("text") or "")
                await send(message)

            return await app(scope, receive, flow_controlled)

        return server

    def read_again(self) -> None:
        self.reading.set()


def stalled_listener(api_key: str, query: str, stalled: Stalled) -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {api_key}".encode())]
    return WebsocketCommunicator(stalled.around(application), f"/ws/events{query}", headers=headers)


@sync_to_async
def store(team, source: str, count: int, prefix: str) -> list[str]:
    posted = [f"{prefix}-{n}" for n in range(count)]
    for event_id in posted:
        hook(team, source, {"id": event_id, "type": "com.example.thing", "padding": PADDING})
    return posted


@sync_to_async
def stored_ids(team) -> list[str]:
    return list(Event.objects.filter(team=team).order_by("txid", "id").values_list("ce_id", flat=True))


async def read_until_closed(communicator, timeout: float = 10.0) -> tuple[list[dict], dict]:
    """Everything the server sent, then its close message."""
    events = []
    while True:
        message = await communicator.receive_output(timeout)
        if message["type"] == "websocket.close":
            return events, message
        events.append(json.loads(message["text"]))


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
def shop(team):
    from tests.factories import SourceFactory

    return SourceFactory(team=team, name="shop", kind="none").name


@async_test
async def test_a_listener_that_stops_reading_is_closed_4008_and_resumes_from_the_cursor_exactly_once(
    team, api_key, shop
):
    posted = await store(team, shop, STORED, "backlog")
    stalled = Stalled(TAKES)
    slow = stalled_listener(api_key, "?after=0", stalled)
    assert (await slow.connect(timeout=5))[0]
    # The consumer gives up on the send that waits, and its close frame waits in turn...
    await wait_until(lambda: stalled.waited == 2, 10, "the stream to stall, then close")
    stalled.read_again()  # ...until the client reads what was buffered
    first, close = await read_until_closed(slow)
    await slow.disconnect(close["code"])

    assert close["code"] == consumers.TOO_SLOW == 4008
    assert 0 < len(first) < STORED, "the stream stopped where the client stopped reading"
    assert ids(first) == posted[: len(first)]
    assert close["reason"] == f"too slow; resume with after={first[-1]['kitecursor']}"
    resumed = communicator_for(api_key, f"?after={first[-1]['kitecursor']}")
    assert (await resumed.connect(timeout=5))[0]
    rest = await receive_events(resumed, STORED - len(first))
    await resumed.disconnect()
    assert ids(first + rest) == posted  # each event once, in order
    assert await stored_ids(team) == posted  # the store is untouched by any of it


@async_test
async def test_a_listener_that_never_reads_again_is_dropped_without_the_close_frame(team, api_key, shop):
    await store(team, shop, STORED, "backlog")
    stalled = Stalled(TAKES)
    slow = stalled_listener(api_key, "?after=0", stalled)
    assert (await slow.connect(timeout=5))[0]

    limit = consumers.SLOW_LISTENER_SECONDS + consumers.CLOSE_WAIT_SECONDS + 5
    await wait_until(lambda: slow.future.done(), limit, "the consumer to end the connection")

    assert slow.future.exception() is None  # ended cleanly (StopConsumer), no traceback
    assert stalled.waited == 2  # the event it gave up on, then the close frame: nothing after
    sent = []
    while not slow.output_queue.empty():
        sent.append(slow.output_queue.get_nowait()["type"])
    # Only events, fewer than were stored, and no close frame: it was dropped unread.
    assert set(sent) == {"websocket.send"} and len(sent) < STORED
    assert len(await stored_ids(team)) == STORED


@async_test
async def test_a_stalled_listener_does_not_delay_another_listener_of_the_team(team, api_key, shop):
    await store(team, shop, STORED, "backlog")
    stalled = Stalled(TAKES)
    slow = stalled_listener(api_key, "?after=0", stalled)
    assert (await slow.connect(timeout=5))[0]
    await wait_until(lambda: stalled.waited, 10, "the slow stream to stall")
    fast = communicator_for(api_key)
    assert (await fast.connect(timeout=5))[0]

    delays = []
    for n in range(20):
        started = time.monotonic()
        await store(team, shop, 1, f"live-{n}")
        (event,) = await receive_events(fast, 1)
        delays.append(time.monotonic() - started)
        assert event["id"] == f"live-{n}-0"
    await fast.disconnect()

    assert stalled.waited >= 1 and not stalled.reading.is_set()  # the slow one stayed stalled throughout
    assert max(delays) < 2.0, delays
    await slow.disconnect()


@async_test
async def test_a_stream_reads_the_store_in_batches_of_about_a_megabyte(team, api_key, shop, monkeypatch):
    """What a stream holds while a slow client reads is one batch: bounded in bytes, not only in events."""
    large = "y" * 100_000
    posted = [f"large-{n}" for n in range(40)]
    for event_id in posted:
        await sync_to_async(hook)(team, shop, {"id": event_id, "type": "com.example.thing", "padding": large})
    limits, read = [], consumers._read

    async def recorded(**query):
        limits.append(query["limit"])
        return await read(**query)

    monkeypatch.setattr(consumers, "_read", recorded)
    async with listening(api_key, "?after=0") as listener:
        assert ids(await receive_events(listener, len(posted))) == posted

    per_megabyte = consumers.BATCH_BYTES // 100_000
    assert limits[0] == consumers.FIRST_BATCH and set(limits[1:]) == {per_megabyte}, limits


@async_test
async def test_an_idle_stream_outlives_the_channel_layers_blocking_read(team, api_key, shop):
    """Redis answers a listener channel's BZPOPMIN after 5 s when nothing came; a read timeout of
    the same 5 s (redis-py's default) raced it and ended idle streams with a traceback."""
    async with listening(api_key) as idle:
        await asyncio.sleep(get_channel_layer().brpop_timeout + 2)
        assert not idle.future.done(), idle.future.exception()
        await store(team, shop, 1, "after-idle")
        assert ids(await receive_events(idle, 1)) == ["after-idle-0"]


# --- kite listen ----------------------------------------------------------------------------------


def _event(n: int) -> str:
    return json.dumps({"specversion": "1.0", "id": f"e{n}", "source": "s", "type": "t", "kitecursor": f"0-{n}",
                       "data": {}})  # fmt: skip


def test_kite_listen_resumes_at_once_after_a_4008_from_its_last_printed_cursor():
    requested = []

    def handler(websocket):
        requested.append((time.monotonic(), websocket.request.path))
        if len(requested) == 1:
            for n in (1, 2, 3):
                websocket.send(_event(n))
            websocket.close(4008, "too slow; resume with after=0-3")
        else:
            websocket.send(_event(4))
            websocket.close(4401, "API key revoked")  # ends the test: a refusal is final

    out, err = _Lines(), _Lines()
    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        args = cli.build_parser().parse_args(
            ["listen", "--instance", f"http://127.0.0.1:{port}", "--api-key", "k", "--after", "0-0",
             "--max-retries", "1"]  # fmt: skip
        )
        with pytest.raises(cli.Fatal, match="4401"):
            cli.listen(args, out=out, err=err)
        server.shutdown()

    assert [json.loads(line)["id"] for line in out.lines] == ["e1", "e2", "e3", "e4"]
    assert requested[1][1].endswith("after=0-3")
    assert requested[1][0] - requested[0][0] < 0.4, "reconnected at once, not after a backoff"
    assert any("4008" in line and "resuming after 0-3" in line for line in err.lines), err.lines
    assert not any("retrying" in line for line in err.lines), err.lines


class _Lines:
    def __init__(self):
        self.lines = []

    def write(self, text: str) -> None:
        self.lines += [line for line in text.splitlines() if line]

    def flush(self) -> None:
        pass
