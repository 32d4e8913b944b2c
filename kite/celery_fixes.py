"""kombu's Redis transport kills a worker that loses the broker while it holds unacknowledged messages.

Seen with kombu 5.7.0 / celery 5.7.0 / redis-py 8.2 (Redis restarted under load): Celery's consumer
answers a lost connection with `Connection.collect()` and then `Connection.close()`, and then reconnects.
In collect(), the default channel (the task consumer's, holding the unacked deliveries) is closed
first; its close begins by reading the reply to the BRPOP it has in flight, that read raises
ConnectionError and the channel is left half-closed (not closed, nothing restored). The transport
then closes its channels in a loop that stops at the first one that raises, and drops its client.
close() tries the default channel again: restoring its unacked messages needs a Redis pool, the pool
needs `transport.client.hostname`, the client is None, and the AttributeError is not a connection
error: "Unrecoverable error", exit status 1. Same failure upstream: celery/kombu#582 (a channel closed
after its Connection dropped the transport) and celery/kombu#970 (restore_unacked at shutdown).

Three narrow changes, applied by kite.celery in every process (web publishes, workers consume):
- a channel whose in-flight BRPOP reply went with the connection still closes (and restores what
  it can while the transport is whole);
- the transport closes every channel even when one fails, then reports the first failure;
- a channel used after its transport was dropped raises a connection error, which Celery answers
  by reconnecting, never an AttributeError.

Messages that cannot be restored (the broker is gone, or lost its data) are not lost to Kite: the
outbox rows in the database are the record, a task only wakes a worker, and beat's 1 s sweeper
kicks every peer with due entries (federation/outbox.py). kombu is pinned below 5.8 in
pyproject.toml; tests/kite/test_celery_fixes.py shows whether a new kombu still needs this.
"""

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.virtual.base import Empty

ORIGINALS = {
    "close": kombu_redis.Channel.close,
    "close_connection": virtual.Transport.close_connection,
    "connparams": kombu_redis.Channel._connparams,
}


def _close_after_lost_brpop(self):
    if self._in_poll:
        try:
            self._brpop_read()
        except Empty:
            pass
        except self.connection_errors:
            pass  # the reply is gone with the connection; what matters is that the channel still closes
    return ORIGINALS["close"](self)


def _close_every_channel(self, connection):
    self.cycle.close()
    first_failure = None
    for channels in (self._avail_channels, self.channels):
        while channels:
            try:
                channels.pop().close()
            except Exception as exc:  # noqa: BLE001 - raised after the others are closed
                first_failure = first_failure or exc
    if first_failure is not None:
        raise first_failure


def _connparams_or_connection_error(self, asynchronous=False):
    if self.connection is None or self.connection.client is None:
        import redis

        raise redis.exceptions.ConnectionError("this channel's broker connection is closed")
    return ORIGINALS["connparams"](self, asynchronous=asynchronous)


def apply() -> None:
    kombu_redis.Channel.close = _close_after_lost_brpop
    virtual.Transport.close_connection = _close_every_channel
    kombu_redis.Channel._connparams = _connparams_or_connection_error


apply()
