"""No silent no-ops (docs/architecture.md "Apps and their dependencies"): every write endpoint refuses a field it will not apply — a 400
`{detail, code}` naming it, and nothing changes — or applies it.

The endpoints are found by walking the URL conf (every route under /api/ and /hooks/ with a POST,
PUT, PATCH or DELETE handler), so a new write endpoint without a case in CASES fails here. Each
case sends a valid body plus an unknown field, then plus a read-only field where the resource has
one, asserts the refusal names it and that no row of Kite's apps changed; then sends the valid body
alone and asserts it is applied, so the refusal was about the field and nothing else.
"""

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest
from django.apps import apps
from django.conf import settings
from django.test import Client, RequestFactory
from django.urls import URLPattern, URLResolver, get_resolver

from federation import certificates, grants, invitations, services, signing
from federation.models import Peer
from fleet import services as fleet_services
from ingest import services as ingest_services
from ingest.models import Event
from kite import crypto
from tests.federation.loopback import loopback  # noqa: F401  (fixture)
from tests.signing import as_wsgi_headers

WRITES = ("POST", "PUT", "PATCH", "DELETE")
PEER_URL = "https://127.0.0.1:9/hooks/tm_far/kite"
SECRET = "whsec_" + "S" * 43
SENDER_SECRET = "whsec_" + "M" * 43


def _routes(patterns, prefix=""):
    for pattern in patterns:
        route = prefix + str(pattern.pattern).lstrip("^").rstrip("$")
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, route)
        elif isinstance(pattern, URLPattern):
            yield route, pattern.callback


def _methods(callback) -> list[str]:
    """The write methods a view answers: an APIView's handlers, or what a function view's 405 allows."""
    view_class = getattr(callback, "cls", None) or getattr(callback, "view_class", None)
    if view_class is not None:
        return [method for method in WRITES if hasattr(view_class, method.lower())]
    refused = callback(RequestFactory().generic("TRACE", "/probe"), **{})
    allowed = refused.get("Allow") if refused.status_code == 405 else None
    assert allowed is not None, f"{callback.__module__}.{callback.__name__}: a 405 must say what it allows"
    return [method for method in WRITES if method in allowed.replace(" ", "").split(",")]


def _probe(callback):
    try:
        return _methods(callback)
    except TypeError:  # a function view needs its URL arguments: give it dummies
        import inspect

        names = [name for name in inspect.signature(callback).parameters if name != "request"]
        refused = callback(RequestFactory().generic("TRACE", "/probe"), **{name: "x" for name in names})
        return [method for method in WRITES if method in refused.get("Allow", "").replace(" ", "").split(",")]


def write_endpoints() -> list[tuple[str, str]]:
    found = set()
    for route, callback in _routes(get_resolver().url_patterns):
        if route.startswith(("api/", "hooks/")):
            found.update((method, "/" + route) for method in _probe(callback))
    return sorted(found, key=lambda item: (item[1], item[0]))


ENDPOINTS = write_endpoints()


# --- the world each case works in --------------------------------------------------------------


@dataclass
class World:
    team: object
    other_team: object
    api: object
    ids: dict = field(default_factory=dict)

    def peer(self) -> Peer:
        if "peer" not in self.ids:
            self.ids["peer"] = services.peer_create(team=self.team, name="far", peer_hook_url=PEER_URL,
                                                    outbound_token=SECRET, scopes=["*"]).row.pk  # fmt: skip
        return Peer.objects.get(pk=self.ids["peer"])

    def sender(self) -> Peer:
        if "sender" not in self.ids:
            self.ids["sender"] = services.trusted_sender_create(team=self.team, name="mallory",
                                                                inbound_token=SENDER_SECRET).row.pk  # fmt: skip
        return Peer.objects.get(pk=self.ids["sender"])


def _api(method: str, path_of: Callable[[World], str]):
    def send(world: World, body: dict):
        answer = getattr(world.api, method.lower())(path_of(world), body, format="json")
        return answer.status_code, (answer.json() if answer.content else {})

    send.prepare = path_of  # makes the rows the path names, before anything is compared
    return send


def _signed(path: str):
    """A control call signed by the trusted sender `mallory` (its secret is the test's)."""

    def send(world: World, body: dict):
        world.sender()
        raw = json.dumps(body).encode()
        headers = signing.sign_headers(secret=SENDER_SECRET, msg_id=f"msg_{secrets.token_hex(8)}",
                                       timestamp=int(time.time()), body=raw, sender_id="mallory-instance",
                                       binding=signing.Binding("POST", path, world.team.id))  # fmt: skip
        answer = Client().post(f"{path}?team={world.team.id}", raw, content_type="application/json",
                               **as_wsgi_headers(headers))  # fmt: skip
        return answer.status_code, answer.json()

    send.prepare = World.sender
    return send


def _handshake(world: World, body: dict):
    """B (other_team) redeems A's (team's) invitation, signed as invitations.accept signs it."""
    raw = json.dumps(body).encode()
    offer = invitations.parse(world.ids["invitation"])
    signer = certificates.signer_for(world.other_team.id)
    headers = signing.sign_headers(secret=invitations._code_secret(offer["code"]), msg_id=f"hs_{secrets.token_hex(8)}",
                                   timestamp=int(time.time()), body=raw, sender_id="kite-b-instance",
                                   binding=signing.Binding("POST", invitations.HANDSHAKE_PATH, world.team.id),
                                   ed25519_sign=signer.sign, key_thumbprint=signer.thumbprint)  # fmt: skip
    answer = Client().post(f"{invitations.HANDSHAKE_PATH}?team={world.team.id}", raw, content_type="application/json",
                           **as_wsgi_headers(headers))  # fmt: skip
    return answer.status_code, json.loads(answer.content)


def _withdrawal(world: World, body: dict):
    """A withdrawal as an invitee signs one (with a key of its own: no handshake of it is stored here)."""
    raw = json.dumps(body).encode()
    headers = signing.sign_headers(secret="whsec_" + "W" * 43, msg_id=f"wd_{secrets.token_hex(8)}",
                                   timestamp=int(time.time()), body=raw, sender_id="kite-b-instance",
                                   binding=signing.Binding("DELETE", invitations.HANDSHAKE_PATH, world.team.id))  # fmt: skip
    answer = Client().delete(f"{invitations.HANDSHAKE_PATH}?team={world.team.id}", raw,
                             content_type="application/json", **as_wsgi_headers(headers))  # fmt: skip
    return answer.status_code, json.loads(answer.content)


def _handshake_body(world: World) -> dict:
    if "invitation" not in world.ids:
        world.ids["invitation"] = invitations.issue(team=world.team, name="b-side")[1]
        certificates.issue(team=world.other_team, subject="kite b")
    offer = invitations.parse(world.ids["invitation"])
    body = json.loads(invitations._handshake_request(world.other_team, offer, certificates.current(world.other_team.id),
                                                     crypto.new_webhook_secret(), "fg-999999.x"))  # fmt: skip
    body["instance_id"] = "kite-b-instance"
    return body


def _invitation_of_other_team(world: World) -> dict:
    if "accept" not in world.ids:
        world.ids["accept"] = invitations.issue(team=world.other_team, name="a-side")[1]
    return {"invitation": world.ids["accept"], "name": "other-side"}


def _grant(world: World) -> int:
    if "grant" not in world.ids:
        world.ids["grant"] = grants.create(peer=world.peer(), resource_kind="fleet.agents")[0].pk
    return world.ids["grant"]


def _token(world: World) -> int:
    if "token" not in world.ids:
        world.ids["token"] = services.token_create(team=world.team, label="t").row.pk
    return world.ids["token"]


def _certificate(world: World) -> int:
    if "certificate" not in world.ids:
        world.ids["certificate"] = certificates.issue(team=world.team, subject="kite a").pk
    return world.ids["certificate"]


@dataclass(frozen=True)
class Case:
    send: Callable
    body: Callable[[World], dict] = lambda world: {}
    read_only: str | None = "id"  # a field of the resource Kite sets itself; None: the resource has none
    ok: tuple = (200, 201, 204)


P = "/api/federation"
CASES = {
    ("POST", "/api/sources"): Case(_api("POST", lambda w: "/api/sources"),
                                   lambda w: {"name": "s1", "kind": "none"}, "hook_url"),
    ("POST", f"{P}/tokens"): Case(_api("POST", lambda w: f"{P}/tokens"), lambda w: {"label": "t2"}, "fingerprint"),
    ("DELETE", f"{P}/tokens/<int:token_id>"): Case(_api("DELETE", lambda w: f"{P}/tokens/{_token(w)}")),
    ("POST", f"{P}/peers"): Case(_api("POST", lambda w: f"{P}/peers"),
                                 lambda w: {"name": "p2", "peer_hook_url": PEER_URL}, "status"),
    ("PATCH", f"{P}/peers/<int:peer_id>"): Case(_api("PATCH", lambda w: f"{P}/peers/{w.peer().pk}"),
                                                lambda w: {"scopes": ["x.*"]}, "inbound_fingerprint"),
    ("DELETE", f"{P}/peers/<int:peer_id>"): Case(_api("DELETE", lambda w: f"{P}/peers/{w.peer().pk}")),
    ("POST", f"{P}/peers/<int:peer_id>/ping"): Case(_api("POST", lambda w: f"{P}/peers/{w.peer().pk}/ping")),
    ("POST", f"{P}/peers/<int:peer_id>/grants"): Case(_api("POST", lambda w: f"{P}/peers/{w.peer().pk}/grants"),
                                                      lambda w: {"resource_kind": "fleet.agents"}, "expires_at"),
    ("DELETE", f"{P}/peers/<int:peer_id>/grants/<int:grant_id>"): Case(
        _api("DELETE", lambda w: f"{P}/peers/{w.peer().pk}/grants/{_grant(w)}")),
    ("POST", f"{P}/peers/<int:peer_id>/rotate-secret"): Case(
        _api("POST", lambda w: f"{P}/peers/{w.peer().pk}/rotate-secret"), lambda w: {"direction": "inbound"},
        "fingerprint"),
    ("POST", f"{P}/peers/<int:peer_id>/replay-dead"): Case(
        _api("POST", lambda w: f"{P}/peers/{w.peer().pk}/replay-dead"), lambda w: {"limit": 10}, None),
    ("POST", f"{P}/peers/<int:peer_id>/pause"): Case(_api("POST", lambda w: f"{P}/peers/{w.peer().pk}/pause"),
                                                     lambda w: {"reason": "maintenance"}, "paused"),
    ("POST", f"{P}/peers/<int:peer_id>/resume"): Case(_api("POST", lambda w: f"{P}/peers/{w.peer().pk}/resume")),
    ("POST", f"{P}/certificates"): Case(_api("POST", lambda w: f"{P}/certificates"), lambda w: {"subject": "kite c"},
                                        "thumbprint"),
    ("DELETE", f"{P}/certificates/<int:certificate_id>"): Case(
        _api("DELETE", lambda w: f"{P}/certificates/{_certificate(w)}")),
    ("POST", f"{P}/certificates/<int:certificate_id>/announce"): Case(
        _api("POST", lambda w: f"{P}/certificates/{_certificate(w)}/announce")),
    ("POST", f"{P}/trusted-senders"): Case(_api("POST", lambda w: f"{P}/trusted-senders"), lambda w: {"name": "ts"},
                                           "inbound_fingerprint"),
    ("PATCH", f"{P}/trusted-senders/<int:sender_id>"): Case(
        _api("PATCH", lambda w: f"{P}/trusted-senders/{w.sender().pk}"),
        lambda w: {"peer_hook_url": PEER_URL, "scopes": []}, "role"),
    ("DELETE", f"{P}/trusted-senders/<int:sender_id>"): Case(
        _api("DELETE", lambda w: f"{P}/trusted-senders/{w.sender().pk}")),
    ("POST", f"{P}/invitations"): Case(_api("POST", lambda w: f"{P}/invitations"), lambda w: {"name": "inv"},
                                       "expires_at"),
    ("POST", f"{P}/invitations/accept"): Case(_api("POST", lambda w: f"{P}/invitations/accept"),
                                              _invitation_of_other_team, "status"),
    # Peer-facing and signed: refused before the signature is checked (no webhook-id used, no contact noted).
    ("POST", f"{P}/terminate"): Case(_signed(f"{P}/terminate"), lambda w: {"reason": "maintenance over"}, "status"),
    ("POST", f"{P}/rotate"): Case(_signed(f"{P}/rotate"), lambda w: {"inbound_secret": "whsec_" + "N" * 43},
                                  "fingerprint"),
    ("POST", f"{P}/handshake"): Case(_handshake, _handshake_body, "status"),
    ("DELETE", f"{P}/handshake"): Case(_withdrawal, lambda w: {"nonce": "n" * 43}, "status",
                                       ok=(401,)),  # a nonce nobody was given: refused, and rightly
    ("POST", "/api/fleet/agents"): Case(_api("POST", lambda w: "/api/fleet/agents"), lambda w: {"name": "w1"},
                                        "last_seen"),
    ("PUT", "/api/fleet/peers/<int:peer_id>/remote-grant"): Case(
        _api("PUT", lambda w: f"/api/fleet/peers/{w.peer().pk}/remote-grant"), lambda w: {"token": "fg-1." + "a" * 43},
        "has_remote_grant"),
    ("DELETE", "/api/fleet/peers/<int:peer_id>/remote-grant"): Case(
        _api("DELETE", lambda w: f"/api/fleet/peers/{w.peer().pk}/remote-grant")),
}
# The webhook endpoint's body is the event itself: every field is applied (stored), none refused.
APPLIED = {("POST", "/hooks/<str:team_id>/<str:source>")}


def snapshot() -> dict:
    """Every row of Kite's apps (API keys aside: using one notes when)."""
    rows = {}
    for app in ("kite", "ingest", "federation", "fleet"):
        for model in apps.get_app_config(app).get_models():
            if model.__name__ != "ApiKey":
                rows[model.__name__] = list(model.objects.order_by("pk").values())
    return rows


@pytest.fixture
def world(team, other_team, api, loopback):  # noqa: F811
    return World(team=team, other_team=other_team, api=api)


def test_the_walk_finds_the_write_endpoints_and_every_case_is_one_of_them():
    found = set(ENDPOINTS)
    assert ("PATCH", f"{P}/trusted-senders/<int:sender_id>") in found and ("POST", f"{P}/handshake") in found
    assert len(found) >= 25
    assert set(CASES) | APPLIED >= found, f"write endpoints without a case: {sorted(found - set(CASES) - APPLIED)}"
    assert set(CASES) | APPLIED <= found, f"cases of endpoints that are gone: {sorted(set(CASES) - found)}"


@pytest.mark.parametrize("method, route", [pair for pair in ENDPOINTS if pair not in APPLIED],
                         ids=[f"{m} {r}" for m, r in ENDPOINTS if (m, r) not in APPLIED])  # fmt: skip
def test_every_write_endpoint_refuses_a_field_it_will_not_apply_and_changes_nothing(world, method, route):
    case = CASES.get((method, route))
    assert case is not None, f"{method} {route} has no case here: make it refuse what it will not apply " \
                             "(kite/fields.py) and add it to CASES"
    getattr(case.send, "prepare", lambda world: None)(world)
    valid = case.body(world)
    refusals = [("colour", "red")] + ([(case.read_only, "x")] if case.read_only else [])
    for name, value in refusals:
        before = snapshot()
        status, answer = case.send(world, {**valid, name: value})
        assert status == 400, (name, status, answer)
        assert answer.get("code") == "invalid" and name in answer.get("detail", ""), answer
        assert snapshot() == before, f"{method} {route} changed something while refusing {name}"
    status, answer = case.send(world, valid)
    assert status in case.ok, (status, answer)


def test_the_webhook_endpoint_applies_every_field_it_is_sent(world, client):
    """Not a refusal: a provider's fields are the event's data, a peer's extra CloudEvent attributes
    its extensions; both are stored and shown."""
    ingest_services.source_create(team=world.team, name="plain", kind="none")
    answer = client.post(f"/hooks/{world.team.id}/plain", {"id": "e1", "type": "x.y", "colour": "red"},
                         content_type="application/json")  # fmt: skip
    assert answer.status_code == 202, answer.json()
    assert Event.objects.get(ce_id="e1").to_cloudevent()["data"]["colour"] == "red"
    world.sender()
    event = {"specversion": "1.0", "id": "e2", "source": "kite://far/tm/stripe", "type": "stripe.charge",
             "colour": "red", "data": {}}  # fmt: skip
    raw = json.dumps(event).encode()
    headers = signing.sign_headers(secret=SENDER_SECRET, msg_id="msg_e2", timestamp=int(time.time()), body=raw,
                                   sender_id="mallory-instance",
                                   binding=signing.Binding("POST", f"/hooks/{world.team.id}/kite", world.team.id))  # fmt: skip
    answer = client.post(f"/hooks/{world.team.id}/kite", raw, content_type="application/cloudevents+json",
                         **as_wsgi_headers(headers))  # fmt: skip
    assert answer.status_code == 202, answer.json()
    assert Event.objects.get(ce_id="e2").to_cloudevent()["colour"] == "red"


def test_a_ping_with_a_body_is_refused_before_anything_is_noted(world, client):
    world.sender()
    path = f"{P}/ping"
    headers = signing.sign_headers(secret=SENDER_SECRET, msg_id="msg_p1", timestamp=int(time.time()), body=b"",
                                   sender_id="mallory-instance", binding=signing.Binding("GET", path, world.team.id))
    before = snapshot()
    answer = client.generic("GET", f"{path}?team={world.team.id}", b'{"colour": "red"}',
                            content_type="application/json", **as_wsgi_headers(headers))  # fmt: skip
    assert answer.status_code == 400 and answer.json()["code"] == "invalid" and "body" in answer.json()["detail"]
    assert snapshot() == before
    assert client.get(f"{path}?team={world.team.id}", **as_wsgi_headers(headers)).status_code == 200
