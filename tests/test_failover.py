"""Failovers are a pause, not an outage: kill -9 a primary (Redis Cluster, Sentinel) with users online.

Real servers on free ports (tests/redis_servers.py). Each test: two gateways in this process, bob on
one and alice on the other, friends; the primary holding alice's keys is killed with SIGKILL. After the
replica is promoted: both sessions are still there, both clients are still connected, alice's next change
reaches bob, bob never heard a false "alice offline", and neither gateway was reaped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import pytest

from presence.config import AppConfig, Settings
from presence.gateway.codec import Command
from presence.nodes import NodeKeeper
from presence.server import Running, start
from presence.service import Presence
from presence.store import open_store
from tests.clients import APP, KEY, TcpClient, WsClient, expect
from tests.redis_servers import Cluster, SentinelSet, Server, free_port

NODE_TTL = 1.5  # shorter than the outage: without the "judge only when healthy" rule peers get reaped


@pytest.fixture
def cluster_with_replicas() -> Iterator[Cluster]:
    c = Cluster(primaries=3, replicas=1, node_timeout_ms=1000)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def sentinel_set() -> Iterator[SentinelSet]:
    s = SentinelSet(down_after_ms=1000)
    try:
        yield s
    finally:
        s.stop()


async def _gateway(url: str, node_id: str) -> Running:
    return await start(
        Settings(
            redis_url=url,
            tcp_port=free_port(),
            ws_port=free_port(),
            http_port=0,
            node_id=node_id,
            node_ttl=NODE_TTL,
            offline_grace=0,
            apps={APP: AppConfig(private_key=KEY)},
        )
    )


@pytest.fixture
async def gateways() -> AsyncIterator[Callable[[str], Awaitable[tuple[Running, Running, Presence]]]]:
    running: list[Running] = []
    stores = []

    async def make(url: str) -> tuple[Running, Running, Presence]:
        a = await _gateway(url, "gw-a")
        running.append(a)
        b = await _gateway(url, "gw-b")
        running.append(b)
        store = await open_store(url)
        stores.append(store)
        return a, b, Presence(store)

    yield make
    for node in running:
        await node.stop()
    for store in stores:
        await store.aclose()


async def _survives(
    kill: Callable[[], None], wait_recovered: Callable[[], None], a: Running, b: Running, facade: Presence
):
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(a.ws_port)
    await bob.login("bob")
    alice = await TcpClient.connect(b.tcp_port)
    await alice.login("alice")
    assert (await expect(bob, Command.NOTIFY)).data["status"] == 1

    kill()
    await asyncio.to_thread(wait_recovered)
    recovered = time.monotonic()
    await facade.set_custom_status(APP, "alice", 7, "back")
    # The next thing bob hears about alice is her custom status: no false "offline" in between.
    msg = await expect(bob, Command.CUSTOM_NOTIFY, timeout=10)
    pushed_after = time.monotonic() - recovered
    assert msg.data == {"userId": "alice", "customStatus": 7, "customText": "back", "version": 2}
    assert pushed_after < 2.0, f"working again {pushed_after:.2f} s after the failover, not within 2 s"
    assert (await expect(alice, Command.CUSTOM_NOTIFY_SYNC, timeout=10)).data["customText"] == "back"

    state = await facade.query_users(APP, ["alice", "bob"])
    assert state["alice"].status == 1 and state["bob"].status == 1, "sessions survive the failover"
    # Clients stayed connected: both still answer a PING on the same connection.
    alice.send(Command.PING)
    await expect(alice, Command.PING)
    await bob.send(Command.PING)
    await expect(bob, Command.PING)

    # No live gateway reaped: wait until both may judge peers again, then let each run a reaper round.
    deadline = time.monotonic() + 30
    while not (a.hub.keeper.may_judge() and b.hub.keeper.may_judge()):
        assert time.monotonic() < deadline, "heartbeats did not come back"
        await a.hub.keeper.beat()
        await b.hub.keeper.beat()
        await asyncio.sleep(0.1)
    assert await a.hub.keeper.reap() == 0 and await b.hub.keeper.reap() == 0
    assert set(await facade.expired_nodes(NODE_TTL)) == set()
    assert not alice.writer.is_closing()
    await alice.close()
    await bob.close()
    return pushed_after


async def test_cluster_primary_killed_sessions_survive_and_pushes_resume(
    cluster_with_replicas: Cluster, gateways, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = cluster_with_replicas
    a, b, facade = await gateways(cluster.url)
    doomed = cluster.primary_for(facade.user(APP, "alice").sessions)
    pushed_after = await _survives(doomed.kill, cluster.wait_ok, a, b, facade)
    with capsys.disabled():
        print(f"\ncluster failover: push delivered {pushed_after:.2f} s after cluster_state:ok")


async def test_sentinel_master_killed_sessions_survive_and_pushes_resume(
    sentinel_set: SentinelSet, gateways, capsys: pytest.CaptureFixture[str]
) -> None:
    sentinels = sentinel_set
    a, b, facade = await gateways(sentinels.url)
    old: Server = sentinels.master()

    def promoted() -> None:
        deadline = time.monotonic() + 30
        while sentinels.master() is old:
            assert time.monotonic() < deadline, "sentinels did not promote the replica"
            time.sleep(0.1)

    pushed_after = await _survives(old.kill, promoted, a, b, facade)
    with capsys.disabled():
        print(f"\nsentinel failover: push delivered {pushed_after:.2f} s after the new master was announced")


async def test_a_node_judges_peers_only_after_a_full_node_ttl_of_its_own_beats(facade: Presence) -> None:
    """Right after (re)connecting every peer's last beat looks old; reaping then would reap live nodes."""
    await facade.login(APP, "alice", 2, "phone", node_id="peer")
    await facade.redis.zadd(facade.keys.nodes, {"peer": 1})  # its last beat looks ancient
    keeper = NodeKeeper(facade, "me", node_ttl=0.5)
    await keeper.beat()
    assert await keeper.reap() == 0, "judged peers before its own beats were good for node_ttl"
    assert (await facade.query_users(APP, ["alice"]))["alice"].status == 1
    deadline = time.monotonic() + 10
    while not keeper.may_judge():
        assert time.monotonic() < deadline
        await keeper.beat()
        await asyncio.sleep(0.05)
    assert await keeper.reap() == 1
    assert (await facade.query_users(APP, ["alice"]))["alice"].status == 2


async def test_sentinel_function_flush_heals_on_the_next_login_and_healthz(sentinel_set: SentinelSet) -> None:
    """Issue 10 on Sentinel: a master that lost its functions gets the library back from the first call."""
    node = await start(
        Settings(
            redis_url=sentinel_set.url,
            tcp_port=free_port(),
            ws_port=0,
            http_port=free_port(),
            offline_grace=0,
            apps={APP: AppConfig(private_key=KEY)},
        )
    )
    try:
        with sentinel_set.master().client() as master:
            master.function_flush()
        alice = await TcpClient.connect(node.tcp_port)
        assert (await alice.login("alice")).command == Command.LOGINACK
        await alice.close()
        with sentinel_set.master().client() as master:
            master.function_flush()
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{node.http_port}/healthz") as resp,
            ):
                assert resp.status == 200
            assert master.function_list(library="presence"), "the library is back on the master"
    finally:
        await node.stop()
