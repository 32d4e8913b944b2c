from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from kite.api import views as kite_views
from federation import overview as overview_screen
from federation import views as federation_screens
from ingest import screens as ingest_screens
from kite import views as kite_screens

urlpatterns = [
    path("healthz", kite_views.healthz),
    path("metrics", kite_views.prometheus_metrics),
    path("api/", include("kite.api.urls")),
    path("api/", include("federation.api.audit_urls")),  # GET /api/audit (README "Audit log and metrics")
    path("api/", include("ingest.api.urls")),
    # Peer-facing (signed), before the federation include: the fleet app serves it (docs/architecture.md "Where each URL is served").
    path("api/federation/fleet/", include("fleet.api.peer_urls")),
    path("api/federation/", include("federation.api.urls")),
    path("api/fleet/", include("fleet.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema")),
    path("admin/", admin.site.urls),
    path("", include("ingest.urls")),
    # The browser: server-rendered screens behind a login.
    path("", overview_screen.overview, name="overview"),  # the landing screen
    path("login/", kite_screens.LoginView.as_view(), name="login"),
    path("logout/", kite_screens.logout_view, name="logout"),
    path("events/", ingest_screens.events, name="events"),
    path("events/journey/", ingest_screens.event_journey, name="event-journey"),
    path("audit/", federation_screens.audit_log, name="audit"),
    path("settings/federation/", include("federation.urls")),
    path("fleet/", include("fleet.urls")),
]

if settings.KITE_BENCH_ENDPOINTS:
    urlpatterns.append(path("bench/", include("kite.bench_endpoints")))  # baselines of bench/ingest.py

handler400 = "kite.errors.handler400"
handler404 = "kite.errors.handler404"
handler500 = "kite.errors.handler500"
