"""Signature schemes, checked against the providers' real formats. No database."""

import base64
import hashlib
import hmac
import json
import secrets
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from ingest import verifiers
from ingest.verifiers import VerificationError
from kite import crypto
from tests.factories import SOURCE_SECRET
from tests.signing import github_signature, standard_webhook_headers, stripe_signature

BODY = json.dumps({"id": "evt_1", "type": "payment_intent.succeeded", "created": 1700000000}).encode()
NOW = int(time.time())


def refusal(verifier, secret, headers, body=BODY, now=NOW) -> str:
    with pytest.raises(VerificationError) as caught:
        verifier(secret, headers, body, now, "tm_x")
    assert caught.value.detail  # the sender is told why
    return caught.value.code


# --- Stripe -------------------------------------------------------------------


def test_stripe_signature_made_like_stripe_is_accepted():
    headers = {"stripe-signature": stripe_signature(SOURCE_SECRET, BODY, NOW)}

    assert verifiers.verify_stripe(SOURCE_SECRET, headers, BODY, NOW) is None


def test_stripe_signature_with_another_secret_is_refused():
    headers = {"stripe-signature": stripe_signature("whsec_someone_else", BODY, NOW)}

    assert refusal(verifiers.verify_stripe, SOURCE_SECRET, headers) == "bad_signature"


def test_stripe_signature_over_another_body_is_refused():
    headers = {"stripe-signature": stripe_signature(SOURCE_SECRET, BODY + b" ", NOW)}

    assert refusal(verifiers.verify_stripe, SOURCE_SECRET, headers) == "bad_signature"


@pytest.mark.parametrize("age", [301, -301, 3600])
def test_stripe_timestamp_outside_five_minutes_is_stale(age):
    headers = {"stripe-signature": stripe_signature(SOURCE_SECRET, BODY, NOW - age)}

    assert refusal(verifiers.verify_stripe, SOURCE_SECRET, headers) == "stale_timestamp"


@pytest.mark.parametrize("age", [299, -299, 0])
def test_stripe_timestamp_inside_five_minutes_is_accepted(age):
    headers = {"stripe-signature": stripe_signature(SOURCE_SECRET, BODY, NOW - age)}

    verifiers.verify_stripe(SOURCE_SECRET, headers, BODY, NOW)


def test_missing_stripe_signature_header_is_refused():
    assert refusal(verifiers.verify_stripe, SOURCE_SECRET, {}) == "missing_signature"


def test_stripe_header_with_several_v1_entries_is_accepted_when_one_matches():
    # Stripe sends one v1 per active endpoint secret while a secret is being rolled, plus a v0 test entry.
    good = stripe_signature(SOURCE_SECRET, BODY, NOW).split(",")[1]
    old = stripe_signature("whsec_old_secret", BODY, NOW).split(",")[1]
    headers = {"stripe-signature": f"t={NOW},{old},{good},v0={'0' * 64}"}

    verifiers.verify_stripe(SOURCE_SECRET, headers, BODY, NOW)


def test_stripe_header_whose_v1_entries_all_mismatch_is_refused():
    old = stripe_signature("whsec_old_secret", BODY, NOW).split(",")[1]
    headers = {"stripe-signature": f"t={NOW},{old},v1={'0' * 64}"}

    assert refusal(verifiers.verify_stripe, SOURCE_SECRET, headers) == "bad_signature"


@pytest.mark.parametrize(
    "header",
    ["garbage", f"t={NOW}", "v1=" + "0" * 64, f"t=yesterday,v1={'0' * 64}"],
    ids=["garbage", "no-signature", "no-timestamp", "timestamp-not-a-number"],
)
def test_malformed_stripe_header_is_refused(header):
    assert refusal(verifiers.verify_stripe, SOURCE_SECRET, {"stripe-signature": header}) == "bad_signature"


def test_stripe_signature_with_non_ascii_characters_is_refused_not_crashed():
    # Header values reach Django as latin-1 text; hmac.compare_digest raises TypeError on non-ASCII str.
    headers = {"stripe-signature": f"t={NOW},v1=é{'0' * 63}"}

    assert refusal(verifiers.verify_stripe, SOURCE_SECRET, headers) == "bad_signature"


def test_stripe_source_without_secret_refuses_everything():
    headers = {"stripe-signature": stripe_signature("", BODY, NOW)}

    assert refusal(verifiers.verify_stripe, None, headers) == "bad_signature"


# --- GitHub ---------------------------------------------------------------------


def test_github_signature_made_like_github_is_accepted():
    headers = {"x-hub-signature-256": github_signature(SOURCE_SECRET, BODY)}

    assert verifiers.verify_github(SOURCE_SECRET, headers, BODY, NOW) is None


def test_github_signature_with_another_secret_is_refused():
    headers = {"x-hub-signature-256": github_signature("other", BODY)}

    assert refusal(verifiers.verify_github, SOURCE_SECRET, headers) == "bad_signature"


def test_github_sha1_signature_is_not_enough():
    digest = hmac.new(SOURCE_SECRET.encode(), BODY, hashlib.sha1).hexdigest()
    headers = {"x-hub-signature-256": f"sha1={digest}"}

    assert refusal(verifiers.verify_github, SOURCE_SECRET, headers) == "bad_signature"


def test_missing_github_signature_is_refused():
    # X-Hub-Signature (SHA-1) alone is not accepted.
    headers = {"x-hub-signature": "sha1=" + hmac.new(SOURCE_SECRET.encode(), BODY, hashlib.sha1).hexdigest()}

    assert refusal(verifiers.verify_github, SOURCE_SECRET, headers) == "missing_signature"


def test_github_form_encoded_delivery_is_verified_over_the_raw_form_body():
    form = b"payload=" + json.dumps({"action": "opened"}).encode().replace(b" ", b"+")
    headers = {"x-hub-signature-256": github_signature(SOURCE_SECRET, form)}

    verifiers.verify_github(SOURCE_SECRET, headers, form, NOW)
    assert refusal(verifiers.verify_github, SOURCE_SECRET, headers, body=form + b"&x=1") == "bad_signature"


def test_github_signature_with_non_ascii_characters_is_refused_not_crashed():
    headers = {"x-hub-signature-256": "sha256=" + "é" * 64}

    assert refusal(verifiers.verify_github, SOURCE_SECRET, headers) == "bad_signature"


# --- Standard Webhooks -----------------------------------------------------------


def test_standard_webhook_signed_by_the_reference_library_is_accepted():
    headers = standard_webhook_headers(SOURCE_SECRET, "msg_1", BODY, NOW)

    assert verifiers.verify_standard(SOURCE_SECRET, headers, BODY, NOW) is None


def test_kite_standard_webhook_signature_is_accepted_by_the_reference_library():
    now = int(time.time())  # the reference library checks its own clock
    signature = verifiers.standard_webhooks_sign(SOURCE_SECRET, "msg_1", now, BODY)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": signature}

    assert Webhook(SOURCE_SECRET).verify(BODY, headers) == json.loads(BODY)


def test_kite_signature_with_a_generated_secret_is_accepted_by_the_reference_library():
    now = int(time.time())  # the reference library checks its own clock
    secret = crypto.new_webhook_secret()
    signature = verifiers.standard_webhooks_sign(secret, "msg_2", now, BODY)
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(now), "webhook-signature": signature}

    Webhook(secret).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(crypto.new_webhook_secret()).verify(BODY, headers)


def test_standard_webhook_secret_without_base64_padding_is_read_like_the_reference_library():
    key = secrets.token_bytes(24 + 1)  # 25 bytes: base64 needs padding
    secret = "whsec_" + base64.b64encode(key).decode().rstrip("=")
    headers = standard_webhook_headers(secret, "msg_3", BODY, NOW)

    verifiers.verify_standard(secret, headers, BODY, NOW)


def test_standard_webhook_with_another_secret_is_refused():
    headers = standard_webhook_headers(crypto.new_webhook_secret(), "msg_1", BODY, NOW)

    assert refusal(verifiers.verify_standard, SOURCE_SECRET, headers) == "bad_signature"


def test_standard_webhook_signature_is_bound_to_the_message_id():
    headers = standard_webhook_headers(SOURCE_SECRET, "msg_1", BODY, NOW) | {"webhook-id": "msg_2"}

    assert refusal(verifiers.verify_standard, SOURCE_SECRET, headers) == "bad_signature"


def test_standard_webhook_with_several_signatures_is_accepted_when_one_v1_matches():
    headers = standard_webhook_headers(SOURCE_SECRET, "msg_1", BODY, NOW)
    other = standard_webhook_headers(crypto.new_webhook_secret(), "msg_1", BODY, NOW)["webhook-signature"]
    headers["webhook-signature"] = f"v1a,{base64.b64encode(b'x' * 64).decode()} {other} {headers['webhook-signature']}"

    verifiers.verify_standard(SOURCE_SECRET, headers, BODY, NOW)


@pytest.mark.parametrize("age", [301, -301])
def test_standard_webhook_timestamp_outside_five_minutes_is_stale(age):
    headers = standard_webhook_headers(SOURCE_SECRET, "msg_1", BODY, NOW - age)

    assert refusal(verifiers.verify_standard, SOURCE_SECRET, headers) == "stale_timestamp"


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_standard_webhook_without_one_of_its_headers_is_refused(missing):
    headers = standard_webhook_headers(SOURCE_SECRET, "msg_1", BODY, NOW)
    del headers[missing]

    assert refusal(verifiers.verify_standard, SOURCE_SECRET, headers) == "missing_signature"


def test_standard_webhook_with_non_numeric_timestamp_is_refused():
    headers = standard_webhook_headers(SOURCE_SECRET, "msg_1", BODY, NOW) | {"webhook-timestamp": "soon"}

    assert refusal(verifiers.verify_standard, SOURCE_SECRET, headers) == "bad_signature"


def test_standard_webhook_signature_with_non_ascii_characters_is_refused_not_crashed():
    headers = standard_webhook_headers(SOURCE_SECRET, "msg_1", BODY, NOW) | {"webhook-signature": "v1,é"}

    assert refusal(verifiers.verify_standard, SOURCE_SECRET, headers) == "bad_signature"


def test_standard_webhooks_sign_matches_the_reference_library_byte_for_byte():
    reference = Webhook(SOURCE_SECRET).sign("msg_9", datetime.fromtimestamp(NOW, tz=UTC), BODY.decode())

    assert verifiers.standard_webhooks_sign(SOURCE_SECRET, "msg_9", NOW, BODY) == reference


# --- none and kite ------------------------------------------------------------------


def test_none_kind_accepts_an_unsigned_body():
    assert verifiers.verify_none(None, {}, b"anything", NOW) is None


def test_unconfigured_kite_verifier_refuses_even_a_signed_request():
    headers = standard_webhook_headers(SOURCE_SECRET, "msg_1", BODY, NOW)

    assert refusal(verifiers.verify_kite_unconfigured, SOURCE_SECRET, headers) == "unknown_peer"


def test_lower_headers_makes_lookups_case_insensitive():
    assert verifiers.lower_headers({"Stripe-Signature": "x", "X-GitHub-Event": "push"}) == {
        "stripe-signature": "x",
        "x-github-event": "push",
    }


def test_headers_of_a_wsgi_request_match_lower_headers_of_djangos_view():
    from django.test import RequestFactory

    request = RequestFactory().post("/x", b"{}", content_type="application/json", HTTP_STRIPE_SIGNATURE="t=1,v1=ab",
                                    HTTP_X_GITHUB_EVENT="push", HTTP_WEBHOOK_ID="msg_1")  # fmt: skip
    assert verifiers.headers_of(request.META) == verifiers.lower_headers(request.headers)
    assert verifiers.headers_of(request.META)["stripe-signature"] == "t=1,v1=ab"
