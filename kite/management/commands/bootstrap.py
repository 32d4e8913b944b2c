from django.core.management.base import BaseCommand

from kite import services


class Command(BaseCommand):
    help = "First-run setup (idempotent): team `default`, a superuser and an admin API key, printed once."

    def handle(self, *args, **options):
        result = services.bootstrap()
        out = self.stdout
        out.write(f"Team: {result.team.name} (id {result.team.id})")
        if result.admin_password:
            out.write(self.style.WARNING("Browser login created — shown once, store it now:"))
            out.write(f"  username: {result.admin_username}")
            out.write(f"  password: {result.admin_password}")
        if result.api_key:
            out.write(self.style.WARNING("Admin API key for team `default` — shown once:"))
            out.write(f"  {result.api_key}")
            out.write(f"  (also written to {result.api_key_path}, mode 0600)")
        if not (result.admin_password or result.api_key):
            out.write(f"Already bootstrapped; admin API key file: {result.api_key_path}")
