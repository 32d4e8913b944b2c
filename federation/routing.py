"""Which peers an event may go to: scopes, filters and loop rules (docs/architecture.md "The flow of one event"). Pure: no Django."""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from federation import filters as peer_filters
from ingest.cloudevent import rfc3339

INTERNAL_PREFIX = "kite."  # kite.federation.delivery_failed and friends never leave the instance
DEFAULT_MAX_HOPS = 3


def strip_vendor(event_type: str) -> str:
    """`com.stripe.payment_intent.succeeded` → `stripe.payment_intent.succeeded`."""
    head, _, rest = event_type.partition(".")
    return rest if head in ("com", "org", "net", "io", "dev") and rest else event_type


def scope_matches(scopes: list[str], event_type: str) -> bool:
    """Globs over the type, also tried against the type without its reverse-DNS vendor prefix."""
    candidates = (event_type, strip_vendor(event_type))
    return any(fnmatchcase(candidate, scope) for scope in scopes for candidate in candidates)


@dataclass(frozen=True)
class Provenance:
    origin: str
    chain: tuple[str, ...]
    hops: int

    def extensions(self) -> dict:
        return {"kitefedorigin": self.origin, "kitefedchain": json.dumps(list(self.chain)), "kitefedhops": self.hops}


def provenance_of(extensions: dict) -> Provenance | None:
    """The provenance an event arrived with, or None for an event born here."""
    origin = extensions.get("kitefedorigin")
    if not isinstance(origin, str) or not origin:
        return None
    try:
        chain = json.loads(extensions.get("kitefedchain") or "[]")
    except (TypeError, ValueError):
        chain = []
    chain = tuple(str(item) for item in chain) if isinstance(chain, list) else ()
    try:
        hops = int(extensions.get("kitefedhops") or 0)
    except (TypeError, ValueError):
        hops = len(chain)
    return Provenance(origin=origin, chain=chain or (origin,), hops=max(hops, 0))


def next_hop(arrived: Provenance | None, me: str) -> Provenance:
    """Provenance for forwarding: the first forward starts the chain, later hops append themselves."""
    if arrived is None:
        return Provenance(origin=me, chain=(me,), hops=1)
    chain = arrived.chain if me in arrived.chain else (*arrived.chain, me)
    return Provenance(origin=arrived.origin, chain=chain, hops=arrived.hops + 1)


@dataclass(frozen=True)
class Decision:
    send: bool
    reason: str = ""  # why not: internal, scope, filter, loop_chain, loop_origin, max_hops


def decide(
    *, event_type: str, forward: Provenance, peer_instance_id: str, scopes: list[str], max_hops: int,
    filters: list | tuple = (), attributes: Callable[[], Mapping[str, str]] | None = None,
) -> Decision:  # fmt: skip
    """`attributes` gives the event's attributes as the peer would receive them (wire_attributes),
    asked for only when the peer has filters."""
    if event_type.startswith(INTERNAL_PREFIX):
        return Decision(False, "internal")
    if not scope_matches(scopes, event_type):
        return Decision(False, "scope")
    if filters and not peer_filters.matches(filters, attributes() if attributes else {}):
        return Decision(False, "filter")
    if peer_instance_id and peer_instance_id == forward.origin:
        return Decision(False, "loop_origin")
    if peer_instance_id and peer_instance_id in forward.chain:
        return Decision(False, "loop_chain")
    if forward.hops > max_hops:
        return Decision(False, "max_hops")
    return Decision(True)


# What the outbox leaves out of the stored event when it sends it on (outbox.wire_json).
NOT_FORWARDED = ("kitecursor", "kitefedpeer")


def wire_attributes(event, forward: Provenance) -> dict[str, str]:
    """The context attributes of a stored event as a peer receives it — its extensions, with the
    provenance of this hop — in the canonical string form filters compare."""
    attributes = {"specversion": "1.0", "id": event.ce_id, "source": event.ce_source, "type": event.ce_type,
                  "time": rfc3339(event.ce_time), "datacontenttype": event.datacontenttype}  # fmt: skip
    if event.ce_subject:
        attributes["subject"] = event.ce_subject
    extensions = {name: value for name, value in (event.extensions or {}).items() if name not in NOT_FORWARDED}
    return peer_filters.canonical({**attributes, **extensions, **forward.extensions()})
