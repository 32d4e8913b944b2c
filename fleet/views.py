"""The Fleet screen (DESIGN §6): our agents, and with the Federation toggle every peer's,
read-only, with each peer's outcome (Unreachable and its last contact when it does not answer).

The list is `fleet.federated.fleet_list`, exactly what GET /api/fleet/agents answers; team
members see it, team admins also store the fleet grant a hand-made peer's operator gave them.
"""

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, QueryDict
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from fleet import federated, selectors, services
from fleet.forms import FleetFilterForm, RemoteGrantForm
from kite.errors import ApiError
from kite.views import MANAGE_PEERS, actor, screen

PAGE = 100


@require_GET
@screen()
def fleet(request):
    return _page(request, request.GET)


def _page(request, params, *, refused: tuple[int, RemoteGrantForm] | None = None):
    """`refused`: (peer id, its grant form with errors), shown on that peer's card."""
    team_id = request.principal.team.id
    peers = selectors.fleet_peers(team_id)
    form = FleetFilterForm(params, peers=[peer.name for peer in peers])
    wanted = form.cleaned_data if form.is_valid() else {"federation": False, "peer": "", "q": ""}
    query = federated.Query(federation=wanted["federation"] or bool(wanted["peer"]), peer=wanted["peer"] or None,
                            q=wanted["q"].strip())  # fmt: skip
    listing = federated.fleet_list(team_id=team_id, query=query, actor=actor(request))
    page = Paginator(listing["results"], PAGE).get_page(params.get("page"))
    ids = {peer.name: peer.pk for peer in peers}
    context = {
        "form": form, "page": page, "includes_federation": listing["includes_federation"],
        "peer_entries": [_entry(entry, ids.get(entry["name"]), request.principal.is_admin, refused)
                         for entry in listing["peers"]],
        "query": _without_page(params),
    }  # fmt: skip
    status = 200 if form.is_valid() and refused is None else 400
    return render(request, "fleet/fleet.html", context, status=status)


def _entry(entry: dict, peer_id: int | None, may_grant: bool, refused) -> dict:
    """A peer's card; a team admin also gets the form to store the grant it gave us (written out
    in the template: fifty peers' forms rendered by Django's form templates cost ~100 ms)."""
    errors = refused[1].errors.get("token", []) if refused and refused[0] == peer_id else []
    return {**entry, "id": peer_id, "may_grant": may_grant and peer_id is not None, "grant_errors": errors}


def _without_page(params) -> str:
    query = params.copy()
    query.pop("page", None)
    return query.urlencode()


@require_POST
@screen(MANAGE_PEERS)
def remote_grant(request, peer_id):
    """Keep the fleet.agents grant token a hand-made peer's operator gave us (an invitation exchanges one)."""
    peer = next((peer for peer in selectors.fleet_peers(request.principal.team.id) if peer.pk == peer_id), None)
    if peer is None:
        raise Http404("No such live peer in your team.")
    form = RemoteGrantForm(request.POST)
    if form.is_valid():
        try:
            services.remote_grant_set(peer=peer, token=form.cleaned_data["token"].strip())
        except ApiError as exc:
            form.add_error("token", exc.detail)
        else:
            messages.success(request, f"Fleet access from {peer.name} stored.")
            return redirect(reverse("fleet:fleet") + "?federation=on")
    return _page(request, QueryDict("federation=on"), refused=(peer.pk, form))
