from django.apps import AppConfig


class FederationConfig(AppConfig):
    name = "federation"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        # Imported here, not above: they need the models, which are not loaded when apps.py is.
        from django.db.models.signals import post_delete, post_save

        from federation import enqueue, inbound
        from federation.journey import event_peers
        from federation.metrics import CertificateExpiryCollector, OutboxCollector, PeerStateCollector
        from federation.models import Peer
        from federation.retention import events_purging
        from ingest import hooks, verifiers
        from kite import metrics

        verifiers.register_verifier("kite", inbound.verify_kite_source, on_loop=inbound.verify_kite_source_on_loop)
        for collector in (OutboxCollector, PeerStateCollector):
            if not any(isinstance(c, collector) for c in metrics.SCRAPE_COLLECTORS):
                metrics.SCRAPE_COLLECTORS.append(collector())
        if not any(isinstance(c, CertificateExpiryCollector) for c in metrics.SCRAPE_COLLECTORS):
            metrics.SCRAPE_COLLECTORS.append(CertificateExpiryCollector())
        if inbound.adopt_provenance not in hooks.event_received:
            hooks.event_received.append(inbound.adopt_provenance)
        if enqueue.route_event not in hooks.event_stored:
            hooks.event_stored.append(enqueue.route_event)
        if event_peers not in hooks.event_journey:
            hooks.event_journey.append(event_peers)
        if events_purging not in hooks.event_purging:
            hooks.event_purging.append(events_purging)

        def peer_changed(sender, instance, **kwargs):
            enqueue.forget_routes(instance.team_id)

        post_save.connect(peer_changed, sender=Peer, dispatch_uid="federation.routes.save", weak=False)
        post_delete.connect(peer_changed, sender=Peer, dispatch_uid="federation.routes.delete", weak=False)
