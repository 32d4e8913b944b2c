from datetime import timedelta

from django.utils import timezone

from kite.crypto import sha256_hex
from kite.models import ApiKey, Membership, Team


LAST_USED_RESOLUTION = timedelta(minutes=1)  # one UPDATE per key per minute, not per request


def apikey_by_raw(raw_key: str) -> ApiKey | None:
    """Look a key up by its digest: the raw key is never stored or compared."""
    api_key = (
        ApiKey.objects.select_related("team")
        .filter(digest=sha256_hex(raw_key), revoked_at__isnull=True)
        .first()
    )
    if api_key is not None:
        _touch(api_key)
    return api_key


def _touch(api_key: ApiKey) -> None:
    now = timezone.now()
    if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now


def membership_for_user(user) -> Membership | None:
    return Membership.objects.select_related("team").filter(user=user).order_by("id").first()


def team_by_id(team_id: str) -> Team | None:
    return Team.objects.filter(id=team_id).first()


def team_by_ref(ref: str) -> Team | None:
    """A team named on the command line: by id or by name."""
    return Team.objects.filter(id=ref).first() or Team.objects.filter(name=ref).first()


def now():
    return timezone.now()
