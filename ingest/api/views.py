from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import permissions, status
from rest_framework.response import Response
from rest_framework.views import APIView

from ingest import cloudevent, journey, selectors, services
from ingest.api import openapi as o
from ingest.api.serializers import EventQuerySerializer, SourceCreateSerializer, SourceSerializer
from kite.auth import CanManageSources, IsTeamMember


class SourceListCreate(APIView):
    """Members read the team's sources; writing one needs ingest.manage_source (team admins)."""

    def get_permissions(self):
        if self.request.method in permissions.SAFE_METHODS:
            return [IsTeamMember()]
        return [CanManageSources()]

    @extend_schema(operation_id="sources_list", responses=o.SOURCES)
    def get(self, request):
        sources = selectors.sources_for_team(request.user.team.id)
        return Response({"results": SourceSerializer(sources, many=True).data})

    @extend_schema(request=SourceCreateSerializer, responses={201: o.SourceIssued})
    def post(self, request):
        params = SourceCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        created = services.source_create(team=request.user.team, **params.validated_data)
        body = SourceSerializer(created.source).data
        if created.secret:
            body["secret"] = created.secret  # shown once
        if created.token:
            body["token"] = created.token  # shown once
        return Response(body, status=status.HTTP_201_CREATED)


class EventList(APIView):
    @extend_schema(operation_id="events_list", parameters=[EventQuerySerializer], responses=o.EVENTS)
    def get(self, request):
        params = EventQuerySerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        query = params.validated_data
        events = selectors.events_after(
            team_id=request.user.team.id,
            after=selectors.cursor_parse(query.get("after")),
            filters=selectors.EventFilter(
                source=query.get("source"), type_glob=query.get("type"), agent=query.get("agent"), all_agents=True
            ),
            limit=query["limit"],
        )
        after = query.get("after") or "0-0"
        # {"results": [CloudEvent…], "next": cursor}, written directly: each event's data as stored
        # (Event.to_cloudevent_json), not parsed and encoded again.
        results = b",".join(event.to_cloudevent_json() for event in events)
        cursor = cloudevent.json_bytes(events[-1].cursor if events else after)
        return HttpResponse(b'{"results":[' + results + b'],"next":' + cursor + b"}", content_type="application/json")


class EventHead(APIView):
    """GET /api/events/head → {cursor}: pass it as `after` to read only newer events."""

    @extend_schema(responses=o.HEAD)
    def get(self, request):
        return Response({"cursor": str(selectors.events_head(team_id=request.user.team.id))})


class EventJourney(APIView):
    """GET /api/events/{id}/journey → {event, arrival, peers, provenance}: how the event arrived,
    each peer's outbox entry with its attempts (the newest 50 and a count), the instances it
    crossed. 404 event_not_found (also for another team's); 409 ambiguous_event naming the
    `sources` when several sources have the id and ?source= does not pick one."""

    @extend_schema(parameters=[OpenApiParameter("source", str, description="The event's CloudEvent source, "
                                                "or the name of the source it arrived on")],
                   responses={200: o.JOURNEY, 409: OpenApiResponse(
                       description="several sources have that id: `sources` names them; pick one with ?source=")})
    def get(self, request, event_id: str):
        try:
            event = journey.event_find(team_id=request.user.team.id, event_id=event_id,
                                       source=request.query_params.get("source") or None)  # fmt: skip
        except journey.AmbiguousEvent as ambiguous:
            return Response(ambiguous.body(), status=ambiguous.status)
        return Response(journey.journey(event))
