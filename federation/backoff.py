"""Retry schedule of outbox entries (docs/architecture.md "The outbox"). Pure: no Django."""

import random

BASE_SECONDS = 1.0
CAP_SECONDS = 300.0
JITTER = 0.2
MAX_ATTEMPTS = 10
DOWN_AFTER_FAILURES = 5


def delay_after(attempts: int, *, retry_after: float | None = None, rng=random) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: 1, 2, 4 … capped at 5 min, ±20 %."""
    if retry_after is not None and retry_after > 0:
        return min(retry_after, CAP_SECONDS * (1 + JITTER))
    base = min(CAP_SECONDS, BASE_SECONDS * 2 ** max(attempts - 1, 0))
    return base * rng.uniform(1 - JITTER, 1 + JITTER)


def classify(status_code: int | None) -> str:
    """transient | auth | gone | permanent | ok for an HTTP answer (None: no answer at all)."""
    if status_code is None or status_code in (408, 429) or status_code >= 500:
        return "transient"
    if 200 <= status_code < 300:
        return "ok"
    if status_code in (401, 403):
        return "auth"
    if status_code == 410:
        return "gone"
    return "permanent"
