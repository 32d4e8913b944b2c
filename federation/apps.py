from django.apps import AppConfig


class FederationConfig(AppConfig):
    name = "federation"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from federation import inbound, outbox
        from ingest import hooks, verifiers

        verifiers.register_verifier("kite", inbound.verify_kite_source)
        if outbox.route_event not in hooks.event_stored:
            hooks.event_stored.append(outbox.route_event)
