"""Secrets, digests, fingerprints and encryption at rest (DESIGN §3).

Bearer credentials are stored as SHA-256 digests; keys Kite must use itself
(HMAC secrets) are encrypted with MultiFernet under KITE_ENCRYPTION_KEYS.
"""

import base64
import hashlib
import hmac
import secrets
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def sha256_hex(value: str | bytes) -> str:
    if isinstance(value, str):
        value = value.encode()
    return hashlib.sha256(value).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def fingerprint(secret: str) -> str:
    """What operators compare on both sides without revealing the secret."""
    return "sha256:" + sha256_hex(secret)[:12]


def new_webhook_secret() -> str:
    """32 CSPRNG bytes in the Standard Webhooks `whsec_` format."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def new_bearer_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


@lru_cache(maxsize=4)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key.encode()) for key in keys])
    except ValueError as exc:
        raise ImproperlyConfigured(f"KITE_ENCRYPTION_KEYS: not a valid Fernet key ({exc})") from exc


def encrypt(plaintext: str) -> str:
    return _fernet(tuple(settings.KITE_ENCRYPTION_KEYS)).encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet(tuple(settings.KITE_ENCRYPTION_KEYS)).decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise ImproperlyConfigured(
            "KITE_ENCRYPTION_KEYS: a stored secret cannot be decrypted with the configured keys"
        ) from exc


def decrypt_cached(token: str) -> str:
    """decrypt, remembered per process: for secrets read on every request (a source's, a peer's).
    A changed secret is a new token, so nothing stale is ever returned; bounded."""
    return _decrypt_cached(tuple(settings.KITE_ENCRYPTION_KEYS), token)


@lru_cache(maxsize=4096)
def _decrypt_cached(keys: tuple[str, ...], token: str) -> str:
    return decrypt(token)


def rotate(token: str) -> str:
    """Re-encrypt under the first key (MultiFernet.rotate); the plaintext never leaves."""
    try:
        return _fernet(tuple(settings.KITE_ENCRYPTION_KEYS)).rotate(token.encode()).decode()
    except InvalidToken as exc:
        raise ImproperlyConfigured(
            "KITE_ENCRYPTION_KEYS: a stored secret cannot be decrypted with the configured keys"
        ) from exc
