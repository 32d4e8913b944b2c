"""The Events screen: the team's newest events, then a live tail over WS /ws/events.

The page is rendered with the newest events and the stream's head cursor; a
little script opens the WebSocket with the same filters and `after` = that
cursor (the browser's session authenticates it, as kite.auth maps a user to a
team) and prepends what arrives. Without JavaScript the page is a snapshot with
a Refresh link.
"""

import json

from django import forms
from django.http import Http404
from django.shortcuts import render
from django.views.decorators.http import require_GET

from ingest import journey, selectors, services
from ingest.models import Event, Source
from kite.errors import ApiError
from kite.views import screen

RECENT = 50


class EventFilterForm(forms.Form):
    source = forms.ChoiceField(required=False)
    type = forms.CharField(required=False, max_length=200, label="Type",
                           widget=forms.TextInput(attrs={"placeholder": "e.g. com.stripe.*"}))  # fmt: skip

    def __init__(self, *args, sources: list[Source], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["source"].choices = [("", "Any source"), *((s.name, _source_label(s)) for s in sources)]


def _source_label(source: Source) -> str:
    return f"{source.name} (unverified)" if source.kind == Source.Kind.NONE else source.name


def recent_events(*, team_id: str, source: str | None, type_glob: str | None, limit: int = RECENT) -> list[Event]:
    """The newest events, newest first, as a listener without `agent` would see them (no agent messages)."""
    events = Event.objects.filter(team_id=team_id, agent="").select_related("source")
    if source:
        events = events.filter(source__name=source)
    if type_glob:
        events = events.filter(ce_type__glob=type_glob)
    return list(events.order_by("-txid", "-id")[:limit])


@require_GET
@screen()
def events(request):
    team_id = request.principal.team.id
    sources = list(selectors.sources_for_team(team_id))
    form = EventFilterForm(request.GET, sources=sources)
    wanted = form.cleaned_data if form.is_valid() else {"source": "", "type": ""}
    found = recent_events(team_id=team_id, source=wanted["source"] or None, type_glob=wanted["type"] or None)
    # The live tail marks events of these CloudEvent sources too (kite.js reads the attribute).
    unverified = " ".join(services.ce_source_for(s) for s in sources if s.kind == Source.Kind.NONE)
    context = {"form": form, "events": found, "head": selectors.events_head(team_id=team_id),
               "source": wanted["source"], "type": wanted["type"], "unverified": unverified}  # fmt: skip
    return render(request, "events.html", context, status=200 if form.is_valid() else 400)


DATA_SHOWN = 20_000  # characters of an event's data the journey page prints


@require_GET
@screen()
def event_journey(request):
    """/events/journey/?id=<CloudEvent id>&source=<its CloudEvent source>: what GET
    /api/events/{id}/journey answers, for a person. The id is a query parameter, not a path
    segment: a browser would resolve an id such as `..` or `a/../b` away before sending it."""
    event_id, source = request.GET.get("id", ""), request.GET.get("source") or None
    if not event_id:
        raise Http404("Which event? Open one's journey from the Events screen (its ID).")
    try:
        event = journey.event_find(team_id=request.principal.team.id, event_id=event_id, source=source)
    except journey.AmbiguousEvent as ambiguous:
        return render(request, "journey.html", {"event_id": event_id, "ambiguous": ambiguous.sources}, status=409)
    except ApiError as missing:
        raise Http404(missing.detail) from None
    context = {"event_id": event_id, "journey": journey.journey(event), "data": _data_text(event),
               "can_manage_peers": request.principal.is_admin}  # fmt: skip
    return render(request, "journey.html", context)


def _data_text(event: Event) -> str:
    try:
        text = json.dumps(json.loads(event.data), indent=2, ensure_ascii=False)
    except ValueError:
        text = event.data
    return text if len(text) <= DATA_SHOWN else text[:DATA_SHOWN] + "\n…"
