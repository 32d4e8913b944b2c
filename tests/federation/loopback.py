"""Peer calls that never leave the process: federation.client's HTTPS session is replaced by one
whose transport is Django's test client, so an outbound call (signed, audited, counted) lands on
this instance's own peer-facing views. Two teams of one instance then stand in for two instances."""

from urllib.parse import urlsplit

import pytest
import requests
from django.test import Client
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

import time

from federation import client, services, signing
from federation.models import AuditEvent, Peer
from tests.federation.test_api import SECRET
from tests.signing import as_wsgi_headers

WRONG = "whsec_" + "A" * 43


class DjangoAdapter(BaseAdapter):
    def send(self, request, **kwargs):
        parts = urlsplit(request.url)
        meta = {f"HTTP_{name.upper().replace('-', '_')}": value for name, value in request.headers.items()
                if name.lower() not in ("content-type", "content-length")}  # fmt: skip
        answer = Client().generic(request.method, parts.path, data=request.body or b"",
                                  content_type=request.headers.get("content-type", ""), **meta)  # fmt: skip
        response = requests.Response()
        response.status_code, response._content, response.url, response.request = (
            answer.status_code, answer.content, request.url, request,
        )  # fmt: skip
        response.headers = CaseInsensitiveDict(answer.headers.items())
        return response

    def close(self):
        pass


@pytest.fixture
def loopback(monkeypatch):
    """Outbound peer calls are answered by this process's own views."""
    session = requests.Session()
    session.mount("https://", DjangoAdapter())
    monkeypatch.setattr(client, "_session", lambda *args, **kwargs: session)
    return session


@pytest.fixture
def pair(team, other_team):
    """Team A (`team`) sends to team B (`other_team`) of this same instance: A's peer `b`, B's sender `a`."""
    peer = services.peer_create(team=team, name="b", peer_hook_url=f"https://127.0.0.1:8443/hooks/{other_team.id}/kite",
                                outbound_token=SECRET, scopes=["*"]).row  # fmt: skip
    Peer.objects.filter(pk=peer.pk).update(remote_instance_id="kite-b")  # so it is not a candidate sender for B
    peer.refresh_from_db()
    sender = services.trusted_sender_create(team=other_team, name="a", inbound_token=SECRET).row
    AuditEvent.objects.all().delete()
    return peer, sender


def peer_signed(body: bytes, secret: str = SECRET, sender: str = "kite-a", timestamp: int | None = None) -> dict:
    """A peer request's headers (DESIGN §3), as Django's test client takes them."""
    headers = signing.sign_headers(secret=secret, msg_id=f"m{time.monotonic_ns()}", body=body, sender_id=sender,
                                   timestamp=int(time.time()) if timestamp is None else timestamp)  # fmt: skip
    return as_wsgi_headers(headers)


def deliver(client, team, body: bytes, **signed):
    """POST a signed event delivery to the team's `kite` source."""
    headers = peer_signed(body, **signed)
    return client.post(f"/hooks/{team.id}/kite", body, content_type="application/cloudevents+json", **headers)
