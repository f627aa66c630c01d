"""Open the Redis the service runs on: a URL, or the embedded in-process store (fakeredis with Lua)."""

from __future__ import annotations

import logging

from redis.asyncio import BlockingConnectionPool, Redis

log = logging.getLogger("presence.store")


MAX_CONNECTIONS = 64


def open_redis(url: str | None, max_connections: int = MAX_CONNECTIONS) -> tuple[Redis, bool]:
    """(client, embedded). No URL -> fakeredis in this process: state dies with it, fine for a demo.

    The pool blocks when all connections are busy instead of failing: a burst of 10,000 logins or
    logouts waits its turn rather than losing sessions to "Too many connections".
    """
    if url:
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=30, health_check_interval=10
        )
        return Redis(connection_pool=pool), False
    import fakeredis

    log.warning("no Redis URL given: using the embedded in-process store (fakeredis); state is not persisted")
    server = fakeredis.FakeServer()
    return fakeredis.FakeAsyncRedis(server=server, decode_responses=False), True
