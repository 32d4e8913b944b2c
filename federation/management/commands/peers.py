import json
from datetime import UTC

from federation import selectors
from federation.api.serializers import PeerSerializer
from federation.management.base import TeamCommand

COLUMNS = ("NAME", "STATUS", "REACHABILITY", "PAUSED", "PENDING", "DEAD", "LAST CONTACT")


class Command(TeamCommand):
    help = "List the team's peers: status, reachability, outbox pending/dead and last contact."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("--json", action="store_true", dest="as_json", help="print the peers as the API shows them")

    def handle(self, *args, team, as_json: bool, **options):
        found = self.team(team)
        peers = list(selectors.peers(found.id))
        depths = selectors.outbox_depths([peer.pk for peer in peers])
        shown = PeerSerializer(peers, many=True, context={"depths": depths}).data
        if as_json:
            self.stdout.write(json.dumps(shown, indent=2, default=str))
        elif not peers:
            self.stdout.write(f"Team {found.name} has no peers.")
        else:
            self._table([_row(peer, data) for peer, data in zip(peers, shown, strict=True)])

    def _table(self, rows: list[tuple]) -> None:
        widths = [max(len(str(row[i])) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
        for row in [COLUMNS, *rows]:
            cells = (str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
            self.stdout.write("  ".join(cells).rstrip())


def _row(peer, data: dict) -> tuple:
    contacts = [at for at in (peer.last_success_at, peer.last_inbound_at) if at is not None]
    last = max(contacts) if contacts else None
    contact = f"{last.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC" if last else "never"
    outbox = data["outbox"]
    return (peer.name, peer.status, data["reachability"] or "-", peer.paused or "-", outbox.get("pending", 0),
            outbox.get("dead", 0), contact)  # fmt: skip
