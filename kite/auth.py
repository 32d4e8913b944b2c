"""Who is calling: admin API keys (Bearer) or a logged-in browser user.

Both resolve to a `Principal` carrying the team; every query is scoped by it.
"""

from dataclasses import dataclass

from rest_framework import authentication, exceptions, permissions

from kite import selectors
from kite.models import ApiKey, Membership, Team


@dataclass(frozen=True)
class Principal:
    team: Team
    is_admin: bool
    api_key: ApiKey | None = None
    user: object = None

    # DRF treats request.user as a user object.
    is_authenticated = True
    is_active = True

    def __str__(self):
        return f"api-key {self.api_key.prefix}…" if self.api_key else str(self.user)


def bearer_from_header(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def principal_for_key(raw_key: str) -> Principal | None:
    api_key = selectors.apikey_by_raw(raw_key)
    if api_key is None:
        return None
    return Principal(team=api_key.team, is_admin=True, api_key=api_key)


def principal_for_user(user) -> Principal | None:
    if user is None or not user.is_authenticated:
        return None
    membership = selectors.membership_for_user(user)
    if membership is None:
        return None
    return Principal(team=membership.team, is_admin=membership.role == "admin" or user.is_superuser, user=user)


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION")
        if not header:
            return None
        raw = bearer_from_header(header)
        if raw is None:
            raise exceptions.AuthenticationFailed("Authorization must be 'Bearer <api key>'.")
        principal = principal_for_key(raw)
        if principal is None:
            raise exceptions.AuthenticationFailed("Unknown or revoked API key.")
        return principal, principal.api_key

    def authenticate_header(self, request):
        return 'Bearer realm="kite"'


class IsTeamMember(permissions.BasePermission):
    """Session users need a team membership; API keys always have one."""

    message = "You are not a member of any team."

    def has_permission(self, request, view):
        user = request.user
        if isinstance(user, Principal):
            return True
        principal = principal_for_user(user)
        if principal is None:
            return False
        request.user = principal  # views read request.user.team either way
        return True


class _TeamAdminPermission(IsTeamMember):
    """A team member who is a team admin (API keys act as team admins)."""

    permission = ""

    def has_permission(self, request, view):
        if not super().has_permission(request, view):
            return False
        if not request.user.is_admin:
            self.message = f"This needs the {self.permission} permission: team admins have it."
            return False
        return True


class CanManagePeers(_TeamAdminPermission):
    permission = "federation.manage_peer"


class CanInvitePeers(_TeamAdminPermission):
    permission = "federation.invite_peer"


class CanViewAudit(_TeamAdminPermission):
    permission = "federation.view_audit"


class CanManageSources(_TeamAdminPermission):
    """Creating, changing or deleting a source: a `none` source is a public endpoint whose
    events reach the team's listeners and its peers, so members may only read."""

    permission = "ingest.manage_source"


# Why a principal that was valid when a long-lived connection opened no longer is.
KEY_REVOKED = "key_revoked"
USER_INACTIVE = "user_inactive"
NOT_A_MEMBER = "not_a_member"


def principal_lost(principal: Principal) -> str | None:
    """None while `principal` may still act for its team; else why not (one indexed query)."""
    if principal.api_key is not None:
        valid = ApiKey.objects.filter(pk=principal.api_key.pk, revoked_at__isnull=True).exists()
        return None if valid else KEY_REVOKED
    active = (
        Membership.objects.filter(user_id=principal.user.pk, team_id=principal.team.pk)
        .values_list("user__is_active", flat=True)
        .first()
    )
    if active is None:
        return NOT_A_MEMBER
    return None if active else USER_INACTIVE
