from django.apps import AppConfig


class FleetConfig(AppConfig):
    name = "fleet"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from fleet import presence
        from ingest import hooks

        hooks.on_listener_connected(presence.listener_announced)
        hooks.on_listener_disconnected(presence.listener_left)
