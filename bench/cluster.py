"""``python -m bench.cluster``: a status change and a 500-user query on one redis-server and on a local
3-primary Redis Cluster, side by side: client requests (round trips), Redis commands, time.

Starts its own servers on free ports (tests/redis_servers.py: the same helpers the test suite uses) and the
``Presence`` facade in this process (no gateway: this measures the Redis side of a change). Per change, at
10/100/1000 friends spread over slots, 10% of them online on two gateway nodes:

- requests: what the client sent, counted on the wire (every ``send_packed_command`` of redis-py's
  asyncio connections, connection set-up excluded); requests to different primaries go in parallel;
- Redis commands: INFO commandstats summed over every primary, top level (FCALL, PUBLISH) and in all
  (with what the functions run inside);
- time: wall time of ``set_custom_status`` (own call, fan-out, doorbells), median and p99.

Writes bench/results/cluster.json and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection

from bench.procs import ROOT
from presence.library import ensure_library
from presence.service import Presence
from tests.redis_servers import Cluster, Server

APP = 10000
HANDSHAKE = (b"HELLO", b"CLIENT", b"AUTH", b"SELECT")
TOP_LEVEL = {"fcall", "fcall_ro", "publish", "spublish"}


class Wire:
    def __init__(self) -> None:
        self.requests = 0


@contextmanager
def counting(wire: Wire) -> Iterator[None]:
    send = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        data = command if isinstance(command, bytes) else b"".join(bytes(c) for c in command)
        parts = data.split(b"\r\n", 3)
        if len(parts) < 3 or parts[2].upper() not in HANDSHAKE:
            wire.requests += 1
        await send(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield
    finally:
        AbstractConnection.send_packed_command = send  # type: ignore[method-assign]


async def commands(primaries: list[Server]) -> tuple[int, int]:
    """(top-level, all) command calls so far, summed over the primaries."""
    top = total = 0
    for node in primaries:
        client = Redis(port=node.port)
        try:
            for key, value in (await client.info("commandstats")).items():
                name = key.removeprefix("cmdstat_").split("|")[0].lower()
                if name in ("info", "config"):
                    continue
                total += int(value["calls"])
                top += int(value["calls"]) if name in TOP_LEVEL else 0
        finally:
            await client.aclose()
    return top, total


async def measure(mode: str, client: Any, primaries: list[Server], changes: int) -> list[dict[str, Any]]:
    presence = Presence(client)
    rows = []
    for friends in (10, 100, 1000):
        for node in primaries:
            with node.client() as c:
                c.flushall()
        names = [f"f{i}" for i in range(friends)]
        await presence.import_friends(APP, "alice", names)
        for i, name in enumerate(names[: max(1, friends // 10)]):
            await presence.login(APP, name, 2, "d", node_id=f"gw{i % 2}")
        for i in range(5):
            await presence.set_custom_status(APP, "alice", i, "warm")
        rows.append(await _run(mode, f"status change, {friends} friends", presence, primaries, changes, friends))
    users = [f"q{i}" for i in range(500)]
    for user in users[:250]:
        await presence.login(APP, user, 2, "d", node_id="gw0")
    for user in users[::3]:
        await presence.set_custom_status(APP, user, 1, "busy")
    await presence.query_users(APP, users)
    rows.append(await _run(mode, "query of 500 users", presence, primaries, changes, 0, users))
    return rows


async def _run(
    mode: str,
    what: str,
    presence: Presence,
    primaries: list[Server],
    n: int,
    friends: int,
    users: list[str] | None = None,
) -> dict[str, Any]:
    wire = Wire()
    times = []
    top0, all0 = await commands(primaries)
    with counting(wire):
        for i in range(n):
            started = time.perf_counter()
            if users is None:
                await presence.set_custom_status(APP, "alice", i, "bench")
            else:
                await presence.query_users(APP, users)
            times.append(time.perf_counter() - started)
    top1, all1 = await commands(primaries)
    times.sort()
    return {
        "mode": mode,
        "what": what,
        "friends": friends,
        "requests": wire.requests / n,
        "top_level_commands": (top1 - top0 - len(primaries)) / n,  # less our own INFO reads
        "all_commands": (all1 - all0) / n,
        "median_ms": statistics.median(times) * 1000,
        "p99_ms": times[int(len(times) * 0.99) - 1] * 1000,
    }


async def main(changes: int) -> list[dict[str, Any]]:
    standalone = Server()
    cluster = Cluster(primaries=3)
    try:
        one = Redis(port=standalone.port)
        await ensure_library(one)
        rows = await measure("standalone", one, [standalone], changes)
        await one.aclose()
        many = RedisCluster.from_url(cluster.url)
        await ensure_library(many)
        rows += await measure("cluster (3 primaries)", many, cluster.primaries(), changes)
        await many.aclose()
    finally:
        standalone.stop()
        cluster.stop()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| store | operation | client requests | Redis commands (top level / all) | median ms | p99 ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['mode']} | {r['what']} | {r['requests']:.1f} | {r['top_level_commands']:.1f} / "
            f"{r['all_commands']:.1f} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} |"
        )
    return "\n".join(out)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=200, help="measured operations per row")
    args = parser.parse_args()
    rows = asyncio.run(main(args.changes))
    path = ROOT / "bench" / "results" / "cluster.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    cli()
