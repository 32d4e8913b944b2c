"""A live instance (runkite, two web workers over HTTPS) keeps, per worker, a copy of the rows of
a trusted sender whose deliveries authenticate. The attacker is that sender after the operator
revoked it or rotated its secret out: every delivery is refused at once, in whichever worker it
lands, and nothing is stored."""

import json
import secrets
import time

import pytest
import requests

from federation import signing
from tests.e2e.conftest import Instances

pytestmark = pytest.mark.e2e

ROUNDS = 12  # new connections each: both web workers see several


@pytest.fixture(scope="module")
def kite(tmp_path_factory):
    """An instance whose team has no peer to send to: its webhooks take the path the copies serve."""
    started = Instances(tmp_path_factory)
    try:
        yield started.start("copies")
    finally:
        started.close()


def _deliver(kite, team: str, secret: str, event_id: str, sender: str, batched: bool = False) -> requests.Response:
    """One event; batched: that event and a second (`<id>-b`) in one CloudEvents batch."""
    events = [{"specversion": "1.0", "id": event_id, "source": "kite://elsewhere/tm_x/stripe",
               "type": "com.stripe.charge.succeeded", "data": {"n": 1}}]  # fmt: skip
    if batched:
        events.append(dict(events[0], id=f"{event_id}-b"))
    body = json.dumps(events if batched else events[0]).encode()
    headers = signing.sign_headers(secret=secret, msg_id=f"m{secrets.token_hex(6)}", timestamp=int(time.time()),
                                   body=body, sender_id=sender, binding=signing.delivery_binding(team))  # fmt: skip
    headers["content-type"] = f"application/cloudevents{'-batch' if batched else ''}+json"
    return requests.post(f"{kite.url}/hooks/{team}/kite", data=body, headers=headers, verify=str(kite.cert), timeout=15)


def _accepted(response: requests.Response, batched: bool) -> bool:
    if not batched:
        return response.status_code == 202
    return response.status_code == 200 and [item["result"] for item in response.json()] == ["accepted"] * 2


def _stored(kite) -> set[str]:
    listed = kite.api("GET", "/api/events", params={"limit": 500, "type": "com.stripe.charge.succeeded"}).json()
    return {event["id"] for event in listed["results"]}


def _trusted(kite, name: str) -> tuple[int, str]:
    token = kite.api("POST", "/api/federation/tokens", json={"label": name}).json()["token"]
    row = kite.api("POST", "/api/federation/trusted-senders", json={"name": name, "inbound_token": token})
    assert row.status_code == 201, row.text
    return row.json()["id"], token


def _warm(kite, team, secret, sender, tag, batched: bool = False) -> set[str]:
    ids = set()
    for n in range(ROUNDS):
        response = _deliver(kite, team, secret, f"{tag}-{n}", sender, batched)
        assert _accepted(response, batched), response.text
        ids |= {f"{tag}-{n}", f"{tag}-{n}-b"} if batched else {f"{tag}-{n}"}
    return ids


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
def test_a_revoked_sender_is_refused_at_once_by_every_worker(kite, batched):
    team = kite.team_id()
    sender_id, secret = _trusted(kite, f"copy-revoked-{secrets.token_hex(2)}")
    instance = f"copy-inst-{secrets.token_hex(3)}"
    stored = _warm(kite, team, secret, instance, f"warm-{instance}", batched)
    assert stored <= _stored(kite)
    assert kite.api("DELETE", f"/api/federation/trusted-senders/{sender_id}").status_code in (200, 204)
    before = _stored(kite)
    for n in range(ROUNDS):
        response = _deliver(kite, team, secret, f"after-{instance}-{n}", instance, batched)
        assert response.status_code == 401 and response.json()["code"] == "unknown_peer", response.text
    assert _stored(kite) == before


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
def test_a_secret_rotated_out_now_is_refused_at_once_by_every_worker(kite, batched):
    team = kite.team_id()
    sender_id, secret = _trusted(kite, f"copy-rotated-{secrets.token_hex(2)}")
    instance = f"copy-inst-{secrets.token_hex(3)}"
    _warm(kite, team, secret, instance, f"warm-{instance}", batched)
    rotated = kite.api("POST", f"/api/federation/peers/{sender_id}/rotate-secret",
                       json={"direction": "inbound", "grace": False})  # fmt: skip
    assert rotated.status_code == 200, rotated.text
    before = _stored(kite)
    for n in range(ROUNDS):
        response = _deliver(kite, team, secret, f"old-{instance}-{n}", instance, batched)
        assert response.status_code == 401 and response.json()["code"] == "bad_secret", response.text
    assert _stored(kite) == before
    assert _warm(kite, team, rotated.json()["secret"], instance, f"new-{instance}", batched) <= _stored(kite)

