"""The Fleet screen, mounted at /fleet/ (kite/urls.py)."""

from django.urls import path

from fleet import views

app_name = "fleet"

urlpatterns = [
    path("", views.fleet, name="fleet"),
    path("peers/<int:peer_id>/access", views.remote_grant, name="remote-grant"),
    # Ours by id, a peer's as peer:<name>/<id>.
    path("agents/<path:agent_id>", views.agent, name="agent"),
]
