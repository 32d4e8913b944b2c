"""An event's journey in Chromium against two live instances: from the Events screen (a stored row,
and a row the live tail added) to the journey page, on A (B delivered, with its attempt) and on B
(arrived from peer a, the chain A → B)."""

import re
import secrets

import pytest

from tests.browser.conftest import Operator
from tests.e2e.harness import wait_for
from tests.e2e.test_federation import Cluster, stored_ids

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kites(tmp_path_factory):
    cluster = Cluster(tmp_path_factory)
    try:
        yield cluster.start_together("journey-ui-a", "journey-ui-b")
    finally:
        cluster.close()


def _delivered(kite, event_id: str) -> bool:
    answer = kite.api("GET", f"/api/events/{event_id}/journey")
    return answer.status_code == 200 and [p["status"] for p in answer.json()["peers"]] == ["delivered"]


def _open_journey_from_events(op: Operator, event_id: str) -> None:
    op.go("/events/")
    op.page.locator("table.events tbody tr").get_by_role("link", name=event_id, exact=True).click()
    op.page.wait_for_url(re.compile(r".*/events/journey/\?id="))


def test_the_journey_opened_from_the_events_screen_on_both_sides(chromium, kites):
    a, b = kites
    token = b.token("from-a")
    peer = a.add_peer(b, "b", outbound_token=token, scopes=["example.*"])
    b.trust("a", token)
    event_id = f"evt_{secrets.token_hex(4)}"
    assert a.post_plain(a.team_id(), "plain", event_id).status_code == 202
    wait_for(lambda: _delivered(a, event_id), 15, lambda: f"the delivery to B\n{a.state()}")

    op = Operator(chromium, a, "a").login()
    try:
        _open_journey_from_events(op, event_id)
        page = op.page
        assert page.locator("h1").inner_text() == f"Journey of {event_id}"
        assert page.locator("[data-verification]").inner_text() == "none"  # a `none` source: unverified
        journey = page.locator("article.peer-journey[data-peer=b]")
        assert journey.locator("h3 .status").inner_text() == "delivered"
        peer_page = journey.get_by_role("link", name="b").get_attribute("href")
        assert peer_page == f"/settings/federation/peers/{peer['id']}/"
        rows = journey.locator("table.attempts tbody tr")
        assert rows.count() == 1
        cells = rows.first.locator("td").all_inner_texts()
        (attempt,) = a.api("GET", f"/api/events/{event_id}/journey").json()["peers"][0]["attempts"]
        assert attempt["status_code"] in (200, 202)  # 200: a batch, once a heartbeat advertised batch_max
        assert cells[0] == attempt["at"][:19].replace("T", " ")  # UTC, as the page says it
        assert cells[1:4] == ["delivered", str(attempt["status_code"]), f"{attempt['latency_ms']} ms"]
        assert "Born here" in page.locator("section[aria-labelledby=provenance-title]").inner_text()
        op.shot("journey-a")
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
        op.shot("journey-a-390")
    finally:
        op.close()

    op = Operator(chromium, b, "b").login()
    try:
        _open_journey_from_events(op, event_id)
        page = op.page
        assert page.locator("td.arrival-peer").inner_text() == "a"
        steps = page.locator("ol.provenance li").all_inner_texts()
        assert steps == [a.instance_id, f"{b.instance_id} (here)"]
        assert "Sent to no peer" in page.locator("section[aria-labelledby=peers-title]").inner_text()
        op.shot("journey-b")
    finally:
        op.close()


def test_a_row_the_live_tail_adds_links_to_its_journey_whatever_its_id(chromium, kites):
    a, b = kites
    op = Operator(chromium, b, "b-live").login()
    try:
        op.go("/events/")
        op.page.locator("[data-live-state] .badge.ok").wait_for()  # the tail is connected
        event_id = f"orders/../{secrets.token_hex(3)}?x=1#y"  # a browser would resolve it away in a path
        answer = b.post_plain(b.team_id(), "plain", event_id)
        assert answer.status_code == 202, answer.text
        wait_for(lambda: event_id in stored_ids(b), 10, "the event at B")
        link = op.page.locator("table.events tbody tr.fresh").get_by_role("link", name=event_id, exact=True)
        link.click()
        op.page.wait_for_url(re.compile(r".*/events/journey/\?id="))
        assert op.page.locator("h1").inner_text() == f"Journey of {event_id}"
        assert op.page.locator("[data-verification]").inner_text() == "none"
    finally:
        op.close()
