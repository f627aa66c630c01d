"""The service's Redis connection packs commands with hiredis: the same bytes as redis-py's own packer."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection
from redis.typing import EncodableT

from presence.wire import HiredisPackingConnection


@pytest.mark.parametrize(
    "args",
    [
        ("FCALL", "presence_fanout", 2, "presence:{1:a}:sessions", b"presence:{1:a}:inbox", 4006, b'{"x":1}'),
        ("SET", "k", "\u00e9\u4e2d\U0001f600", "PX", 1000),
        ("XINFO STREAM", "presence:{1:a}:inbox"),
        ("HMGET", b"\x00\xff", "customStatus"),
        ("ZADD", "z", 1.5, "m", 0.1, "n", -3, "o"),
        ("PING",),
    ],
)
def test_packs_the_same_bytes_as_redis_py(args: tuple[EncodableT, ...]) -> None:
    ours = b"".join(HiredisPackingConnection().pack_command(*args))
    theirs = b"".join(bytes(chunk) for chunk in Connection().pack_command(*args))
    assert ours == theirs
