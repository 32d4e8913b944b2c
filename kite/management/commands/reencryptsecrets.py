"""Re-encrypt every stored secret with the first KITE_ENCRYPTION_KEYS key.

Rotation: put a new key first in KITE_ENCRYPTION_KEYS (keep the old ones after
it), restart, run this, then drop the old keys.
"""

from django.apps import apps
from django.core.management.base import BaseCommand
from django.db import transaction

from kite import crypto

encrypted_fields = crypto.encrypted_fields


class Command(BaseCommand):
    help = "Re-encrypt stored secrets with the first key of KITE_ENCRYPTION_KEYS."

    def handle(self, *args, **options):
        total = 0
        for model in apps.get_models():
            fields = encrypted_fields(model)
            if not fields:
                continue
            count = 0
            with transaction.atomic():
                for row in model.objects.select_for_update().only("pk", *fields).iterator():
                    for name in fields:
                        if getattr(row, name):
                            setattr(row, name, crypto.rotate(getattr(row, name)))
                    row.save(update_fields=fields)
                    count += 1
            self.stdout.write(f"{model._meta.label}: {count} row(s) re-encrypted")
            total += count
        self.stdout.write(self.style.SUCCESS(f"Done: {total} row(s). Old keys can now be removed."))
