"""The Overview (the landing screen, `/`) and the charts of a peer's screen.

Thin adapters: the figures come from federation.activity (traffic per bucket, outbox health) and
the screens' own selectors (peers, reachability, certificate warnings); kite.charts draws them.
Every chart has its figures next to it in words and in a table (the text alternative).
"""

from __future__ import annotations

from datetime import datetime

from django.shortcuts import render
from django.utils import timezone
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_GET

from federation import activity, reachability, selectors
from federation.models import Peer
from kite import charts
from kite.views import screen


@require_GET
@screen()
def overview(request):
    """Every member sees the team's traffic; peers, outboxes and certificates are for team admins,
    as on Settings → Federation."""
    now = timezone.now()
    principal = request.principal
    context = {"traffic": traffic_chart(activity.team_last_hour(principal.team.id, now)), "now": now,
               "is_admin": principal.is_admin}  # fmt: skip
    if principal.is_admin:
        peers = list(selectors.peers(principal.team.id).exclude(status=Peer.Status.REVOKED))
        health = activity.outbox_health([peer.pk for peer in peers])
        context["rows"] = [{"peer": peer, "chip": reachability.of_peer(peer, now=now), **health[peer.pk]}
                           for peer in peers]  # fmt: skip
        context["queued"] = sum(row["queued"] for row in context["rows"])
        context["dead"] = sum(row["dead"] for row in context["rows"])
        context["chips"] = _chip_counts(context["rows"])
    return render(request, "overview.html", context)


def _chip_counts(rows: list[dict]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for row in rows:
        name = "Paused" if row["peer"].paused == Peer.Pause.OPERATOR else row["chip"]
        counts[name] = counts.get(name, 0) + 1
    order = ["Reachable", "Slow", "Stale", "Unreachable", "Unknown", "Paused"]
    return sorted(counts.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))


# --- charts ----------------------------------------------------------------------------------------


def _minute(moment: datetime) -> str:
    return f"{moment:%H:%M}"


def traffic_chart(buckets: list[activity.Bucket]) -> dict:
    """The Overview's chart: events in and deliveries out per minute, failed attempts as bars."""
    labels = [_minute(bucket.start) for bucket in buckets]
    events, delivered, failed = (sum(getattr(b, name) for b in buckets) for name in ("events", "delivered", "failed"))
    span = f"{labels[0]}–{labels[-1]} UTC"
    busiest = max(buckets, key=lambda b: (b.events, b.start))
    sentence = (f"Last hour ({span}): {charts.number(events)} events in, {charts.number(delivered)} deliveries out, "
                f"{charts.number(failed)} failed delivery attempts.")  # fmt: skip
    if busiest.events:
        sentence += f" Busiest minute {_minute(busiest.start)} with {charts.number(busiest.events)} events in."
    svg = charts.time_chart(
        chart_id="traffic-chart", title="Events in and deliveries out per minute, last hour", desc=sentence,
        labels=labels, unit="/min", series=[
            charts.Series("Events in", [b.events for b in buckets]),
            charts.Series("Deliveries out", [b.delivered for b in buckets]),
            charts.Series("Failed attempts", [b.failed for b in buckets], kind="bars", tone="bad"),
        ],
    )  # fmt: skip
    table = charts.figures_table(
        caption="Events in, deliveries out and failed delivery attempts per minute, last hour (UTC)",
        headers=["Minute (UTC)", "Events in", "Deliveries out", "Failed attempts"],
        rows=[(label, b.events, b.delivered, b.failed) for label, b in zip(labels, buckets, strict=True)],
    )
    return {"svg": mark_safe(svg), "sentence": sentence, "table": mark_safe(table)}


def peer_charts(buckets: list[activity.Bucket]) -> dict:
    """A peer's last 24 h: latency percentiles of delivered attempts, and deliveries against failures."""
    labels = [_minute(bucket.start) for bucket in buckets]
    delivered, failed = sum(b.delivered for b in buckets), sum(b.failed for b in buckets)
    span = f"since {buckets[0].start:%Y-%m-%d %H:%M} UTC, per 15 minutes"
    latest = next((b for b in reversed(buckets) if b.p50_ms is not None), None)
    worst = max((b for b in buckets if b.p95_ms is not None), key=lambda b: b.p95_ms, default=None)
    latency = f"Last 24 h ({span}): "
    if latest is None:
        latency += "no delivered attempt, so no latency to show."
    else:
        latency += (f"latest p50 {charts.number(latest.p50_ms, 'ms')} and p95 {charts.number(latest.p95_ms, 'ms')} "
                    f"(from {_minute(latest.start)}); highest p95 {charts.number(worst.p95_ms, 'ms')} "
                    f"(from {_minute(worst.start)}).")  # fmt: skip
    attempts = (f"Last 24 h ({span}): {charts.number(delivered)} delivered, "
                f"{charts.number(failed)} failed attempts.")  # fmt: skip
    latency_svg = charts.time_chart(
        chart_id="latency-chart", title="Delivery latency, last 24 hours (p50 and p95)", desc=latency, labels=labels,
        unit="ms", series=[charts.Series("p50", [b.p50_ms for b in buckets]),
                           charts.Series("p95", [b.p95_ms for b in buckets])],
    )  # fmt: skip
    attempts_svg = charts.time_chart(
        chart_id="attempts-chart", title="Deliveries and failed attempts, last 24 hours", desc=attempts, labels=labels,
        series=[charts.Series("Delivered", [b.delivered for b in buckets]),
                charts.Series("Failed attempts", [b.failed for b in buckets], kind="bars", tone="bad")],
    )  # fmt: skip
    table = charts.figures_table(
        caption="Delivered attempts, failed attempts and the latency of the delivered ones per 15 minutes, "
                "last 24 hours (UTC)",
        headers=["From (UTC)", "Delivered", "Failed attempts", "p50 latency (ms)", "p95 latency (ms)"],
        rows=[(f"{b.start:%Y-%m-%d %H:%M}", b.delivered, b.failed, b.p50_ms, b.p95_ms) for b in buckets],
    )  # fmt: skip
    return {"latency_svg": mark_safe(latency_svg), "latency": latency,
            "attempts_svg": mark_safe(attempts_svg), "attempts": attempts, "table": mark_safe(table)}  # fmt: skip
