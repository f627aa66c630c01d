"""Shared fixtures: a real redis-server on a free port (or REDIS_URL), and fakeredis with Lua."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis
from redis.asyncio import Redis

from presence.config import AppConfig, Settings
from presence.functions import ensure_library
from presence.server import Running, start
from presence.service import Presence
from tests.clients import APP, KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis 7 for the whole run: REDIS_URL if set, else a private redis-server."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not on PATH: run `make test`, which installs it"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="presence-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--enable-debug-command",
            "yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.05)
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


async def _real(url: str) -> Redis:
    client = Redis.from_url(url)
    await client.flushall()
    await client.function_flush()
    await ensure_library(client)
    return client


async def _fake() -> Redis:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    await ensure_library(client)
    return client


@pytest.fixture
async def real_redis(redis_url: str) -> AsyncIterator[Redis]:
    client = await _real(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["redis", "fakeredis"])
async def any_redis(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Redis]:
    """The same test on a real redis-server and on fakeredis: the library must behave alike."""
    client = await (_real(redis_url) if request.param == "redis" else _fake())
    yield client
    await client.aclose()


@pytest.fixture
def presence(any_redis: Redis) -> Presence:
    return Presence(any_redis, Settings())


MakeNode = Callable[..., Awaitable[Running]]


@pytest.fixture
async def make_node(real_redis: Redis, redis_url: str) -> AsyncIterator[MakeNode]:
    running: list[Running] = []

    async def make(login_model: int = 3, node_id: str | None = None, **overrides: Any) -> Running:
        """A node; ``apps`` replaces the default (APP signed with KEY, this ``login_model``)."""
        overrides.setdefault("offline_grace", 0)
        overrides.setdefault("http_port", 0)
        overrides.setdefault("apps", {APP: AppConfig(private_key=KEY, login_model=login_model)})
        settings = Settings(
            redis_url=redis_url,
            tcp_port=free_port(),
            ws_port=free_port(),
            node_id=node_id,
            **overrides,
        )
        node = await start(settings)
        running.append(node)
        return node

    yield make
    for node in running:
        await node.stop()


@pytest.fixture
def facade(real_redis: Redis) -> Presence:
    return Presence(real_redis, Settings())
