"""Routing an event to peers, in the transaction that stores it (docs/architecture.md "The outbox"): the per-team cache of
routes, the decision per peer (federation.routing), the outbox entries written, and their peers
kicked after commit (federation.dispatch)."""

import functools
import json
import threading
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from federation import dispatch, metrics, routing
from federation.models import OutboxEntry, Peer
from ingest import cloudevent
from ingest import hooks as ingest_hooks
from ingest import services as ingest_services
from ingest.models import Event, Source
from kite import fastsql, tracing
from kite.models import Team

FAILED_TYPE = "kite.federation.delivery_failed"


@dataclass(frozen=True)
class Route:
    """What routing needs of a peer; cached per team so storing an event costs no query."""

    pk: int
    name: str
    remote_instance_id: str
    scopes: tuple[str, ...]
    max_hops: int
    filters: tuple[dict, ...] = ()  # federation.filters expressions, all of which must match


# Each process keeps the routes it read per team, with the team's `routes_version` they were
# read at. Any change to a team's peers bumps that version in the same transaction; webhooks
# read it along with their source, so an event of a team without peers costs no query and
# no round trip, and a change is seen by the next event in every process.
_routes: dict[str, tuple[int, list[Route]]] = {}
_routes_lock = threading.Lock()


def routes_for(team_id: str, version: int | None = None) -> list[Route]:
    if version is None:  # not read with a webhook's source: one indexed read
        version = Team.objects.filter(pk=team_id).values_list("routes_version", flat=True).first() or 0
    cached = _routes.get(team_id)
    if cached is not None and cached[0] == version:
        return cached[1]
    peers = (
        Peer.objects.filter(team_id=team_id, role=Peer.Role.PEER)
        .exclude(status=Peer.Status.REVOKED)
        .exclude(peer_hook_url="")
        .values_list("pk", "name", "remote_instance_id", "scopes", "max_hops", "filters")
    )
    routes = [Route(pk, name, remote, tuple(scopes or ()), hops, tuple(filters or ()))
              for pk, name, remote, scopes, hops, filters in peers]  # fmt: skip
    with _routes_lock:
        _routes[team_id] = (version, routes)
    return routes


def forget_routes(team_id: str | None = None) -> None:
    """A peer's routing fields changed: bump the team's routes version, in the caller's
    transaction when there is one, so that every process reloads at its next event."""
    with _routes_lock:
        if team_id is None:
            _routes.clear()
        else:
            _routes.pop(team_id, None)
    teams = Team.objects.all() if team_id is None else Team.objects.filter(pk=team_id)
    teams.update(routes_version=F("routes_version") + 1)


def route_event(event: Event, sender) -> None:
    if event.ce_type.startswith(routing.INTERNAL_PREFIX):
        return
    source = event.source if Event._meta.get_field("source").is_cached(event) else None
    routes = routes_for(event.team_id, getattr(source, "team_routes_version", None))
    if not routes:
        return
    forward = routing.next_hop(routing.provenance_of(event.extensions or {}), settings.KITE_INSTANCE_ID)
    peer_ids = []
    attributes = functools.cache(lambda: routing.wire_attributes(event, forward))  # once, for filters only
    for route in routes:
        decision = _decide(event, forward, route, sender, attributes)
        if decision.send:
            peer_ids.append(route.pk)
            continue
        metrics.DROPPED.labels(route.name, decision.reason).inc()
        if decision.reason == "max_hops":
            _emit_delivery_failed(event, route, forward)
    if peer_ids:
        with tracing.event_span("kite.outbox", event, {"kite.peer_ids": peer_ids}):
            entries_write(event, forward, peer_ids)
        peer_ids = sorted(set(peer_ids))
        transaction.on_commit(lambda: dispatch.kick_all(peer_ids), robust=True)


def entries_write(event: Event, forward: routing.Provenance, peer_ids: list[int]) -> None:
    """One outbox entry per peer, in the caller's transaction: one statement however many peers.
    The entries differ only by peer and msg_id, so on PostgreSQL the shared values are bound once
    and each msg_id is made there (gen_random_uuid(), a v4 UUID as uuid.uuid4 makes). Binding every
    column of every entry (2,400 parameters at 200 peers) made route_event four times as slow
    (bench/RESULTS.md, Fan-out). Nothing reads the entries back: the kicks name peers."""
    shared = OutboxEntry(team_id=event.team_id, event=event, provenance=forward.extensions())
    fastsql.insert_each(shared, "peer", peer_ids, generated={"msg_id": "gen_random_uuid()"})


def _routes_idle_for(source) -> bool:
    """This process knows the source's team has no peer to route to at the routes version read
    with the source. Never reads: what is not cached (yet) is not known to be idle."""
    cached = _routes.get(source.team_id)
    return cached is not None and cached[0] == getattr(source, "team_routes_version", None) and not cached[1]


route_event.idle_for = _routes_idle_for


def _routes_known_for(source) -> bool:
    """This process has the routes of the source's team at the version read with the source:
    what routing writes for its events can be worked out without a query (`_route_alone`), unless
    tracing is on (route_event's span)."""
    cached = _routes.get(source.team_id)
    return not tracing.ENABLED and cached is not None and cached[0] == getattr(source, "team_routes_version", None)


def _route_alone(source, events: list[Event], sender) -> ingest_hooks.Alone | None:
    """route_event for `events` of `source` stored by one statement (ingest.hooks.Alone): their
    outbox entries written by that statement (fastsql.Children), and once it has run, for the
    events it inserted, the drops counted and the peers kicked. The same routes and decisions as
    route_event, from the routes cached at the version the statement's guard checks. None (a
    transaction stores them, calling route_event) when tracing is on (route_event's span) or an
    event meets a peer's max_hops (its delivery_failed event is stored in that transaction)."""
    cached = _routes.get(source.team_id)  # once: another thread may drop it meanwhile
    if tracing.ENABLED or cached is None or cached[0] != getattr(source, "team_routes_version", None):
        return None
    rows, kicks, drops = [], {}, {}
    for index, event in enumerate(events):
        if not cached[1] or event.ce_type.startswith(routing.INTERNAL_PREFIX):
            continue
        forward = routing.next_hop(routing.provenance_of(event.extensions or {}), settings.KITE_INSTANCE_ID)
        attributes = functools.cache(lambda event=event, forward=forward: routing.wire_attributes(event, forward))
        provenance = forward.extensions()
        for route in cached[1]:
            decision = _decide(event, forward, route, sender, attributes)
            if decision.send:
                rows.append((index, (route.pk, provenance)))
                kicks.setdefault(index, set()).add(route.pk)
            elif decision.reason == "max_hops":
                return None
            else:
                drops.setdefault(index, []).append((route.name, decision.reason))

    def stored(inserted: list[bool]) -> None:
        for index, reasons in drops.items():
            if inserted[index]:
                for name, reason in reasons:
                    metrics.DROPPED.labels(name, reason).inc()

    def committed(inserted: list[bool]) -> None:
        peer_ids = sorted({pk for index, pks in kicks.items() if inserted[index] for pk in pks})
        if peer_ids:
            dispatch.kick_all(peer_ids)

    children = None
    if rows:
        shared = OutboxEntry(team_id=source.team_id)
        children = fastsql.Children(shared, "event", ("peer", "provenance"), rows, generated={"msg_id": "gen_random_uuid()"})
    return ingest_hooks.Alone(children, stored if drops else None, committed if rows else None)


route_event.alone_for = _routes_known_for
route_event.alone = _route_alone


def _decide(event, forward, peer, sender, attributes=None) -> routing.Decision:
    if sender is not None and getattr(sender, "pk", None) == peer.pk:
        return routing.Decision(False, "loop_chain")  # never straight back to whoever sent it
    return routing.decide(
        event_type=event.ce_type,
        forward=forward,
        peer_instance_id=peer.remote_instance_id,
        scopes=list(peer.scopes),
        max_hops=peer.max_hops,
        filters=peer.filters,
        attributes=attributes,
    )


def _emit_delivery_failed(event: Event, peer: Peer, forward: routing.Provenance) -> None:
    source = Source.objects.get(team_id=event.team_id, name="kite")
    data = {
        "peer": peer.name,
        "reason": "max_hops",
        "max_hops": peer.max_hops,
        "hops": forward.hops - 1,
        "event": {"id": event.ce_id, "source": event.ce_source, "type": event.ce_type},
        "chain": list(forward.chain),
    }
    ingest_services.event_store(
        source=source,
        draft=cloudevent.Draft(
            id=f"drop-{uuid.uuid4()}",
            type=FAILED_TYPE,
            source=f"kite://{settings.KITE_INSTANCE_ID}/{event.team_id}/federation",
            time=timezone.now(),
            data_json=json.dumps(data),
        ),
    )

