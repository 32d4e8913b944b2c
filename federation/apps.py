from django.apps import AppConfig


class FederationConfig(AppConfig):
    name = "federation"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from federation import inbound, outbox
        from ingest import hooks, verifiers

        verifiers.register_verifier("kite", inbound.verify_kite_source)
        from federation.metrics import OutboxCollector, PeerStateCollector
        from kite import metrics

        for collector in (OutboxCollector, PeerStateCollector):
            if not any(isinstance(c, collector) for c in metrics.SCRAPE_COLLECTORS):
                metrics.SCRAPE_COLLECTORS.append(collector())
        from federation.metrics import CertificateExpiryCollector

        if not any(isinstance(c, CertificateExpiryCollector) for c in metrics.SCRAPE_COLLECTORS):
            metrics.SCRAPE_COLLECTORS.append(CertificateExpiryCollector())
        if inbound.adopt_provenance not in hooks.event_received:
            hooks.event_received.append(inbound.adopt_provenance)
        if outbox.route_event not in hooks.event_stored:
            hooks.event_stored.append(outbox.route_event)
        from federation.journey import event_peers

        if event_peers not in hooks.event_journey:
            hooks.event_journey.append(event_peers)
        from federation.retention import events_purging

        if events_purging not in hooks.event_purging:
            hooks.event_purging.append(events_purging)

        from django.db.models.signals import post_delete, post_save

        from federation.models import Peer

        def peer_changed(sender, instance, **kwargs):
            outbox.forget_routes(instance.team_id)

        post_save.connect(peer_changed, sender=Peer, dispatch_uid="federation.routes.save", weak=False)
        post_delete.connect(peer_changed, sender=Peer, dispatch_uid="federation.routes.delete", weak=False)
