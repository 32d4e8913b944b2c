"""kite.celery_fixes: a worker's broker connection lost while it holds unacknowledged messages ends in a
reconnection, never in an AttributeError that kills the worker (kombu 5.7, a real redis-server).

The scenario is what Celery's consumer does on a lost connection: collect(), then close(), then connect
again. The unpatched test shows the scenario still reproduces the crash with the installed kombu; when it
fails after an upgrade, kombu fixed it and kite/celery_fixes.py can go."""

import kombu
import pytest
from kombu.common import ignore_errors
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from kite import celery_fixes
from tests.chaos.servers import RedisServer


@pytest.fixture
def broker(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def unpatched(monkeypatch):
    monkeypatch.setattr(kombu_redis.Channel, "close", celery_fixes.ORIGINALS["close"])
    monkeypatch.setattr(virtual.Transport, "close_connection", celery_fixes.ORIGINALS["close_connection"])
    monkeypatch.setattr(kombu_redis.Channel, "_connparams", celery_fixes.ORIGINALS["connparams"])


def connection_as_a_busy_worker_holds_it(url: str):
    """The task channel holds unacked deliveries (acks_late, prefetch) and, like a second channel
    (remote control), has a BRPOP in flight: the state of a worker's event loop between two events."""
    connection = kombu.Connection(url)
    tasks, control = kombu.Queue("fix-tasks"), kombu.Queue("fix-control")
    producer = connection.Producer()
    for number in range(3):
        producer.publish({"n": number}, routing_key="fix-tasks", declare=[tasks, control], retry=False)
    received = []
    on_message = [lambda body, message: received.append(message)]
    kombu.Consumer(connection.default_channel, [tasks], callbacks=on_message).consume()
    control_channel = connection.channel()
    kombu.Consumer(control_channel, [control], callbacks=[lambda body, message: None]).consume()
    while len(received) < 3:
        connection.drain_events(timeout=5)
    for channel in (connection.default_channel, control_channel):
        channel._brpop_start(timeout=30)
    return connection, connection.default_channel, control_channel, received


def lose_the_broker_as_celery_does(connection) -> None:
    try:
        connection.collect(socket_timeout=1)  # celery's on_connection_error_after_connected ignores failures here
    except Exception:
        pass
    ignore_errors(connection, connection.close)  # ...and here only connection errors


def test_unpatched_kombu_dies_of_the_lost_connection(broker, unpatched):
    connection, task_channel, _, received = connection_as_a_busy_worker_holds_it(broker.url)
    assert len(task_channel.qos._delivered) == len(received) == 3  # unacknowledged
    broker.shutdown_nosave()

    with pytest.raises(AttributeError, match="hostname"):
        lose_the_broker_as_celery_does(connection)


def test_a_lost_connection_with_unacked_messages_closes_cleanly_and_reconnects(broker):
    connection, task_channel, control_channel, received = connection_as_a_busy_worker_holds_it(broker.url)
    assert len(task_channel.qos._delivered) == 3
    broker.shutdown_nosave()

    lose_the_broker_as_celery_does(connection)  # raises nothing

    assert task_channel.closed and control_channel.closed
    assert task_channel.qos._delivered.restored  # attempted while the transport was whole, not left pending
    broker.start()
    with kombu.Connection(broker.url) as again:  # what the consumer does next
        queue = again.SimpleQueue("fix-after")
        queue.put({"back": True})
        assert queue.get(timeout=5).payload == {"back": True}
        queue.close()


def test_a_channel_used_after_its_transport_was_dropped_raises_a_connection_error(broker, unpatched):
    connection = kombu.Connection(broker.url)
    channel = connection.channel()
    connection.transport.client = None  # what Connection.collect() / close() leave behind (celery/kombu#582)

    with pytest.raises(AttributeError):
        channel._create_client()
    celery_fixes.apply()
    with pytest.raises(connection.connection_errors) as raised:
        channel._create_client()
    assert not isinstance(raised.value, AttributeError)


class _Channel:
    def __init__(self, failure=None):
        self.failure, self.closed = failure, False

    def close(self):
        self.closed = True
        if self.failure:
            raise self.failure


def test_the_transport_closes_every_channel_when_one_fails(broker):
    import redis

    transport = kombu.Connection(broker.url).transport
    lost = redis.exceptions.ConnectionError("Connection closed by server.")
    task_channel, failing = _Channel(), _Channel(lost)
    transport.channels = [task_channel, failing]  # the failing one is closed first

    with pytest.raises(redis.exceptions.ConnectionError) as raised:
        transport.close_connection(None)

    assert raised.value is lost and task_channel.closed and failing.closed and not transport.channels
