"""Values Kite generates once and keeps in KITE_DATA_DIR.

No Django here: settings import this before Django is configured.
"""

import base64
import os
import secrets
from pathlib import Path


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def persistent_value(data_dir: Path, name: str, generate) -> str:
    """Return the value stored in data_dir/name, generating it on first use.

    Written with O_EXCL so two processes starting together agree on one value.
    """
    path = ensure_dir(data_dir) / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_nonempty(path)
    value = generate()
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


def _read_nonempty(path: Path) -> str:
    # Another process may have created the file a moment ago and not yet written it.
    for _ in range(100):
        value = path.read_text().strip()
        if value:
            return value
        import time

        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty; delete it to regenerate")


def new_secret_key() -> str:
    return secrets.token_urlsafe(50)


def new_fernet_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def new_instance_id() -> str:
    return "kite-" + secrets.token_hex(6)
