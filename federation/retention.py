"""What federation does when the event purge (ingest.services.events_purge_expired) deletes a batch
of expired events (the ingest.hooks.event_purging hook, registered in FederationConfig.ready()).

An event still owed to a peer (an outbox entry pending or in flight) stays, with its entries, until
a later run finds it delivered or dead: a purge never drops an event a peer has not had. The other
events' entries and their delivery attempts are deleted here by index, in the purge's transaction.
"""

from federation.models import Delivery, OutboxEntry

OWED = [OutboxEntry.Status.PENDING, OutboxEntry.Status.IN_FLIGHT]
SETTLED = [OutboxEntry.Status.DELIVERED, OutboxEntry.Status.DEAD]


def events_purging(event_ids: list[int]) -> set[int]:
    """Delete the settled outbox entries (and attempts) of events not owed to any peer; return the
    ids of the events still owed. The settled entries are locked first, so a dead letter replayed
    meanwhile waits for the purge's commit and then finds nothing to requeue (or, replayed before,
    is owed and kept) — no entry is deleted after it became owed again."""
    settled = list(
        OutboxEntry.objects.select_for_update()
        .filter(event_id__in=event_ids, status__in=SETTLED)
        .order_by()
        .values_list("pk", "event_id")
    )
    owed = set(OutboxEntry.objects.filter(event_id__in=event_ids, status__in=OWED).values_list("event_id", flat=True))
    doomed = [pk for pk, event_id in settled if event_id not in owed]
    if doomed:
        Delivery.objects.filter(entry_id__in=doomed)._raw_delete(Delivery.objects.db)
        OutboxEntry.objects.filter(pk__in=doomed)._raw_delete(OutboxEntry.objects.db)
    return owed
