"""What federation does when the event purge (ingest.services.events_purge_expired) deletes a batch
of expired events (the ingest.hooks.event_purging hook, registered in FederationConfig.ready()).

An event still owed to a peer (an outbox entry pending or in flight) stays, with its entries, until
a later run finds it delivered or dead: a purge never drops an event a peer has not had. The other
events' entries and their delivery attempts are deleted here by index, in the purge's transaction.
"""

from federation.models import Delivery, OutboxEntry

OWED = [OutboxEntry.Status.PENDING.value, OutboxEntry.Status.IN_FLIGHT.value]
SETTLED = [OutboxEntry.Status.DELIVERED.value, OutboxEntry.Status.DEAD.value]


def events_purging(event_ids: list[int]) -> set[int]:
    """Delete the settled outbox entries (and their attempts) of the events not owed to any peer;
    return the ids of the events still owed, which stay with all their entries."""
    owed = _owed(event_ids, OWED)
    settled = [pk for pk in event_ids if pk not in owed]
    if not settled:
        return owed
    entries = OutboxEntry.objects.filter(event_id__in=settled, status__in=SETTLED)
    Delivery.objects.filter(entry__in=entries)._raw_delete(Delivery.objects.db)
    # The DELETE locks each entry and checks its status again after any wait: an entry a replay made
    # pending meanwhile is not deleted. Whatever is left was not settled: its event is owed again.
    entries._raw_delete(OutboxEntry.objects.db)
    return owed | _owed(settled, None)


def _owed(event_ids: list[int], statuses: list[str] | None) -> set[int]:
    entries = OutboxEntry.objects.filter(event_id__in=event_ids)
    if statuses is not None:
        entries = entries.filter(status__in=statuses)
    return set(entries.order_by().values_list("event_id", flat=True).distinct())
