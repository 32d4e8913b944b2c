"""Settings → Federation screens, mounted at /settings/federation/ (kite/urls.py)."""

from django.urls import path

from federation import views

app_name = "federation"

urlpatterns = [
    path("", views.peer_list),
    path("peers/", views.peer_list, name="peers"),
    path("peers/new/", views.peer_new, name="peer-new"),
    path("peers/<int:peer_id>/", views.peer_detail, name="peer"),
    path("peers/<int:peer_id>/created", views.peer_created, name="peer-created"),
    path("peers/<int:peer_id>/ping", views.peer_ping, name="peer-ping"),
    path("peers/<int:peer_id>/pause", views.peer_pause, name="peer-pause"),
    path("peers/<int:peer_id>/resume", views.peer_resume, name="peer-resume"),
    path("peers/<int:peer_id>/settings", views.peer_settings, name="peer-settings"),
    path("peers/<int:peer_id>/rotate", views.peer_rotate, name="peer-rotate"),
    path("peers/<int:peer_id>/replay", views.peer_replay, name="peer-replay"),
    path("peers/<int:peer_id>/delete", views.peer_delete, name="peer-delete"),
    path("peers/<int:peer_id>/progress", views.peer_progress, name="peer-progress"),
    path("peers/<int:peer_id>/grants", views.grant_create, name="grant-create"),
    path("peers/<int:peer_id>/grants/<int:grant_id>/revoke", views.grant_revoke, name="grant-revoke"),
    path("invite/", views.invite, name="invite"),
    path("invite/<int:peer_id>/", views.invited, name="invited"),
    path("accept/", views.accept, name="accept"),
    path("accept/<int:peer_id>/", views.accepted, name="accepted"),
    path("certificates/", views.certificate_list, name="certificates"),
    path("certificates/<int:certificate_id>/revoke", views.certificate_revoke, name="certificate-revoke"),
    path("tokens/", views.token_list, name="tokens"),
    path("tokens/<int:token_id>/delete", views.token_delete, name="token-delete"),
    path("senders/", views.sender_create, name="sender-create"),
    path("senders/<int:sender_id>/revoke", views.sender_revoke, name="sender-revoke"),
    path("senders/<int:sender_id>/make-peer", views.sender_promote, name="sender-promote"),
]
