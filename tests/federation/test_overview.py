"""The Overview (`/`, the landing screen) and the peer screen's charts, with Django's test client:
who sees what, the figures next to each chart, query counts that do not grow with the peers, and
server time with 50 peers and 100,000 delivery attempts in the last hour (a million: bench/overview.py)."""

import itertools
import os
import re
import statistics
import time
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation import activity, certificates
from federation import overview as overview_screen
from federation.models import Delivery, IdentityCertificate, OutboxEntry, Peer, PeerHealth
from ingest.models import Event, Source
from kite import services as kite_services
from kite.models import Membership
from tests.screens import median_ms, member, outsider, owner, teamless  # noqa: F401  (fixtures)


def _text(response) -> str:
    return response.content.decode()


def _peer(team, name: str, **fields) -> Peer:
    fields = {"peer_hook_url": f"https://{name}.example/hooks/t/kite", "status": Peer.Status.ACTIVE, **fields}
    return Peer.objects.create(team=team, name=name, **fields)


_ids = itertools.count()


def _traffic(team, peer, *, minutes_ago: int, outcome: str = "delivered", latency: int = 20) -> Delivery:
    at = timezone.now() - timedelta(minutes=minutes_ago)
    source = Source.objects.get(team=team, name="kite")
    event = Event.objects.create(team=team, source=source, ce_id=f"e-{next(_ids)}",
                                 ce_source="kite://x", ce_type="t.x", ce_time=at, data="{}", received_at=at)  # fmt: skip
    entry = OutboxEntry.objects.create(team=team, peer=peer, event=event, status="delivered", created_at=at)
    return Delivery.objects.create(peer=peer, entry=entry, attempted_at=at, outcome=outcome, latency_ms=latency)


def test_the_landing_screen_is_the_overview_after_login(team, client):
    user = get_user_model().objects.create_user("ada", password="correct horse")
    kite_services.membership_add(team=team, user=user, role=Membership.Role.ADMIN)
    assert client.get("/")["Location"] == "/login/?next=/"
    logged_in = client.post("/login/", {"username": "ada", "password": "correct horse", "next": ""})
    assert logged_in.status_code == 302 and logged_in["Location"] == "/"
    page = client.get("/")
    assert page.status_code == 200 and "<h1>Overview</h1>" in _text(page)
    assert 'href="/" aria-current="page">Overview</a>' in _text(page)
    assert client.post("/").status_code == 405  # a read-only screen


def test_the_overview_shows_every_live_peer_with_its_chip_outbox_and_dead_letters(owner, team):
    now = timezone.now()
    up = _peer(team, "eu-west", last_attempt_at=now, last_success_at=now, last_latency_ms=40)
    down = _peer(team, "us-east", last_attempt_at=now, last_success_at=now - timedelta(hours=1))
    _peer(team, "gone", status=Peer.Status.REVOKED)
    source = Source.objects.get(team=team, name="kite")
    event = Event.objects.create(team=team, source=source, ce_id="x", ce_source="kite://x", ce_type="t.x", ce_time=now,
                                 data="{}")  # fmt: skip
    OutboxEntry.objects.create(team=team, peer=down, event=event, status="pending", created_at=now - timedelta(minutes=42))
    OutboxEntry.objects.create(team=team, peer=down, event=event, status="dead")
    OutboxEntry.objects.create(team=team, peer=down, event=event, status="dead")
    _traffic(team, up, minutes_ago=3)
    _traffic(team, down, minutes_ago=3, outcome="transient", latency=0)

    page = _text(owner.get("/"))

    rows = {name: row for name, row in re.findall(r'<tr>\s*<th scope="row"><a href="[^"]+">([^<]+)</a></th>(.*?)</tr>',
                                                  page, re.S)}  # fmt: skip
    assert set(rows) == {"eu-west", "us-east"}  # a revoked peer is history, not the fleet
    assert "chip-reachable" in rows["eu-west"] and "chip-unreachable" in rows["us-east"]
    assert re.search(r'<td class="num">1</td>\s*<td><time [^>]+>42 min ago</time></td>', rows["us-east"])
    assert f'href="/settings/federation/peers/{down.pk}/?outbox=dead">2</a>' in rows["us-east"]
    assert "none queued" in rows["eu-west"]
    assert "2 peers · 1 reachable · 1 unreachable · 1 queued ·" in page and "2 dead letters" in page
    # The chart, its description and its figures in words and in a table.
    assert re.search(r'<svg class="chart" id="traffic-chart" role="img" aria-labelledby="traffic-chart-title '
                     r'traffic-chart-desc"', page)  # fmt: skip
    sentence = re.search(r'<figcaption id="traffic-figures">([^<]+)</figcaption>', page).group(1)
    assert "3 events in, 1 deliveries out, 1 failed delivery attempts" in sentence
    assert f"<desc id=\"traffic-chart-desc\">{sentence}</desc>" in page
    minute = f"{timezone.now() - timedelta(minutes=3):%H:%M}"
    assert re.search(rf'<th scope="row" class="nowrap">{minute}</th><td class="num">2</td><td class="num">1</td><td class="num">1</td>',
                     page)  # fmt: skip


def test_members_see_the_traffic_but_not_the_peers_and_other_teams_see_nothing_of_them(
        owner, member, outsider, teamless, team):  # fmt: skip
    peer = _peer(team, "secret-peer-name")
    _traffic(team, peer, minutes_ago=2)
    as_member = _text(member.get("/"))
    assert "traffic-chart" in as_member and "secret-peer-name" not in as_member
    assert "1 events in, 1 deliveries out" in as_member
    as_outsider = _text(outsider.get("/"))
    assert "secret-peer-name" not in as_outsider and "0 events in, 0 deliveries out" in as_outsider
    assert teamless.get("/").status_code == 403


def test_certificates_nearing_expiry_are_on_the_overview(owner, team):
    row = certificates.issue(team=team, subject="kite-a", validity_days=30, actor="test")
    IdentityCertificate.objects.filter(pk=row.pk).update(not_after=timezone.now() + timedelta(days=3))
    page = _text(owner.get("/"))
    assert "Identity certificate kite-a expires in 2 days" in page  # 2 days and 23 h 59 min


def _queries(client, url: str) -> int:
    client.get(url)  # warm: the session and the cached buckets
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def test_the_overview_and_the_peer_screen_cost_the_same_queries_for_1_or_30_peers(owner, team):
    first = _peer(team, "p-0")
    _traffic(team, first, minutes_ago=5)
    few = (_queries(owner, "/"), _queries(owner, f"/settings/federation/peers/{first.pk}/"))
    for n in range(1, 30):
        peer = _peer(team, f"p-{n}", last_attempt_at=timezone.now())
        _traffic(team, peer, minutes_ago=n % 50)
        _traffic(team, peer, minutes_ago=n % 50, outcome="transient")
    many = (_queries(owner, "/"), _queries(owner, f"/settings/federation/peers/{first.pk}/"))
    assert few == many, (few, many)
    assert few[0] <= 8  # session, user, membership, peers, outbox, events, attempts, certificates


def test_the_peer_screen_charts_latency_and_failures_of_the_last_24_hours(owner, team):
    peer = _peer(team, "b")
    for latency in (10, 20, 30, 40, 1000):
        _traffic(team, peer, minutes_ago=120, latency=latency)
    _traffic(team, peer, minutes_ago=120, outcome="transient", latency=0)
    _traffic(team, _peer(team, "other"), minutes_ago=120, latency=99999)

    page = _text(owner.get(f"/settings/federation/peers/{peer.pk}/"))

    for chart in ("latency-chart", "attempts-chart"):
        assert re.search(rf'<svg class="chart" id="{chart}" role="img" aria-labelledby="{chart}-title {chart}-desc"', page)
    latency = re.search(r'<figcaption id="latency-figures">([^<]+)</figcaption>', page).group(1)
    assert "latest p50 30 ms and p95 808 ms" in latency  # percentile_cont: 40 + 0.8 × 960
    assert "5 delivered, 1 failed attempts" in re.search(r'<figcaption id="attempts-figures">([^<]+)<', page).group(1)
    assert re.search(r'<td class="num">5</td><td class="num">1</td><td class="num">30</td><td class="num">808</td>', page)
    assert "99999" not in page and "99,999" not in page


# --- at scale -----------------------------------------------------------------------------------

# Every event to every peer. The default, 2,000 events (100,000 outbox entries and attempts), loads in
# seconds; bench/overview.py runs this test with 20,000 (1,000,000 of each, several minutes to load).
PEERS, EVENTS = 50, int(os.environ.get("KITE_OVERVIEW_EVENTS", "2000"))


SPAN = timedelta(minutes=45)  # the load's events span this much of the last hour, at one steady rate
TAIL = timedelta(minutes=2)  # written just before the pages are timed: the minutes a page reads afresh


def _load(team) -> list[Peer]:
    """50 peers; EVENTS events at one rate over SPAN, each sent to every peer (one outbox entry and
    one attempt each: 1 % failed, latencies spread 0–799 ms); one peer down with 5,000 entries
    queued, another with 300 dead letters. The last TAIL of them is written last, ending now,
    however long the bulk took: the current minute is as busy as the others. Rows are written in
    time order, each event fanned out to every peer at once, as Kite writes them (the physical
    order is what the planner's correlation statistics see). INSERT … SELECT, then ANALYZE."""
    now = timezone.now()
    Peer.objects.bulk_create(Peer(team=team, name=f"peer-{n:02d}", peer_hook_url=f"https://p{n}.example/h",
                                  status=Peer.Status.ACTIVE) for n in range(PEERS))  # fmt: skip
    peers = list(Peer.objects.filter(team=team).order_by("name"))
    PeerHealth.objects.bulk_create(PeerHealth(peer=peer, last_attempt_at=now, last_success_at=now, last_latency_ms=30 + n)
                                   for n, peer in enumerate(peers))  # fmt: skip
    spacing = SPAN / EVENTS
    tail = int(TAIL / spacing)
    with connection.cursor() as cursor:
        _events_sent(cursor, team, EVENTS - tail, newest=now - TAIL, spacing=spacing, prefix="bulk")
        # Statistics before the UPDATEs below: planned on an "empty" table, each took a nested loop
        # over every row (minutes) whenever autovacuum had not analyzed the bulk in time.
        cursor.execute(f"ANALYZE {OutboxEntry._meta.db_table}")
        for status, peer, count in (("pending", peers[1], 5000), ("dead", peers[2], 300)):
            cursor.execute(f"UPDATE {OutboxEntry._meta.db_table} SET status = %s, delivered_at = NULL WHERE id IN "
                           f"(SELECT id FROM {OutboxEntry._meta.db_table} WHERE peer_id = %s ORDER BY id LIMIT %s)",
                           [status, peer.pk, count])  # fmt: skip
        _events_sent(cursor, team, tail, newest=timezone.now(), spacing=spacing, prefix="tail")
        for model in (Event, OutboxEntry, Delivery):
            cursor.execute(f"ANALYZE {model._meta.db_table}")
    return peers


def _events_sent(cursor, team, count: int, *, newest, spacing: timedelta, prefix: str) -> None:
    source = Source.objects.get(team=team, name="kite")
    first = (Event.objects.order_by("-id").values_list("id", flat=True).first() or 0) + 1
    cursor.execute(
        f"INSERT INTO {Event._meta.db_table} (team_id, source_id, ce_id, ce_source, ce_type, ce_time, ce_subject, "
        "datacontenttype, data, extensions, agent, received_at) SELECT %s, %s, %s || g, 'kite://bench', "
        "'com.stripe.charge.succeeded', t, '', 'application/json', '{}', '{}', '', t FROM generate_series(%s, 0, -1) g, "
        "LATERAL (SELECT %s - g * %s AS t) at", [team.id, source.pk, prefix, count - 1, newest, spacing])  # fmt: skip
    cursor.execute(
        f"INSERT INTO {OutboxEntry._meta.db_table} (msg_id, team_id, peer_id, event_id, provenance, status, "
        "attempts, next_attempt_at, last_error, created_at, delivered_at) SELECT gen_random_uuid(), %s, p.id, e.id, "
        "'{}', 'delivered', 1, e.received_at, '', e.received_at, e.received_at "
        f"FROM {Event._meta.db_table} e, {Peer._meta.db_table} p WHERE e.team_id = %s AND e.id >= %s AND p.team_id = %s "
        "ORDER BY e.received_at, p.id", [team.id, team.id, first, team.id])  # fmt: skip
    cursor.execute(
        f"INSERT INTO {Delivery._meta.db_table} (peer_id, entry_id, attempted_at, status_code, outcome, latency_ms, "
        "error) SELECT o.peer_id, o.id, o.created_at, 200, CASE WHEN o.id %% 100 = 0 THEN 'transient' ELSE "
        f"'delivered' END, (o.id * 7919) %% 800, '' FROM {OutboxEntry._meta.db_table} o WHERE o.event_id >= %s "
        "AND o.team_id = %s ORDER BY o.id", [first, team.id])  # fmt: skip


def _median(work, runs: int = 7) -> float:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def _timed_once(client, url: str) -> float:
    started = time.perf_counter()
    assert client.get(url).status_code == 200
    return (time.perf_counter() - started) * 1000


def test_overview_and_peer_screen_take_at_most_100_ms_with_50_peers_and_their_attempts(owner, team):
    started = time.perf_counter()
    peers = _load(team)
    loaded = time.perf_counter() - started
    assert Delivery.objects.filter(peer__team=team).count() == PEERS * EVENTS
    recent = Delivery.objects.filter(peer__team=team, attempted_at__gte=timezone.now() - timedelta(hours=1))
    assert recent.count() == PEERS * EVENTS  # all in the Overview's window
    peer_url = f"/settings/federation/peers/{peers[1].pk}/"
    cold = (_timed_once(owner, "/"), _timed_once(owner, peer_url))  # every bucket counted: a cold cache
    overview, peer_screen = median_ms(lambda: owner.get("/")), median_ms(lambda: owner.get(peer_url))
    peers_list = median_ms(lambda: owner.get("/settings/federation/peers/"))  # a yardstick: no chart, same peers
    charts_only = (_median(lambda: overview_screen.traffic_chart(activity.team_last_hour(team.id, timezone.now()))),
                   _median(lambda: overview_screen.peer_charts(activity.peer_last_day(peers[1], timezone.now()))))
    print(f"OVERVIEW-BENCH {PEERS * EVENTS:,} attempts loaded in {loaded:.1f} s; cold cache: overview {cold[0]:.0f} ms, "
          f"peer screen {cold[1]:.0f} ms; median warm: overview {overview:.1f} ms, peer screen {peer_screen:.1f} ms, "
          f"peers list (no chart) {peers_list:.1f} ms; of which charts (queries and SVG): overview "
          f"{charts_only[0]:.1f} ms, peer screen {charts_only[1]:.1f} ms")  # fmt: skip
    page = _text(owner.get("/"))
    queued = OutboxEntry.objects.filter(peer=peers[1], status="pending").count()
    dead = OutboxEntry.objects.filter(peer=peers[2], status="dead").count()
    assert "peer-49" in page and f'<td class="num">{queued}</td>' in page and f">{dead}</a>" in page
    assert overview <= 100 and peer_screen <= 100, (overview, peer_screen)
