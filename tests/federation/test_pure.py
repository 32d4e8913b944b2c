"""Pure federation helpers: signing, scopes, loop rules, backoff. No database."""

import json
import random
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from standardwebhooks.webhooks import Webhook

from federation import backoff, routing, signing
from kite.crypto import new_webhook_secret


DELIVERY = signing.delivery_binding("tm_b")
PING = signing.Binding("GET", "/api/federation/ping", "tm_b")
TERMINATE = signing.Binding("POST", "/api/federation/terminate", "tm_b")


def _signed(secret, body=b'{"a":1}', now=None, binding=DELIVERY, **extra):
    now = int(time.time()) if now is None else now
    return signing.sign_headers(secret=secret, msg_id="msg_1", timestamp=now, body=body, sender_id="kite-a",
                                binding=binding, **extra)  # fmt: skip


def test_a_deliverys_v1_signature_verifies_with_the_standardwebhooks_library_and_its_v1a_is_ignored_by_it():
    secret, key = new_webhook_secret(), Ed25519PrivateKey.generate()
    body = b'{"specversion":"1.0"}'
    headers = _signed(secret, body, ed25519_sign=key.sign, key_thumbprint="sha256:ab")
    assert Webhook(secret).verify(body, headers) == {"specversion": "1.0"}


def test_a_control_calls_signature_is_bound_so_no_standard_webhooks_library_and_no_other_endpoint_accepts_it():
    secret = new_webhook_secret()
    headers = _signed(secret, b"", binding=PING)
    with pytest.raises(Exception):
        Webhook(secret).verify(b"", headers)
    request = signing.parse_headers(headers, int(time.time()))
    assert signing.hmac_matches(secret, request, request.hmac_message(b"", PING))
    for other in (TERMINATE, signing.Binding("GET", "/api/federation/ping", "tm_c"),
                  signing.Binding("POST", "/api/federation/ping", "tm_b"), DELIVERY):  # fmt: skip
        assert not signing.hmac_matches(secret, request, request.hmac_message(b"", other)), other


def test_binding_is_read_from_the_url_a_request_goes_to():
    assert signing.binding_for("get", "https://b.example/api/federation/ping?team=tm_b") == PING
    assert signing.binding_for("POST", "https://b.example:8443/hooks/tm_b/kite") == DELIVERY
    assert signing.binding_for("POST", "https://b.example/prefix/hooks/tm_b/kite/") == DELIVERY
    assert signing.binding_for("POST", "https://b.example/api/federation/terminate?team=bad%20team").team == ""
    assert not signing.binding_for("GET", "https://b.example/hooks/tm_b/kite").delivery


@pytest.mark.parametrize("headers, code", [
    ({"webhook-id": "x" * 256, "webhook-timestamp": "1", "webhook-signature": "v1,a"}, "malformed_signature"),
    ({"webhook-id": "x", "webhook-timestamp": "²", "webhook-signature": "v1,a"}, "malformed_signature"),
    ({"webhook-id": "x", "webhook-timestamp": "+1", "webhook-signature": "v1,a"}, "malformed_signature"),
    ({"webhook-id": "x", "webhook-timestamp": "NOW", "webhook-signature": " ".join(["v1a,x"] * 9)},
     "malformed_signature"),
    ({"webhook-id": "x", "webhook-timestamp": "NOW", "webhook-signature": "v1a,x " * 500}, "malformed_signature"),
])  # fmt: skip
def test_absurd_signature_headers_are_refused_before_any_verification(headers, code):
    now = int(time.time())
    headers = {k: v.replace("NOW", str(now)) for k, v in headers.items()}
    with pytest.raises(signing.SignatureError) as caught:
        signing.parse_headers(headers, now)
    assert (caught.value.code, caught.value.status) == (code, 400)


def test_hmac_and_ed25519_factors_each_verify_and_fail_independently():
    secret, key = new_webhook_secret(), Ed25519PrivateKey.generate()
    raw = b"{}"
    headers = _signed(secret, raw, ed25519_sign=key.sign, key_thumbprint="sha256:ab")
    request = signing.parse_headers(headers, int(time.time()))
    body = request.hmac_message(raw, DELIVERY)
    bound = request.ed25519_message(raw, DELIVERY)

    def verify_with(public):
        def verify(signature, message):
            try:
                public.verify(signature, message)
                return True
            except Exception:
                return False

        return verify

    assert signing.hmac_matches(secret, request, body)
    assert not signing.hmac_matches(new_webhook_secret(), request, body)
    assert signing.ed25519_matches(verify_with(key.public_key()), request, bound)
    assert not signing.ed25519_matches(verify_with(key.public_key()), request, body)  # v1a is over the bound message
    assert not signing.ed25519_matches(verify_with(Ed25519PrivateKey.generate().public_key()), request, bound)
    assert not signing.hmac_matches(secret, request, request.hmac_message(b"{ }", DELIVERY))
    assert request.sender == "kite-a" and request.key_thumbprint == "sha256:ab"


@pytest.mark.parametrize("skew", [-301, 301])
def test_timestamps_outside_five_minutes_are_stale(skew):
    now = int(time.time())
    headers = _signed(new_webhook_secret(), now=now + skew)
    with pytest.raises(signing.SignatureError) as caught:
        signing.parse_headers(headers, now)
    assert caught.value.code == "stale_timestamp"


def test_missing_headers_are_named():
    with pytest.raises(signing.SignatureError) as caught:
        signing.parse_headers({"webhook-id": "x"}, int(time.time()))
    assert caught.value.code == "missing_signature"


@pytest.mark.parametrize(
    "scopes, event_type, expected",
    [
        (["stripe.*"], "com.stripe.payment_intent.succeeded", True),
        (["com.stripe.*"], "com.stripe.payment_intent.succeeded", True),
        (["stripe.*"], "com.github.push", False),
        (["com.kite.agent.message"], "com.kite.agent.message", True),
        (["*"], "anything", True),
        ([], "com.stripe.charge.succeeded", False),
        (["stripe.charge.*"], "com.stripe.payment_intent.succeeded", False),
    ],
)
def test_scope_globs_also_match_without_the_vendor_prefix(scopes, event_type, expected):
    assert routing.scope_matches(scopes, event_type) is expected


def test_first_forward_starts_the_chain_and_later_hops_append():
    first = routing.next_hop(None, "a")
    assert first == routing.Provenance("a", ("a",), 1)
    arrived = routing.provenance_of(json.loads(json.dumps(first.extensions())))
    second = routing.next_hop(arrived, "b")
    assert second == routing.Provenance("a", ("a", "b"), 2)
    assert second.extensions() == {"kitefedorigin": "a", "kitefedchain": '["a", "b"]', "kitefedhops": 2}


def _decide(forward, peer, max_hops=3, event_type="com.stripe.x", scopes=("stripe.*",)):
    return routing.decide(
        event_type=event_type, forward=forward, peer_instance_id=peer, scopes=list(scopes), max_hops=max_hops
    )


def test_loop_rules_drop_origin_chain_members_and_hop_limit():
    at_b = routing.next_hop(routing.provenance_of(routing.next_hop(None, "a").extensions()), "b")
    assert _decide(at_b, "a").reason == "loop_origin"
    assert _decide(routing.Provenance("z", ("z", "b", "c"), 3), "b").reason == "loop_chain"
    assert _decide(at_b, "c").send
    assert _decide(routing.Provenance("a", ("a", "b", "c"), 4), "d", max_hops=3).reason == "max_hops"
    assert _decide(routing.Provenance("a", ("a", "b", "c"), 3), "d", max_hops=3).send
    assert _decide(at_b, "c", event_type="kite.federation.delivery_failed", scopes=["*"]).reason == "internal"
    assert _decide(at_b, "c", event_type="com.github.push").reason == "scope"


def test_backoff_doubles_with_jitter_and_caps_at_five_minutes():
    rng = random.Random(7)
    for attempts, base in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (30, 300)]:
        for _ in range(50):
            assert base * 0.8 <= backoff.delay_after(attempts, rng=rng) <= base * 1.2
    assert backoff.delay_after(3, retry_after=17) == 17


@pytest.mark.parametrize(
    "status, outcome",
    [(None, "transient"), (408, "transient"), (429, "transient"), (503, "transient"), (200, "ok"),
     (401, "auth"), (403, "auth"), (410, "gone"), (400, "permanent"), (422, "permanent")],
)  # fmt: skip
def test_responses_are_classified_as_the_design_says(status, outcome):
    assert backoff.classify(status) == outcome
