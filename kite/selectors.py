from django.utils import timezone

from kite.crypto import sha256_hex
from kite.models import ApiKey, Membership, Team


def apikey_by_raw(raw_key: str) -> ApiKey | None:
    """Look a key up by its digest: the raw key is never stored or compared."""
    return (
        ApiKey.objects.select_related("team")
        .filter(digest=sha256_hex(raw_key), revoked_at__isnull=True)
        .first()
    )


def membership_for_user(user) -> Membership | None:
    return Membership.objects.select_related("team").filter(user=user).order_by("id").first()


def team_by_id(team_id: str) -> Team | None:
    return Team.objects.filter(id=team_id).first()


def team_by_ref(ref: str) -> Team | None:
    """A team named on the command line: by id or by name."""
    return Team.objects.filter(id=ref).first() or Team.objects.filter(name=ref).first()


def now():
    return timezone.now()
