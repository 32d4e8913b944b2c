from django.core.management.base import CommandError

from federation import channel
from federation.management.base import ACTOR, TeamCommand, service_errors


class Command(TeamCommand):
    help = ("Rotate a peer's inbound or outbound secret (carried over the signed channel when the peer has one). "
            "--now: a suspected leak, the replaced secret stops working at once instead of after 24 h.")

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("peer", help="peer name or id")
        parser.add_argument("--direction", choices=["inbound", "outbound"], required=True)
        parser.add_argument("--now", action="store_true", help="no grace period for the replaced secret")
        parser.add_argument("--no-propagate", action="store_true", help="do not tell the peer; print the secret")

    def handle(self, *args, team, peer, direction, now, no_propagate, **options):
        found = self.peer(self.team(team), peer)
        if found.status == found.Status.REVOKED:
            raise CommandError(f"Peer {found.name} is revoked.")
        propagate = channel.has_channel(found) and not no_propagate
        with service_errors():
            rotated = channel.rotate_secret(peer=found, direction=direction, propagate=propagate, grace=not now,
                                            actor=ACTOR)  # fmt: skip
        fingerprint = getattr(rotated.peer, f"{direction}_fingerprint")
        grace = "no grace: the old secret no longer works" if now else "the old inbound secret stays valid 24 h"
        self.stdout.write(f"{found.name}: {direction} secret rotated, fingerprint {fingerprint} ({grace}).")
        if rotated.propagated:
            self.stdout.write(f"{found.name} was told over the signed channel and switched itself.")
        if rotated.secret:
            if rotated.error:
                self.stdout.write(f"Could not tell {found.name}: {rotated.error}")
            self.stdout.write(f"New secret (shown once, paste it on the other side): {rotated.secret}")
