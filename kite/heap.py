"""Long-lived processes keep what they loaded at start out of the garbage collector's full passes.

A Kite process holds ~130,000 objects once Django, the apps and their modules are loaded, and
CPython's full (generation 2) collection walks every one of them while holding the GIL: 50–165 ms
here, during which no other thread of that process runs — a request, a delivery or a listener
waiting that long (measured in a web and a worker process under 200 federated events/s:
bench/RESULTS.md, "Garbage collection"). Objects loaded at start live as long as the process, so
after start-up each serving process collects once and moves what is left to the permanent
generation (`gc.freeze`); full passes then walk only what was made since. Cycles among frozen
objects freed later are not reclaimed — a start-up's worth of objects at most.

Called by the web process at ASGI lifespan start-up, once the URLconf and its views are loaded
(kite.asgi), by the Celery worker's own process once it is ready, each pool process at its start
and beat (kite.celery). bench/gcpauses.py shows the full passes of both instances' processes while
federated events flow."""

import gc


def freeze_loaded() -> int:
    """Collect once, then freeze what survives. Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
