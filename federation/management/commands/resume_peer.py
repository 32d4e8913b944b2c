from federation import selectors, services
from federation.management.base import ACTOR, TeamCommand, service_errors
from federation.management.commands.pause_peer import peer_or_sender


class Command(TeamCommand):
    help = ("Resume a peer an operator paused: what queued meanwhile is delivered now. A queue paused as down "
            "or auth_failed is left as it is (a heartbeat or a fixed token lifts those).")

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("peer", help="peer name or id")

    def handle(self, *args, team, peer, **options):
        found = peer_or_sender(self, team, peer)
        pending = selectors.outbox_depths([found.pk])[found.pk]["pending"]  # before: the worker may start at once
        with service_errors():
            found, changed = services.peer_resume(peer=found, actor=ACTOR)
        if not changed:
            state = f"its queue is paused as {found.paused}" if found.paused else "it is not paused"
            self.stdout.write(f"{found.name}: not paused by an operator ({state}); nothing changed.")
            return
        self.stdout.write(f"{found.name}: resumed; {pending} queued entr{'y' if pending == 1 else 'ies'} "
                          "being delivered now.")  # fmt: skip
