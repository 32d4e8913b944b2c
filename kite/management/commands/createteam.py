from django.core.management.base import BaseCommand, CommandError

from kite import selectors, services


class Command(BaseCommand):
    help = "Create a team and print its id (then `createapikey --team NAME` for its admin key)."

    def add_arguments(self, parser):
        parser.add_argument("name")

    def handle(self, *args, name, **options):
        name = name.strip()
        if not name or len(name) > 100:
            raise CommandError("A team name is 1-100 characters.")
        if selectors.team_by_ref(name) is not None:
            raise CommandError(f"A team named {name!r} already exists.")
        team = services.team_create(name=name)
        self.stderr.write(f"Team {team.name} created.")
        self.stdout.write(team.id)
