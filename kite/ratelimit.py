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


class _LocalWindows:
    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}

    def hit(self, key: str, window: int, cost: int = 1) -> int:
        with self._lock:
            start, count = self._counts.get(key, (window, 0))
            count = count + cost if start == window else cost
            self._counts[key] = (window, count)
            if len(self._counts) > 10_000:
                self._counts = {k: v for k, v in self._counts.items() if v[0] == window}
            return count


_local = _LocalWindows()


def hit(key: str, limit_per_second: int | None, cost: int = 1) -> Verdict:
    """Count `cost` units in this second's window; refuse once the limit is passed."""
    if not limit_per_second:
        return Verdict(True)
    window = int(time.time())
    if settings.REDIS_URL:
        redis_key = f"kite:rl:{key}:{window}"
        pipe = _redis().pipeline(transaction=False)
        pipe.incrby(redis_key, cost)
        pipe.expire(redis_key, 2)
        count = pipe.execute()[0]
    else:
        count = _local.hit(key, window, cost)
    if count > limit_per_second:
        return Verdict(False, retry_after=1)
    return Verdict(True)
