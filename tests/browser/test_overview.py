"""The Overview and the peer screen's charts in Chromium, against two live instances: A delivers
to B (real attempts with real latencies) and fails to reach a third peer that does not listen.
The operator logs in and lands on the Overview (`/`), sees the chart and every peer; B's screen
charts the last 24 hours. Screenshots: tests/browser/screenshots/overview-*.png."""

import re
import secrets

import pytest

from tests.browser.conftest import SCREENSHOTS, Operator
from tests.e2e.harness import wait_for
from tests.e2e.test_federation import Cluster, federate, stored_ids

pytestmark = pytest.mark.e2e

NOWHERE = "https://127.0.0.1:9/hooks/tm_zyxwvutsrqponmlkjihgfedcba9876543210/kite"  # nothing listens on port 9


@pytest.fixture(scope="module")
def kites(tmp_path_factory):
    cluster = Cluster(tmp_path_factory)
    try:
        yield cluster.start_together("overview-a", "overview-b")
    finally:
        cluster.close()


def test_the_operator_lands_on_the_overview_and_reads_the_charts(chromium, kites):
    a, b = kites
    peer = federate(a, b, "b", scopes=["stripe.*"])
    down = a.api("POST", "/api/federation/peers", json={"name": "archive-down", "peer_hook_url": NOWHERE,
                                                        "scopes": ["stripe.*"]})  # fmt: skip
    assert down.status_code == 201, down.text
    sent = [f"evt_{n}_{secrets.token_hex(3)}" for n in range(12)]
    for event_id in sent:
        a.post_event("plain", event_id)
    wait_for(lambda: set(sent) <= set(stored_ids(b, source="kite")), 20, lambda: f"the events at B\n{a.state()}")

    op = Operator(chromium, a, "overview").login()  # waits for the landing URL, /
    try:
        page = op.page
        assert page.title() == "Overview · Kite"
        chart = page.get_by_role("img", name="Events in and deliveries out per minute, last hour")
        assert chart.is_visible() and chart.bounding_box()["width"] > 600
        caption = page.locator("#traffic-figures").inner_text()
        assert re.search(r"Last hour \(\d\d:\d\d–\d\d:\d\d UTC\): 12 events in, (\d+) deliveries out", caption), caption
        assert int(re.search(r"(\d+) deliveries out", caption).group(1)) == 12  # all to B; none reached archive-down
        assert page.locator("svg#traffic-chart .series-0 path, svg#traffic-chart .series-0 circle").count() >= 1
        rows = page.locator("section[aria-labelledby=peers-title] tbody tr")
        assert rows.count() == 2
        b_row = rows.filter(has=page.get_by_role("link", name="b", exact=True))
        assert b_row.locator(".chip").inner_text() in ("Reachable", "Unknown", "Slow")
        down_row = rows.filter(has=page.get_by_role("link", name="archive-down", exact=True))
        assert int(down_row.locator("td.num").first.inner_text()) >= 1  # queued: it never answers
        assert "none queued" in b_row.inner_text()
        op.shot("overview-1280")
        page.locator("section[aria-labelledby=traffic-title]").screenshot(path=str(SCREENSHOTS / "overview-chart.png"))
        page.get_by_text("Figures per minute").click()  # the text alternative, without any script
        assert page.locator("details.chart-table tbody tr").count() == 60
        page.get_by_text("Figures per minute").click()
        page.set_viewport_size({"width": 390, "height": 900})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        op.shot("overview-390")
        page.set_viewport_size({"width": 1280, "height": 900})

        b_row.get_by_role("link", name="b", exact=True).click()
        page.wait_for_url(re.compile(rf".*/peers/{peer['id']}/$"))
        latency = page.get_by_role("img", name="Delivery latency, last 24 hours (p50 and p95)")
        attempts = page.get_by_role("img", name="Deliveries and failed attempts, last 24 hours")
        assert latency.is_visible() and attempts.is_visible()
        figures = page.locator("#latency-figures").inner_text()
        assert re.search(r"latest p50 [\d,.]+ ms and p95 [\d,.]+ ms", figures), figures
        assert "12 delivered, 0 failed attempts" in page.locator("#attempts-figures").inner_text()
        op.shot("overview-peer-b")
        page.locator("#activity").screenshot(path=str(SCREENSHOTS / "overview-peer-charts.png"))
    finally:
        op.close()
