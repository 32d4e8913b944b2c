"""What the peers and certificates screens show of identity certificates that expire soon and of
their renewal (federation.renewal): the views stay as they are, the screens ask here."""

from django import template

from federation import renewal

register = template.Library()


@register.simple_tag
def certificate_warnings(team_id: str) -> list[dict]:
    """`{% certificate_warnings team_id as warnings %}`: certificates in use that expire soon."""
    return renewal.warnings(team_id)


@register.simple_tag
def certificate_status(certificate) -> dict:
    """`{% certificate_status row as status %}`: expiring, what it replaces or is renewed by, who acknowledged it."""
    return renewal.status(certificate)


@register.simple_tag
def certificate_warning_days() -> int:
    return renewal.warning_days()
