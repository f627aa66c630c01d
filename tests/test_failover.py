"""Failovers are a pause, not an outage: kill -9 a primary (Redis Cluster, Sentinel) with users online.

Real servers on free ports (tests/redis_servers.py). Each test: two gateways in this process, bob on
one and alice on the other, friends; the primary holding alice's keys is killed with SIGKILL. After the
replica is promoted: both sessions are still there, both clients are still connected, alice's next change
reaches bob, bob never heard a false "alice offline", and neither gateway was reaped.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio.connection import AbstractConnection

from presence.config import AppConfig, Settings
from presence.gateway.codec import Command
from presence.nodes import NodeKeeper
from presence.server import Running, start
from presence.service import Presence
from presence.store import open_store
from tests.clients import APP, KEY, Msg, TcpClient, WsClient, expect, sign
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


async def _gateway(url: str, node_id: str, **overrides: Any) -> Running:
    settings: dict[str, Any] = {
        "redis_url": url,
        "tcp_port": free_port(),
        "ws_port": free_port(),
        "http_port": free_port(),
        "node_id": node_id,
        "node_ttl": NODE_TTL,
        "offline_grace": 0,
        "apps": {APP: AppConfig(private_key=KEY)},
    }
    return await start(Settings(**(settings | overrides)))


@pytest.fixture
async def gateways() -> AsyncIterator[Callable[[str], Awaitable[tuple[Running, Running, Presence]]]]:
    running: list[Running] = []
    stores = []

    async def make(url: str, **overrides: Any) -> tuple[Running, Running, Presence]:
        a = await _gateway(url, "gw-a", **overrides)
        running.append(a)
        b = await _gateway(url, "gw-b", **overrides)
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
    assert set(await facade.nodes.expired(NODE_TTL)) == set()
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


# --- traffic DURING the failover: bounded in count and time ---

ROUNDS = 24  # REST status changes, one every 0.25 s, and as many PULLs, while the primary fails over
ROUND_GAP = 0.25


class Listener:
    """Everything one client hears, read in the background; a close or an ERROR is recorded, never skipped."""

    def __init__(self, client: TcpClient | WsClient) -> None:
        self.client = client
        self.heard: list[Msg] = []
        self.closed: str | None = None
        self._new = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.client.recv(timeout=3600)
                self.heard.append(msg)
                self._new.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the server closed the socket (or the read failed): a broken promise
            self.closed = repr(exc)
            self._new.set()

    def customs(self, command: int) -> list[int]:
        return [m.data["customStatus"] for m in self.heard if m.command == command]

    async def wait_for(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert self.closed is None, f"connection closed: {self.closed}"
            left = deadline - time.monotonic()
            assert left > 0, f"{what}: heard {[(m.command, m.data) for m in self.heard][-5:]}"
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _traffic_through_failover(
    kill: Callable[[], None], wait_recovered: Callable[[], None], a: Running, b: Running, facade: Presence
) -> None:
    """alice's REST status changes and dave's PULLs keep flowing while her primary fails over."""
    await facade.add_friend(APP, "alice", "bob")
    await facade.add_friend(APP, "alice", "carol")
    bob_ws = await WsClient.connect(a.ws_port)
    await bob_ws.login("bob")
    carol_tcp = await TcpClient.connect(b.tcp_port)
    await carol_tcp.login("carol")
    dave_tcp = await TcpClient.connect(a.tcp_port, imei="dave-1")
    await dave_tcp.login("dave")
    alice_tcp = await TcpClient.connect(b.tcp_port, imei="alice-1")
    await alice_tcp.login("alice")
    for friend in (bob_ws, carol_tcp):
        assert (await expect(friend, Command.NOTIFY)).data["status"] == 1
    bob, carol, alice = Listener(bob_ws), Listener(carol_tcp), Listener(alice_tcp)
    rest: list[tuple[int, int]] = []  # (customStatus, HTTP status)
    pulls: list[tuple[int, int | None]] = []  # (reply command, ERROR code or None)

    async def changes(http: aiohttp.ClientSession) -> None:
        params = {"appId": str(APP), "identifier": "alice", "userSign": sign("alice")}
        url = f"http://127.0.0.1:{a.http_port}/v1/user/setUserCustomerStatus"
        for i in range(1, ROUNDS + 1):
            async with http.post(url, params=params, json={"customStatus": i, "customText": f"c{i}"}) as resp:
                rest.append((i, resp.status))
            await asyncio.sleep(ROUND_GAP)

    async def pulling() -> None:
        for _ in range(ROUNDS):
            dave_tcp.send(Command.PULL, {"userList": ["alice", "bob"]})
            msg = await dave_tcp.recv(timeout=40)
            pulls.append((msg.command, msg.data.get("code") if msg.command == Command.ERROR else None))
            await asyncio.sleep(ROUND_GAP)

    kill()
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as http:
        await asyncio.wait_for(asyncio.gather(changes(http), pulling(), asyncio.to_thread(wait_recovered)), 90)
    took = time.monotonic() - started

    statuses = [status for _, status in rest]
    assert set(statuses) <= {200, 503}, f"REST during the failover: {statuses}"
    assert all(command in (Command.PULL, Command.ERROR) for command, _ in pulls), pulls
    assert all(code == 90000 for command, code in pulls if command == Command.ERROR), pulls
    applied = [i for i, status in rest if status == 200]
    assert applied and applied[-1] == ROUNDS, f"the service works again after the failover ({took:.1f} s): {rest}"
    # Applied means pushed: every change REST confirmed reaches every friend (and alice's own device).
    for who, listener, command in (
        ("bob", bob, Command.CUSTOM_NOTIFY),
        ("carol", carol, Command.CUSTOM_NOTIFY),
        ("alice", alice, Command.CUSTOM_NOTIFY_SYNC),
    ):

        def heard_all(listener: Listener = listener, command: int = command) -> bool:
            return set(applied) <= set(listener.customs(command))

        await listener.wait_for(heard_all, 10, f"{who} did not get every applied change {applied}")
    # No false offline, no ERROR, no close on any client.
    for listener in (bob, carol):
        assert not [m for m in listener.heard if m.command == Command.NOTIFY and m.data["status"] != 1]
    for listener in (bob, carol, alice):
        assert listener.closed is None and not [m for m in listener.heard if m.command == Command.ERROR]
        await listener.stop()
    for tcp in (carol_tcp, alice_tcp, dave_tcp):
        tcp.send(Command.PING)
        await expect(tcp, Command.PING)
    await bob_ws.send(Command.PING)
    await expect(bob_ws, Command.PING)
    state = await facade.query_users(APP, ["alice", "bob", "carol", "dave"])
    assert all(s.status == 1 for s in state.values()), "no session lost"
    for client in (alice_tcp, carol_tcp, dave_tcp, bob_ws):
        await client.close()


async def test_cluster_failover_with_traffic_running_no_500_no_close_every_applied_change_pushed(
    cluster_with_replicas: Cluster, gateways, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No retry path may fall back to asking a node for a command's keys (COMMAND GETKEYS), least of all
    # the dead one: the client knows every key's slot.
    getkeys: list[bytes] = []
    send = AbstractConnection.send_packed_command

    async def recording(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        data = command if isinstance(command, bytes | str) else b"".join(bytes(c) for c in command)
        if b"GETKEYS" in (data if isinstance(data, bytes) else data.encode()).upper():
            getkeys.append(bytes(data[:80]) if isinstance(data, bytes) else data[:80].encode())
        await send(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", recording)
    cluster = cluster_with_replicas
    a, b, facade = await gateways(cluster.url)
    doomed = cluster.primary_for(facade.user(APP, "alice").sessions)
    await _traffic_through_failover(doomed.kill, cluster.wait_ok, a, b, facade)
    assert getkeys == []


async def test_sentinel_failover_with_traffic_running_no_500_no_close_every_applied_change_pushed(
    sentinel_set: SentinelSet, gateways
) -> None:
    old = sentinel_set.master()

    def promoted() -> None:
        deadline = time.monotonic() + 30
        while sentinel_set.master() is old:
            assert time.monotonic() < deadline, "sentinels did not promote the replica"
            time.sleep(0.1)

    a, b, facade = await gateways(sentinel_set.url)
    await _traffic_through_failover(old.kill, promoted, a, b, facade)


# --- a node that hangs (SIGSTOP) instead of dying ---


@pytest.fixture
def frozen_server() -> Iterator[Server]:
    """A redis-server of this test only, frozen with SIGSTOP by the test (always thawed and stopped after)."""
    server = Server()
    try:
        yield server
    finally:
        thaw(server)
        server.stop()


def freeze(server: Server) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)


def thaw(server: Server) -> None:
    if server.proc is not None and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)


async def test_a_frozen_redis_gets_503_within_the_retry_window_not_the_socket_timeout(
    frozen_server: Server, gateways
) -> None:
    """redis_retry_for is a hard bound: a hung attempt (socket timeout 5 s) is cut off at the window's end."""
    a, _, _ = await gateways(frozen_server.url, redis_retry_for=1.5, redis_timeout=5)
    params = {"appId": str(APP), "identifier": "alice", "userSign": sign("alice")}
    url = f"http://127.0.0.1:{a.http_port}/v1/user/setUserCustomerStatus"
    freeze(frozen_server)
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            started = time.monotonic()
            async with http.post(url, params=params, json={"customStatus": 1}) as resp:
                took = time.monotonic() - started
                assert resp.status == 503 and (await resp.json())["code"] == 90000
            assert took < 1.5 + 1.0, f"503 after {took:.1f} s, past the 1.5 s retry window"
        thaw(frozen_server)
        async with http.post(url, params=params, json={"customStatus": 2}) as resp:
            assert resp.status == 200


async def test_socket_commands_and_a_login_during_an_outage_keep_the_connection(
    frozen_server: Server, gateways
) -> None:
    """A PULL that Redis cannot serve gets ERROR 90000 and the connection stays open (no false offline); a
    LOGIN waiting on Redis is not answered by the login deadline (90001: a browser would stop for good)."""
    a, _, facade = await gateways(frozen_server.url, redis_retry_for=2.5, login_timeout=1.0)
    bob = await TcpClient.connect(a.tcp_port)
    await bob.login("bob")
    freeze(frozen_server)
    bob.send(Command.PULL, {"userList": ["alice"]})
    error = await expect(bob, Command.ERROR, timeout=10)
    assert error.data["code"] == 90000 and error.data["command"] == Command.PULL
    late = await TcpClient.connect(a.tcp_port, imei="late-1")
    late.send(Command.LOGIN, {"userId": "carol", "userSign": sign("carol"), "pong": True})
    reply = await late.recv(timeout=10)  # after the retry window (2.5 s), not the login deadline (1 s)
    assert reply.command == Command.ERROR and reply.data["code"] == 90000, reply
    assert await late.closed(), "a failed LOGIN closes (the client reconnects: 90000 is retried)"
    thaw(frozen_server)
    bob.send(Command.PING)
    await expect(bob, Command.PING)
    bob.send(Command.PULL, {"userList": ["alice"]})
    assert (await expect(bob, Command.PULL)).data["code"] == 200
    assert (await facade.query_users(APP, ["bob"]))["bob"].status == 1, "no false offline"
    # A LOGIN sent while Redis is frozen for longer than the login deadline, answered once it thaws.
    freeze(frozen_server)
    slow = await TcpClient.connect(a.tcp_port, imei="slow-1")
    slow.send(Command.LOGIN, {"userId": "dave", "userSign": sign("dave"), "pong": True})
    await asyncio.sleep(1.6)  # longer than login_timeout (1 s), shorter than the retry window (2.5 s)
    thaw(frozen_server)
    assert (await slow.recv(timeout=10)).command == Command.LOGINACK
    for client in (bob, late, slow):
        await client.close()


async def test_cluster_primary_frozen_sessions_survive_and_pushes_resume(
    cluster_with_replicas: Cluster, gateways, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGSTOP, not SIGKILL: the doorbell subscription on the frozen node raises nothing; it is PINGed,
    given up and made again on the new primary, so the push comes within 2 s of cluster_state:ok."""
    cluster = cluster_with_replicas
    a, b, facade = await gateways(cluster.url)
    frozen = cluster.primary_for(facade.user(APP, "alice").sessions)
    try:
        pushed_after = await _survives(lambda: freeze(frozen), lambda: cluster.wait_ok(frozen=frozen), a, b, facade)
    finally:
        thaw(frozen)
    with capsys.disabled():
        print(f"\ncluster freeze: push delivered {pushed_after:.2f} s after cluster_state:ok")


# --- a primary without replicas dies, and comes back empty ---


@pytest.fixture
def bare_cluster() -> Iterator[Cluster]:
    c = Cluster(primaries=3, replicas=0, node_timeout_ms=1000)
    try:
        yield c
    finally:
        c.stop()


async def test_cluster_shard_down_healthz_stable_and_an_empty_restart_gets_its_sessions_back(
    bare_cluster: Cluster, gateways
) -> None:
    """/healthz names the shard that is down (200 degraded, every time, not flapping with the node asked) and
    is 503 only when no primary answers. A primary back empty (no persistence, no replica) lost its users'
    sessions: the gateway's reconciliation logs in again the sessions of its live connections."""
    cluster = bare_cluster
    a, b, facade = await gateways(cluster.url)
    alice = await TcpClient.connect(b.tcp_port, imei="alice-1")
    await alice.login("alice")
    doomed = cluster.primary_for(facade.user(APP, "alice").sessions)
    doomed.kill()
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            async with http.get(f"http://127.0.0.1:{a.http_port}/healthz") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "degraded", "unavailable": [f"127.0.0.1:{doomed.port}"]}
        doomed.start()  # same port and cluster config, no data: its slots are back, its sessions are not
        await asyncio.to_thread(cluster.wait_ok)
        async with http.get(f"http://127.0.0.1:{a.http_port}/healthz") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
    assert (await facade.query_users(APP, ["alice"]))["alice"].status == 2, "the empty restart lost her session"
    assert await b.hub.reassert() == 1
    assert (await facade.query_users(APP, ["alice"]))["alice"].status == 1
    assert await b.hub.reassert() == 0, "a session Redis holds is left alone"
    alice.send(Command.PULL, {"userList": ["alice"]})
    assert (await expect(alice, Command.PULL)).data["data"]["alice"]["status"] == 1
    await alice.close()
    for server in cluster.primaries():
        server.kill()
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{a.http_port}/healthz") as resp:
        assert resp.status == 503


async def test_stop_is_bounded_when_redis_is_away(frozen_server: Server) -> None:
    """Stopping (SIGTERM) while Redis hangs: each step waits at most a few seconds, not the retry window
    per logout; the node record stays, so a peer's reaper logs out what could not be."""
    node = await _gateway(frozen_server.url, "gw-stop", redis_retry_for=30)
    clients = [await TcpClient.connect(node.tcp_port, imei=f"dev-{i}") for i in range(3)]
    for i, client in enumerate(clients):
        await client.login(f"user{i}")
    freeze(frozen_server)
    started = time.monotonic()
    await node.stop()
    took = time.monotonic() - started
    assert took < 15, f"stop took {took:.1f} s with Redis away"
    thaw(frozen_server)
    with frozen_server.client() as direct:
        assert direct.zscore("presence:nodes", "gw-stop") is not None, "the record stays for a peer's reaper"
    for client in clients:
        await client.close()
