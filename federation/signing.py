"""Signing peer-to-peer requests. Pure: no Django.

Standard Webhooks headers: `webhook-id`, `webhook-timestamp`,
`webhook-signature` holding space-separated `v1,<base64 HMAC-SHA256>` (the
shared-secret factor) and, with a certificate, `v1a,<base64 Ed25519>` (the
certificate factor).

Every signature but one is over the **bound message**, which names what the
request authorises — method, path and target team — so a signature made for one
endpoint (or team) is worthless on another:

    kite-bind-v1 LF <METHOD> LF <path> LF <team id> LF <webhook-id>.<webhook-timestamp>.<raw body>

The exception keeps event deliveries verifiable by any Standard Webhooks library:
on `POST …/hooks/<team>/kite` the `v1` entry is over the plain Standard Webhooks
message `<webhook-id>.<webhook-timestamp>.<raw body>` (the `v1a` entry, which those
libraries ignore, is still over the bound message). A header value cannot hold a
line feed, so no plain message is ever a bound one. SECURITY.md documents both.
"""

import base64
import functools
import hashlib
import hmac
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ingest.verifiers import standard_signature_entries, standard_webhooks_key

TOLERANCE_SECONDS = 300
BIND_TAG = "kite-bind-v1"
MAX_SIGNATURE_ENTRIES = 8  # v1 + a v1a per valid certificate while one rotates: a handful at most
MAX_HEADER_CHARS = 2048  # webhook-signature / kite-key: 8 entries of base64 fit many times over
MAX_ID_CHARS = 255
_HOOK_PATH = re.compile(r"/hooks/(?P<team>[A-Za-z0-9_-]{1,64})/kite/?$")
_TEAM = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Binding:
    """What a request authorises: its method, path and target team."""

    method: str
    path: str
    team: str

    @property
    def delivery(self) -> bool:
        """An event delivery (`POST /hooks/<team>/kite`): its v1 entry stays plain Standard Webhooks."""
        return self.method == "POST" and _HOOK_PATH.search(self.path) is not None

    def message(self, msg_id: str, timestamp: int, body: bytes) -> bytes:
        return f"{BIND_TAG}\n{self.method}\n{self.path}\n{self.team}\n{msg_id}.{timestamp}.".encode() + body


@functools.lru_cache(maxsize=1024)
def binding_for(method: str, url: str) -> Binding:
    """The binding of a request to `url`: the team is the URL's `?team=` (control calls) or the
    team its `/hooks/<team>/kite` path names (deliveries); '' when it names none."""
    parts = urlsplit(url)
    hook = _HOOK_PATH.search(parts.path)
    if hook:  # a delivery: bound to the canonical hook path, whatever prefix or slash the URL has
        return delivery_binding(hook.group("team"), method)
    team = (parse_qs(parts.query).get("team") or [""])[0]
    return Binding(method.upper(), parts.path or "/", team if _TEAM.fullmatch(team) else "")


def delivery_binding(team: str, method: str = "POST") -> Binding:
    return Binding(method.upper(), f"/hooks/{team}/kite", team)


def signed_message(msg_id: str, timestamp: int, body: bytes) -> bytes:
    """The plain Standard Webhooks message (event deliveries' v1 entry only)."""
    return f"{msg_id}.{timestamp}.".encode() + body


def hmac_entry(secret: str, message: bytes) -> str:
    digest = hmac.new(standard_webhooks_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_headers(
    *, secret: str, msg_id: str, timestamp: int, body: bytes, sender_id: str, binding: Binding, ed25519_sign=None,
    key_thumbprint=None, also_signed_by: tuple = (),
) -> dict[str, str]:  # fmt: skip
    """Headers for one request; `ed25519_sign(message) -> bytes` adds the v1a factor.

    `also_signed_by`: (thumbprint, sign) of other valid certificates, each adding a v1a entry
    (while a certificate is rotated, a peer still pinned to the old one verifies its entry);
    `kite-key` then lists every thumbprint, space-separated, the newest first."""
    bound = binding.message(msg_id, timestamp, body)
    plain = signed_message(msg_id, timestamp, body) if binding.delivery else bound
    entries = [hmac_entry(secret, plain)]
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "kite-peer": sender_id}
    if ed25519_sign is not None:
        thumbprints = [key_thumbprint]
        entries.append("v1a," + base64.b64encode(ed25519_sign(bound)).decode())
        for thumbprint, sign in also_signed_by:
            thumbprints.append(thumbprint)
            entries.append("v1a," + base64.b64encode(sign(bound)).decode())
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

    def hmac_message(self, body: bytes, binding: Binding) -> bytes:
        """What the v1 entry signs: plain for a delivery, bound otherwise."""
        if binding.delivery:
            return signed_message(self.msg_id, self.timestamp, body)
        return binding.message(self.msg_id, self.timestamp, body)

    def ed25519_message(self, body: bytes, binding: Binding) -> bytes:
        return binding.message(self.msg_id, self.timestamp, body)


class SignatureError(Exception):
    def __init__(self, code: str, detail: str, status: int = 401):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status


def parse_headers(headers: dict[str, str], now: int) -> SignedRequest:
    """Read the signature headers (lower-case names); check presence, size and clock."""
    msg_id, raw_ts, signature = (headers.get(h, "") for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (msg_id and raw_ts and signature):
        raise SignatureError(
            "missing_signature", "webhook-id, webhook-timestamp and webhook-signature headers are required."
        )
    key = headers.get("kite-key", "")
    if len(msg_id) > MAX_ID_CHARS or len(signature) > MAX_HEADER_CHARS or len(key) > MAX_HEADER_CHARS:
        raise SignatureError("malformed_signature", f"webhook-id is at most {MAX_ID_CHARS} characters; "
                             f"webhook-signature and kite-key at most {MAX_HEADER_CHARS}.", 400)  # fmt: skip
    if not raw_ts.isascii() or not raw_ts.isdigit() or len(raw_ts) > 12:
        raise SignatureError("malformed_signature", "webhook-timestamp is not a unix timestamp.", 400)
    timestamp = int(raw_ts)
    if abs(now - timestamp) > TOLERANCE_SECONDS:
        raise SignatureError(
            "stale_timestamp",
            f"webhook-timestamp is {timestamp - now:+d} s from this server's clock (tolerance ±{TOLERANCE_SECONDS} s).",
        )
    entries = standard_signature_entries(signature)
    if len(entries) > MAX_SIGNATURE_ENTRIES or len(key.split()) > MAX_SIGNATURE_ENTRIES:
        raise SignatureError("malformed_signature", f"At most {MAX_SIGNATURE_ENTRIES} signature entries.", 400)
    return SignedRequest(
        msg_id=msg_id,
        timestamp=timestamp,
        hmac_entries=tuple(value for version, value in entries if version == "v1"),
        ed25519_entries=tuple(value for version, value in entries if version == "v1a"),
        sender=headers.get("kite-peer", "").strip()[:63],
        key_thumbprint=key.strip(),
    )


def hmac_matches(secret: str, request: SignedRequest, message: bytes) -> bool:
    expected = hmac_entry(secret, message).split(",", 1)[1].encode()
    return any(hmac.compare_digest(expected, candidate.encode()) for candidate in request.hmac_entries)


def ed25519_matches(verify, request: SignedRequest, message: bytes) -> bool:
    """`verify(signature, message) -> bool` checks against the pinned certificate's key."""
    for entry in request.ed25519_entries:
        try:
            signature = base64.b64decode(entry, validate=True)
        except ValueError:
            continue
        if verify(signature, message):
            return True
    return False
