from federation import invitations
from federation.management.base import ACTOR, TeamCommand, scope_list, service_errors


class Command(TeamCommand):
    help = "Create an invitation for another Kite instance; print it once (stdout)."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("--name", default="", help="what to call the peer here (default: generated)")
        parser.add_argument("--scopes", default="", help="comma-separated event type globs we send it, e.g. 'stripe.*'")
        parser.add_argument("--max-hops", type=int, default=None)
        parser.add_argument("--ttl-seconds", type=int, default=invitations.DEFAULT_TTL_SECONDS,
                            help="valid this long (60 s to 7 days; default 1 h)")  # fmt: skip

    def handle(self, *args, team, name, scopes, max_hops, ttl_seconds, **options):
        found = self.team(team)
        with service_errors():
            peer, invitation = invitations.issue(team=found, name=name, scopes=scope_list(scopes), max_hops=max_hops,
                                                 ttl_seconds=ttl_seconds, actor=ACTOR)  # fmt: skip
        self.stderr.write(f"Invitation for peer {peer.name} (id {peer.pk}) of team {found.name}, valid until "
                          f"{peer.invitation_expires_at:%Y-%m-%d %H:%M:%S} UTC, single use, shown once:")  # fmt: skip
        self.stdout.write(invitation)
