"""Peer calls that never leave the process: federation.client's HTTPS exchange is replaced by
Django's test client, so an outbound call (signed, audited, counted) lands on
this instance's own peer-facing views. Two teams of one instance then stand in for two instances."""

from urllib.parse import urlsplit

import pytest
import urllib3
from django.test import Client

import time

from federation import client, services, signing
from federation.models import AuditEvent, Peer
from tests.federation.test_api import SECRET
from tests.signing import as_wsgi_headers

WRONG = "whsec_" + "A" * 43


def django_send(target, method, body, headers, timeout, max_answer_bytes=client.MAX_ANSWER_BYTES):
    """federation.client._send, answered by this process's views through Django's test client
    (the destination policy is applied by client.call before it; the size limit here)."""
    parts = urlsplit(target.url)
    meta = {f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()
            if name.lower() not in ("content-type", "content-length")}  # fmt: skip
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    answer = Client().generic(method, path, data=body or b"", content_type=headers.get("content-type", ""), **meta)
    if len(answer.content) > max_answer_bytes:
        raise client.too_large(answer.status_code, max_answer_bytes)
    return client.RawAnswer(answer.status_code, urllib3.HTTPHeaderDict(answer.headers.items()), answer.content)


@pytest.fixture
def loopback(monkeypatch):
    """Outbound peer calls are answered by this process's own views."""
    monkeypatch.setattr(client, "_send", django_send)
    return django_send


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


def peer_signed(body: bytes, secret: str = SECRET, sender: str = "kite-a", timestamp: int | None = None,
                binding: signing.Binding | None = None) -> dict:  # fmt: skip
    """A peer request's headers (SECURITY.md "The signed message"), as Django's test client takes them; `binding`: the
    method, path and team it is signed for (default: the handshake of no team)."""
    headers = signing.sign_headers(secret=secret, msg_id=f"m{time.monotonic_ns()}", body=body, sender_id=sender,
                                   timestamp=int(time.time()) if timestamp is None else timestamp,
                                   binding=binding or signing.Binding("POST", "/api/federation/handshake", ""))  # fmt: skip
    return as_wsgi_headers(headers)


def deliver(client, team, body: bytes, **signed):
    """POST a signed event delivery to the team's `kite` source."""
    headers = peer_signed(body, binding=signing.delivery_binding(team.id), **signed)
    return client.post(f"/hooks/{team.id}/kite", body, content_type="application/cloudevents+json", **headers)
