"""Template filters of the screens: times as operators read them ("12 s ago", UTC)."""

from datetime import UTC, datetime

from django import template
from django.utils import timezone

register = template.Library()


def _moment(value) -> datetime | None:
    """A datetime, or an ISO 8601 string as the fleet rows carry them."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return value if isinstance(value, datetime) else None


@register.filter
def ago(value) -> str:
    moment = _moment(value)
    if moment is None:
        return "never"
    seconds = int((timezone.now() - moment).total_seconds())
    if seconds < 0:
        return "just now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


@register.filter
def utc(value) -> str:
    moment = _moment(value)
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC" if moment else "—"
