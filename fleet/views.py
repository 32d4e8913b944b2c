"""The Fleet screen (README "The fleet across instances"): our agents, and with the Federation toggle every peer's,
read-only, with each peer's outcome (Unreachable and its last contact when it does not answer);
each agent's page, a peer's agent fetched from the peer (or its snapshot, flagged stale).

The list is `fleet.federated.fleet_list`, exactly what GET /api/fleet/agents answers, and an
agent's page what GET /api/fleet/agents/{id} does; team members see them, team admins also
store the fleet grant a hand-made peer's operator gave them.
"""

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, QueryDict
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from fleet import federated, rows, selectors, services
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
        # Each row links to its page: the prefix is reversed once, not once per row.
        "agent_url": reverse("fleet:agent", args=["-"])[:-1],
    }  # fmt: skip
    status = 200 if form.is_valid() and refused is None else 400
    return render(request, "fleet/fleet.html", context, status=status)


def _entry(entry: dict, peer_id: int | None, may_grant: bool, refused) -> dict:
    """A peer's card; a team admin also gets the form to store the grant it gave us (written out
    in the template: fifty peers' forms rendered by Django's form templates cost ~100 ms)."""
    errors = refused[1].errors.get("token", []) if refused and refused[0] == peer_id else []
    may_grant = may_grant and peer_id is not None
    detail = entry["detail"]
    if detail == federated.NO_GRANT:  # the API's words name the API call; the screen's, its form
        detail = _NO_GRANT_FORM if may_grant else _NO_GRANT_ASK
    return {**entry, "detail": detail, "id": peer_id, "may_grant": may_grant, "grant_errors": errors}


_NO_GRANT_FORM = ("No fleet access from this peer yet: an invitation exchanges it; for a peer added by hand, its "
                  "operator creates a grant for you — paste its token in “Fleet access” below.")  # fmt: skip
_NO_GRANT_ASK = ("No fleet access from this peer yet: its operator creates a grant for your team, and a team admin "
                 "stores the token on this screen.")  # fmt: skip


def _without_page(params) -> str:
    query = params.copy()
    query.pop("page", None)
    return query.urlencode()


@require_GET
@screen()
def agent(request, agent_id: str):
    """One agent's page: ours, or a peer's (read-only: no control on it changes anything)."""
    team_id = request.principal.team.id
    if not agent_id.startswith(rows.REMOTE_PREFIX):
        found = selectors.agent_for_team(team_id, agent_id)
        if found is None:
            raise Http404("No such agent in your team.")
        return render(request, "fleet/agent.html", {"agent": selectors.agent_detail(found)})
    parts = rows.parse_remote_id(agent_id)
    context = {"agent": None, "peer": parts[0] if parts else "", "remote_id": parts[1] if parts else agent_id}
    try:
        context["agent"] = federated.remote_agent(team_id=team_id, agent_id=agent_id, actor=actor(request))
    except ApiError as refused:
        if refused.status == 404:
            raise Http404(refused.detail) from None
        context.update(error=refused.detail, code=refused.code)  # no access, or unreachable with no snapshot row
        return render(request, "fleet/agent.html", context, status=refused.status)
    return render(request, "fleet/agent.html", context)


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
