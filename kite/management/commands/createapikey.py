from django.core.management.base import BaseCommand, CommandError

from kite import selectors, services


class Command(BaseCommand):
    help = "Create an admin API key for a team and print it once."

    def add_arguments(self, parser):
        parser.add_argument("--team", required=True, help="team id or name")
        parser.add_argument("--label", default="", help="what the key is for")

    def handle(self, *args, team, label, **options):
        found = selectors.team_by_ref(team)
        if found is None:
            raise CommandError(f"No team with id or name {team!r}.")
        issued = services.apikey_create(team=found, label=label)
        self.stderr.write(f"API key for team {found.name} ({found.id}), shown once:")
        self.stdout.write(issued.raw_key)
