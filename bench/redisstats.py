"""What Redis did: INFO commandstats deltas, split into top-level commands and commands run inside functions.

Redis counts a command a function runs (``redis.call``) in commandstats like one a client sent, and a
FCALL's usec already include them. MONITOR shows where each command came from (``[0 lua]`` for inside a
function), so a short MONITOR window run beside a few changes classifies the command names; the totals
come from commandstats over the measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

_MONITOR_LINE = re.compile(r'^\+?\d+\.\d+ \[\d+ ([^\]]+)\] "([^"]+)"')


@dataclass
class CommandStats:
    calls: Counter[str] = field(default_factory=Counter)
    usec: Counter[str] = field(default_factory=Counter)
    cpu_s: float = 0.0

    def __sub__(self, other: CommandStats) -> CommandStats:
        out = CommandStats(cpu_s=self.cpu_s - other.cpu_s)
        out.calls.update(self.calls)
        out.calls.subtract(other.calls)
        out.usec.update(self.usec)
        out.usec.subtract(other.usec)
        return out


async def snapshot(redis: Redis) -> CommandStats:
    stats = CommandStats()
    info = await redis.info("commandstats")
    for key, value in info.items():
        name = key.removeprefix("cmdstat_").split("|")[0].lower()
        stats.calls[name] += int(value["calls"])
        stats.usec[name] += int(value["usec"])
    cpu = await redis.info("cpu")
    stats.cpu_s = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return stats


@dataclass
class Split:
    top_level: int
    inner: int
    usec: int  # of top-level commands only (a FCALL's time includes its inner commands)
    by_command: dict[str, int]
    usec_by_command: dict[str, int]


# Commands the benchmark itself sends to read the stats; they are not the system's work.
_OWN = {"info", "monitor", "config", "memory", "client"}


def split(delta: CommandStats, inner_names: set[str]) -> Split:
    top = inner = usec = 0
    by_command: dict[str, int] = {}
    usec_by_command: dict[str, int] = {}
    for name, calls in delta.calls.items():
        if calls <= 0 or name in _OWN:
            continue
        by_command[name] = calls
        usec_by_command[name] = delta.usec[name]
        if name in inner_names:
            inner += calls
        else:
            top += calls
            usec += delta.usec[name]
    ordered = dict(sorted(by_command.items(), key=lambda kv: -kv[1]))
    return Split(top, inner, usec, ordered, {k: usec_by_command[k] for k in ordered})


async def inner_command_names(host: str, port: int, action: Callable[[], Awaitable[None]]) -> set[str]:
    """Names of the commands Redis ran inside functions/scripts while ``action`` ran (MONITOR)."""
    reader, writer = await asyncio.open_connection(host, port, limit=16 * 1024 * 1024)
    writer.write(b"MONITOR\r\n")
    await writer.drain()
    await reader.readline()  # +OK
    names: set[str] = set()

    async def read() -> None:
        while line := await reader.readline():
            m = _MONITOR_LINE.match(line.decode(errors="replace"))
            if m and m.group(1) == "lua":
                names.add(m.group(2).lower())

    task = asyncio.create_task(read())
    try:
        await action()
        await asyncio.sleep(0.2)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return names
