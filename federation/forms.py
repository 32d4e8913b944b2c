"""Forms of the Settings → Federation screens.

They type and bound what the browser sends; the rules themselves (https only,
Ed25519 PEM, secret length, name shape …) stay in the services, whose refusals
the views put on the field they name (kite.views.apply_error).
"""

import json
import re
from datetime import UTC, datetime

from django import forms
from django.forms.boundfield import BoundField
from django.forms.fields import InvalidJSONInput
from django.utils import timezone

from federation import audit, grants, invitations, renewal
from federation.models import Peer
from federation.routing import DEFAULT_MAX_HOPS
from kite.errors import ApiError
from kite.fields import AsciiIntegerFormField

REACHABILITY = ("Reachable", "Slow", "Stale", "Unreachable", "Unknown")
SCOPES_HELP = "Event type globs, separated by commas or spaces, e.g. stripe.* com.kite.agent.message. Empty: nothing."
SECRET_HELP = "Leave empty to generate one (shown once), or paste what the other side gave you."
PEM_WIDGET = forms.Textarea(attrs={"rows": 6, "spellcheck": "false", "class": "mono",
                                   "placeholder": "-----BEGIN CERTIFICATE-----"})  # fmt: skip


class ScopesField(forms.CharField):
    """Globs typed as one line; a list to the services."""

    def __init__(self, **kwargs):
        kwargs.setdefault("required", False)
        kwargs.setdefault("help_text", SCOPES_HELP)
        super().__init__(max_length=2000, **kwargs)

    def prepare_value(self, value):
        return ", ".join(value) if isinstance(value, list) else value

    def to_python(self, value):
        return [scope for scope in re.split(r"[\s,]+", super().to_python(value)) if scope]


FILTERS_HELP = ('CloudEvents filter expressions (exact, prefix, suffix, all, any, not) that must all match as well as '
                'the scopes, e.g. [{"prefix": {"type": "com.stripe."}}, {"not": {"exact": {"subject": "test"}}}]. '
                "Empty: every event in scope.")  # fmt: skip


class FiltersField(forms.JSONField):
    """A peer's filters as a JSON textarea; empty is none. Their rules stay in the services."""

    def __init__(self, **kwargs):
        kwargs.setdefault("required", False)
        kwargs.setdefault("help_text", FILTERS_HELP)
        widget = forms.Textarea(attrs={"rows": 4, "spellcheck": "false", "class": "mono",
                                       "placeholder": '[{"prefix": {"type": "com.stripe."}}]'})  # fmt: skip
        super().__init__(max_length=64_000, widget=widget, **kwargs)

    def to_python(self, value):
        value = super().to_python(value.strip() if isinstance(value, str) else value)
        return [] if value is None else value

    def prepare_value(self, value):
        if isinstance(value, InvalidJSONInput):
            return value
        return json.dumps(value, indent=2, ensure_ascii=False) if value not in (None, "", []) else ""

    def get_bound_field(self, form, field_name):
        return _WideField(form, self, field_name)


class _WideField(BoundField):
    """Its row of a .grid-form to itself (kite.css): JSON needs more room than a column."""

    def css_classes(self, extra_classes=None):
        return " ".join(filter(None, (super().css_classes(extra_classes), "wide")))


class PeerFilterForm(forms.Form):
    q = forms.CharField(required=False, max_length=100, label="Search", widget=forms.TextInput(
        attrs={"type": "search", "placeholder": "name, URL or instance ID"}))  # fmt: skip
    status = forms.ChoiceField(required=False, choices=[("", "Live (not revoked)"), *Peer.Status.choices,
                                                        ("all", "All")])  # fmt: skip
    reachability = forms.ChoiceField(required=False, choices=[("", "Any"), *((r, r) for r in REACHABILITY)])


class PeerCreateForm(forms.Form):
    name = forms.CharField(max_length=63, help_text="How this instance calls the other one, e.g. us-region.")
    peer_hook_url = forms.CharField(label="Hook URL of the other side", max_length=500,
                                    help_text="https://…/hooks/&lt;team id&gt;/kite, as its New peer page shows.")
    certificate_pem = forms.CharField(label="Its certificate PEM", required=False, max_length=16_384,
                                      strip=False, widget=PEM_WIDGET,
                                      help_text="Pasted: its requests must then be signed by that certificate too.")
    tls_fingerprint = forms.CharField(label="Its TLS fingerprint", required=False, max_length=71,
                                      help_text="sha256:… of its server certificate, to pin a self-signed one.")
    outbound_token = forms.CharField(label="Outbound secret (we sign with it)", required=False, max_length=500,
                                     help_text=SECRET_HELP)  # fmt: skip
    inbound_token = forms.CharField(label="Inbound secret (we check it)", required=False, max_length=500,
                                    help_text=SECRET_HELP)  # fmt: skip
    scopes = ScopesField()
    max_hops = forms.IntegerField(min_value=1, max_value=32, initial=DEFAULT_MAX_HOPS)
    rate_limit_per_second = forms.IntegerField(label="Rate limit (events/s)", required=False, min_value=1,
                                               max_value=100_000, help_text="Empty: no limit.")  # fmt: skip

    # How the services name each field in their refusals (and conflict: the name is taken).
    ERRORS = {"conflict": "name", "insecure_url": "peer_hook_url", "peer_hook_url": "peer_hook_url",
              "certificate_pem": "certificate_pem", "tls_fingerprint": "tls_fingerprint",
              "outbound_token": "outbound_token", "inbound_token": "inbound_token", "scopes": "scopes",
              "Peer URL": "peer_hook_url", "name": "name"}  # fmt: skip

    def service_kwargs(self) -> dict:
        data = dict(self.cleaned_data)
        for secret in ("outbound_token", "inbound_token"):
            data[secret] = data[secret].strip() or None
        return data


class PeerSettingsForm(forms.Form):
    peer_hook_url = forms.CharField(label="Hook URL of the other side", max_length=500)
    scopes = ScopesField()
    filters = FiltersField()
    max_hops = forms.IntegerField(min_value=1, max_value=32)
    rate_limit_per_second = forms.IntegerField(label="Rate limit (events/s)", required=False, min_value=1,
                                               max_value=100_000, help_text="Empty: no limit.")  # fmt: skip

    ERRORS = {"invalid_filters": "filters", "insecure_url": "peer_hook_url", "peer_hook_url": "peer_hook_url",
              "Peer URL": "peer_hook_url", "scopes": "scopes"}  # fmt: skip

    def changes(self, peer: Peer) -> dict:
        """Only what differs, so the audit row says what changed."""
        return {key: value for key, value in self.cleaned_data.items() if getattr(peer, key) != value}


class RotateForm(forms.Form):
    direction = forms.ChoiceField(choices=[("inbound", "inbound"), ("outbound", "outbound")], widget=forms.HiddenInput)
    secret = forms.CharField(label="New secret", required=False, max_length=500, help_text=SECRET_HELP)
    now = forms.BooleanField(label="Rotate now, no grace (suspected leak)", required=False,
                             help_text="The replaced secret stops working at once instead of after 24 h.")

    ERRORS = {"secret": "secret", "direction": "direction", "grace": "now"}


class ReplayForm(forms.Form):
    limit = forms.IntegerField(min_value=1, max_value=100_000, initial=100, help_text="Dead entries to re-queue.")


class GrantForm(forms.Form):
    resource_kind = forms.ChoiceField(choices=[(kind, kind) for kind in sorted(grants.KINDS)])
    resource_id = forms.CharField(label="Resource", required=False, max_length=100,
                                  help_text="Empty: every agent. An agent name, or label:key=value.")  # fmt: skip
    permission_scopes = ScopesField(label="Permissions", initial=["read"], help_text="e.g. read")
    source_cidrs = ScopesField(label="Source networks", help_text="CIDRs it may be used from; empty: anywhere.")
    ttl_days = forms.IntegerField(label="Valid for (days)", min_value=1, max_value=365, initial=30)

    ERRORS = {"source_cidrs": "source_cidrs", "permission_scopes": "permission_scopes",
              "resource_kind": "resource_kind", "ttl_seconds": "ttl_days"}  # fmt: skip

    def service_kwargs(self) -> dict:
        data = dict(self.cleaned_data)
        data["ttl_seconds"] = data.pop("ttl_days") * 24 * 3600
        data["permission_scopes"] = data["permission_scopes"] or ["read"]
        data["resource_id"] = data["resource_id"].strip() or None
        return data


TTL_CHOICES = [(3600, "1 hour"), (6 * 3600, "6 hours"), (24 * 3600, "1 day"), (7 * 24 * 3600, "7 days")]


class InviteForm(forms.Form):
    name = forms.CharField(required=False, max_length=63,
                           help_text="How this instance will call the peer; empty: a name is made up.")  # fmt: skip
    scopes = ScopesField()
    max_hops = forms.IntegerField(min_value=1, max_value=32, initial=DEFAULT_MAX_HOPS)
    ttl_seconds = forms.TypedChoiceField(label="Expires after", choices=TTL_CHOICES, coerce=int, initial=3600)

    ERRORS = {"conflict": "name", "name": "name", "scopes": "scopes", "ttl_seconds": "ttl_seconds"}


class AcceptForm(forms.Form):
    invitation = forms.CharField(max_length=invitations.MAX_INVITATION_CHARS,
                                 widget=forms.Textarea(attrs={"rows": 4, "spellcheck": "false", "class": "mono",
                                                              "placeholder": "kite-invite-v1.…"}),
                                 help_text="The whole string the other side's Invite a peer page showed.")  # fmt: skip
    name = forms.CharField(required=False, max_length=63,
                           help_text="How this instance will call the peer; empty: its instance ID.")  # fmt: skip
    scopes = ScopesField()

    ERRORS = {"conflict": "name", "name": "name", "scopes": "scopes"}

    def clean_invitation(self):
        """Refused here, before any call: not an invitation, damaged, another contract, expired."""
        value = self.cleaned_data["invitation"].strip()
        try:
            offer = invitations.parse(value)
        except ApiError as exc:
            raise forms.ValidationError(exc.detail) from None
        expires = _parse_time(offer.get("expires_at"))
        if expires is not None and expires <= timezone.now():
            raise forms.ValidationError(
                f"This invitation expired at {expires:%Y-%m-%d %H:%M} UTC: ask the other side for a new one."
            )
        return value


def _parse_time(value) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class CertificateForm(forms.Form):
    subject = forms.CharField(max_length=200, help_text="Free text, e.g. kite-eu (shown in audit logs).")
    validity_days = forms.IntegerField(min_value=1, max_value=825, initial=90)

    ERRORS = {"subject": "subject", "validity_days": "validity_days"}


class TokenForm(forms.Form):
    label = forms.CharField(max_length=100, help_text="What it is for, e.g. peer-b-outbound.")


class MakePeerForm(forms.Form):
    """A trusted sender made a peer (PATCH /api/federation/trusted-senders/{id}): where we send and how."""

    peer_hook_url = forms.CharField(label="Hook URL of the other side", max_length=500,
                                    help_text="https://…/hooks/&lt;team id&gt;/kite, as its identity shows.")  # fmt: skip
    outbound_token = forms.CharField(label="Outbound secret (we sign with it)", required=False, max_length=500,
                                     help_text="What the other side checks from us (the inbound secret of its peer "
                                               "for this instance); empty: generated, shown once.")  # fmt: skip
    scopes = ScopesField()
    max_hops = forms.IntegerField(min_value=1, max_value=32, initial=DEFAULT_MAX_HOPS)
    tls_fingerprint = forms.CharField(label="Its TLS fingerprint", required=False, max_length=71,
                                      help_text="sha256:… of its server certificate, to pin a self-signed one.")

    ERRORS = {"insecure_url": "peer_hook_url", "peer_hook_url": "peer_hook_url", "Peer URL": "peer_hook_url",
              "outbound_token": "outbound_token", "scopes": "scopes", "tls_fingerprint": "tls_fingerprint"}  # fmt: skip

    def service_kwargs(self) -> dict:
        return {**self.cleaned_data, "outbound_token": self.cleaned_data["outbound_token"].strip() or None}


class TrustedSenderForm(forms.Form):
    name = forms.CharField(max_length=63)
    inbound_token = forms.CharField(label="Inbound secret", required=False, max_length=500, help_text=SECRET_HELP)
    certificate_pem = forms.CharField(label="Its certificate PEM", required=False, max_length=16_384, strip=False,
                                      widget=PEM_WIDGET)  # fmt: skip

    ERRORS = {"conflict": "name", "name": "name", "inbound_token": "inbound_token",
              "certificate_pem": "certificate_pem"}  # fmt: skip


# Every action the code writes (tests/test_readme.py holds it): those named in federation.audit (fleet's
# included) and the certificate renewal's.
AUDIT_ACTIONS = sorted({value for module in (audit, renewal) for name, value in vars(module).items()
                        if name.isupper() and isinstance(value, str) and value.startswith("Federation.")})  # fmt: skip


class AuditFilterForm(forms.Form):
    action = forms.ChoiceField(required=False, choices=[("", "Any action"), *((a, a) for a in AUDIT_ACTIONS)])
    peer = forms.CharField(required=False, max_length=63, help_text="Name, or id")
    outcome = forms.CharField(required=False, max_length=40, help_text="ok, or a code such as bad_secret")
    since = forms.DateField(label="From", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(label="To", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    before = AsciiIntegerFormField(required=False, min_value=1, max_value=2**63 - 1,
                                  widget=forms.HiddenInput)  # an audit event id
