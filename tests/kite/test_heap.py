"""A serving process moves what it loaded at start out of the garbage collector's full passes
(kite.heap): the web process at ASGI lifespan start-up, the Celery worker once ready, each pool
process and beat at their start.
A full pass over a started process walked every loaded object with the GIL held.
And the web process, once serving, has its threads take turns with the GIL every millisecond."""

import asyncio
import faulthandler
import gc
import signal as signals
import sys
import time

import pytest
from celery.signals import beat_init, worker_process_init, worker_ready


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process's own objects go back where they were


@pytest.fixture(autouse=True)
def switch_interval():
    """A lifespan start-up sets the process's switch interval: the test process gets its own back."""
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def _full_pass_ms() -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        gc.collect(2)
        best = min(best, (time.perf_counter() - started) * 1000)
    return best


def _lifespan_startup() -> list[dict]:
    from kite.asgi import application

    sent, messages = [], [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(application({"type": "lifespan"}, receive, send))
    return sent


def test_the_web_process_freezes_what_it_loaded_when_it_starts_serving(unfrozen):
    import kite.asgi  # noqa: F401 - what a web process has loaded before its lifespan starts

    assert gc.get_freeze_count() == 0  # importing the app (tests, tools) freezes nothing
    before = _full_pass_ms()
    sent = _lifespan_startup()
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert gc.get_freeze_count() > 50_000  # Django, the apps, their modules
    after = _full_pass_ms()
    assert after < before / 3, (before, after)  # a full pass no longer walks them


@pytest.mark.parametrize("signal", [worker_process_init, worker_ready, beat_init], ids=["pool process", "worker", "beat"])
def test_celery_pool_processes_and_beat_freeze_what_they_loaded_at_start(unfrozen, signal):
    import kite.celery  # noqa: F401 - connects the handlers

    assert gc.get_freeze_count() == 0
    sigterm = signals.getsignal(signals.SIGTERM)
    try:  # the pool process's other start-up handlers: SIGTERM ignored, stacks on SIGWINCH
        signal.send(sender=None)
    finally:
        signals.signal(signals.SIGTERM, sigterm)
        faulthandler.unregister(signals.SIGWINCH)
    assert gc.get_freeze_count() > 50_000


def test_the_web_process_hands_the_gil_on_after_a_millisecond_once_serving(unfrozen):
    """The event loop and the request threads take turns every millisecond, not every 5 (kite.asgi)."""
    import kite.asgi

    sys.setswitchinterval(0.005)  # CPython's default
    _lifespan_startup()
    assert sys.getswitchinterval() == pytest.approx(kite.asgi.SWITCH_INTERVAL) == pytest.approx(0.001)
