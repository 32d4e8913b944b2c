from django.urls import path

from fleet.api import peer_views

urlpatterns = [
    path("agents", peer_views.agents),
    # Any id, so that an odd one (`../`, 10 KB) gets the fleet's own 404 rather than Django's.
    path("agents/<path:agent_id>", peer_views.agent),
]
