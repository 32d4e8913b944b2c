"""The peer screen's Pause and Resume, in Chromium against two live instances: the chip says
Paused while events queue at A (none reaches B), and Resume delivers them."""

import re
import secrets

import pytest

from tests.browser.conftest import Operator
from tests.e2e.harness import wait_for
from tests.e2e.test_federation import Cluster, federate, stored_ids

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kites(tmp_path_factory):
    cluster = Cluster(tmp_path_factory)
    try:
        yield cluster.start_together("pause-ui-a", "pause-ui-b")
    finally:
        cluster.close()


def test_pause_and_resume_on_the_peer_screen(chromium, kites):
    a, b = kites
    peer = federate(a, b, "b", scopes=["stripe.*"])
    op = Operator(chromium, a, "a").login()
    try:
        op.go(f"/settings/federation/peers/{peer['id']}/")
        assert op.page.locator(".title-row .chip").inner_text() != "Paused"
        op.page.fill("#pause-reason", "B's upgrade")
        op.page.get_by_role("button", name="Pause", exact=True).click()
        op.page.wait_for_url(re.compile(rf".*/peers/{peer['id']}/$"))
        assert op.page.locator(".title-row .chip").inner_text() == "Paused"
        assert "b paused: events queue here" in op.page.locator(".messages").inner_text()
        assert op.page.get_by_role("button", name="Pause", exact=True).count() == 0
        op.shot("peer-paused")

        sent = [f"evt_{i}_{secrets.token_hex(3)}" for i in range(5)]
        for event_id in sent:
            a.post_event("plain", event_id)
        wait_for(lambda: len(a.outbox(peer["id"], "pending")) == len(sent), 10, "the events queued at A")
        op.go(f"/settings/federation/peers/{peer['id']}/?outbox=pending")
        assert op.page.locator("section[aria-labelledby=outbox-title] tbody tr").count() == len(sent)
        op.go("/settings/federation/peers/")
        row = op.page.locator("tbody tr", has=op.page.get_by_role("link", name="b", exact=True))
        assert row.locator(".chip").inner_text() == "Paused"
        assert not set(sent) & set(stored_ids(b, source="kite"))

        op.go(f"/settings/federation/peers/{peer['id']}/")
        op.page.get_by_role("button", name="Resume", exact=True).click()
        op.page.wait_for_url(re.compile(rf".*/peers/{peer['id']}/$"))
        assert "b resumed: 5 queued entries are being delivered now." in op.page.locator(".messages").inner_text()
        assert op.page.locator(".title-row .chip").inner_text() != "Paused"
        assert op.page.get_by_role("button", name="Pause", exact=True).count() == 1
        wait_for(lambda: set(sent) <= set(stored_ids(b, source="kite")), 10, lambda: f"the events at B\n{a.state()}")
        op.shot("peer-resumed")
    finally:
        op.close()
