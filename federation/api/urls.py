from django.urls import path

from federation.api import peer_views, views

urlpatterns = [
    path("identity", views.Identity.as_view()),
    path("tokens", views.TokenListCreate.as_view()),
    path("tokens/<int:token_id>", views.TokenDetail.as_view()),
    path("peers", views.PeerListCreate.as_view()),
    path("peers/<int:peer_id>", views.PeerDetail.as_view()),
    path("peers/<int:peer_id>/ping", views.PeerPing.as_view()),
    path("peers/<int:peer_id>/grants", views.PeerGrants.as_view()),
    path("peers/<int:peer_id>/grants/<int:grant_id>", views.PeerGrantDetail.as_view()),
    path("peers/<int:peer_id>/rotate-secret", views.PeerRotateSecret.as_view()),
    path("peers/<int:peer_id>/outbox", views.PeerOutbox.as_view()),
    path("peers/<int:peer_id>/replay-dead", views.PeerReplayDead.as_view()),
    path("peers/<int:peer_id>/deliveries", views.PeerDeliveries.as_view()),
    path("peers/<int:peer_id>/pause", views.PeerPause.as_view()),
    path("peers/<int:peer_id>/resume", views.PeerResume.as_view()),
    path("certificates", views.CertificateListCreate.as_view()),
    path("certificates/<int:certificate_id>", views.CertificateDetail.as_view()),
    path("certificates/<int:certificate_id>/announce", views.CertificateAnnounce.as_view()),
    path("trusted-senders", views.TrustedSenderListCreate.as_view()),
    path("trusted-senders/<int:sender_id>", views.TrustedSenderDetail.as_view()),
    # Peer-facing, signed (SECURITY.md "The signed message"):
    path("ping", peer_views.ping),
    path("terminate", peer_views.terminate),
    path("rotate", peer_views.rotate),
    path("handshake", peer_views.handshake),
    path("invitations", views.InvitationCreate.as_view()),
    path("invitations/accept", views.InvitationAccept.as_view()),
]
