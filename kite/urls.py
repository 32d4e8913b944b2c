from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from kite.api import views as kite_views

urlpatterns = [
    path("healthz", kite_views.healthz),
    path("metrics", kite_views.prometheus_metrics),
    path("api/", include("kite.api.urls")),
    path("api/", include("ingest.api.urls")),
    path("api/federation/", include("federation.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema")),
    path("admin/", admin.site.urls),
    path("", include("ingest.urls")),
]

if settings.KITE_BENCH_ENDPOINTS:
    urlpatterns.append(path("bench/", include("kite.bench.urls")))

handler404 = "kite.errors.handler404"
handler500 = "kite.errors.handler500"
