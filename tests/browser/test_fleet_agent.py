"""A peer's agent opened from the Fleet screen (the Ampora guide's "click an agent to open its
details — read-only, buttons that would mutate state on the remote side are disabled"), in
Chromium against two live instances peered by invitation: live from B, then from A's snapshot
once B is stopped. Each screen is saved under screenshots/."""

import re

import pytest

from tests.browser.conftest import Operator, stop_quietly
from tests.e2e.test_federation import Cluster
from tests.e2e.test_fleet import invite

pytestmark = pytest.mark.e2e

# Whatever could change something, enabled: none may be on a peer's agent page.
MUTATING = ("main form[method=post], main form[method=POST], main button:not([disabled]), "
            "main input:not([disabled]):not([type=hidden]), main select:not([disabled]), "
            "main textarea:not([disabled]), main [contenteditable=true]")  # fmt: skip


@pytest.fixture(scope="module")
def kites(tmp_path_factory):
    cluster = Cluster(tmp_path_factory)
    try:
        a, b = cluster.start_together("agent-a", "agent-b")
        invite(a, b, "b", "a")
        registered = b.api("POST", "/api/fleet/agents", json={"name": "b-worker", "version": "4.2", "host": "b-box",
                                                              "labels": {"role": "billing"}})  # fmt: skip
        assert registered.status_code == 201, registered.text
        yield a, b, registered.json()["id"]
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def operator(chromium, kites):
    op = Operator(chromium, kites[0], "a").login()
    yield op
    op.close()


def _assert_read_only_page(op: Operator) -> None:
    main = op.page.locator("main")
    assert op.page.locator("main h1").inner_text() == "b-worker"
    assert main.locator(".badge.federation").inner_text() == "Includes federation"
    assert main.locator(".badge", has_text="read-only").count() == 1
    details = main.locator("table.kv").inner_text()
    for shown in ("peer:b/", "4.2", "b-box", "role=billing", "online"):
        assert shown in details, shown
    assert op.page.locator(MUTATING).count() == 0


def test_a_remote_agent_opens_from_the_fleet_screen_read_only(operator, kites):
    _, _, worker = kites
    operator.go("/fleet/")
    operator.page.check("#id_federation")
    operator.page.get_by_role("button", name="Show").click()
    row = operator.page.locator("tr.remote", has_text="b-worker")
    assert f"peer:b/{worker}" in row.inner_text()

    row.get_by_role("link", name="b-worker").click()

    operator.page.wait_for_url(re.compile(rf".*/fleet/agents/peer:b/{worker}$"))
    _assert_read_only_page(operator)
    assert operator.page.locator("main .badge.warn", has_text="stale").count() == 0
    assert "registered by" in operator.page.locator("table.kv").inner_text().lower()
    assert "kite listen" not in operator.page.locator("table.kv tr", has_text="Registered by").inner_text()
    operator.shot("fleet-remote-agent")


def test_with_the_peer_stopped_the_page_is_served_from_the_snapshot_flagged_stale(operator, kites):
    _, b, worker = kites
    operator.go("/fleet/?federation=on&peer=b")  # a live list: the snapshot holds b-worker
    assert "Reachable" in operator.page.locator(".peer-card", has_text="b").inner_text()
    stop_quietly(b)

    operator.go(f"/fleet/agents/peer:b/{worker}")

    _assert_read_only_page(operator)
    assert operator.page.locator("main .badge.warn", has_text="stale").count() == 1
    assert "did not answer (unreachable)" in operator.page.locator("main .msg.warning").inner_text()
    operator.shot("fleet-remote-agent-stale")
    operator.page.get_by_role("link", name="← Fleet").click()
    operator.page.wait_for_url(re.compile(r".*/fleet/\?federation=on&peer=b$"))
    assert "stale" in operator.page.locator("tr.remote", has_text="b-worker").inner_text()
