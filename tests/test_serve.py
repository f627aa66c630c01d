"""`presence serve` as a process: crash and shutdown leave no ghost presence; embedded mode works; a node
releases what it started when it stops or fails to start; a node id is one live process's at a time."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis

from presence.config import AppConfig, Settings
from presence.gateway.codec import Command
from presence.keys import KeySchema
from presence.server import start
from presence.service import Presence
from presence.store import open_store
from tests.clients import APP, KEY, TcpClient, WsClient, expect, sign
from tests.conftest import MakeNode, free_port
from tests.redis_servers import SentinelSet
from tests.serve_process import ServeProcess, serve_until_exit


async def test_killed_node_sessions_go_offline_within_node_ttl(
    make_node: MakeNode, facade: Presence, store_url: str
) -> None:
    """A gateway killed with SIGKILL: a peer's reaper logs its users out; friends see "offline"."""
    await facade.add_friend(APP, "alice", "bob")
    survivor = await make_node(node_ttl=1.0)
    bob = await WsClient.connect(survivor.ws_port)
    await bob.login("bob")
    doomed = ServeProcess(["--redis", store_url, "--node-ttl", "1", "--offline-grace", "0", "--node-id", "doomed"])
    try:
        alice = await TcpClient.connect(doomed.tcp_port)
        await alice.login("alice")
        assert (await expect(bob, Command.NOTIFY)).data["status"] == 1
        doomed.kill()
        msg = await expect(bob, Command.NOTIFY, timeout=1.0 + 4.0)  # node_ttl plus a reaper round or two
        assert msg.data["userId"] == "alice" and msg.data["status"] == 2
        assert (await facade.query_users(APP, ["alice"]))["alice"].status == 2
        assert await facade.nodes.session_count("doomed") == 0
    finally:
        doomed.kill()
    await bob.close()


async def rest_query(node: ServeProcess, key: str, user: str) -> dict[str, Any]:
    """queryUserOnlineStatus over real HTTP, signed as admin with the given app key."""
    params = {"appId": str(APP), "identifier": "admin", "userSign": sign("admin", key)}
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{node.http_port}/v1/user/queryUserOnlineStatus"
        async with http.post(url, params=params, json={"userList": [user]}) as resp:
            assert resp.status == 200
            return (await resp.json())["data"][user]


@pytest.mark.parametrize("store", ["embedded", "redis"])
async def test_serve_answers_rest_tcp_and_websocket(store: str, request: pytest.FixtureRequest) -> None:
    if store == "embedded":
        node = ServeProcess([], env={})  # no Redis URL, no app: embedded store in dev mode
    else:
        node = ServeProcess(["--redis", request.getfixturevalue("redis_url")])
    try:
        if store == "embedded":
            assert "embedded in-process store" in node.output()
            key = node.dev_key()
        else:
            key = KEY
        alice = await TcpClient.connect(node.tcp_port)
        ack = await alice.login("alice", key=key)
        assert ack.command == Command.LOGINACK
        bob = await WsClient.connect(node.ws_port)
        await bob.login("bob", key=key)
        await bob.send(Command.PULL, {"userList": ["alice"]})
        reply = await expect(bob, Command.PULL)
        assert reply.data["data"]["alice"]["status"] == 1
        assert (await rest_query(node, key, "alice"))["status"] == 1
        await alice.close()
        await bob.close()
    finally:
        node.signal(signal.SIGTERM)
        assert node.wait() == 0


async def test_connection_pool_waits_instead_of_failing(store_url: str, store_redis: Any) -> None:
    """A burst bigger than the pool queues for a connection: no "Too many connections", no lost logout."""
    store = await open_store(store_url, max_connections=4)
    presence = Presence(store)
    users = [f"burst{i}" for i in range(300)]
    await asyncio.gather(*(presence.login(APP, u, 2, "d", node_id="burst") for u in users))
    await asyncio.gather(*(presence.logout(APP, u, 2, "d") for u in users))
    assert all(s.status == 2 for s in (await presence.query_users(APP, users)).values())
    await store.aclose()


async def rest(node: ServeProcess, path: str, user: str, body: dict[str, Any]) -> Any:
    params = {"appId": str(APP), "identifier": user, "userSign": sign(user)}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{node.http_port}{path}", params=params, json=body) as resp:
            env = await resp.json()
            assert resp.status == 200 and env["code"] == 200, env
            return env["data"]


async def test_two_gateways_on_a_cluster_from_one_node_url(cluster: Any, cluster_redis: Any) -> None:
    """The issue's "done when": two `presence serve` given a plain redis:// URL of one cluster node."""
    url = cluster.nodes[1].url
    one = ServeProcess(["--redis", url, "--node-ttl", "1", "--offline-grace", "0", "--node-id", "gw-one"])
    two = ServeProcess(["--redis", url, "--node-ttl", "1", "--offline-grace", "0", "--node-id", "gw-two"])
    try:
        one.wait_for_line("redis store: cluster, 3 primaries")
        await rest(one, "/v1/friendship/addFriend", "admin", {"fromId": "alice", "toItem": {"toId": "bob"}})
        bob = await WsClient.connect(one.ws_port)
        await bob.login("bob")
        carol = await TcpClient.connect(one.tcp_port)
        await carol.login("carol")
        body = {"subUserId": ["alice", "dave"], "subTime": 60_000}
        sub = await rest(one, "/v1/user/subscribeUserOnlineStatus", "carol", body)
        assert sub["liveSubscriptions"] == 2
        alice = await TcpClient.connect(two.tcp_port)  # on the other gateway
        await alice.login("alice")
        for client in (bob, carol):  # fan-out across gateways: friend and subscriber
            assert (await expect(client, Command.NOTIFY)).data["userId"] == "alice"
        await rest(two, "/v1/user/setUserCustomerStatus", "alice", {"customStatus": 3, "customText": "away"})
        for client in (bob, carol):
            assert (await expect(client, Command.CUSTOM_NOTIFY)).data["customText"] == "away"
        users = ["alice", "bob", "carol", *(f"u{i}" for i in range(497))]
        state = await rest(two, "/v1/user/queryUserOnlineStatus", "admin", {"userList": users})
        assert len(state) == 500 and state["alice"]["customText"] == "away" and state["u0"]["status"] == 2
        assert [state[u]["status"] for u in ("alice", "bob", "carol")] == [1, 1, 1]

        # carol's subscription to alice expires (its score is its expiry): alice's next change reaches
        # bob, not carol; carol's next push is dave's login, through her live subscription to him.
        await cluster_redis.zadd(KeySchema().user(APP, "alice").subscribers, {"carol": 1})
        await rest(two, "/v1/user/setUserCustomerStatus", "alice", {"customStatus": 4, "customText": "gone"})
        assert (await expect(bob, Command.CUSTOM_NOTIFY)).data["customText"] == "gone"
        dave = await TcpClient.connect(two.tcp_port)
        await dave.login("dave")
        assert (await expect(carol, Command.NOTIFY)).data["userId"] == "dave"

        two.kill()  # SIGKILL: gateway one's reaper logs alice and dave out within node_ttl (plus a round or two)
        for client, user in ((bob, "alice"), (carol, "dave")):
            msg = await expect(client, Command.NOTIFY, timeout=1.0 + 4.0)
            assert msg.data["userId"] == user and msg.data["status"] == 2
        await bob.close()
        await carol.close()
    finally:
        two.kill()
        one.signal(signal.SIGTERM)
        assert one.wait() == 0


def _new_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Tasks started since ``before`` that are still running (this test's own task aside)."""
    return {t for t in asyncio.all_tasks() if t not in before and t is not asyncio.current_task() and not t.done()}


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _node_settings(redis_url: str, **overrides: Any) -> Settings:
    apps = {APP: AppConfig(private_key=KEY, webhook_urls=("http://127.0.0.1:9/hook",))}  # a webhook worker too
    ports = {"tcp_port": free_port(), "ws_port": free_port(), "http_port": free_port()}
    return Settings(redis_url=redis_url, offline_grace=0, apps=apps, **{**ports, **overrides})


async def test_stop_closes_the_listeners_and_ends_every_background_task(real_redis: Any, redis_url: str) -> None:
    """The node app's cleanup_ctx releases what it started: listeners, hub and webhook tasks, the store."""
    before = set(asyncio.all_tasks())
    node = await start(_node_settings(redis_url), ready_line=False)
    assert node.webhooks is not None and _new_tasks(before), "a started node runs background tasks"
    alice = await TcpClient.connect(node.tcp_port)
    await alice.login("alice")
    await node.stop()
    assert await asyncio.wait_for(alice.reader.read(), 5) == b"", "the hub closed its connection"
    assert all(_refused(port) for port in (node.tcp_port, node.ws_port, node.http_port))
    assert not _new_tasks(before)
    assert (await Presence(real_redis).query_users(APP, ["alice"]))["alice"].status == 2, "logged out at stop"


async def test_a_start_that_fails_releases_what_it_had_started(real_redis: Any, redis_url: str) -> None:
    """REST's port is taken: the start fails with the listener's error after TCP, WebSocket, the hub and the
    webhook worker started, and those are released again (the TCP port is free, no task is left)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = _node_settings(redis_url, http_port=taken.getsockname()[1])
        before = set(asyncio.all_tasks())
        with pytest.raises(OSError):
            await start(settings, ready_line=False)
    assert not _new_tasks(before)
    assert _refused(settings.tcp_port) and _refused(settings.ws_port)
    with socket.socket() as again:  # not held by a listener left behind
        again.bind(("127.0.0.1", settings.tcp_port))


# --- one live process per node id ---


@pytest.fixture(params=["standalone", "sentinel", "cluster"])
async def any_store(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Presence]]:
    """A flushed Redis URL of each kind (one server; a primary, a replica and three sentinels; a 3-primary
    cluster) and a facade on it."""
    sentinels = None
    if request.param == "sentinel":
        sentinels = SentinelSet()
        url = sentinels.url
    elif request.param == "cluster":
        cluster = request.getfixturevalue("cluster")
        cluster.flush()
        url = cluster.url
    else:
        url = request.getfixturevalue("redis_url")
        with redis.Redis.from_url(url) as client:
            client.flushall()
    store = await open_store(url)
    try:
        yield url, Presence(store)
    finally:
        await store.aclose()
        if sentinels is not None:
            sentinels.stop()


REFUSAL = re.compile(
    r"presence: node id 'twin' is in use: another process \(incarnation (?P<incarnation>[0-9a-f]{16})\) beat it "
    r"[0-9.]+ s ago, after this one started; give every process its own --node-id \(PRESENCE_NODE_ID\)"
)


async def test_a_second_process_under_a_live_node_id_refuses_to_start_and_the_first_serves_on(
    any_store: tuple[str, Presence],
) -> None:
    """Copy-pasted config: the second `presence serve --node-id twin` exits 2 with one line naming the node id;
    the first keeps running untouched: its users online, its node record its own, pushes flowing both ways."""
    url, facade = any_store
    args = ["--redis", url, "--offline-grace", "0", "--node-id", "twin"]
    await facade.add_friend(APP, "alice", "bob")
    first = ServeProcess(args)
    try:
        alice = await TcpClient.connect(first.tcp_port)
        await alice.login("alice")
        bob = await WsClient.connect(first.ws_port)
        await bob.login("bob")
        assert (await expect(alice, Command.NOTIFY)).data["userId"] == "bob"
        held = await facade.nodes.session_members("twin")
        assert len(held) == 2

        second = await asyncio.to_thread(serve_until_exit, args)
        assert second.returncode == 2, second.stderr
        refusal = REFUSAL.fullmatch(second.stderr.strip().splitlines()[-1])
        assert refusal, second.stderr
        assert "Traceback" not in second.stderr and "presence listening" not in second.stdout

        assert first.proc.poll() is None, "the first still runs"
        record, _ = await facade.nodes.last_record("twin")
        assert record is not None and record.incarnation == refusal["incarnation"], "the refusal names the first"
        assert await facade.nodes.session_members("twin") == held
        state = await facade.query_users(APP, ["alice", "bob"])
        assert state["alice"].status == 1 and state["bob"].status == 1
        await facade.set_custom_status(APP, "alice", 5, "still here")
        assert (await expect(bob, Command.CUSTOM_NOTIFY)).data["customText"] == "still here"
        assert (await expect(alice, Command.CUSTOM_NOTIFY_SYNC)).data["customText"] == "still here"
        await facade.set_custom_status(APP, "bob", 6, "me too")
        assert (await expect(alice, Command.CUSTOM_NOTIFY)).data["customText"] == "me too"
        assert (await expect(bob, Command.CUSTOM_NOTIFY_SYNC)).data["customText"] == "me too"
        assert "another process" not in first.output(), "the refused process never beat the first's id"
        await alice.close()
        await bob.close()
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait) == 0
    finally:
        first.kill()


async def test_a_restart_right_after_a_kill_waits_out_the_last_beat_and_logs_out_what_it_left(
    any_store: tuple[str, Presence],
) -> None:
    """kill -9, then the same node id again within node_ttl (no peer reaps it for 30 s): the new incarnation
    starts once the dead one's last beat proved to be its last, and logs out its sessions at once."""
    url, facade = any_store
    await facade.add_friend(APP, "alice", "bob")
    peer = ServeProcess(["--redis", url, "--node-ttl", "30", "--offline-grace", "0", "--node-id", "peer"])
    args = ["--redis", url, "--node-ttl", "30", "--offline-grace", "0", "--node-id", "twin"]
    first = ServeProcess(args)
    second = None
    try:
        bob = await WsClient.connect(peer.ws_port)
        await bob.login("bob")
        alice = await TcpClient.connect(first.tcp_port)
        await alice.login("alice")
        assert (await expect(bob, Command.NOTIFY)).data["status"] == 1
        dead, _ = await facade.nodes.last_record("twin")
        first.kill()

        second = ServeProcess(args)
        msg = await expect(bob, Command.NOTIFY, timeout=2.0)  # at its start, not after node_ttl
        assert msg.data["userId"] == "alice" and msg.data["status"] == 2
        second.wait_for_line(r"its last heartbeat is [0-9.]+ s old; waiting until it is 3\.0 s old")
        second.wait_for_line(r"new incarnation; 1 sessions of the predecessor")
        record, _ = await facade.nodes.last_record("twin")
        assert dead is not None and record is not None and record.incarnation != dead.incarnation
        alice = await TcpClient.connect(second.tcp_port)
        assert (await alice.login("alice")).command == Command.LOGINACK
        assert (await expect(bob, Command.NOTIFY)).data["status"] == 1
        await alice.close()
        await bob.close()
    finally:
        for proc in (first, second, peer):
            if proc is not None:
                proc.kill()
