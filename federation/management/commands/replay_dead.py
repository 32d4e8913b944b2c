from django.core.management.base import CommandError

from federation import outbox
from federation.management.base import ACTOR, TeamCommand


class Command(TeamCommand):
    help = "Re-queue a peer's dead-lettered outbox entries for immediate retry."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("peer", help="peer name or id")
        parser.add_argument("--limit", type=int, default=100, help="at most this many entries (default 100)")

    def handle(self, *args, team, peer, limit, **options):
        if not 1 <= limit <= 100_000:
            raise CommandError("--limit must be between 1 and 100000.")
        found = self.peer(self.team(team), peer)
        requeued = outbox.replay_dead(peer=found, limit=limit, actor=ACTOR)
        self.stdout.write(f"Re-queued {requeued} dead entr{'y' if requeued == 1 else 'ies'} for {found.name}.")
