"""Shared fixtures: a real redis-server on a free port (or REDIS_URL), and fakeredis with Lua."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from presence.config import AppConfig, Settings
from presence.library import ensure_library
from presence.server import Running, start
from presence.service import Presence
from tests.clients import APP, KEY
from tests.redis_servers import Cluster, free_port

__all__ = ["free_port"]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A real Redis Cluster of 3 primaries (no replicas) for the whole run; tests flush it."""
    c = Cluster(primaries=3)
    try:
        yield c
    finally:
        c.stop()


async def _cluster_client(cluster: Cluster) -> RedisCluster:
    cluster.flush()
    client = RedisCluster.from_url(cluster.url)
    await ensure_library(client)
    return client


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


@pytest.fixture(params=["redis", "fakeredis", "cluster"])
async def any_redis(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Redis]:
    """The same test on a real redis-server, on fakeredis and on a real 3-primary Redis Cluster."""
    if request.param == "cluster":
        client: Any = await _cluster_client(request.getfixturevalue("cluster"))
    else:
        client = await (_real(redis_url) if request.param == "redis" else _fake())
    yield client
    await client.aclose()


@pytest.fixture
def presence(any_redis: Redis) -> Presence:
    return Presence(any_redis, Settings())


MakeNode = Callable[..., Awaitable[Running]]


@pytest.fixture
async def cluster_redis(cluster: Cluster) -> AsyncIterator[RedisCluster]:
    """A client of the flushed session cluster, library loaded."""
    client = await _cluster_client(cluster)
    yield client
    await client.aclose()


@pytest.fixture(params=["standalone", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The gateway end-to-end tests run on one redis-server and on a 3-primary cluster (one node's URL)."""
    if request.param == "cluster":
        return request.getfixturevalue("cluster").url
    return request.getfixturevalue("redis_url")


@pytest.fixture
async def store_redis(store_url: str, redis_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A flushed client of ``store_url`` with the library loaded (RedisCluster on the cluster)."""
    if store_url == redis_url:
        client: Any = await _real(redis_url)
    else:
        client = await _cluster_client(request.getfixturevalue("cluster"))
    yield client
    await client.aclose()


@pytest.fixture
async def make_node(store_redis: Any, store_url: str) -> AsyncIterator[MakeNode]:
    redis_url = store_url
    running: list[Running] = []

    async def make(login_model: int = 3, node_id: str | None = None, **overrides: Any) -> Running:
        """A node; ``apps`` replaces the default (APP signed with KEY, this ``login_model``)."""
        overrides.setdefault("offline_grace", 0)
        overrides.setdefault("http_port", 0)
        overrides.setdefault("apps", {APP: AppConfig(private_key=KEY, login_model=login_model)})
        for attempt in range(3):
            settings = Settings(
                redis_url=redis_url,
                tcp_port=free_port(),
                ws_port=free_port(),
                node_id=node_id,
                **overrides,
            )
            try:
                node = await start(settings)
            except OSError as exc:
                # free_port() is a probe: another process (a parallel suite) may bind the port before we do.
                if exc.errno != errno.EADDRINUSE or attempt == 2:
                    raise
                continue
            running.append(node)
            return node
        raise AssertionError("unreachable")

    yield make
    for node in running:
        await node.stop()


@pytest.fixture
def facade(store_redis: Any) -> Presence:
    return Presence(store_redis, Settings())
