"""A peer whose clock is off by more than the signature tolerance, between real instances
(README "Identity certificates (the second factor)", its clock factor): each side refuses the other's signed requests as `stale_timestamp`,
and Ping names the clock as the failing factor.

B runs under Debian's libfaketime (LD_PRELOAD), its clock 10 minutes behind A's and C's.
"""

import re
import secrets
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import psycopg
import pytest
import requests

from federation.signing import TOLERANCE_SECONDS
from tests.e2e.harness import Kite

pytestmark = pytest.mark.e2e

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")  # Debian package libfaketime
SKEW_SECONDS = -600
# Monotonic clocks are shifted too: with FAKETIME_DONT_FAKE_MONOTONIC=1, libfaketime 0.9.10 makes
# Python 3.11's time.sleep() fail with EINVAL (wolfcw/libfaketime#426) and runkite exits at once.
SKEWED_CLOCK = {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"{SKEW_SECONDS:+d}"}


def clock_offset(kite: Kite) -> float:
    """How far the instance's clock is from ours, by its HTTP Date header (whole seconds)."""
    response = requests.get(f"{kite.url}/healthz", verify=str(kite.cert), timeout=5)
    return parsedate_to_datetime(response.headers["Date"]).timestamp() - time.time()


def peer(sender: Kite, receiver: Kite, name: str) -> int:
    """Manual peering, one way, with the right secret: the receiver's token, the sender's peer
    (its URL and pinned TLS fingerprint), the receiver trusting the sender. The sender's peer id."""
    token = receiver.api("POST", "/api/federation/tokens", json={"label": f"from-{name}"}).json()["token"]
    identity = receiver.api("GET", "/api/federation/identity").json()
    created = sender.api("POST", "/api/federation/peers", json={
        "name": name, "peer_hook_url": identity["hook_url"], "tls_fingerprint": identity["tls_fingerprint"],
        "scopes": ["*"], "outbound_token": token,
    })  # fmt: skip
    assert created.status_code == 201, created.text
    trusted = receiver.api("POST", "/api/federation/trusted-senders",
                           json={"name": f"{name}-sender-{secrets.token_hex(2)}", "inbound_token": token})  # fmt: skip
    assert trusted.status_code == 201, trusted.text
    return created.json()["id"]


def ping(kite: Kite, peer_id: int) -> dict:
    response = kite.api("POST", f"/api/federation/peers/{peer_id}/ping")
    assert response.status_code == 200, response.text
    return response.json()


def refused_offset(pinged: dict) -> int:
    """The offset the refusing side measured, from its stale_timestamp detail carried in Ping's error."""
    found = re.search(r"webhook-timestamp is ([+-]\d+) s from this server's clock", pinged["error"])
    assert found, pinged
    return int(found.group(1))


def test_a_clock_skewed_peer_is_refused_both_ways_and_ping_names_the_clock(instances):
    assert LIBFAKETIME.exists(), "Debian's libfaketime is not installed: apt-get install faketime (make test does)"
    assert abs(SKEW_SECONDS) > TOLERANCE_SECONDS
    # A last, so stopped first at teardown: its pooled keep-alive connections to B and C go with it,
    # rather than hold each of their TLS servers in its 5 s graceful shutdown.
    b = instances.start("clock-b", extra_env=SKEWED_CLOCK)
    c, a = instances.start("clock-c"), instances.start("clock-a")
    assert abs(clock_offset(b) - SKEW_SECONDS) <= 2 and abs(clock_offset(a)) <= 2  # libfaketime took hold
    a_to_b, b_to_a, a_to_c = peer(a, b, "b"), peer(b, a, "a"), peer(a, c, "c")

    # Control: the same manual peering between two true clocks pings fine, every factor ok.
    control = ping(a, a_to_c)
    assert control["ok"], control
    assert control["factors"] == {"tls": "ok", "certificate": "not_configured", "secret": "ok", "clock": "ok"}

    # A → B: B's clock says A signed 10 minutes in the future (+600 s); B → A: A says B signed
    # 10 minutes ago (-600 s). The detail gives the timestamp's offset from the refusing clock.
    skewed = {"tls": "ok", "certificate": "not_configured", "secret": "unknown", "clock": "skewed"}
    for pinged, measured in ((ping(a, a_to_b), -SKEW_SECONDS), (ping(b, b_to_a), SKEW_SECONDS)):
        assert (pinged["ok"], pinged["status_code"], pinged["factors"]) == (False, 401, skewed), pinged
        assert abs(refused_offset(pinged) - measured) <= 2, pinged
        assert f"tolerance ±{TOLERANCE_SECONDS} s" in pinged["error"]

    # Each caller's audit trail names the factor (GET /api/audit)...
    for kite, name in ((a, "b"), (b, "a")):
        called = kite.api("GET", "/api/audit", params={"action": "Federation.PeerCalled", "peer": name}).json()
        assert [(row["endpoint"], row["outcome"]) for row in called["results"]][:1] == [
            ("/api/federation/ping", "stale_timestamp")
        ], called
    # ...and each receiver audited the refusal. Refused before the signer is identified, the row
    # belongs to no team, so /api/audit cannot show it (the Django admin does): read the table.
    for receiver, sender in ((b, a), (a, b)):
        with psycopg.connect(receiver.database_url) as connection:
            rows = connection.execute(
                "SELECT endpoint, actor, team_id FROM federation_auditevent"
                " WHERE action = 'Federation.AuthFailed' AND outcome = 'stale_timestamp'"
            ).fetchall()
        assert ("/api/federation/ping", sender.instance_id, None) in rows, rows
