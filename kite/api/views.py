from django.conf import settings
from django.db import connection
from django.http import HttpResponse, JsonResponse
from rest_framework.response import Response
from rest_framework.views import APIView

from kite import metrics


class Me(APIView):
    def get(self, request):
        team = request.user.team
        return Response(
            {
                "team": {"id": team.id, "name": team.name},
                "instance_id": settings.KITE_INSTANCE_ID,
                "public_url": settings.KITE_PUBLIC_URL,
            }
        )


def healthz(request):
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:  # the point of a health check is to say so
        return JsonResponse({"status": "error", "detail": f"database: {exc}"}, status=503)
    return JsonResponse({"status": "ok", "instance_id": settings.KITE_INSTANCE_ID})


def prometheus_metrics(request):
    return HttpResponse(metrics.render(), content_type=metrics.CONTENT_TYPE_LATEST)
