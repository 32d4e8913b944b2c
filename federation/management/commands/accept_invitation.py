from federation import invitations
from federation.management.base import ACTOR, TeamCommand, scope_list, service_errors


class Command(TeamCommand):
    help = "Accept another instance's invitation (the handshake runs now); print the new peer."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("invitation", help="the kite-invite-v1.… string")
        parser.add_argument("--name", default="", help="what to call the peer here (default: its instance id)")
        parser.add_argument("--scopes", default="", help="comma-separated event type globs we send it")
        parser.add_argument("--max-hops", type=int, default=None)

    def handle(self, *args, team, invitation, name, scopes, max_hops, **options):
        found = self.team(team)
        with service_errors():
            peer = invitations.accept(team=found, invitation=invitation, name=name, scopes=scope_list(scopes),
                                      max_hops=max_hops, actor=ACTOR)  # fmt: skip
        self.stdout.write(f"Peer {peer.name} (id {peer.pk}) is {peer.status}; the first heartbeats enrol it.")
