"""`manage.py --data-dir DIR <command>`: act on the instance that runs from DIR.

Each Kite process reads its settings from the environment, so a command run in another shell sees
another instance (the first one's data, or none) unless it is given the same variables. `runkite`
records the variables it started with in DIR/instance.env (mode 0600, next to the database and keys
it protects already); `--data-dir` replaces the caller's Kite variables with that record. The
secrets an operator may keep out of the data dir on purpose (KITE_ENCRYPTION_KEYS, SECRET_KEY,
KITE_METRICS_TOKEN, and a DATABASE_URL or REDIS_URL that holds a password) are never recorded: the
record names them, and a command takes them from its own environment.

No Django here: manage.py applies it before settings are read.
"""

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

RECORD = "instance.env"
NOT_RECORDED = frozenset({"KITE_ENCRYPTION_KEYS", "SECRET_KEY", "KITE_METRICS_TOKEN"})
OPTION = "--data-dir"


def is_kite_variable(name: str) -> bool:
    return name.startswith("KITE_") or name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY")


def _secret(name: str, value: str) -> bool:
    if name in NOT_RECORDED:
        return True
    return name.endswith("_URL") and bool(urlsplit(value).password)


def record(data_dir: Path, environ) -> Path:
    """Write the Kite variables of `environ` (but the secrets above, only named) to data_dir/instance.env."""
    lines = []
    for name, value in sorted(environ.items()):
        if not is_kite_variable(name) or "\n" in value:
            continue
        lines.append(f"# {name}: not recorded, a secret\n" if _secret(name, value) else f"{name}={value}\n")
    lines.append(f"KITE_DATA_DIR={data_dir}\n")
    path = Path(data_dir) / RECORD
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.writelines(lines)
    os.replace(temporary, path)
    return path


def read(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#") and is_kite_variable(name.strip()):
            values[name.strip()] = value
    return values


def unrecorded(path: Path) -> set[str]:
    """The secrets the record names but does not hold (besides NOT_RECORDED)."""
    found = re.findall(r"^# ([A-Z_]+): not recorded", path.read_text(), re.MULTILINE)
    return {name for name in found if is_kite_variable(name)}


def apply_data_dir_option(argv: list[str], environ) -> list[str]:
    """argv without `--data-dir DIR` (given before the command); environ then describes DIR's instance."""
    if len(argv) < 2 or not (argv[1] == OPTION or argv[1].startswith(OPTION + "=")):
        return argv
    if argv[1] == OPTION:
        if len(argv) < 3:
            raise ImproperlyConfigured(f"{OPTION} needs a directory: manage.py {OPTION} DIR <command>")
        value, rest = argv[2], argv[3:]
    else:
        value, rest = argv[1].partition("=")[2], argv[2:]
    data_dir = Path(value).expanduser().resolve()
    if not data_dir.is_dir():
        raise ImproperlyConfigured(f"{OPTION}: {data_dir} is not a directory")
    recorded = data_dir / RECORD
    kept = NOT_RECORDED | (unrecorded(recorded) if recorded.exists() else set())
    for name in [name for name in environ if is_kite_variable(name) and name not in kept]:
        del environ[name]
    if recorded.exists():
        environ.update(read(recorded))
    environ["KITE_DATA_DIR"] = str(data_dir)
    return [argv[0], *rest]
