from drf_spectacular.utils import extend_schema
from rest_framework import permissions, status
from rest_framework.response import Response
from rest_framework.views import APIView

from ingest import selectors, services
from ingest.api.serializers import EventQuerySerializer, SourceCreateSerializer, SourceSerializer
from kite.auth import CanManageSources, IsTeamMember


class SourceListCreate(APIView):
    """Members read the team's sources; writing one needs ingest.manage_source (team admins)."""

    def get_permissions(self):
        if self.request.method in permissions.SAFE_METHODS:
            return [IsTeamMember()]
        return [CanManageSources()]

    @extend_schema(responses=SourceSerializer(many=True))
    def get(self, request):
        sources = selectors.sources_for_team(request.user.team.id)
        return Response({"results": SourceSerializer(sources, many=True).data})

    @extend_schema(request=SourceCreateSerializer, responses={201: SourceSerializer})
    def post(self, request):
        params = SourceCreateSerializer(data=request.data)
        params.is_valid(raise_exception=True)
        created = services.source_create(team=request.user.team, **params.validated_data)
        body = SourceSerializer(created.source).data
        if created.secret:
            body["secret"] = created.secret  # shown once
        return Response(body, status=status.HTTP_201_CREATED)


class EventList(APIView):
    @extend_schema(parameters=[EventQuerySerializer])
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
        return Response(
            {
                "results": [event.to_cloudevent() for event in events],
                "next": events[-1].cursor if events else after,
            }
        )


class EventHead(APIView):
    """GET /api/events/head → {cursor}: pass it as `after` to read only newer events."""

    def get(self, request):
        return Response({"cursor": str(selectors.events_head(team_id=request.user.team.id))})
