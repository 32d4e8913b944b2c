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
    entries = _entries(event_ids)
    owed = {event_id for event_id, status in entries if status in OWED}
    settled = [pk for pk in event_ids if pk not in owed]
    expected = sum(1 for event_id, _ in entries if event_id not in owed)
    if not expected:
        return owed
    doomed = OutboxEntry.objects.filter(event_id__in=settled, status__in=SETTLED)
    Delivery.objects.filter(entry__in=doomed)._raw_delete(Delivery.objects.db)
    # The DELETE locks each entry and checks its status again after any wait: an entry a replay made
    # pending since it was read is not deleted, and its event is owed again.
    if doomed._raw_delete(OutboxEntry.objects.db) != expected:
        owed |= {event_id for event_id, _ in _entries(settled)}
    return owed


def _entries(event_ids: list[int]) -> list[tuple[int, str]]:
    """(event id, status) of every outbox entry of the events: one probe of the event_id index each."""
    return list(OutboxEntry.objects.filter(event_id__in=event_ids).order_by().values_list("event_id", "status"))
