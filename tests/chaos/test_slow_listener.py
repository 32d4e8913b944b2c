"""A listener that stops reading, against a live instance (runkite, HTTPS, PostgreSQL + Redis).

A raw WebSocket client connects and then reads nothing while 5,000 events arrive: the server
closes it with 4008 and the cursor to resume from; a `kite listen` of the same team, served by
the same web process, prints every event within seconds of its acceptance; the web process's
memory grows by far less than the events would take; a resume with `after` gets the rest
exactly once. The events come as signed CloudEvents batches from a trusted sender (the peer
path): posted one by one they would take longer than the server waits for a client that does
not read (its keepalive ping goes unanswered after 40 s), so the silent client could not read
its close frame afterwards.
"""

import base64
import json
import os
import secrets
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from federation import signing
from tests.e2e.conftest import instances, listen  # noqa: F401  (fixtures)
from tests.e2e.harness import wait_for

pytestmark = pytest.mark.e2e

EVENTS = 5000
BATCH = 64  # ~0.8 MB a request, under the default KITE_MAX_BODY_BYTES
POSTERS = 3
PAYLOAD_BYTES = 12_000  # random, so per-message deflate cannot shrink it: 5,000 events are ~60 MB of frames
PROMPT_SECONDS = 5.0
# Over the web process's peak RSS for the same load without the silent client: measured 0-5 MB;
# holding what the silent client missed would take some 60 MB.
RSS_GROWTH_LIMIT_KB = 16 * 1024
SENDER = "slow-test-sender"


def uvicorn_pids(kite) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(entry)) == kite.process.pid:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if b"uvicorn" in cmdline.read():
                        found.append(int(entry))
        except OSError:  # gone meanwhile
            continue
    return found


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


class RssPeak:
    """Samples a process's RSS every 50 ms until stopped; `stop()` answers the highest seen."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.stopped = pid, rss_kb(pid), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.stopped.wait(0.05):
            self.peak = max(self.peak, rss_kb(self.pid))

    def stop(self) -> int:
        self.stopped.set()
        self.thread.join()
        return self.peak


def trusted_sender(kite) -> str:
    """A trusted sender of the team whose secret the test holds: it delivers to the `kite` source."""
    token = kite.api("POST", "/api/federation/tokens", json={"label": SENDER}).json()["token"]
    created = kite.api("POST", "/api/federation/trusted-senders", json={"name": SENDER, "inbound_token": token})
    assert created.status_code == 201, created.text
    return token


def deliver(kite, team: str, secret: str, event_ids: list[str]) -> dict[str, float]:
    """Deliver the ids in signed CloudEvents batches from POSTERS threads; id → monotonic time accepted."""
    accepted = {}

    def batch(ids):
        events = [{"specversion": "1.0", "id": event_id, "source": f"kite://{SENDER}/tm_x/load",
                   "type": "com.example.load", "data": base64.b64encode(os.urandom(PAYLOAD_BYTES * 3 // 4)).decode()}
                  for event_id in ids]  # fmt: skip
        body = json.dumps(events).encode()
        headers = signing.sign_headers(secret=secret, msg_id=f"m{secrets.token_hex(6)}", timestamp=int(time.time()),
                                       body=body, sender_id=SENDER, binding=signing.delivery_binding(team))  # fmt: skip
        headers["content-type"] = "application/cloudevents-batch+json"
        response = requests.post(f"{kite.url}/hooks/{team}/kite", data=body, headers=headers, verify=str(kite.cert),
                                 timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text[:300]
        assert {item["result"] for item in response.json()} == {"accepted"}, response.text[:300]
        accepted.update(dict.fromkeys(ids, time.monotonic()))

    with ThreadPoolExecutor(POSTERS) as pool:
        list(pool.map(batch, [event_ids[n : n + BATCH] for n in range(0, len(event_ids), BATCH)]))
    return accepted


def stream_url(kite, after: str) -> str:
    return f"wss://127.0.0.1:{kite.port}/ws/events?source=kite&after={after}"


def silent_client(kite, after: str):
    """A client that reads nothing until told: websockets queues 16 messages and then stops reading
    from the socket (the kernel's buffers fill, then the server's); no keepalive of its own (a ping
    whose answer it cannot read would make it close itself)."""
    return connect(stream_url(kite, after), ssl=ssl.create_default_context(cafile=str(kite.cert)),
                   additional_headers={"Authorization": f"Bearer {kite.admin_key}"}, ping_interval=None,
                   max_size=None, open_timeout=10)  # fmt: skip


def read_until_closed(websocket) -> tuple[list[dict], ConnectionClosed]:
    received = []
    try:
        while True:
            received.append(json.loads(websocket.recv(timeout=30)))
    except ConnectionClosed as closed:
        return received, closed


def read(kite, after: str, count: int) -> list[dict]:
    with connect(stream_url(kite, after), ssl=ssl.create_default_context(cafile=str(kite.cert)), max_size=None,
                 additional_headers={"Authorization": f"Bearer {kite.admin_key}"}) as websocket:  # fmt: skip
        return [json.loads(websocket.recv(timeout=30)) for _ in range(count)]


def wait_printed(listener, expected: list[str], timeout: float) -> list[tuple[str, float]]:
    """(id, monotonic time printed) of every line of `kite listen`, once all of `expected` are
    printed; each line parsed once (5,000 large lines on every poll would starve its readers)."""
    printed, parsed = [], 0

    def done():
        nonlocal parsed
        lines = listener.lines[parsed:]
        parsed += len(lines)
        printed.extend((json.loads(line)["id"], at) for at, line in lines)
        return set(expected) <= {event_id for event_id, _ in printed}

    wait_for(done, timeout, lambda: f"{len(expected)} ids printed; {listener.diagnostics()}", interval=0.2)
    return printed


def test_a_listener_that_stops_reading_is_closed_4008_and_delays_nobody(instances, listen):  # noqa: F811
    # Both listeners in one web process; two malloc arenas instead of one per thread (16 WSGI threads),
    # so that RSS tells what the process holds rather than which thread's arena a request landed in.
    kite = instances.start("slow-listener", extra_env={"KITE_WEB_WORKERS": "1", "MALLOC_ARENA_MAX": "2"})
    team, secret = kite.team_id(), trusted_sender(kite)
    normal = listen(kite, "--source", "kite")
    wait_for(lambda: "connection open" in kite.log_tail, 20, "kite listen to connect")
    # The same load once without the silent client: its peak RSS is what taking and streaming it
    # costs (threads, allocator arenas, request bodies), so what the second round adds is the silent client's.
    (web,) = uvicorn_pids(kite)
    peak = RssPeak(web)
    warm_up = [f"warm-{n}" for n in range(EVENTS)]
    deliver(kite, team, secret, warm_up)
    wait_printed(normal, warm_up, timeout=60)
    rss_before = peak.stop()
    head = kite.api("GET", "/api/events/head").json()["cursor"]

    with silent_client(kite, after=head) as silent:
        given_up = f"listener ('127.0.0.1', {silent.socket.getsockname()[1]}) too slow: closing with 4008"
        peak = RssPeak(web)
        event_ids = [f"load-{n}" for n in range(EVENTS)]
        try:
            accepted = deliver(kite, team, secret, event_ids)
            printed = wait_printed(normal, warm_up + event_ids, timeout=60)
            wait_for(lambda: given_up in kite.log_path.read_text(errors="replace"), 30,
                     "the server to give up on the silent client")  # fmt: skip
        finally:
            rss_peak = peak.stop()
        first, closed = read_until_closed(silent)  # only now does the silent client read

    assert closed.rcvd is not None and closed.rcvd.code == 4008, closed
    assert 0 < len(first) < EVENTS // 2, len(first)
    assert closed.rcvd.reason == f"too slow; resume with after={first[-1]['kitecursor']}"
    rest = read(kite, first[-1]["kitecursor"], EVENTS - len(first))
    got = [event["id"] for event in first + rest]
    assert sorted(got) == sorted(event_ids) and len(set(got)) == EVENTS  # each event exactly once
    # The listener that reads got each event once and promptly while the other one sat stalled.
    arrival = dict(printed)
    assert len(printed) == len(arrival) == len(warm_up) + EVENTS
    assert not [line for line in normal.errors if "4008" in line]
    late = {event_id: round(arrival[event_id] - accepted[event_id], 2) for event_id in event_ids
            if arrival[event_id] - accepted[event_id] > PROMPT_SECONDS}  # fmt: skip
    assert not late, f"{len(late)} events printed over {PROMPT_SECONDS} s after acceptance: {list(late.items())[:5]}"
    assert rss_peak - rss_before < RSS_GROWTH_LIMIT_KB, f"web RSS grew {rss_peak - rss_before} kB"
