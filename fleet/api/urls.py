from django.urls import path, re_path

from fleet.api import views

urlpatterns = [
    path("agents", views.AgentListRegister.as_view()),
    # Any id, so that a peer's `peer:<name>/<id>` gets a clear answer rather than a bare 404.
    re_path(r"^agents/(?P<agent_id>.+)$", views.AgentDetail.as_view()),
    path("peers/<int:peer_id>/remote-grant", views.PeerRemoteGrant.as_view()),
]
