"""Teams, memberships, API keys and the one-time bootstrap."""

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from kite.crypto import new_bearer_token, sha256_hex
from kite.models import ApiKey, Membership, Team

API_KEY_PREFIX = "kite_ak"


def team_create(*, name: str) -> Team:
    # Apps that keep per-team rows (ingest's built-in `kite` source) add them
    # from a post_save receiver, inside this transaction.
    with transaction.atomic():
        return Team.objects.create(name=name)


def team_get_or_create(*, name: str) -> tuple[Team, bool]:
    team = Team.objects.filter(name=name).first()
    if team:
        return team, False
    return team_create(name=name), True


@dataclass(frozen=True)
class IssuedApiKey:
    api_key: ApiKey
    raw_key: str


def apikey_create(*, team: Team, label: str = "") -> IssuedApiKey:
    raw = new_bearer_token(API_KEY_PREFIX)
    api_key = ApiKey.objects.create(team=team, label=label, prefix=raw[:12], digest=sha256_hex(raw))
    return IssuedApiKey(api_key=api_key, raw_key=raw)


def apikey_revoke(*, api_key: ApiKey) -> None:
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())


def membership_add(*, team: Team, user, role: str = Membership.Role.MEMBER) -> Membership:
    membership, _ = Membership.objects.update_or_create(team=team, user=user, defaults={"role": role})
    return membership


@dataclass
class BootstrapResult:
    team: Team
    admin_username: str | None = None
    admin_password: str | None = None
    api_key: str | None = None
    api_key_path: Path | None = None


def bootstrap(*, data_dir: Path | None = None) -> BootstrapResult:
    """Idempotent first-run setup: team `default`, a superuser, an admin API key.

    Credentials are returned (to be printed) only when they are created.
    """
    data_dir = Path(data_dir or settings.KITE_DATA_DIR)
    team, _ = team_get_or_create(name="default")
    result = BootstrapResult(team=team)
    user_model = get_user_model()
    if not user_model.objects.filter(is_superuser=True).exists():
        result.admin_username = "admin"
        result.admin_password = secrets.token_urlsafe(12)
        user = user_model.objects.create_superuser("admin", "", result.admin_password)
        membership_add(team=team, user=user, role=Membership.Role.ADMIN)
    key_path = data_dir / "admin-api-key"
    if not _key_file_works(key_path):  # missing, or left over from another database
        issued = apikey_create(team=team, label="bootstrap admin key")
        _write_private(key_path, issued.raw_key)
        result.api_key = issued.raw_key
    result.api_key_path = key_path
    return result


def _key_file_works(path: Path) -> bool:
    from kite.selectors import apikey_by_raw

    try:
        raw = path.read_text().strip()
    except FileNotFoundError:
        return False
    return bool(raw) and apikey_by_raw(raw) is not None


def _write_private(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content + "\n")
    os.chmod(path, 0o600)
