"""Fixed one-second windows, shared through Redis when there is one.

Without REDIS_URL Kite runs one web process, so an in-process counter is exact.
"""

import threading
import time
from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0


@lru_cache(maxsize=1)
def _redis():
    import redis

    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)


def redis_client():
    """This process's Redis client (REDIS_URL), shared with whatever else keeps state there (the
    outbox's kick flags)."""
    return _redis()


class _LocalWindows:
    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}

    def hit(self, key: str, window_end: int, cost: int = 1) -> int:
        with self._lock:
            end, count = self._counts.get(key, (window_end, 0))
            count = count + cost if end == window_end else cost
            self._counts[key] = (window_end, count)
            if len(self._counts) > 10_000:
                now = time.time()
                self._counts = {k: v for k, v in self._counts.items() if v[0] > now}
            return count


_local = _LocalWindows()


def hit(key: str, limit_per_second: int | None, cost: int = 1, window_seconds: int = 1) -> Verdict:
    """Count `cost` units in this window (one second, or `window_seconds` aligned to the epoch:
    86400 is the UTC day); refuse once `limit_per_second` (then: per window) is passed."""
    if not limit_per_second:
        return Verdict(True)
    now = time.time()
    window = int(now) // window_seconds
    if settings.REDIS_URL:
        redis_key = f"kite:rl:{key}:{window}"
        pipe = _redis().pipeline(transaction=False)
        pipe.incrby(redis_key, cost)
        pipe.expire(redis_key, window_seconds + 1)
        count = pipe.execute()[0]
    else:
        count = _local.hit(key, (window + 1) * window_seconds, cost)
    if count > limit_per_second:
        return Verdict(False, retry_after=max(1, (window + 1) * window_seconds - int(now)))
    return Verdict(True)
