from django.core.management.base import CommandError

from federation import heartbeat
from federation.management.base import ACTOR, TeamCommand


class Command(TeamCommand):
    help = "Ping a peer now (signed GET of its /api/federation/ping), print each factor; exit 1 unless ok."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("peer", help="peer name or id")

    def handle(self, *args, team, peer, **options):
        found = self.peer(self.team(team), peer)
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
