"""Inbox memory: delivered entries stay resumable for the resume window, then go; an emptied inbox is deleted."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from presence.functions import fcall
from presence.gateway.codec import Command
from presence.service import Presence
from tests.clients import APP, WsClient, expect, stream_entries, ws_pack
from tests.conftest import MakeNode


async def _trim(redis: Redis, inbox: str, window_ms: int, upto: bytes | str) -> int:
    return int(await redis.execute_command(*fcall("presence_inbox_trim", [inbox], [window_ms, upto])))


async def test_inbox_trim_keeps_entries_younger_than_the_window_and_after_the_cursor(any_redis: Redis) -> None:
    inbox = "presence:{10000:bob}:inbox"
    ids = [await any_redis.xadd(inbox, {"c": "4006", "d": "{}"}) for _ in range(3)]
    assert await _trim(any_redis, inbox, 60_000, ids[-1]) == 3  # delivered, but within the window
    await asyncio.sleep(0.01)  # the entries are now older than a 1 ms window
    assert await _trim(any_redis, inbox, 1, ids[1]) == 1  # up to the cursor only: the undelivered one stays
    assert [e[0] for e in stream_entries(await any_redis.xrange(inbox))] == [ids[2]]
    assert await _trim(any_redis, inbox, 1, ids[2]) == 0
    assert await any_redis.exists(inbox) == 0  # nothing undelivered left: the inbox is gone
    assert await _trim(any_redis, inbox, 1, ids[2]) == 0  # a repeat on the missing key changes nothing


async def _gone(redis: Redis, key: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not await redis.exists(key):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_delivered_entries_resume_within_the_window_then_cost_no_memory(
    make_node: MakeNode, facade: Presence, store_redis: Redis
) -> None:
    node = await make_node(offline_grace=30, resume_window=1.0)
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    await bob.login("bob", lastEventId=None)
    await facade.set_custom_status(APP, "alice", 1, "one")
    seen = await expect(bob, Command.CUSTOM_NOTIFY)
    await node.hub.delivery.trim_inboxes()  # delivered, but younger than the window: kept
    await bob.close()  # dropped: the session stays for the grace
    await facade.set_custom_status(APP, "alice", 1, "two")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    ack = await bob.login("bob", lastEventId=ws_pack(seen)["eventId"])
    assert ack.data["resumed"] is True
    assert (await expect(bob, Command.CUSTOM_NOTIFY)).data["customText"] == "two"

    # Once the window has passed, the gateway trims what bob received and drops the emptied inbox.
    keys = facade.user(APP, "bob")
    assert await _gone(store_redis, keys.inbox), "the delivered inbox outlived the resume window"
    usage = [await store_redis.memory_usage(k, samples=0) for k in (keys.sessions, keys.status, keys.inbox)]
    assert usage[2] is None and sum(u or 0 for u in usage) <= 1024

    # A later entry (in a new inbox) is still after bob's cursor: delivered.
    await facade.set_custom_status(APP, "alice", 1, "three")
    assert (await expect(bob, Command.CUSTOM_NOTIFY)).data["customText"] == "three"
    await bob.close()
