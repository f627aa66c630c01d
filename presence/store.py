"""Open the Redis the service runs on: a URL, or the embedded in-process store (fakeredis with Lua)."""

from __future__ import annotations

import logging

from redis.asyncio import Redis

log = logging.getLogger("presence.store")


def open_redis(url: str | None) -> tuple[Redis, bool]:
    """(client, embedded). No URL -> fakeredis in this process: state dies with it, fine for a demo."""
    if url:
        return Redis.from_url(url, decode_responses=False, health_check_interval=10), False
    import fakeredis

    log.warning("no Redis URL given: using the embedded in-process store (fakeredis); state is not persisted")
    server = fakeredis.FakeServer()
    return fakeredis.FakeAsyncRedis(server=server, decode_responses=False), True
