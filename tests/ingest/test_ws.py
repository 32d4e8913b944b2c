"""WS /ws/events against the real ASGI app, Redis channel layer and PostgreSQL.

The consumer reads the store from other threads, hence transactional tests.
A stream is ordered by cursor, so "X is never sent" is checked by sending a
later sentinel and asserting it is the next message: had X been sent, it would
have come first.
"""

import asyncio
import contextlib
import functools
import json
import threading

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db import connection, transaction
from django.test import Client

from ingest import broadcast, consumers
from ingest.models import Event
from kite import services
from kite.asgi import application
from tests.factories import SourceFactory

pytestmark = pytest.mark.django_db(transaction=True)

RECEIVE_SECONDS = 10.0
AGENT_MESSAGE = "com.kite.agent.message"


@pytest.fixture(autouse=True)
def no_idle_poll_within_a_test(monkeypatch):
    """The consumer re-reads the store every IDLE_POLL_SECONDS in case a notice is lost. Pushed
    out of any test's reach, an event that arrives at all was pushed (woken by its notice),
    and receive timeouts can stay generous for a loaded machine."""
    monkeypatch.setattr(consumers, "IDLE_POLL_SECONDS", 600.0)


def async_test(coroutine_function):
    @functools.wraps(coroutine_function)
    def run(*args, **kwargs):
        return async_to_sync(coroutine_function)(*args, **kwargs)

    return run


def communicator_for(api_key: str | None, query: str = "") -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {api_key}".encode())] if api_key else []
    return WebsocketCommunicator(application, f"/ws/events{query}", headers=headers)


async def refusal(api_key: str | None, query: str = "") -> tuple[bool, int]:
    communicator = communicator_for(api_key, query)
    outcome = await communicator.connect(timeout=5)
    await communicator.disconnect()  # as the server tells the consumer after it closed the handshake
    return outcome


@contextlib.asynccontextmanager
async def listening(api_key: str, query: str = ""):
    communicator = communicator_for(api_key, query)
    connected, code = await communicator.connect(timeout=5)
    assert connected, f"refused with close code {code}"
    try:
        yield communicator
    finally:
        await communicator.disconnect()


async def receive_events(communicator, count: int) -> list[dict]:
    return [await communicator.receive_json_from(timeout=RECEIVE_SECONDS) for _ in range(count)]


def ids(events: list[dict]) -> list[str]:
    return [event["id"] for event in events]


def hook(team, source: str, payload: dict) -> None:
    """A provider's POST to /hooks/{team}/{source} (an unverified `none` source)."""
    response = Client().post(f"/hooks/{team.id}/{source}", json.dumps(payload), content_type="application/json")
    assert response.status_code == 202, response.content


@sync_to_async
def post(team, source: str, event_id: str, event_type: str = "com.example.thing", to: str | None = None) -> None:
    payload = {"id": event_id, "type": event_type}
    if to:
        payload["to"] = f"https://kite.example/agents/{to}"
    hook(team, source, payload)


@pytest.fixture
def shop(team):
    return SourceFactory(team=team, name="shop", kind="none").name


@pytest.fixture
def crm(team):
    return SourceFactory(team=team, name="crm", kind="none").name


# --- refusals -----------------------------------------------------------------
# The test communicator has no websocket.http.response extension, so refusals
# are close codes 4000 + HTTP status.


@async_test
async def test_stream_without_api_key_is_refused_4401(team):
    outcome = await refusal(None)

    assert outcome == (False, 4401)


@async_test
async def test_stream_with_unknown_api_key_is_refused_4401(team):
    outcome = await refusal("kite_ak_not-a-real-key")

    assert outcome == (False, 4401)


@async_test
async def test_stream_with_revoked_api_key_is_refused_4401(team):
    issued = await sync_to_async(services.apikey_create)(team=team, label="soon revoked")
    await sync_to_async(services.apikey_revoke)(api_key=issued.api_key)

    outcome = await refusal(issued.raw_key)

    assert outcome == (False, 4401)


@pytest.mark.parametrize("cursor", ["banana", "12", "-1-2", "1-2-3", "99999999999999999999-1"])
@async_test
async def test_stream_with_malformed_cursor_is_refused_4400(api_key, cursor):
    outcome = await refusal(api_key, f"?after={cursor}")

    assert outcome == (False, 4400)


# --- replay, then live --------------------------------------------------------


@async_test
async def test_replays_after_cursor_then_pushes_live_in_order_without_repeats(team, api_key, shop):
    for n in range(1, 4):
        await post(team, shop, f"old-{n}")
    async with listening(api_key, "?after=0") as everything:
        replayed = await receive_events(everything, 3)
    assert ids(replayed) == ["old-1", "old-2", "old-3"]
    assert all(event["kitecursor"] for event in replayed)

    async with listening(api_key, f"?after={replayed[0]['kitecursor']}") as resumed:
        assert ids(await receive_events(resumed, 2)) == ["old-2", "old-3"]
        for n in range(1, 4):
            await post(team, shop, f"live-{n}")
        live = await receive_events(resumed, 3)
        assert ids(live) == ["live-1", "live-2", "live-3"]
        await post(team, shop, "sentinel")
        assert ids(await receive_events(resumed, 1)) == ["sentinel"]  # nothing was sent twice
    cursors = [event["kitecursor"] for event in replayed + live]
    assert len(set(cursors)) == len(cursors)


@async_test
async def test_events_posted_while_a_listener_is_away_are_replayed_on_resume(team, api_key, shop):
    async with listening(api_key) as first:
        await post(team, shop, "seen")
        (seen,) = await receive_events(first, 1)
    for n in range(1, 4):
        await post(team, shop, f"missed-{n}")

    async with listening(api_key, f"?after={seen['kitecursor']}") as second:
        await post(team, shop, "after-resume")
        assert ids(await receive_events(second, 4)) == ["missed-1", "missed-2", "missed-3", "after-resume"]


@async_test
async def test_each_event_is_one_valid_structured_cloudevent(team, api_key, shop):
    async with listening(api_key) as listener:
        await post(team, shop, "evt-shape", event_type="com.example.order.paid")
        (event,) = await receive_events(listener, 1)

    assert event["specversion"] == "1.0"
    assert (event["id"], event["type"]) == ("evt-shape", "com.example.order.paid")
    assert event["source"].endswith(f"/{team.id}/shop")
    assert event["data"] == {"id": "evt-shape", "type": "com.example.order.paid"}
    assert event["kitecursor"].count("-") == 1


# --- filters ------------------------------------------------------------------


@async_test
async def test_source_filter_streams_only_that_source(team, api_key, shop, crm):
    async with listening(api_key, f"?source={crm}") as listener:
        await post(team, shop, "from-shop")
        await post(team, crm, "from-crm")

        assert ids(await receive_events(listener, 1)) == ["from-crm"]


@async_test
async def test_type_glob_filter_streams_only_matching_types(team, api_key, shop):
    async with listening(api_key, "?type=com.example.order.*") as listener:
        await post(team, shop, "a", event_type="com.example.invoice.paid")
        await post(team, shop, "b", event_type="com.example.order.paid")
        await post(team, shop, "c", event_type="org.other.order.paid")
        await post(team, shop, "d", event_type="com.example.order.refunded")

        assert ids(await receive_events(listener, 2)) == ["b", "d"]


@async_test
async def test_filters_also_apply_to_replay(team, api_key, shop, crm):
    await post(team, shop, "shop-order", event_type="com.example.order.paid")
    await post(team, crm, "crm-invoice", event_type="com.example.invoice.paid")
    await post(team, crm, "crm-order", event_type="com.example.order.paid")

    async with listening(api_key, f"?after=0-0&source={crm}&type=*.order.*") as listener:
        assert ids(await receive_events(listener, 1)) == ["crm-order"]
        await post(team, crm, "crm-order-2", event_type="com.example.order.paid")
        assert ids(await receive_events(listener, 1)) == ["crm-order-2"]


@async_test
async def test_agent_messages_reach_only_their_addressee(team, api_key, shop):
    async with (
        listening(api_key, "?agent=alice") as alice,
        listening(api_key, "?agent=bob") as bob,
        listening(api_key) as anonymous,
    ):
        await post(team, shop, "to-alice", event_type=AGENT_MESSAGE, to="alice")
        await post(team, shop, "to-bob", event_type=AGENT_MESSAGE, to="bob")
        await post(team, shop, "broadcast")

        assert ids(await receive_events(alice, 2)) == ["to-alice", "broadcast"]
        assert ids(await receive_events(bob, 2)) == ["to-bob", "broadcast"]
        assert ids(await receive_events(anonymous, 1)) == ["broadcast"]


@async_test
async def test_agent_messages_are_replayed_only_to_their_addressee(team, api_key, shop):
    await post(team, shop, "to-alice", event_type=AGENT_MESSAGE, to="alice")
    await post(team, shop, "to-bob", event_type=AGENT_MESSAGE, to="bob")
    await post(team, shop, "broadcast")

    async with listening(api_key, "?after=0-0&agent=bob") as bob:
        assert ids(await receive_events(bob, 2)) == ["to-bob", "broadcast"]


# --- team isolation -----------------------------------------------------------


@async_test
async def test_listener_never_receives_another_teams_events(team, api_key, other_team, other_api_key, shop):
    their_source = await sync_to_async(SourceFactory)(team=other_team, name="shop", kind="none")
    await post(other_team, their_source.name, "theirs-before")

    async with listening(api_key, "?after=0-0") as ours, listening(other_api_key, "?after=0-0") as theirs:
        assert ids(await receive_events(theirs, 1)) == ["theirs-before"]
        await post(other_team, their_source.name, "theirs-live")
        await post(team, shop, "ours-live")

        assert ids(await receive_events(ours, 1)) == ["ours-live"]
        assert ids(await receive_events(theirs, 1)) == ["theirs-live"]


@async_test
async def test_team_filter_cannot_be_widened_by_query_parameters(team, api_key, other_team, shop):
    their_source = await sync_to_async(SourceFactory)(team=other_team, name="shop", kind="none")
    await post(other_team, their_source.name, "theirs")
    await post(team, shop, "ours")

    async with listening(api_key, f"?after=0-0&source=shop&team={other_team.id}") as ours:
        assert ids(await receive_events(ours, 1)) == ["ours"]


# --- broadcast after commit ---------------------------------------------------


class Rollback(Exception):
    pass


@sync_to_async
def post_and_roll_back(team, source: str, event_id: str) -> None:
    with pytest.raises(Rollback), transaction.atomic():
        hook(team, source, {"id": event_id})
        raise Rollback


@contextlib.asynccontextmanager
async def group_probe(team_id: str):
    """A bare channel in the team's broadcast group: sees the notices themselves."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(broadcast.group_for(team_id), channel)
    try:
        yield lambda: asyncio.wait_for(layer.receive(channel), RECEIVE_SECONDS)
    finally:
        await layer.group_discard(broadcast.group_for(team_id), channel)


@async_test
async def test_event_of_a_rolled_back_transaction_is_never_broadcast_or_streamed(team, api_key, shop):
    async with listening(api_key) as listener, group_probe(team.id) as next_notice:
        await post_and_roll_back(team, shop, "rolled-back")
        await post(team, shop, "committed")

        committed = await sync_to_async(Event.objects.get)(team=team, ce_id="committed")
        assert (await next_notice())["id"] == committed.id
        assert ids(await receive_events(listener, 1)) == ["committed"]


class SlowTransaction:
    """Stores an event in a transaction on a thread (and connection) of its own, committing on demand."""

    def __init__(self, team, source: str, event_id: str):
        self.stored, self.commit, self.done = threading.Event(), threading.Event(), threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(team, source, event_id), daemon=True)

    def _run(self, team, source, event_id):
        try:
            with transaction.atomic():
                hook(team, source, {"id": event_id})
                self.stored.set()
                assert self.commit.wait(30), "never told to commit"
        except BaseException as exc:  # re-raised in the test's thread
            self.error = exc
        finally:
            connection.close()
            self.stored.set()
            self.done.set()

    async def store(self):
        self.thread.start()
        assert await asyncio.to_thread(self.stored.wait, 10)
        self._raise()

    async def finish(self):
        self.commit.set()
        assert await asyncio.to_thread(self.done.wait, 10)
        self._raise()

    def _raise(self):
        if self.error is not None:
            raise self.error


@async_test
async def test_broadcast_waits_for_commit_and_a_late_commit_is_not_skipped(team, api_key, shop):
    """The slow transaction's event has the lower id and txid but commits last: it is still streamed, first."""
    slow = SlowTransaction(team, shop, "slow")
    async with listening(api_key) as listener, group_probe(team.id) as next_notice:
        try:
            await slow.store()
            await post(team, shop, "fast")
            fast_notice = await next_notice()  # slow's notice waits for its commit
            # The consumer polls every 50 ms while a noticed event is invisible: give it
            # a few rounds to (wrongly) send `fast` ahead of the older open transaction.
            assert await listener.receive_nothing(timeout=0.5), "streamed past an open older transaction"
        finally:
            await slow.finish()
        slow_notice = await next_notice()

        assert (slow_notice["txid"], slow_notice["id"]) < (fast_notice["txid"], fast_notice["id"])
        assert ids(await receive_events(listener, 2)) == ["slow", "fast"]
        await post(team, shop, "sentinel")
        assert ids(await receive_events(listener, 1)) == ["sentinel"]


# --- lifecycle -------------------------------------------------------------------


@async_test
async def test_without_after_a_listener_starts_at_now(team, api_key, shop):
    await post(team, shop, "before-connecting")
    async with listening(api_key) as communicator:
        await post(team, shop, "after-connecting")
        assert ids(await receive_events(communicator, 1)) == ["after-connecting"]


@async_test
async def test_revoking_the_key_closes_an_open_stream(team, monkeypatch):
    monkeypatch.setattr(consumers, "IDLE_POLL_SECONDS", 0.2)
    issued = await sync_to_async(services.apikey_create)(team=team, label="revoked while streaming")
    async with listening(issued.raw_key, "?after=0") as communicator:
        await sync_to_async(services.apikey_revoke)(api_key=issued.api_key)
        closed = await communicator.receive_output(timeout=RECEIVE_SECONDS)
        assert closed == {"type": "websocket.close", "code": 4401, "reason": "API key revoked"}


# --- broadcasts only when someone listens ----------------------------------------


@async_test
async def test_no_broadcast_while_nobody_listens_yet_a_listener_gets_everything(team, api_key, shop, monkeypatch):
    sent = []
    layer = get_channel_layer()
    real = layer.group_send

    async def spy(group, message):
        sent.append(group)
        return await real(group, message)

    monkeypatch.setattr(layer, "group_send", spy)
    await post(team, shop, "unheard")  # nobody has listened to this team: no notice at all
    await asyncio.sleep(0.2)
    assert sent == []
    async with listening(api_key, "?after=0") as listener:
        assert ids(await receive_events(listener, 1)) == ["unheard"]  # read from the store
        await post(team, shop, "heard")
        assert ids(await receive_events(listener, 1)) == ["heard"]  # pushed: IDLE_POLL is out of reach
    assert sent == [broadcast.group_for(team.id)]


@async_test
async def test_an_event_whose_webhook_missed_the_new_listener_is_read_shortly_after(team, api_key, shop, monkeypatch):
    """A webhook read `listening_until` just before the listener announced itself, so it sends
    no notice, and commits just after the listener's first read: a catch-up read finds it."""
    from ingest import selectors, services as ingest_services
    from ingest.cloudevent import Draft
    from django.utils import timezone

    monkeypatch.setattr(consumers, "CATCH_UP_READS_AFTER", (2.0,))
    async with listening(api_key) as listener:
        await post(team, shop, "marker")  # announced: pushed, and read after this listener's first read
        assert ids(await receive_events(listener, 1)) == ["marker"]
        await asyncio.sleep(0.5)  # the marker's own notice may come after a read that sent it: let it pass
        @sync_to_async
        def store_unannounced():
            source = selectors.source_for_hook(team.id, shop)
            source.team_listening_until = None  # what it read before the listener connected
            ingest_services.event_store(source=source, draft=Draft(id="missed", type="com.example.thing",
                                                                   time=timezone.now(), data_json="{}"))  # fmt: skip

        await store_unannounced()
        assert ids(await receive_events(listener, 1)) == ["missed"]


# --- a stream ends within seconds once its principal loses access ------------------------------
# REVALIDATE_SECONDS keeps its real value: the bound under test is the one users get.

CLOSED_WITHIN_SECONDS = 5.0


@contextlib.asynccontextmanager
async def flowing(team, source: str, every: float = 0.05):
    """Post an event every `every` seconds until the block ends; yields the ids posted so far."""
    posted: list[str] = []

    async def run():
        while True:
            posted.append(f"flow-{len(posted)}")
            await post(team, source, posted[-1])
            await asyncio.sleep(every)

    task = asyncio.create_task(run())
    try:
        yield posted
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until_closed(communicator, timeout: float = 15.0) -> tuple[list[dict], dict, float]:
    """Events received until the server closed the stream, the close message, and when it came."""
    loop = asyncio.get_running_loop()
    events, deadline = [], loop.time() + timeout
    while True:
        message = await communicator.receive_output(timeout=max(0.1, deadline - loop.time()))
        if message["type"] == "websocket.close":
            return events, message, loop.time()
        events.append(json.loads(message["text"]))


def session_headers(team, username: str, role: str = "member") -> tuple[list, object]:
    from django.conf import settings
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user(username, password="pw-" + username)
    services.membership_add(team=team, user=user, role=role)
    client = Client()
    client.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    return [(b"cookie", cookie.encode())], user


@contextlib.asynccontextmanager
async def session_stream(headers: list, query: str = "?after=0"):
    communicator = WebsocketCommunicator(application, f"/ws/events{query}", headers=headers)
    connected, code = await communicator.connect(timeout=5)
    assert connected, f"refused with close code {code}"
    try:
        yield communicator
    finally:
        await communicator.disconnect()


@async_test
async def test_revoking_the_key_ends_a_stream_within_seconds_while_events_keep_flowing(team, shop):
    issued = await sync_to_async(services.apikey_create)(team=team, label="revoked mid-flow")
    loop = asyncio.get_running_loop()
    async with listening(issued.raw_key) as communicator, flowing(team, shop) as posted:
        assert len(await receive_events(communicator, 5)) == 5  # live: every wake-up finds events
        await sync_to_async(services.apikey_revoke)(api_key=issued.api_key)
        revoked_at, posted_before = loop.time(), len(posted)
        events, closed, closed_at = await until_closed(communicator)
        posted_until_close = len(posted)
        assert await communicator.receive_nothing(timeout=0.5)  # nothing after the close, events still posted
        assert len(posted) > posted_until_close
    assert closed == {"type": "websocket.close", "code": 4401, "reason": "API key revoked"}
    assert closed_at - revoked_at <= CLOSED_WITHIN_SECONDS
    assert posted_until_close - posted_before >= 10  # events kept flowing until the close: no idle moment
    assert set(ids(events)) <= set(posted[:posted_until_close])


@async_test
async def test_removing_the_membership_ends_an_idle_session_stream_with_4403(team):
    from kite.models import Membership

    headers, user = await sync_to_async(session_headers)(team, "leaver")
    loop = asyncio.get_running_loop()
    async with session_stream(headers) as communicator:
        await sync_to_async(Membership.objects.filter(user=user, team=team).delete)()
        removed_at = loop.time()
        events, closed, closed_at = await until_closed(communicator)
    # IDLE_POLL is out of reach and no event came: the revalidation timer closed it.
    assert closed == {"type": "websocket.close", "code": 4403, "reason": "no longer a member of the team"}
    assert events == [] and closed_at - removed_at <= CLOSED_WITHIN_SECONDS


@async_test
async def test_deactivating_the_user_ends_a_session_stream_with_4401_while_events_flow(team, shop):
    from django.contrib.auth import get_user_model

    headers, user = await sync_to_async(session_headers)(team, "deactivated")
    loop = asyncio.get_running_loop()
    async with session_stream(headers, "") as communicator, flowing(team, shop) as posted:
        assert len(await receive_events(communicator, 3)) == 3
        await sync_to_async(get_user_model().objects.filter(pk=user.pk).update)(is_active=False)
        deactivated_at, posted_before = loop.time(), len(posted)
        events, closed, closed_at = await until_closed(communicator)
        posted_until_close = len(posted)
    assert closed == {"type": "websocket.close", "code": 4401, "reason": "user deactivated"}
    assert closed_at - deactivated_at <= CLOSED_WITHIN_SECONDS and posted_until_close - posted_before >= 10
    assert set(ids(events)) <= set(posted[:posted_until_close])


@async_test
async def test_a_session_stream_stays_open_while_the_user_keeps_the_membership(team, shop):
    headers, _ = await sync_to_async(session_headers)(team, "stayer")
    async with session_stream(headers, "") as communicator, flowing(team, shop, every=0.1):
        await asyncio.sleep(consumers.REVALIDATE_SECONDS * 2.5)  # several re-checks, all passed
        events = await receive_events(communicator, 3)
        assert len(events) == 3 and all(event["id"].startswith("flow-") for event in events)


@async_test
async def test_the_principal_is_rechecked_on_a_timer_not_per_event(team, api_key, shop, monkeypatch):
    looked = []
    real = consumers._lost

    async def counting(principal):
        looked.append(principal)
        return await real(principal)

    monkeypatch.setattr(consumers, "_lost", counting)
    monkeypatch.setattr(consumers, "REVALIDATE_SECONDS", 0.5)
    consumers._verdicts.clear()
    loop = asyncio.get_running_loop()
    async with listening(api_key) as first, listening(api_key) as second, flowing(team, shop, every=0.02):
        started = loop.time()
        received = await receive_events(first, 60) + await receive_events(second, 60)
        elapsed = loop.time() - started
    assert len(received) == 120
    # Each stream looks at most once per REVALIDATE_SECONDS, and a verdict is shared for half of that.
    assert 1 <= len(looked) <= 2 * (elapsed / 0.5 + 1) < len(received)
