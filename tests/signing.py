"""Signatures exactly as the providers send them, for tests and benchmarks."""

import hashlib
import hmac
import time


def stripe_signature(secret: str, body: bytes, timestamp: int | None = None) -> str:
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def github_signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def standard_webhook_headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """Standard Webhooks headers signed by the reference `standardwebhooks` library, not by Kite's code."""
    from datetime import UTC, datetime

    from standardwebhooks.webhooks import Webhook

    timestamp = int(time.time()) if timestamp is None else timestamp
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=UTC), body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def as_wsgi_headers(headers: dict[str, str]) -> dict[str, str]:
    """{"webhook-id": …} → {"HTTP_WEBHOOK_ID": …}, for Django's test client."""
    return {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}
