"""`presence serve --workers N`: gateway workers share the ports, each its own node; REST once; crashes and SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from typing import cast

import aiohttp
from redis.asyncio import Redis

from presence.config import Settings
from presence.service import Presence
from tests.clients import APP, WsClient
from tests.serve_process import ServeProcess


async def _line(proc: ServeProcess, pattern: str, timeout: float = 15.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(proc.lines):
            if match := re.search(pattern, line):
                return match
        await asyncio.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r} in:\n{proc.output()}")


async def _node_ids(redis: Redis) -> set[str]:
    """The node ids recorded in ``presence:nodes`` (the client returns bytes)."""
    return {n.decode() for n in cast(list[bytes], await redis.zrange("presence:nodes", 0, -1))}


async def _status(presence: Presence, users: list[str]) -> set[int]:
    return {s.status for s in (await presence.query_users(APP, users)).values()}


async def test_workers_share_ports_and_a_crashed_worker_is_reaped_and_replaced(
    real_redis: Redis, redis_url: str
) -> None:
    presence = Presence(real_redis, Settings())
    proc = ServeProcess(["--redis", redis_url, "--workers", "2", "--node-id", "multi", "--offline-grace", "0"])
    clients: list[WsClient] = []
    try:
        pids = {}
        for i in range(2):
            pids[i] = int((await _line(proc, rf"worker {i} started: node multi-w{i}, pid (\d+)")).group(1))
        assert {"multi-rest", "multi-w0", "multi-w1"} <= await _node_ids(real_redis)
        async with aiohttp.ClientSession() as http:  # REST is served once, by the supervisor
            async with http.get(f"http://127.0.0.1:{proc.http_port}/healthz") as resp:
                assert resp.status == 200

        users = [f"u{i}" for i in range(24)]
        for user in users:  # one port, and the kernel spreads the connections over both workers
            client = await WsClient.connect(proc.ws_port, imei=user)
            await client.login(user)
            clients.append(client)
        held = {w: await presence.nodes.session_members(f"multi-w{w}") for w in range(2)}
        assert held[0] and held[1], f"one worker got every connection: {held}"
        on = {w: sorted(m.split("|")[1] for m in held[w]) for w in range(2)}
        assert sorted(on[0] + on[1]) == sorted(users)

        os.kill(pids[0], signal.SIGKILL)
        await _line(proc, r"reaped \d+ sessions of node multi-w0")
        assert await _status(presence, on[0]) == {2}, "the crashed worker's users are still online"
        assert await _status(presence, on[1]) == {1}
        await _line(proc, r"worker 0 started: node multi-w0\.2")
        assert await presence.nodes.session_count("multi-w0") == 0
        assert "multi-w0.2" in await _node_ids(real_redis)
        late = await WsClient.connect(proc.ws_port, imei="late")
        await late.login("late")
        clients.append(late)
        assert await _status(presence, ["late"]) == {1}

        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert await _status(presence, [*on[1], "late"]) == {2}, "SIGTERM left sessions online"
        assert not await _node_ids(real_redis) & {"multi-rest", "multi-w0.2", "multi-w1"}
    finally:
        proc.kill()
        for client in clients:
            await client.close()
