"""The Redis connection the service uses on one server: redis-py's asyncio connection, packing with hiredis.

redis-py's asyncio connection packs every command in Python, one argument at a time; a fan-out to 100
friends is 200+ arguments and a 500-user query 1,000, and packing them was the largest part of the
facade's CPU (BENCHMARKS.md). hiredis (a dependency of redis[hiredis]) packs a whole command in C.
"""

from __future__ import annotations

from typing import Any

from hiredis import pack_command
from redis.asyncio.connection import Connection


class HiredisPackingConnection(Connection):
    """``pack_command`` in C; the same bytes on the wire as redis-py's (str as UTF-8, numbers as text)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        command = args[0]
        if isinstance(command, str) and " " in command:  # 'XINFO STREAM': the server wants two arguments
            args = (*command.split(), *args[1:])
        return [pack_command(args)]
