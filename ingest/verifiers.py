"""Signature schemes of webhook senders. Pure functions: no Django, no database.

A verifier takes the source's secret, the request headers (lower-cased names),
the raw body, the current unix time and the team id, and raises
`VerificationError` or returns what it learned about the sender (None for
provider webhooks; the federation verifier returns the peer), which the
pipeline hands on to the "event stored" hooks.
"""

import base64
import binascii
import contextvars
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass

TOLERANCE_SECONDS = 300


class VerificationError(Exception):
    def __init__(self, code: str, detail: str, status: int = 401):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status  # 401: not authenticated; 400: headers too malformed to try


Verifier = Callable[[str | None, Mapping[str, str], bytes, int, str], object]


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _check_timestamp(raw: str, now: int, header: str) -> int:
    try:
        timestamp = int(raw)
    except (TypeError, ValueError):
        raise VerificationError("bad_signature", f"{header} is not a unix timestamp.") from None
    if abs(now - timestamp) > TOLERANCE_SECONDS:
        raise VerificationError(
            "stale_timestamp",
            f"{header} is {now - timestamp:+d} s from this server's clock (tolerance ±{TOLERANCE_SECONDS} s).",
        )
    return timestamp


def _same(expected: str, candidate: str) -> bool:
    # Header values are arbitrary text; compare_digest refuses non-ASCII str, so compare bytes.
    return hmac.compare_digest(expected.encode(), candidate.encode())


def _require_secret(secret: str | None) -> str:
    if not secret:
        raise VerificationError("bad_signature", "This source has no signing secret configured.")
    return secret


def verify_stripe(secret, headers, body, now, team_id=None):
    """`Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "t.body")>[,v1=…]`."""
    secret = _require_secret(secret)
    header = headers.get("stripe-signature")
    if not header:
        raise VerificationError("missing_signature", "Stripe-Signature header is missing.")
    pairs = [part.split("=", 1) for part in header.split(",") if "=" in part]
    timestamps = [value for key, value in pairs if key.strip() == "t"]
    signatures = [value.strip() for key, value in pairs if key.strip() == "v1"]
    if not timestamps or not signatures:
        raise VerificationError("bad_signature", "Stripe-Signature has no t= or no v1= element.")
    _check_timestamp(timestamps[0], now, "Stripe-Signature t")
    expected = hmac.new(secret.encode(), timestamps[0].encode() + b"." + body, hashlib.sha256).hexdigest()
    if not any(_same(expected, candidate) for candidate in signatures):
        raise VerificationError("bad_signature", "Stripe-Signature does not match this source's secret.")


def verify_github(secret, headers, body, now, team_id=None):
    """`X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`."""
    secret = _require_secret(secret)
    header = headers.get("x-hub-signature-256")
    if not header:
        raise VerificationError("missing_signature", "X-Hub-Signature-256 header is missing.")
    scheme, _, signature = header.partition("=")
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if scheme != "sha256" or not _same(expected, signature.strip()):
        raise VerificationError("bad_signature", "X-Hub-Signature-256 does not match this source's secret.")


def standard_webhooks_key(secret: str) -> bytes:
    """`whsec_<base64>` → key bytes, as every Standard Webhooks library reads it."""
    encoded = secret[len("whsec_") :] if secret.startswith("whsec_") else secret
    try:  # senders may drop the base64 padding; the reference libraries restore it
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        return secret.encode()


def standard_webhooks_sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    message = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(_hmac_sha256(standard_webhooks_key(secret), message)).decode()


def standard_signature_entries(header: str) -> list[tuple[str, str]]:
    entries = []
    for item in header.split():
        version, _, value = item.partition(",")
        if value:
            entries.append((version, value))
    return entries


def verify_standard(secret, headers, body, now, team_id=None):
    """Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature `v1,<base64>`."""
    secret = _require_secret(secret)
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signature = headers.get("webhook-signature")
    if not (msg_id and timestamp and signature):
        raise VerificationError(
            "missing_signature", "webhook-id, webhook-timestamp and webhook-signature headers are required."
        )
    _check_timestamp(timestamp, now, "webhook-timestamp")
    expected = standard_webhooks_sign(secret, msg_id, int(timestamp), body).split(",", 1)[1]
    candidates = [value for version, value in standard_signature_entries(signature) if version == "v1"]
    if not any(_same(expected, candidate) for candidate in candidates):
        raise VerificationError("bad_signature", "webhook-signature does not match this source's secret.")


class TokenDigest(str):
    """The SHA-256 (hex) of a source's bearer token, handed to its verifier instead of a secret."""


def verify_cloudevents(secret, headers, body, now, team_id=None):
    """A CloudEvents producer: a Standard Webhooks signature, or `Authorization: Bearer <token>`
    for a source created with auth=token (its hash compared in constant time)."""
    if not isinstance(secret, TokenDigest):
        return verify_standard(secret, headers, body, now, team_id)
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise VerificationError("missing_token", "Authorization: Bearer <the source's token> is required.")
    digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()
    if not _same(secret, digest):
        raise VerificationError("bad_token", "The bearer token is not this source's token.")


def verify_none(secret, headers, body, now, team_id=None):
    """Explicitly unverified: the operator chose to accept anything."""


def verify_kite_unconfigured(secret, headers, body, now, team_id=None):
    raise VerificationError(
        "unknown_peer", "Federation is not enabled on this instance: no peer or trusted sender can be verified."
    )


VERIFIERS: dict[str, Verifier] = {
    "stripe": verify_stripe,
    "github": verify_github,
    "standard": verify_standard,
    "cloudevents": verify_cloudevents,
    "none": verify_none,
    # Replaced by the federation app (AppConfig.ready) with the peer verifier.
    "kite": verify_kite_unconfigured,
}


# True while a webhook is verified against a source read from the per-process cache, whose event
# is then stored by one statement that checks the source row is still as read
# (ingest.services._store_alone). A verifier may then also use cached rows of its own, provided
# the sender it returns carries a `store_guard` (StoreGuard) that the same statement checks.
from_cache: contextvars.ContextVar[bool] = contextvars.ContextVar("from_cache", default=False)


@dataclass(frozen=True)
class StoreGuard:
    """A condition the statement storing the event must also find true (SQL, with `params`), else
    nothing is stored and the webhook is verified again against fresh reads; `forget` drops
    the cached rows that failed it first."""

    sql: str
    params: tuple
    forget: Callable[[], None]


# Verifiers of senders (not providers) that ingest.edge may call on the event loop: (headers, body,
# team_id) → the sender, carrying the `store_guard` the statement storing its event checks, or None
# when they cannot decide without the database — then Django verifies the webhook as always. They
# never read or write the database and never refuse: a refusal is Django's to make (and audit).
LOOP_VERIFIERS: dict[str, Callable[[Mapping[str, str], bytes, str], object | None]] = {}


def register_verifier(kind: str, verifier: Verifier, on_loop=None) -> None:
    VERIFIERS[kind] = verifier
    if on_loop is not None:
        LOOP_VERIFIERS[kind] = on_loop
    else:
        LOOP_VERIFIERS.pop(kind, None)


def lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def headers_of(meta: Mapping[str, str]) -> dict[str, str]:
    """A WSGI request's headers, names lower-case (`lower_headers(request.headers)` without
    building Django's HttpHeaders first: a webhook reads its headers once)."""
    headers = {name[5:].replace("_", "-").lower(): value for name, value in meta.items() if name.startswith("HTTP_")}
    for name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if meta.get(name):
            headers[name.replace("_", "-").lower()] = meta[name]
    return headers
