"""An event's journey (GET /api/events/{id}/journey, the journey screen): how it arrived, where
it went, and the instances it crossed — "did B get evt_123, and when?" answered in one place.

ingest knows nothing of federation (docs/architecture.md "Apps and their dependencies"): where the event went — its outbox entry per peer
and every delivery attempt — comes from the `event_journey` hooks federation registers
(ingest.hooks). Arrival and provenance are read from the stored event itself.
"""

import json

from django.conf import settings

from ingest import hooks
from ingest.cloudevent import MAX_ATTRIBUTE_LENGTH, UNVERIFIED_EXTENSION
from ingest.errors import Code
from ingest.models import Event, Source
from kite.errors import ApiError

ATTEMPTS_SHOWN = 50  # per peer: the newest ones, and a count of them all
AMBIGUOUS_LISTED = 50  # sources a 409 names at most
PEER_EXTENSION = "kitefedpeer"  # the peer that handed the event over (federation.inbound sets it)
PROVENANCE_EXTENSIONS = ("kitefedorigin", "kitefedchain", "kitefedhops")
FEDERATION_KIND = Source.Kind.KITE

VERIFIED_BY = {
    Source.Kind.STRIPE: "Stripe-Signature (the source's secret)",
    Source.Kind.GITHUB: "X-Hub-Signature-256 (the source's secret)",
    Source.Kind.STANDARD: "Standard Webhooks signature (the source's secret)",
    Source.Kind.KITE: "the sending peer's signature",
}


class AmbiguousEvent(ApiError):
    """Several events of the team have that id (from different sources): `sources` names them."""

    def __init__(self, event_id: str, sources: list[str], more: bool):
        listed = ", ".join(sources) + (", …" if more else "")
        detail = f"Several sources of your team have an event {event_id!r}: {listed}. Name one with ?source= (the " \
            "event's CloudEvent source)."
        super().__init__(detail, Code.AMBIGUOUS_EVENT, status=409)
        self.sources = sources

    def body(self) -> dict:
        return {"detail": self.detail, "code": self.code, "sources": self.sources}


def _not_found(event_id: str) -> ApiError:
    # The same answer for another team's event as for none at all: ids of other teams stay unknown.
    return ApiError(f"No event {event_id[:100]!r} in your team.", Code.EVENT_NOT_FOUND, status=404)


def _storable(value: str) -> bool:
    """A value an event's id or source can hold (anything else names no event: 404, not a query
    PostgreSQL refuses)."""
    return 0 < len(value) <= MAX_ATTRIBUTE_LENGTH and "\x00" not in value


def event_find(*, team_id: str, event_id: str, source: str | None = None) -> Event:
    """The team's event with CloudEvent id `event_id`. `source` picks one when several sources
    have that id: the event's CloudEvent source (one probe of the dedup index, as the journey
    screen's links ask), or the name of the team's source it arrived on.
    Raises ApiError 404 event_not_found, AmbiguousEvent (409 ambiguous_event)."""
    if not _storable(event_id) or (source and not _storable(source)):
        raise _not_found(event_id)
    events = Event.objects.filter(team_id=team_id, ce_id=event_id).select_related("source")
    if source:
        exact = events.filter(ce_source=source).first()  # (team, ce_source, ce_id) is unique
        if exact is not None:
            return exact
        named = Source.objects.filter(team_id=team_id, name=source).values_list("pk", flat=True).first()
        if named is None:
            raise _not_found(event_id)
        events = events.filter(source_id=named)
    found = list(events.order_by("id")[: AMBIGUOUS_LISTED + 1])
    if not found:
        raise _not_found(event_id)
    if len(found) > 1:
        raise AmbiguousEvent(event_id, [event.ce_source for event in found[:AMBIGUOUS_LISTED]],
                             more=len(found) > AMBIGUOUS_LISTED)  # fmt: skip
    return found[0]


def arrival(event: Event) -> dict:
    """How the event arrived: on which source, verified how, handed over by which peer, when."""
    extensions = event.extensions or {}
    source = event.source
    federated = source.kind == FEDERATION_KIND
    unverified = source.kind == Source.Kind.NONE or extensions.get(UNVERIFIED_EXTENSION) is True
    return {
        "source": source.name,
        "kind": source.kind,
        "ce_source": event.ce_source,
        "verification": "none" if unverified else "verified",
        "verified_by": _verified_by(source, unverified, federated),
        "peer": (extensions.get(PEER_EXTENSION) or None) if federated else None,
        "received_at": event.received_at,
    }


def _verified_by(source: Source, unverified: bool, federated: bool) -> str:
    if source.kind == Source.Kind.NONE:
        return "nothing: an unverified source (anyone who knows its URL can post to it)"
    if unverified and federated:
        return "nothing where it was first received (it came in unverified there); the sending peer's signature here"
    if unverified:
        return "nothing: the event says it came in unverified (kiteunverified)"
    if source.kind == Source.Kind.CLOUDEVENTS:
        return "the source's bearer token" if source.token_sha256 else VERIFIED_BY[Source.Kind.STANDARD]
    return VERIFIED_BY.get(source.kind, f"the {source.kind} source's check")


def provenance(event: Event) -> dict:
    """The instances the event crossed, as its kitefed* extensions say, this one last (`path`).

    An event born here has none: origin null, chain [], hops 0, path [here]. A chain that is not a
    JSON array of strings or hops that are not a whole number come back null; `extensions` holds
    what the event carries, as it carries it."""
    extensions = event.extensions or {}
    carried = {name: extensions[name] for name in PROVENANCE_EXTENSIONS if name in extensions}
    origin = carried.get("kitefedorigin")
    origin = origin if isinstance(origin, str) and origin else None
    chain, hops = _chain(carried.get("kitefedchain")), _hops(carried.get("kitefedhops"))
    if origin is None:
        chain, hops = (chain or []), (hops or 0)
    crossed = chain if chain else ([origin] if origin else [])
    here = settings.KITE_INSTANCE_ID
    return {
        "origin": origin,
        "chain": chain,
        "hops": hops,
        "here": here,
        "path": [*crossed, here] if not crossed or crossed[-1] != here else crossed,
        "extensions": carried,
    }


def _chain(raw) -> list[str] | None:
    if raw is None:
        return []
    try:
        chain = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    return chain if isinstance(chain, list) and all(isinstance(item, str) for item in chain) else None


def _hops(raw) -> int | None:
    if raw is None:
        return 0
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    return int(raw) if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) < 10 else None


def peers(event: Event, attempts_shown: int = ATTEMPTS_SHOWN) -> list[dict]:
    """Where the event went: one entry per peer it was owed to (none when federation is off)."""
    return [entry for hook in hooks.event_journey for entry in hook(event, attempts_shown)]


def journey(event: Event) -> dict:
    return {"event": event.to_cloudevent(), "arrival": arrival(event), "peers": peers(event),
            "provenance": provenance(event)}  # fmt: skip
