"""Django's PostgreSQL backend; the per-request health check is skipped on a connection
that finished a request or task without error less than a second ago.

With CONN_HEALTH_CHECKS every request starts with a `SELECT 1` round trip, to find a
connection that died while idle (server restart, dropped network) before the request
uses it. A connection busy a moment ago has not been idle; if it broke all the same,
the failing query marks it (errors_occurred) and the next request checks it and
reconnects, as Django does without health checks. On the 2-core machine Kite is
measured on, the check was one of the larger costs per webhook (bench/RESULTS.md).
"""

import time

from django.db.backends.postgresql import base

RECENTLY_USED_SECONDS = 1.0


class DatabaseWrapper(base.DatabaseWrapper):
    _vouched_at = float("-inf")

    def close_if_unusable_or_obsolete(self):
        # Called as a request (or task) starts and as it ends. health_check_done is set once the
        # request made a cursor, so here it means "used since the last call": at a request's end
        # with no error, the connection just worked; at a request's start it is still unset.
        used = self.connection is not None and self.health_check_done and not self.errors_occurred
        super().close_if_unusable_or_obsolete()
        if used and self.connection is not None:
            self._vouched_at = time.monotonic()

    def close_if_health_check_failed(self):
        if self.connection is not None and time.monotonic() - self._vouched_at < RECENTLY_USED_SECONDS:
            self.health_check_done = True
            return
        super().close_if_health_check_failed()

    def close(self):
        self._vouched_at = float("-inf")
        super().close()
