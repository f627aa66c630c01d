"""Delivery: which local connection gets which inbox entry, written how; and the loops over real Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

import fakeredis
from redis.asyncio import Redis

from presence.config import Settings
from presence.gateway.codec import Command, pack_tail
from presence.gateway.delivery import KICK_CODE, Delivery
from presence.gateway.outbound import Encoded
from presence.gateway.session import SessionId
from presence.inbox import NO_EVENT, EventId, InboxEntry, Inboxes
from presence.keys import KeySchema
from presence.metrics import REGISTRY
from presence.service import Presence
from presence.store import Store
from tests.clients import APP

IOS = 2


class FakeConn:
    """A connection reduced to what delivery sees: frames in the WebSocket text format, writes recorded."""

    def __init__(self, imei: str) -> None:
        self.tail = pack_tail(IOS, imei)
        self.framed: list[Encoded] = []
        self.writes: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.failed: tuple[int, str] | None = None
        self.wrote = asyncio.Event()

    def frame(self, message: Encoded) -> bytes:
        self.framed.append(message)
        return message.pack(self.tail) + b"\n"

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.wrote.set()

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    async def fail(self, code: int, message: str, request_id: str | None = None) -> None:
        self.failed = (code, message)

    def packs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for data in self.writes for line in data.splitlines()]


class Harness:
    def __init__(self, redis: Any | None = None, node_id: str = "n1", settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        store = Store.wrap(redis if redis is not None else fakeredis.FakeAsyncRedis())
        self.inboxes = Inboxes(store, KeySchema(self.settings.prefix))
        self.spawned: list[Coroutine[Any, Any, object]] = []
        self.kicked: list[FakeConn] = []
        self.delivery: Delivery[FakeConn] = Delivery(
            self.inboxes, node_id, self.settings, spawn=self.spawned.append, end_kicked=self._kicked
        )

    async def _kicked(self, conn: FakeConn) -> None:
        self.kicked.append(conn)

    def connect(self, user: str, conn_id: str, cursor: EventId = NO_EVENT) -> tuple[FakeConn, str]:
        conn = FakeConn(imei=conn_id)
        self.delivery.attach(conn, SessionId(APP, user, IOS, conn_id, conn_id), cursor)
        return conn, self.inboxes.key(APP, user)

    async def run_spawned(self) -> None:
        for coro in self.spawned:
            await coro
        self.spawned.clear()


def entry(entry_id: str, command: int = Command.NOTIFY, data: bytes = b'{"n":1}', **fields: bytes) -> InboxEntry:
    """An entry as the library writes it; ``t``/``x``: the one connection it is for / not for."""
    extra = {name.encode(): value for name, value in fields.items()}
    return InboxEntry.parse(entry_id.encode(), {b"c": str(command).encode(), b"d": data, **extra})


def pushes_written() -> float:
    return REGISTRY.get_sample_value("presence_pushes_written_total") or 0.0


def test_an_entry_reaches_every_connection_of_the_inbox_encoded_once() -> None:
    h = Harness()
    phone, inbox = h.connect("bob", "phone")
    tab, _ = h.connect("bob", "tab")
    other, _ = h.connect("carol", "pc")
    before = pushes_written()
    assert h.delivery.dispatch(inbox, [entry("5-1")]) is False
    assert [p["eventId"] for p in phone.packs()] == ["5-1"] and [p["imei"] for p in tab.packs()] == ["tab"]
    assert phone.framed[0] is tab.framed[0]  # one Encoded for all: the pack head is built once
    assert phone.packs()[0]["userId"] == "bob" and other.writes == []
    assert pushes_written() - before == 2  # one per connection written to, not one per entry


async def test_t_targets_one_connection_and_x_skips_one() -> None:
    h = Harness()
    phone, inbox = h.connect("bob", "phone")
    tab, _ = h.connect("bob", "tab")
    kick = entry("5-1", Command.MUTUALLOGIN, t=b"phone")
    sync = entry("5-2", Command.NOTIFY_SYNC, x=b"tab")
    h.delivery.dispatch(inbox, [kick, sync])
    assert [p["command"] for p in phone.packs()] == [Command.MUTUALLOGIN, Command.NOTIFY_SYNC]
    assert tab.writes == []
    # Skipped entries still move the cursor: read again, nothing is written twice.
    h.delivery.dispatch(inbox, [kick, sync])
    assert len(phone.writes) == 1 and tab.writes == []
    await h.run_spawned()
    assert h.kicked == [phone]


def test_a_backlog_goes_out_in_one_write_and_nothing_at_or_before_the_cursor() -> None:
    h = Harness()
    conn, inbox = h.connect("bob", "phone", cursor=EventId(5, 1))
    h.delivery.dispatch(inbox, [entry("5-0"), entry("5-1"), entry("5-2"), entry("6-0")])
    assert len(conn.writes) == 1
    assert [p["eventId"] for p in conn.packs()] == ["5-2", "6-0"]


def test_a_connection_behind_the_read_is_left_for_a_read_from_its_cursor() -> None:
    h = Harness()
    early, inbox = h.connect("bob", "early", cursor=EventId(9, 0))
    late, _ = h.connect("bob", "late", cursor=EventId(3, 0))  # activated while the read from 9-0 was in flight
    assert h.delivery.dispatch(inbox, [entry("10-0")], read_from=EventId(9, 0)) is True  # read again
    assert [p["eventId"] for p in early.packs()] == ["10-0"] and late.writes == []
    h.delivery.dispatch(inbox, [entry("4-0"), entry("10-0")], read_from=EventId(3, 0))
    assert [p["eventId"] for p in late.packs()] == ["4-0", "10-0"]
    assert [p["eventId"] for p in early.packs()] == ["10-0"]


async def test_a_kick_is_written_then_the_connection_closed_and_ended() -> None:
    h = Harness()
    old, inbox = h.connect("bob", "old")
    new, _ = h.connect("bob", "new")
    h.delivery.dispatch(inbox, [entry("7-0", Command.MUTUALLOGIN, t=b"old")])
    assert [p["command"] for p in old.packs()] == [Command.MUTUALLOGIN]
    assert old.closed == (KICK_CODE, "logged in elsewhere") and new.closed is None
    await h.run_spawned()
    assert h.kicked == [old]


def test_a_detached_connection_gets_nothing() -> None:
    h = Harness()
    gone, inbox = h.connect("bob", "gone")
    stays, _ = h.connect("bob", "stays")
    h.delivery.detach(gone)
    h.delivery.detach(gone)  # twice: nothing
    h.delivery.dispatch(inbox, [entry("8-0")])
    assert gone.writes == [] and len(stays.writes) == 1
    h.delivery.detach(stays)
    assert h.delivery.dispatch(inbox, [entry("9-0")]) is False


def test_trim_candidates_are_inboxes_every_local_session_is_past() -> None:
    """Up to the lowest local cursor, and only when that entry is older than the resume window."""
    h = Harness(settings=Settings(resume_window=60))
    now_ms = 1_700_000_100_000
    old, recent = EventId(now_ms - 61_000, 0), EventId(now_ms - 1_000, 0)
    _, bob = h.connect("bob", "a", cursor=old)
    _, carol = h.connect("carol", "a", cursor=recent)
    h.connect("carol", "b", cursor=old)  # carol's other device got less: her inbox goes up to it only
    h.connect("dave", "a", cursor=recent)  # within the window: kept for a resume
    h.connect("erin", "a")  # nothing received yet
    assert h.delivery.trim_candidates(now_ms) == {bob: old, carol: old}


# --- the loops, over real Redis (standalone, fakeredis, cluster) ------------------------------------------


async def _online(presence: Presence, user: str, conn_id: str, node_id: str) -> EventId:
    result = await presence.login(APP, user, IOS, conn_id, conn_id=conn_id, node_id=node_id)
    return EventId.parse(result.inbox_last_id)


async def _until_pushed(conn: FakeConn, text: str) -> None:
    """Wait (5 s at most) until a CUSTOM_NOTIFY with ``text`` was written to ``conn``."""
    async with asyncio.timeout(5):
        while not any(p["data"].get("customText") == text for p in conn.packs()):
            conn.wrote.clear()
            await conn.wrote.wait()


async def test_changes_reach_the_attached_connection_through_the_loops(presence: Presence) -> None:
    await presence.add_friend(APP, "alice", "bob")
    h = Harness(presence.store.client, node_id="n1")
    h.delivery.sweep_interval = 3600.0  # only doorbells (and the read at attach) bring entries
    conn = FakeConn("bob-phone")
    cursor = await _online(presence, "bob", "bob-phone", "n1")
    await h.delivery.open()
    h.delivery.start()
    try:
        h.delivery.attach(conn, SessionId(APP, "bob", IOS, "bob-phone", "bob-phone"), cursor)
        for text in ("one", "two"):
            await presence.set_custom_status(APP, "alice", 3, text)
            await _until_pushed(conn, text)
        assert [(p["command"], p["data"]["customText"]) for p in conn.packs()] == [
            (Command.CUSTOM_NOTIFY, "one"),
            (Command.CUSTOM_NOTIFY, "two"),
        ]
    finally:
        await h.delivery.stop()


async def test_a_lost_doorbell_subscription_is_made_again_and_misses_nothing(real_redis: Redis) -> None:
    presence = Presence(real_redis)
    await presence.add_friend(APP, "alice", "bob")
    h = Harness(real_redis, node_id="n1")
    h.delivery.sweep_interval = 3600.0
    conn = FakeConn("bob-phone")
    cursor = await _online(presence, "bob", "bob-phone", "n1")
    await h.delivery.open()
    h.delivery.start()
    try:
        h.delivery.attach(conn, SessionId(APP, "bob", IOS, "bob-phone", "bob-phone"), cursor)
        await presence.set_custom_status(APP, "alice", 3, "before")
        await _until_pushed(conn, "before")
        assert await real_redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
        await presence.set_custom_status(APP, "alice", 3, "rung while away")  # its doorbell is lost
        await _until_pushed(conn, "rung while away")  # read again after resubscribing
        await presence.set_custom_status(APP, "alice", 3, "after")  # rung on the new subscription
        await _until_pushed(conn, "after")
    finally:
        await h.delivery.stop()
