from federation import certificates
from federation.management.base import ACTOR, TeamCommand, service_errors


class Command(TeamCommand):
    help = "Issue an identity certificate for the team; print its PEM (stdout) and thumbprint (stderr)."

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("--subject", required=True, help="free text, e.g. 'kite-eu production'")
        parser.add_argument("--validity-days", type=int, default=certificates.DEFAULT_VALIDITY_DAYS)

    def handle(self, *args, team, subject, validity_days, **options):
        found = self.team(team)
        with service_errors():
            row = certificates.issue(team=found, subject=subject, validity_days=validity_days, actor=ACTOR)
        self.stderr.write(f"Certificate {row.pk} for team {found.name}, valid until {row.not_after:%Y-%m-%d}")
        self.stderr.write(f"thumbprint: {row.thumbprint}")
        self.stdout.write(row.pem.rstrip("\n"))
