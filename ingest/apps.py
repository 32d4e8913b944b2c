from django.apps import AppConfig


class IngestConfig(AppConfig):
    name = "ingest"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.db.models.signals import post_save

        from ingest import receivers
        from kite.models import Team

        post_save.connect(receivers.team_saved, sender=Team, dispatch_uid="ingest.team_saved")
