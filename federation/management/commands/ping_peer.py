from django.core.management.base import CommandError

from federation import heartbeat, selectors
from federation.management.base import ACTOR, TeamCommand
from federation.models import Peer


class Command(TeamCommand):
    help = "Ping a peer now (signed GET of its /api/federation/ping), print each factor; exit 1 unless ok."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("peer", help="peer name or id")

    def handle(self, *args, team, peer, **options):
        found_team = self.team(team)
        # `peers` lists revoked peers too: name one and hear that it is revoked, not that it does not exist.
        found = selectors.peer_by_ref(found_team.id, peer) or Peer.objects.filter(
            team_id=found_team.id, role=Peer.Role.PEER, name=peer, status=Peer.Status.REVOKED).order_by("-pk").first()
        if found is None:
            found = self.peer(found_team, peer)  # the usual "has no peer named" error
        if found.status == Peer.Status.REVOKED:
            raise CommandError(f"Peer {found.name} is revoked (deleted here, or terminated by the other side): it is "
                               "no longer pinged, and there is nothing to ping; peer again to reconnect.")  # fmt: skip
        if not found.sends_to:
            raise CommandError(f"Peer {found.name} has no URL to ping (a trusted sender, or revoked).")
        result = heartbeat.heartbeat(found, actor=ACTOR)
        latency = f" in {result.latency_ms} ms" if result.latency_ms is not None else ""
        verdict = "ok" if result.ok else "FAILED"
        self.stdout.write(f"{found.name}: {verdict} (HTTP {result.status_code or '-'}{latency})")
        for factor, verdict in result.factors.items():
            self.stdout.write(f"  {factor:<12} {verdict}")
        if not result.ok:
            raise CommandError(f"Ping of {found.name} failed: {result.error}")
