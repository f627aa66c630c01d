"""The library on the servers: the per-primary health check (``presence_version`` through ``Functions.call_on``)."""

from __future__ import annotations

from redis.asyncio import Redis

from presence.library import library_health, library_version
from presence.store import Store


async def test_health_asks_every_primary_and_loads_the_library_where_it_was_flushed(any_redis: Redis) -> None:
    store = Store.wrap(any_redis)
    primaries = store.primaries()
    await store.on_node(primaries[0], "FUNCTION", "FLUSH")  # an empty restart of one primary
    answers = await library_health(store, 5.0)
    assert [answer for _, answer in answers] == [library_version()] * len(primaries)
    assert await library_health(store, 5.0) == answers  # loaded again: asked once more, the same answer
