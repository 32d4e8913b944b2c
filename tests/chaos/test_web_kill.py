"""The web SIGKILLed, and runkite SIGKILLed, on a live instance (runkite, 2 uvicorn workers, HTTPS,
PostgreSQL + Redis).

A uvicorn worker outlives a SIGKILLed master unless told otherwise: it keeps the port, serves on,
and every web runkite starts again dies with "address already in use". Asserts: the old workers end
with their master, runkite logs the kill and its restart, and a new web (new master, new workers)
answers within seconds; and when runkite itself is SIGKILLed, none of its processes lives on."""

import os
import signal
import time

import pytest
import requests

from tests.chaos.procs import alive, group_processes, runkite_children, web_workers
from tests.e2e.conftest import instances  # noqa: F401  (fixture)
from tests.e2e.harness import wait_for

pytestmark = pytest.mark.e2e

BACK_WITHIN_SECONDS = 10


def answers(kite) -> bool:
    try:
        response = requests.get(f"{kite.url}/healthz", verify=str(kite.cert), timeout=2)
    except requests.RequestException:
        return None
    return response.status_code == 200


def test_a_sigkilled_web_is_replaced_by_runkite_and_its_workers_do_not_outlive_it(instances):  # noqa: F811
    kite = instances.start("web-kill")
    before = runkite_children(kite.process.pid)
    assert set(before) == {"web", "worker", "beat"}, before
    old_workers = wait_for(lambda: len(web_workers(before["web"])) == 2 and web_workers(before["web"]), 10,
                           "two uvicorn workers")  # fmt: skip

    os.kill(before["web"], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: not any(alive(pid) for pid in old_workers), 10,
             lambda: f"the old workers to end with their master: {group_processes(kite.process.pid)}")  # fmt: skip

    def replaced() -> bool:
        now = runkite_children(kite.process.pid)
        return now.get("web") not in (None, before["web"]) and len(web_workers(now["web"])) == 2 and answers(kite)

    wait_for(replaced, BACK_WITHIN_SECONDS, lambda: f"a new web answering\n{kite.log_tail}")
    took = time.monotonic() - killed_at
    after = runkite_children(kite.process.pid)
    assert after["worker"] == before["worker"] and after["beat"] == before["beat"]  # the others ran on
    assert "web was killed by SIGKILL; restarting it in" in kite.log_tail, kite.log_tail
    assert "address already in use" not in kite.log_tail.lower(), kite.log_tail
    print(f"web answering again {took:.1f} s after its SIGKILL")


def test_a_sigkilled_runkite_leaves_no_process_behind(instances):  # noqa: F811
    kite = instances.start("runkite-kill")
    group = kite.process.pid
    processes = group_processes(group)
    assert len(processes) >= 5, processes  # runkite, uvicorn master and workers, celery worker and pool, beat
    kite.process.send_signal(signal.SIGKILL)  # runkite alone, not its group: as the OOM killer would
    kite.process.wait()
    wait_for(lambda: not group_processes(group), 15,
             lambda: f"every child of the killed runkite to exit: {group_processes(group)}")  # fmt: skip
    kite.process = None
