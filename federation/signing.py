"""Signing peer-to-peer requests (DESIGN §3). Pure: no Django.

Standard Webhooks headers: `webhook-id`, `webhook-timestamp`,
`webhook-signature` holding space-separated `v1,<base64 HMAC-SHA256>` (the
shared-secret factor) and, with a certificate, `v1a,<base64 Ed25519>` (the
certificate factor), over `{id}.{timestamp}.{body}`. Any Standard Webhooks
library verifies the `v1` entry.
"""

import base64
import hashlib
import hmac
from dataclasses import dataclass

from ingest.verifiers import standard_signature_entries, standard_webhooks_key

TOLERANCE_SECONDS = 300


def signed_message(msg_id: str, timestamp: int, body: bytes) -> bytes:
    return f"{msg_id}.{timestamp}.".encode() + body


def hmac_entry(secret: str, message: bytes) -> str:
    digest = hmac.new(standard_webhooks_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_headers(
    *, secret: str, msg_id: str, timestamp: int, body: bytes, sender_id: str, ed25519_sign=None, key_thumbprint=None,
    also_signed_by: tuple = (),
) -> dict[str, str]:
    """Headers for one request; `ed25519_sign(message) -> bytes` adds the v1a factor.

    `also_signed_by`: (thumbprint, sign) of other valid certificates, each adding a v1a entry
    (while a certificate is rotated, a peer still pinned to the old one verifies its entry);
    `kite-key` then lists every thumbprint, space-separated, the newest first."""
    message = signed_message(msg_id, timestamp, body)
    entries = [hmac_entry(secret, message)]
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "kite-peer": sender_id}
    if ed25519_sign is not None:
        thumbprints = [key_thumbprint]
        entries.append("v1a," + base64.b64encode(ed25519_sign(message)).decode())
        for thumbprint, sign in also_signed_by:
            thumbprints.append(thumbprint)
            entries.append("v1a," + base64.b64encode(sign(message)).decode())
        headers["kite-key"] = " ".join(thumbprints)
    headers["webhook-signature"] = " ".join(entries)
    return headers


@dataclass(frozen=True)
class SignedRequest:
    msg_id: str
    timestamp: int
    hmac_entries: tuple[str, ...]
    ed25519_entries: tuple[str, ...]
    sender: str
    key_thumbprint: str

    @property
    def message_prefix(self) -> bytes:
        return f"{self.msg_id}.{self.timestamp}.".encode()


class SignatureError(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def parse_headers(headers: dict[str, str], now: int) -> SignedRequest:
    """Read the signature headers (lower-case names); check presence and clock."""
    msg_id, raw_ts, signature = (headers.get(h, "") for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and raw_ts and signature):
        raise SignatureError(
            "missing_signature", "webhook-id, webhook-timestamp and webhook-signature headers are required."
        )
    try:
        timestamp = int(raw_ts)
    except ValueError:
        raise SignatureError("bad_secret", "webhook-timestamp is not a unix timestamp.") from None
    if abs(now - timestamp) > TOLERANCE_SECONDS:
        raise SignatureError(
            "stale_timestamp",
            f"webhook-timestamp is {now - timestamp:+d} s from this server's clock (tolerance ±{TOLERANCE_SECONDS} s).",
        )
    entries = standard_signature_entries(signature)
    return SignedRequest(
        msg_id=msg_id[:255],
        timestamp=timestamp,
        hmac_entries=tuple(value for version, value in entries if version == "v1"),
        ed25519_entries=tuple(value for version, value in entries if version == "v1a"),
        sender=headers.get("kite-peer", "").strip(),
        key_thumbprint=headers.get("kite-key", "").strip(),
    )


def hmac_matches(secret: str, request: SignedRequest, body: bytes) -> bool:
    expected = hmac_entry(secret, request.message_prefix + body).split(",", 1)[1].encode()
    return any(hmac.compare_digest(expected, candidate.encode()) for candidate in request.hmac_entries)


def ed25519_matches(verify, request: SignedRequest, body: bytes) -> bool:
    """`verify(signature, message) -> bool` checks against the pinned certificate's key."""
    message = request.message_prefix + body
    for entry in request.ed25519_entries:
        try:
            signature = base64.b64decode(entry, validate=True)
        except ValueError:
            continue
        if verify(signature, message):
            return True
    return False
