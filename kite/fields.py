"""A write refuses a field it will not apply (docs/architecture.md "Apps and their dependencies"), in one place for every endpoint.

A field a write endpoint does not take is a 400 `{detail, code: "invalid"}` naming it and what
to use instead, raised before anything is read from or written to the database — never silently
ignored. Input serializers inherit `StrictSerializer`; views that read their body by hand (the
peer-facing, signed endpoints, the fleet) call `refuse_unapplied`; endpoints that take no body
call `refuse_any`. tests/security/test_no_silent_noops.py walks the URL conf and holds every write
endpoint to it.
"""

from collections.abc import Iterable, Mapping

from django import forms
from rest_framework import serializers

from kite.errors import ApiError, Code

# Fields that appear in Kite's answers but that Kite sets itself: why a write does not take them.
READ_ONLY = {
    "id": "ids are given by Kite",
    "created_at": "set by Kite when the row is made",
    "fingerprint": "computed by Kite from the secret",
    "inbound_fingerprint": "computed by Kite from the inbound secret",
    "outbound_fingerprint": "computed by Kite from the outbound secret",
    "secret_fingerprint": "computed by Kite from the secret",
    "thumbprint": "computed by Kite from the certificate",
    "certificate_thumbprint": "computed by Kite from certificate_pem",
    "status": "set by Kite",
    "reachability": "follows the heartbeats",
    "remote_instance_id": "learned from the other instance, never set by hand",
    "role": "set by Kite",
    "hook_url": "set by Kite from KITE_PUBLIC_URL",
    "verified": "follows the source's kind",
    "expires_at": "set by Kite from ttl_seconds",
    "not_before": "set by Kite when the certificate is issued",
    "not_after": "set by Kite from validity_days",
    "last_seen": "follows the agent's heartbeats",
    "last_inbound_at": "set by Kite when the peer calls",
    "last_heartbeat_at": "follows the heartbeats",
    "last_success_at": "follows the heartbeats",
}


def explain(field: str, what: str, accepted: Iterable[str], instead: Mapping[str, str] | None = None) -> str:
    """Why one field is refused: what to use instead, or, for a field nobody knows, what is taken."""
    if instead and field in instead:
        return f"{instead[field]}."
    if field in READ_ONLY:
        return f"read-only ({READ_ONLY[field]})."
    taken = ", ".join(sorted(accepted))
    return f"not a field of {what}" + (f" (it takes {taken})." if taken else " (it takes no body).")


def refused(data, accepted: Iterable[str], *, what: str, instead: Mapping[str, str] | None = None) -> dict:
    """{field: why} for every field of `data` outside `accepted` (nothing for a non-object body:
    its shape is the endpoint's own check)."""
    if not isinstance(data, Mapping):
        return {}
    accepted = set(accepted)
    return {name: explain(name, what, accepted, instead) for name in sorted(map(str, data)) if name not in accepted}


def refuse_unapplied(data, accepted: Iterable[str], *, what: str, instead: Mapping[str, str] | None = None) -> None:
    """ApiError 400 naming every field of `data` outside `accepted`."""
    found = refused(data, accepted, what=what, instead=instead)
    if found:
        raise ApiError(" ".join(f"{field}: {reason}" for field, reason in found.items()), Code.INVALID)


def refuse_any(data, *, what: str, instead: Mapping[str, str] | None = None) -> None:
    """For an endpoint that takes no body: any field is refused (an empty body or {} is fine)."""
    if isinstance(data, Mapping):
        refuse_unapplied(data, (), what=what, instead=instead)
    elif data not in (None, b"", "", [], ()):
        raise ApiError(f"{what} takes no body.", Code.INVALID)


class StrictSerializer(serializers.Serializer):
    """An input serializer that refuses a field it does not declare (or declares read-only),
    naming it: `WHAT` says what the body describes, `INSTEAD` maps a field to what to use."""

    WHAT = "this request"
    INSTEAD: dict[str, str] = {}

    def to_internal_value(self, data):
        writable = [name for name, field in self.fields.items() if not field.read_only]
        found = refused(data, writable, what=self.WHAT, instead=self.INSTEAD)
        if found:
            raise serializers.ValidationError({field: [reason] for field, reason in found.items()})
        return super().to_internal_value(data)


class AsciiIntegerField(serializers.IntegerField):
    """An integer that, sent as text (a query parameter), is written in ASCII: int() also reads
    "٣" as 3 and "１２" as 12 (str.isdigit() admits them, and "²", which int() refuses)."""

    def to_internal_value(self, data):
        if isinstance(data, str) and not data.isascii():
            self.fail("invalid")
        return super().to_internal_value(data)


class AsciiIntegerFormField(forms.IntegerField):
    """The same for a screen's form (a filter in the query string)."""

    def to_python(self, value):
        if isinstance(value, str) and not value.isascii():
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid")
        return super().to_python(value)
