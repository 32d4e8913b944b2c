"""The browser's shell: login, logout, and what every screen shares.

Screens are thin adapters like the JSON API: a logged-in user maps to a team
(`kite.auth.principal_for_user`), team admins hold the federation permissions,
reads go through selectors and writes through services. A permission failure is
the 403 page, another team's object the 404 page.
"""

import functools
import re

from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import render
from django.views.decorators.cache import never_cache

from kite.auth import principal_for_user
from kite.errors import ApiError

# The permission each screen needs, named as the JSON API names it (kite.auth): team admins hold all.
MANAGE_PEERS = "federation.manage_peer"
INVITE_PEERS = "federation.invite_peer"
VIEW_AUDIT = "federation.view_audit"


def screen(permission: str | None = None):
    """A team screen: login required, the caller's team as `request.principal`, never cached
    (pages may carry a secret shown once). `permission`: team admins only."""

    def decorate(view):
        @functools.wraps(view)
        def wrapped(request, *args, **kwargs):
            principal = principal_for_user(request.user)
            if principal is None:
                raise PermissionDenied("Your login is not a member of any team: ask a team admin to add you.")
            if permission and not principal.is_admin:
                raise PermissionDenied(f"This needs the {permission} permission: team admins have it.")
            request.principal = principal
            try:
                return view(request, *args, **kwargs)
            except Http404 as exc:
                return render(request, "404.html", {"message": str(exc) or "Not found."}, status=404)

        return login_required(never_cache(wrapped))

    return decorate


def actor(request) -> str:
    """The audit trail's `actor` for a browser user."""
    return f"user {request.user.get_username()}"


def apply_error(form, error: ApiError, fields: dict[str, str]) -> None:
    """Put a service's refusal on the form field it is about: `fields` maps the names a service
    uses in its messages (API field names) or error codes to form fields; else a form-wide error."""
    detail = error.detail
    for name, field in fields.items():
        if error.code == name or re.search(rf"\b{re.escape(name)}\b", detail):
            form.add_error(field, detail)
            return
    form.add_error(None, detail)


class LoginView(auth_views.LoginView):
    template_name = "login.html"
    redirect_authenticated_user = True
    next_page = "overview"  # without ?next=: the landing screen


def logout_view(request):
    """POST only (a link must not log anyone out); GET shows the button."""
    if request.method == "POST":
        return auth_views.LogoutView.as_view(next_page="login")(request)
    return render(request, "logout.html")
