"""Template filters of the screens: times as operators read them ("12 s ago", UTC), long tokens
that wrap at sensible points."""

import re
from datetime import UTC, datetime

from django import template
from django.utils import timezone
from django.utils.html import conditional_escape
from django.utils.safestring import mark_safe

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


_BREAK_AFTER = re.compile(r"(?<=[/.\-_:?&=])")


@register.filter
def breaks(value) -> str:
    """A long token (URL, id, event type) with a line-break opportunity after each / . - _ : ? & =,
    so a narrow cell wraps it there rather than anywhere; copying it copies it unchanged."""
    parts = [part for part in _BREAK_AFTER.split(str(value)) if part]
    return mark_safe("<wbr>".join(str(conditional_escape(part)) for part in parts))
