"""Redis commands per status change grow with friends only by one fan-out call per chunk (INFO commandstats)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from presence.service import Limits, Presence
from tests.clients import APP

IOS = 2
FUNCTION_CALLS = {"cmdstat_fcall", "cmdstat_fcall_ro"}


async def _change_stats(redis: Redis, presence: Presence, friends: int, online: int) -> dict[str, int]:
    await redis.flushall()
    names = [f"f{i}" for i in range(friends)]
    for start in range(0, friends, 1000):
        await presence.import_friends(APP, "alice", names[start : start + 1000])
    for name in names[:online]:
        await presence.login(APP, name, IOS, "d", node_id="n1")
    await redis.config_resetstat()
    result = await presence.set_custom_status(APP, "alice", 1, "hello")
    assert result.recipients == friends and result.delivered == online
    stats = await redis.info("commandstats")
    return {name: int(v["calls"]) for name, v in stats.items() if name != "cmdstat_config|resetstat"}


@pytest.mark.parametrize("online", [5])
async def test_client_commands_per_change_grow_only_by_fanout_chunks(real_redis: Redis, online: int) -> None:
    presence = Presence(real_redis)
    chunk = Limits().fanout_chunk
    assert 10 <= chunk < 1000
    small = await _change_stats(real_redis, presence, 10, online)
    large = await _change_stats(real_redis, presence, 1000, online)
    # What the client sends: the user's own function (and the XRANGE of its feed outbox in the same
    # pipeline), then the presence_fanout calls, one per chunk of recipients (so no single call holds
    # Redis for the whole list), and the presence_feed_append relay (standalone Redis).
    assert {k: v for k, v in small.items() if k in FUNCTION_CALLS} == {"cmdstat_fcall": 3}
    assert {k: v for k, v in large.items() if k in FUNCTION_CALLS} == {"cmdstat_fcall": 2 + -(-1000 // chunk)}
    assert small["cmdstat_xrange"] == large["cmdstat_xrange"] == 1
    # Redis also counts what the functions run inside; with the same online friends that is the same
    # too, except the one HVALS per recipient that finds offline friends offline. XADDs: one per online
    # friend, the outbox entry and the feed entry.
    assert small["cmdstat_xadd"] == large["cmdstat_xadd"] == online + 2
    # One doorbell per gateway node per change: rung by the one fan-out call, or by the facade after
    # several chunks.
    assert small["cmdstat_publish"] == large["cmdstat_publish"] == 1
    inner_small = sum(v for k, v in small.items() if k not in FUNCTION_CALLS | {"cmdstat_hvals"})
    inner_large = sum(v for k, v in large.items() if k not in FUNCTION_CALLS | {"cmdstat_hvals"})
    assert inner_small == inner_large
    assert large["cmdstat_hvals"] - small["cmdstat_hvals"] == 1000 - 10
