"""A Celery worker SIGKILLed mid-delivery, between two live instances (runkite, HTTPS, PostgreSQL + Redis).

B is frozen (SIGSTOP) so that A's deliveries hang in the middle; 20 entries are claimed by one
worker of A at once; the worker processes of A holding a connection to B are killed; B is thawed
at once. The entries the dead worker had
claimed are delivered within seconds (its lease is short and was renewed only while it lived;
its kick flag lapses as fast), each stored once at B, each recorded delivered once at A, none dead.
"""

import os
import secrets
import signal
import time

import psycopg
import pytest

from tests.e2e.conftest import instances  # noqa: F401  (fixture)
from tests.e2e.harness import wait_for

pytestmark = pytest.mark.e2e

EVENTS = 20
RECOVERY_SECONDS = 10


def federate(a, b) -> dict:
    """A sends to B the getting-started way: B's token, A's peer row for B, B trusts A."""
    token = b.api("POST", "/api/federation/tokens", json={"label": "from-a"}).json()["token"]
    identity = b.api("GET", "/api/federation/identity").json()
    peer = a.api("POST", "/api/federation/peers", json={
        "name": "b", "peer_hook_url": identity["hook_url"], "tls_fingerprint": identity["tls_fingerprint"],
        "outbound_token": token, "scopes": ["*"],
    })  # fmt: skip
    assert peer.status_code == 201, peer.text
    trusted = b.api("POST", "/api/federation/trusted-senders", json={"name": "a", "inbound_token": token})
    assert trusted.status_code == 201, trusted.text
    return peer.json()


def outbox(kite, peer_id: int, status: str) -> list[dict]:
    return kite.api("GET", f"/api/federation/peers/{peer_id}/outbox", params={"status": status}).json()["results"]


def stored_ids(kite) -> list[str]:
    found, after = [], "0-0"
    while page := kite.api("GET", "/api/events", params={"source": "kite", "after": after, "limit": 1000}).json():
        if not page["results"]:
            return found
        found += [event["id"] for event in page["results"]]
        after = page["next"]
    return found


def post(kite, team_id: str, event_id: str) -> None:
    response = kite.api("POST", f"/hooks/{team_id}/plain", json={"id": event_id, "type": "com.stripe.charge.x"})
    assert response.status_code == 202, response.text


def processes_connected_to(kite, port: int) -> list[int]:
    """The processes of `kite` holding a TCP connection to 127.0.0.1:`port`: who is delivering there."""
    found = []
    for pid in (int(entry) for entry in os.listdir("/proc") if entry.isdigit()):
        try:
            if os.getpgid(pid) != kite.process.pid or pid == kite.process.pid:
                continue
            inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            with open(f"/proc/{pid}/net/tcp") as table:
                rows = [line.split() for line in table.readlines()[1:]]
        except (OSError, ProcessLookupError):
            continue
        if any(row[2] == f"0100007F:{port:04X}" and f"socket:[{row[9]}]" in inodes for row in rows):
            found.append(pid)
    return found


def set_paused(kite, peer_id: int, paused: str) -> None:
    with psycopg.connect(kite.database_url, autocommit=True) as connection:
        connection.execute("UPDATE federation_peer SET paused = %s WHERE id = %s", (paused, peer_id))


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as raw:
        return raw.read().replace(b"\0", b" ").decode()


def test_a_worker_killed_mid_delivery_has_its_entries_delivered_within_seconds_none_twice_none_dead(instances):  # noqa: F811
    a, b = instances.start("crash-a"), instances.start("crash-b")
    a.create_source("plain", "none")
    peer, team_a = federate(a, b), a.team_id()
    warm = f"warm_{secrets.token_hex(3)}"
    post(a, team_a, warm)
    wait_for(lambda: warm in stored_ids(b), 15, "a first delivery to B")

    os.killpg(b.process.pid, signal.SIGSTOP)  # B takes connections (the kernel does) and answers nothing
    try:
        # Queued while the peer is paused, then claimed by one worker at once when it resumes.
        set_paused(a, peer["id"], "down")
        sent = [f"evt_{n}_{secrets.token_hex(3)}" for n in range(EVENTS)]
        for event_id in sent:
            post(a, team_a, event_id)
        set_paused(a, peer["id"], "")
        wait_for(lambda: len(outbox(a, peer["id"], "in_flight")) == EVENTS, 10, "A's worker to claim them all")
        # The worker holding the claim (A's web process keeps an idle connection from the warm-up,
        # which it delivered itself: it is not the one to kill).
        delivering = wait_for(lambda: [pid for pid in processes_connected_to(a, b.port) if "celery" in cmdline(pid)],
                              10, "A's worker mid-delivery to B")  # fmt: skip
        for pid in delivering:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        os.killpg(b.process.pid, signal.SIGCONT)

    def all_delivered() -> bool:
        return {entry["event_id"] for entry in outbox(a, peer["id"], "delivered")} >= set(sent)

    wait_for(all_delivered, RECOVERY_SECONDS, lambda: f"every entry delivered {RECOVERY_SECONDS} s after the kill; "
             f"A's outbox now: in_flight={outbox(a, peer['id'], 'in_flight')} "
             f"pending={outbox(a, peer['id'], 'pending')}\n{a.log_tail}")  # fmt: skip
    recovered_in = time.monotonic() - killed_at
    at_b = stored_ids(b)
    assert sorted(i for i in at_b if i in sent) == sorted(sent), "each event stored exactly once at B"
    assert outbox(a, peer["id"], "dead") == []
    with psycopg.connect(a.database_url) as connection:
        twice = connection.execute(
            "SELECT entry_id, count(*) FROM federation_delivery WHERE outcome = 'delivered' GROUP BY entry_id"
            " HAVING count(*) > 1"
        ).fetchall()
    assert twice == [], "an entry recorded delivered twice: two workers delivered it"
    print(f"all {EVENTS} entries, in flight at the kill, delivered {recovered_in:.1f} s after it")
