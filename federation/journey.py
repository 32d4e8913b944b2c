"""Where an event went, for its journey (ingest.journey asks through the ingest.hooks.event_journey
hook, registered in FederationConfig.ready()): its outbox entry per peer and the delivery attempts
of each — the newest `attempts_shown` of them and how many there were, in two queries however many
attempts an entry has."""

from django.db.models import Count, F, Window
from django.db.models.functions import RowNumber

from federation.models import Delivery, OutboxEntry
from ingest.models import Event

# What the journey calls an entry's state: one in flight is still owed, as a pending one is.
STATUS = {
    OutboxEntry.Status.PENDING: "pending",
    OutboxEntry.Status.IN_FLIGHT: "pending",
    OutboxEntry.Status.DELIVERED: "delivered",
    OutboxEntry.Status.DEAD: "dead",
}


def event_peers(event: Event, attempts_shown: int) -> list[dict]:
    entries = list(
        OutboxEntry.objects.filter(team_id=event.team_id, event_id=event.pk)
        .select_related("peer")
        .order_by("peer__name", "id")
    )
    attempts = _newest_attempts([entry.pk for entry in entries], attempts_shown) if entries else {}
    return [_entry(entry, *attempts.get(entry.pk, (0, []))) for entry in entries]


def _newest_attempts(entry_ids: list[int], shown: int) -> dict[int, tuple[int, list[dict]]]:
    """{entry id: (attempts in all, the newest `shown` of them oldest first)}."""
    newest_first = [F("attempted_at").desc(), F("id").desc()]
    rows = (
        Delivery.objects.filter(entry_id__in=entry_ids)
        .annotate(
            rank=Window(RowNumber(), partition_by=[F("entry_id")], order_by=newest_first),
            total=Window(Count("id"), partition_by=[F("entry_id")]),
        )
        .filter(rank__lte=shown)
        .order_by("entry_id", "attempted_at", "id")
    )
    found: dict[int, tuple[int, list[dict]]] = {}
    for row in rows:
        found.setdefault(row.entry_id, (row.total, []))[1].append(_attempt(row))
    return found


def _attempt(row: Delivery) -> dict:
    return {"at": row.attempted_at, "status_code": row.status_code, "latency_ms": row.latency_ms,
            "outcome": row.outcome, "error": row.error}  # fmt: skip


def _entry(entry: OutboxEntry, attempt_count: int, attempts: list[dict]) -> dict:
    status = STATUS.get(entry.status, entry.status)
    return {
        "peer": entry.peer.name,
        "peer_id": entry.peer_id,
        "status": status,
        "webhook_id": str(entry.msg_id),  # what the peer's side sees as webhook-id, on every try
        "queued_at": entry.created_at,
        "delivered_at": entry.delivered_at,
        "next_attempt_at": entry.next_attempt_at if status == "pending" else None,
        "last_error": entry.last_error,
        "attempt_count": attempt_count,
        "attempts": attempts,
        "sent_provenance": entry.provenance,
    }
