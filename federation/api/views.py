from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import APIView

from federation import audit, certificates, channel, grants, heartbeat, invitations, outbox, selectors, services
from federation.api import openapi as o, serializers as s
from federation.errors import Code
from federation.models import IdentityCertificate
from kite.auth import CanInvitePeers, CanManagePeers, CanViewAudit
from kite.errors import ApiError
from kite.fields import refuse_any
from kite.schema import NoBody

DELETED = {"request": NoBody, "responses": {204: None}}


def _valid(serializer_class, data, **kwargs):
    serializer = serializer_class(data=data, **kwargs)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def _peer(request, peer_id, role="peer"):
    peer = selectors.peer_for_team(request.user.team.id, peer_id, role=role)
    if peer is None:
        raise ApiError("No such peer in your team.", Code.NOT_FOUND, status=404)
    return peer


def _certificate(request, certificate_id) -> IdentityCertificate:
    row = IdentityCertificate.objects.filter(team_id=request.user.team.id, pk=certificate_id).first()
    if row is None:
        raise ApiError("No such certificate in your team.", Code.NOT_FOUND, status=404)
    return row


def _actor(request) -> str:
    return audit.actor_of(request.user)


def _peer_body(peer, extra=None):
    body = s.PeerSerializer(peer, context={"depths": selectors.outbox_depths([peer.pk])}).data
    body.update(extra or {})
    return body


class Identity(APIView):
    @extend_schema(responses=o.IDENTITY)
    def get(self, request):
        return Response(selectors.identity(request.user.team))


class TokenListCreate(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(operation_id="federation_tokens_list", responses=o.TOKENS)
    def get(self, request):
        return Response({"results": s.TokenSerializer(selectors.tokens(request.user.team.id), many=True).data})

    @extend_schema(request=s.TokenCreateSerializer, responses={201: o.TokenIssued})
    def post(self, request):
        issued = services.token_create(team=request.user.team, actor=_actor(request),
                                       **_valid(s.TokenCreateSerializer, request.data))  # fmt: skip
        return Response({**s.TokenSerializer(issued.row).data, **issued.secrets}, status=status.HTTP_201_CREATED)


class TokenDetail(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(**DELETED)
    def delete(self, request, token_id):
        refuse_any(request.data, what="deleting a token")
        token = selectors.tokens(request.user.team.id).filter(pk=token_id).first()
        if token is None:
            raise ApiError("No such token in your team.", Code.NOT_FOUND, status=404)
        services.token_delete(token=token, actor=_actor(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class PeerListCreate(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(operation_id="federation_peers_list", responses=o.PEERS)
    def get(self, request):
        peers = list(selectors.peers(request.user.team.id))
        depths = selectors.outbox_depths([peer.pk for peer in peers])
        return Response({"results": s.PeerSerializer(peers, many=True, context={"depths": depths}).data})

    @extend_schema(request=s.PeerCreateSerializer, responses={201: o.PeerIssued})
    def post(self, request):
        issued = services.peer_create(team=request.user.team, actor=_actor(request),
                                      **_valid(s.PeerCreateSerializer, request.data))  # fmt: skip
        return Response(_peer_body(issued.row, issued.secrets), status=status.HTTP_201_CREATED)


class PeerDetail(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(responses=s.PeerSerializer)
    def get(self, request, peer_id):
        return Response(_peer_body(_peer(request, peer_id)))

    @extend_schema(request=s.PeerUpdateSerializer, responses=s.PeerSerializer)
    def patch(self, request, peer_id):
        peer = _peer(request, peer_id)
        changes = _valid(s.PeerUpdateSerializer, request.data, partial=True)
        return Response(_peer_body(services.peer_update(peer=peer, actor=_actor(request), **changes)))

    @extend_schema(**DELETED)
    def delete(self, request, peer_id):
        """Revoke here, and tell the peer (signed terminate) so that it stops sending too."""
        refuse_any(request.data, what="deleting a peer")
        services.peer_delete(peer=_peer(request, peer_id), actor=_actor(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class PeerPing(APIView):
    """Ping the peer now (signed GET of its /api/federation/ping) and say which factor failed."""

    permission_classes = [CanManagePeers]

    @extend_schema(request=NoBody, responses=o.PING_RESULT)
    def post(self, request, peer_id):
        refuse_any(request.data, what="a ping")
        peer = _peer(request, peer_id)
        if not peer.sends_to:
            raise ApiError("This peer has no URL to ping (a trusted sender, or revoked).", Code.INVALID)
        return Response(heartbeat.heartbeat(peer, actor=_actor(request)).as_dict())


class PeerRotateSecret(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(request=s.RotateSecretSerializer, responses=o.ROTATION)
    def post(self, request, peer_id):
        peer = selectors.peer_for_team(request.user.team.id, peer_id, role=None)
        if peer is None or peer.status == peer.Status.REVOKED:
            raise ApiError("No such peer in your team.", Code.NOT_FOUND, status=404)
        data = _valid(s.RotateSecretSerializer, request.data)
        propagate = data["propagate"] if data["propagate"] is not None else channel.has_channel(peer)
        rotated = channel.rotate_secret(peer=peer, direction=data["direction"], secret=data.get("secret") or None,
                                        propagate=propagate, grace=data["grace"], actor=_actor(request))  # fmt: skip
        body = {
            "direction": data["direction"],
            "fingerprint": getattr(rotated.peer, f"{data['direction']}_fingerprint"),
            "propagated": rotated.propagated,
            **({"secret": rotated.secret} if rotated.secret else {}),
            **({"propagation_error": rotated.error} if rotated.error else {}),
        }
        if data["direction"] == "inbound":
            body["previous_valid_until"] = rotated.peer.previous_inbound_expires_at
        return Response(body)


class PeerOutbox(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(operation_id="federation_peers_outbox_list", responses=o.OUTBOX,
                   parameters=[OpenApiParameter("status", enum=["pending", "in_flight", "delivered", "dead"])])
    def get(self, request, peer_id):
        peer = _peer(request, peer_id)
        wanted = request.query_params.get("status") or None
        if wanted and wanted not in ("pending", "in_flight", "delivered", "dead"):
            raise ApiError("status must be pending, in_flight, delivered or dead.", Code.INVALID)
        entries = selectors.outbox_entries(peer, status=wanted)
        return Response({"results": s.OutboxEntrySerializer(entries, many=True).data})


class PeerReplayDead(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(request=s.ReplaySerializer, responses=o.REQUEUED)
    def post(self, request, peer_id):
        peer = _peer(request, peer_id)
        limit = _valid(s.ReplaySerializer, request.data)["limit"]
        return Response({"requeued": outbox.replay_dead(peer=peer, limit=limit, actor=_actor(request))})


class PeerDeliveries(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(operation_id="federation_peers_deliveries_list", responses=o.DELIVERIES)
    def get(self, request, peer_id):
        peer = _peer(request, peer_id)
        return Response({"results": s.DeliverySerializer(selectors.deliveries(peer), many=True).data})


class TrustedSenderListCreate(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(operation_id="federation_trusted_senders_list", responses=o.SENDERS)
    def get(self, request):
        senders = selectors.trusted_senders(request.user.team.id)
        return Response({"results": s.TrustedSenderSerializer(senders, many=True).data})

    @extend_schema(request=s.TrustedSenderCreateSerializer, responses={201: o.TrustedSenderIssued})
    def post(self, request):
        data = _valid(s.TrustedSenderCreateSerializer, request.data)
        issued = services.trusted_sender_create(team=request.user.team, actor=_actor(request), **data)
        body = {**s.TrustedSenderSerializer(issued.row).data, **issued.secrets}
        return Response(body, status=status.HTTP_201_CREATED)


class TrustedSenderDetail(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(request=o.TrustedSenderPromote, responses=o.PeerIssued)
    def patch(self, request, sender_id):
        """Make the trusted sender a peer: the same row (id, inbound secret) now also sends to it.
        From then on it is listed by GET /api/federation/peers; an outbound_token left out is
        generated and returned once."""
        sender = _peer(request, sender_id, role="sender")
        data = _valid(s.TrustedSenderPromoteSerializer, request.data)
        issued = services.trusted_sender_promote(sender=sender, actor=_actor(request), **data)
        return Response(_peer_body(issued.row, issued.secrets))

    @extend_schema(**DELETED)
    def delete(self, request, sender_id):
        refuse_any(request.data, what="revoking a trusted sender")
        services.peer_revoke(peer=_peer(request, sender_id, role="sender"), actor=_actor(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class CertificateListCreate(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(operation_id="federation_certificates_list", responses=o.CERTIFICATES)
    def get(self, request):
        rows = IdentityCertificate.objects.filter(team_id=request.user.team.id).order_by("-created_at", "-id")
        return Response({"results": s.CertificateSerializer(rows, many=True).data})

    @extend_schema(request=s.CertificateCreateSerializer, responses={201: o.CertificateIssued})
    def post(self, request):
        row = certificates.issue(team=request.user.team, actor=_actor(request),
                                 **_valid(s.CertificateCreateSerializer, request.data))  # fmt: skip
        # Peers with a channel pin the new certificate now; the old one keeps signing until deleted.
        announced = channel.announce_certificate(team_id=row.team_id, pem=row.pem)
        return Response({**s.CertificateSerializer(row).data, "announced": announced}, status=status.HTTP_201_CREATED)


class CertificateAnnounce(APIView):
    """Tell the peers again (e.g. one was down when the certificate was issued)."""

    permission_classes = [CanManagePeers]

    @extend_schema(request=NoBody, responses=o.ANNOUNCED)
    def post(self, request, certificate_id):
        refuse_any(request.data, what="an announcement")
        row = _certificate(request, certificate_id)
        return Response({"announced": channel.announce_certificate(team_id=row.team_id, pem=row.pem)})


class CertificateDetail(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(**DELETED)
    def delete(self, request, certificate_id):
        refuse_any(request.data, what="revoking a certificate")
        row = _certificate(request, certificate_id)
        certificates.revoke(certificate=row, actor=_actor(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


class InvitationCreate(APIView):
    permission_classes = [CanInvitePeers]

    @extend_schema(request=s.InvitationCreateSerializer, responses={201: o.INVITATION})
    def post(self, request):
        peer, invitation = invitations.issue(team=request.user.team, actor=_actor(request),
                                             **_valid(s.InvitationCreateSerializer, request.data))  # fmt: skip
        return Response({"id": peer.pk, "invitation": invitation, "expires_at": peer.invitation_expires_at,
                         "peer_id": peer.pk}, status=status.HTTP_201_CREATED)  # fmt: skip


class InvitationAccept(APIView):
    permission_classes = [CanInvitePeers]

    @extend_schema(request=s.InvitationAcceptSerializer, responses={201: s.PeerSerializer})
    def post(self, request):
        peer = invitations.accept(team=request.user.team, actor=_actor(request),
                                  **_valid(s.InvitationAcceptSerializer, request.data))  # fmt: skip
        return Response(_peer_body(peer), status=status.HTTP_201_CREATED)


class PeerGrants(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(operation_id="federation_peers_grants_list", responses=o.GRANTS)
    def get(self, request, peer_id):
        peer = _peer(request, peer_id)
        return Response({"results": s.GrantSerializer(peer.grants.order_by("-created_at", "-id"), many=True).data})

    @extend_schema(request=s.GrantCreateSerializer, responses={201: o.GrantIssued})
    def post(self, request, peer_id):
        peer = _peer(request, peer_id)
        grant, token = grants.create(peer=peer, actor=_actor(request), **_valid(s.GrantCreateSerializer, request.data))
        return Response({**s.GrantSerializer(grant).data, "token": token}, status=status.HTTP_201_CREATED)


class PeerGrantDetail(APIView):
    permission_classes = [CanManagePeers]

    @extend_schema(**DELETED)
    def delete(self, request, peer_id, grant_id):
        refuse_any(request.data, what="revoking a grant")
        peer = _peer(request, peer_id)
        if not grants.revoke(peer=peer, grant_id=grant_id, actor=_actor(request)):
            raise ApiError("No such grant for this peer.", Code.NOT_FOUND, status=404)
        return Response(status=status.HTTP_204_NO_CONTENT)


class AuditList(APIView):
    """GET /api/audit: the team's audit events, newest first; `next` goes in `before` for older ones."""

    permission_classes = [CanViewAudit]

    @extend_schema(operation_id="audit_list", parameters=[s.AuditQuerySerializer], responses=s.AuditPageSerializer)
    def get(self, request):
        query = _valid(s.AuditQuerySerializer, request.query_params)
        filters = selectors.AuditFilter(**{key: query.get(key) for key in selectors.AuditFilter.FIELDS})
        rows, more = selectors.audit_events(request.user.team.id, filters, query["limit"])
        return Response({"results": s.AuditEventSerializer(rows, many=True).data,
                         "next": str(rows[-1].pk) if more else None})  # fmt: skip


def _pausable_peer(request, peer_id):
    """A peer or trusted sender of the team: the service says why a sender or a revoked peer has no pause."""
    return _peer(request, peer_id, role=None)


class PeerPause(APIView):
    """Maintenance: events keep queuing, no delivery is attempted, heartbeats go on; only resume lifts it.
    Pausing a paused peer is 200 and changes nothing (`changed: false`)."""

    permission_classes = [CanManagePeers]

    @extend_schema(request=s.PauseSerializer, responses=o.PeerChanged)
    def post(self, request, peer_id):
        peer = _pausable_peer(request, peer_id)
        reason = _valid(s.PauseSerializer, request.data)["reason"]
        peer, changed = services.peer_pause(peer=peer, reason=reason, actor=_actor(request))
        return Response(_peer_body(peer, {"changed": changed}))


class PeerResume(APIView):
    """Lift an operator's pause and deliver the backlog now. Resuming a peer not paused by an
    operator is 200 and changes nothing (`changed: false`; a down or auth_failed queue stays so)."""

    permission_classes = [CanManagePeers]

    @extend_schema(request=NoBody, responses=o.PeerChanged)
    def post(self, request, peer_id):
        peer = _pausable_peer(request, peer_id)
        refuse_any(request.data, what="a resume")
        peer, changed = services.peer_resume(peer=peer, actor=_actor(request))
        return Response(_peer_body(peer, {"changed": changed}))
