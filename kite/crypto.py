"""Secrets, digests, fingerprints and encryption at rest (SECURITY.md "What Kite protects").

Bearer credentials are stored as SHA-256 digests; keys Kite must use itself
(HMAC secrets) are encrypted with MultiFernet under KITE_ENCRYPTION_KEYS.
"""

import base64
import hashlib
import secrets
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class UndecryptableSecret(ImproperlyConfigured):
    """A stored secret that none of KITE_ENCRYPTION_KEYS decrypts: the key that encrypted it is missing.
    The API answers it 503 `encryption_key_missing` (kite.errors), a command with one line (manage.py)."""

    def __init__(self, detail: str = ""):
        super().__init__(detail or f"KITE_ENCRYPTION_KEYS: a stored secret cannot be decrypted: {keys_origin()}")


def sha256_hex(value: str | bytes) -> str:
    if isinstance(value, str):
        value = value.encode()
    return hashlib.sha256(value).hexdigest()


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
    except InvalidToken:
        raise UndecryptableSecret() from None


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
    except InvalidToken:
        raise UndecryptableSecret() from None


# --- are the configured keys the ones that encrypted what is stored? ---------------------------


def keys_origin() -> str:
    """Where this process's keys come from, and what to do when one is missing (one sentence)."""
    key_file = settings.KITE_ENCRYPTION_KEYS_FILE
    if settings.KITE_ENCRYPTION_KEYS_FROM_ENV:
        return (f"the key that encrypted them is not in KITE_ENCRYPTION_KEYS; add it after the first key (the key Kite "
                f"generated on its first start is in {key_file})")  # fmt: skip
    return (f"KITE_ENCRYPTION_KEYS is unset, so Kite uses the key in {key_file}, which did not encrypt them; set "
            "KITE_ENCRYPTION_KEYS=<new>,<old> as when you rotated, or write those keys into that file")  # fmt: skip


def encrypted_fields(model) -> list[str]:
    return [field.name for field in model._meta.concrete_fields if field.name.endswith("_encrypted")]


def undecryptable_columns() -> list[str]:
    """`app.Model.field` of each encrypted column whose oldest or newest stored value none of the
    configured keys decrypts: two rows a column, so a start costs a dozen indexed reads, and a key
    dropped before or after `reencryptsecrets` (old rows, or new ones) is found either way."""
    from django.apps import apps

    fernet, failed = _fernet(tuple(settings.KITE_ENCRYPTION_KEYS)), []
    for model in apps.get_models():
        for name in encrypted_fields(model):
            stored = model._default_manager.exclude(**{name: ""}).values_list(name, flat=True)
            samples = {stored.order_by("pk").first(), stored.order_by("-pk").first()} - {None}
            if any(not _decrypts(fernet, token) for token in samples):
                failed.append(f"{model._meta.label}.{name}")
    return failed


def _decrypts(fernet: MultiFernet, token: str) -> bool:
    try:
        fernet.decrypt(token.encode())
    except InvalidToken:
        return False
    return True


def check_stored_secrets() -> None:
    """Raise UndecryptableSecret (one line: the variable, the key file, the columns) when the keys
    cannot decrypt what is stored; say nothing when the database cannot be read yet (an outage, or
    not migrated): the processes start and wait for it as they always do."""
    from django.db import Error as DatabaseError  # OperationalError, ProgrammingError and InterfaceError alike

    try:
        failed = undecryptable_columns()
    except DatabaseError:
        return
    if failed:
        raise UndecryptableSecret(
            f"KITE_ENCRYPTION_KEYS cannot decrypt the stored secrets in {', '.join(failed)}: {keys_origin()}."
        )
