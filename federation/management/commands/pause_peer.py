from django.core.management.base import CommandError

from federation import selectors, services
from federation.management.base import ACTOR, TeamCommand, service_errors


class Command(TeamCommand):
    help = ("Pause a peer for maintenance: events keep queuing, nothing is sent to it (no attempt is burnt), "
            "heartbeats go on, until resume_peer. Pausing a paused peer changes nothing.")

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("peer", help="peer name or id")
        parser.add_argument("--reason", default="", help="why, for the audit trail (at most 200 characters)")

    def handle(self, *args, team, peer, reason, **options):
        found = peer_or_sender(self, team, peer)
        with service_errors():
            found, changed = services.peer_pause(peer=found, reason=reason, actor=ACTOR)
        if changed:
            self.stdout.write(f"{found.name}: paused. Events queue here; nothing is sent until "
                              f"`manage.py resume_peer {found.name}`.")  # fmt: skip
        else:
            self.stdout.write(f"{found.name}: paused already; nothing changed.")


def peer_or_sender(command: TeamCommand, team: str, ref: str):
    """A peer or a trusted sender of the team (the service says why a sender has no pause)."""
    found_team = command.team(team)
    found = selectors.peer_by_ref(found_team.id, ref, role=None)
    if found is None:
        raise CommandError(f"Team {found_team.name} has no peer named {ref!r} (or with that id).")
    return found
