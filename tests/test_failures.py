"""Issue 10 with real faults: Redis stalls (DEBUG SLEEP), loses its functions, restarts empty; gateways are
SIGKILLed and restarted under the same id, or SIGTERMed during a deploy. Friends end on the truth, nobody
is logged out by an outage, and lastSeen is the evidence."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from presence.errors import UnavailableError
from presence.gateway.codec import Command
from presence.gateway.hub import HANDOVER_CODE
from presence.service import Presence
from tests.clients import APP, Msg, TcpClient, WsClient, expect, sign, ws_pack
from tests.conftest import MakeNode, free_port
from tests.redis_servers import Server
from tests.serve_process import ServeProcess

Stall = Callable[[float], Awaitable[None]]


def primaries(store_url: str, request: pytest.FixtureRequest) -> list[redis.Redis]:
    """Sync clients of every primary behind ``store_url`` (the one server, or each cluster primary)."""
    if store_url == request.getfixturevalue("redis_url"):
        return [redis.Redis.from_url(store_url)]
    return [node.client() for node in request.getfixturevalue("cluster").primaries()]


@pytest.fixture
def stall(store_url: str, request: pytest.FixtureRequest) -> Stall:
    """``await stall(s)``: every primary runs DEBUG SLEEP s; returns once each of them is asleep."""

    async def run(seconds: float) -> None:
        clients = primaries(store_url, request)
        probes = []
        for client in clients:
            kw = client.connection_pool.connection_kwargs
            probes.append(
                redis.Redis(host=kw["host"], port=kw["port"], socket_timeout=0.1, retry=Retry(NoBackoff(), 0))
            )

        def sleep(client: redis.Redis) -> None:
            with client:
                client.execute_command("DEBUG", "SLEEP", seconds)

        for client in clients:
            asyncio.get_running_loop().run_in_executor(None, sleep, client)
        for probe in probes:  # asleep = a PING gets no answer in time
            deadline = time.monotonic() + 5
            while True:
                assert time.monotonic() < deadline, "DEBUG SLEEP did not stall the server"
                try:
                    await asyncio.to_thread(probe.ping)
                except redis.TimeoutError:
                    break
            probe.close()

    return run


async def messages_until(client: WsClient, done: Callable[[list[Any]], bool], timeout: float = 10) -> list[Any]:
    got: list[Any] = []
    while not done(got):
        got.append(await client.recv(timeout))
    return got


async def marker_is_next(facade: Presence, friend: WsClient, user: str, text: str) -> list[Any]:
    """A custom status change of ``user`` as a barrier: every push to ``friend`` before it."""
    await facade.set_custom_status(APP, user, 77, text)
    before: list[Msg] = []
    while True:
        msg = await friend.recv()
        if msg.command == Command.CUSTOM_NOTIFY and msg.data["customText"] == text:
            return before
        before.append(msg)


def offline(msgs: list[Any], user: str) -> list[Any]:
    return [m for m in msgs if m.command == Command.NOTIFY and m.data["userId"] == user and m.data["status"] == 2]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        await asyncio.sleep(0.05)


# --- stalls: applied means pushed ---


async def test_debug_sleep_longer_than_the_client_timeout_still_tells_friends(
    make_node: MakeNode, facade: Presence, stall: Stall
) -> None:
    """Redis sleeps 2 s, the gateway's calls time out after 0.5 s: the custom status and three drops the
    calls applied during the stall are each applied once and pushed to the friend."""
    node = await make_node(redis_timeout=0.5, redis_retry_for=10, node_ttl=1)
    drops = ["u1", "u2", "u3"]
    await facade.import_friends(APP, "bob", ["alice", *drops])
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    await bob.login("bob")
    conns = {}
    for user in ["alice", *drops]:
        conns[user] = await TcpClient.connect(node.tcp_port, imei=f"{user}-phone")
        await conns[user].login(user)
        await expect(bob, Command.NOTIFY)

    await stall(2.0)
    change = asyncio.ensure_future(node.presence.set_custom_status(APP, "alice", 4, "stalled"))
    for user in drops:
        await conns[user].close()
    await change

    def told(got: list[Any]) -> bool:
        custom = [m for m in got if m.command == Command.CUSTOM_NOTIFY and m.data["customText"] == "stalled"]
        return bool(custom) and all(offline(got, u) for u in drops)

    await messages_until(bob, told)
    state = await facade.query_users(APP, ["alice", *drops])
    assert state["alice"].version == 2, "the custom status was applied once (login 1, status 2)"
    for user in drops:
        assert state[user].status == 2 and state[user].version == 2, f"{user}'s logout was applied once"
    await conns["alice"].close()
    await bob.close()


async def test_a_login_slowed_by_a_stall_is_not_closed_for_silence(make_node: MakeNode, stall: Stall) -> None:
    """The client waits on us while its LOGIN is served: a Redis stall longer than the heartbeat timeout
    answers the LOGIN (no close for silence); the silence after the LOGINACK still closes the connection."""
    node = await make_node(heartbeat_timeout=0.3, redis_timeout=5)
    await stall(1.5)
    alice = await TcpClient.connect(node.tcp_port)
    ack = await alice.login("alice")
    assert ack.command == Command.LOGINACK
    assert await alice.closed(timeout=3), "the heartbeat timeout still applies once logged in"


async def test_a_login_told_failed_during_a_stall_leaves_no_session(
    make_node: MakeNode, facade: Presence, stall: Stall
) -> None:
    node = await make_node(redis_timeout=0.3, redis_retry_for=0.5, login_timeout=0)
    await stall(2.0)
    late = await TcpClient.connect(node.tcp_port, imei="late-phone")
    reply = await late.login("late")
    assert reply.command == Command.ERROR and reply.data["code"] == 90000
    assert await late.closed()

    async def gone() -> bool:
        return (await facade.query_users(APP, ["late"]))["late"].session == []

    await eventually(gone, 10, "the failed login's session removed")
    # (The node's own record of it may outlive it on a cluster; reconciliation drops that, and logging out
    # a session that does not exist changes nothing.)
    await late.close()


async def test_a_change_given_up_after_the_retry_window_is_still_pushed(
    make_node: MakeNode, facade: Presence, stall: Stall
) -> None:
    """Follow-up B: the stall outlasts redis_retry_for, the caller gets UnavailableError (REST: 503), but the
    change Redis applies at wake is pushed: the resolver replays the call (same op id) once Redis answers."""
    node = await make_node(redis_timeout=0.3, redis_retry_for=0.5)
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    await bob.login("bob")

    await stall(3.0)
    with pytest.raises(UnavailableError):
        await node.presence.set_custom_status(APP, "alice", 6, "given-up")
    assert len(node.presence.resolver) == 1, "the unknown outcome is kept for the resolver"

    def told(got: list[Any]) -> bool:
        return any(m.command == Command.CUSTOM_NOTIFY and m.data["customText"] == "given-up" for m in got)

    got = await messages_until(bob, told, timeout=10)
    assert got[-1].data["version"] == 1
    state = await facade.query_users(APP, ["alice"])
    assert state["alice"].version == 1, "applied once, however often it was sent"
    assert await node.presence.resolver.wait(5) and node.presence.resolver.resolved == 1
    await bob.close()


# One server: a 6 s freeze of every cluster primary (node timeout 1 s) is a cluster failure, not a stall.
@pytest.mark.parametrize("store_url", ["standalone"], indirect=True)
async def test_logouts_given_up_during_a_long_stall_are_applied_and_pushed_at_wake(
    make_node: MakeNode, facade: Presence, stall: Stall
) -> None:
    """Follow-up C: a LOGIN told 90000 and two drops during a stall much longer than the logouts' retries:
    at wake the resolver applies the logouts (not reconciliation, 30 s later) and the friend is told."""
    node = await make_node(redis_timeout=0.3, redis_retry_for=0.3, login_timeout=0)
    drops = ["u1", "u2"]
    await facade.import_friends(APP, "bob", ["late", *drops])
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    await bob.login("bob")
    conns = {}
    for user in drops:
        conns[user] = await TcpClient.connect(node.tcp_port, imei=f"{user}-phone")
        await conns[user].login(user)
        await expect(bob, Command.NOTIFY)

    await stall(6.0)  # longer than the gateway's old 5 logout attempts with their back-off
    late = await TcpClient.connect(node.tcp_port, imei="late-phone")
    reply = await late.login("late")
    assert reply.command == Command.ERROR and reply.data["code"] == 90000
    for user in drops:
        await conns[user].close()

    def told(got: list[Any]) -> bool:
        return all(offline(got, u) for u in drops)

    await messages_until(bob, told, timeout=12)

    async def gone() -> bool:
        state = await facade.query_users(APP, ["late", *drops])
        return all(state[u].session == [] for u in ["late", *drops])

    await eventually(gone, 5, "the failed login's and the drops' sessions removed")
    await late.close()
    await bob.close()


# --- no false reaping ---


async def test_a_redis_stall_longer_than_node_ttl_logs_nobody_out(
    make_node: MakeNode, facade: Presence, stall: Stall
) -> None:
    a = await make_node(node_id="gw-a", node_ttl=1, redis_timeout=0.5)
    b = await make_node(node_id="gw-b", node_ttl=1, redis_timeout=0.5)
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(b.ws_port, imei="bob-tab")
    await bob.login("bob")
    alice = await TcpClient.connect(a.tcp_port)
    await alice.login("alice")
    await expect(bob, Command.NOTIFY)

    await stall(2.5)  # every heartbeat is older than node_ttl when Redis wakes up

    async def both_judge() -> bool:
        return a.hub.keeper.may_judge() and b.hub.keeper.may_judge()

    await eventually(both_judge, 10, "both gateways judging peers again")
    assert await a.hub.keeper.reap() == 0 and await b.hub.keeper.reap() == 0
    assert offline(await marker_is_next(facade, bob, "alice", "after-stall"), "alice") == []
    state = await facade.query_users(APP, ["alice", "bob"])
    assert state["alice"].status == 1 and state["bob"].status == 1, "nobody was logged out"
    await alice.close()
    await bob.close()


# --- Redis loses its functions ---


async def test_function_flush_heals_on_the_next_call_of_every_kind(
    make_node: MakeNode, facade: Presence, store_url: str, request: pytest.FixtureRequest
) -> None:
    node = await make_node(http_port=free_port())

    def flush() -> None:
        for client in primaries(store_url, request):
            with client:
                client.function_flush()

    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    await bob.login("bob")

    flush()  # a login
    alice = await TcpClient.connect(node.tcp_port)
    assert (await alice.login("alice")).command == Command.LOGINACK
    assert (await expect(bob, Command.NOTIFY)).data["status"] == 1

    flush()  # a REST call
    params = {"appId": str(APP), "identifier": "alice", "userSign": sign("alice")}
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{node.http_port}/v1/user/setUserCustomerStatus"
        async with http.post(url, params=params, json={"customStatus": 3, "customText": "healed"}) as resp:
            assert resp.status == 200, await resp.text()
        assert (await expect(bob, Command.CUSTOM_NOTIFY)).data["customText"] == "healed"

        flush()  # /healthz (what a load balancer calls) loads it too
        async with http.get(f"http://127.0.0.1:{node.http_port}/healthz") as resp:
            assert resp.status == 200
    for client in primaries(store_url, request):
        with client:
            assert client.function_list(library="presence"), "the library is back on every primary"

    flush()  # heartbeats: a round succeeds and loads it
    await node.hub.keeper.beat()
    await alice.close()
    await bob.close()


@pytest.fixture
async def own_redis() -> AsyncIterator[Server]:
    """A redis-server of this test only (it is killed and restarted empty)."""
    server = Server()
    try:
        yield server
    finally:
        server.stop()


async def test_an_empty_redis_restart_heals_without_an_operator(own_redis: Server, make_node: MakeNode) -> None:
    """While Redis is down /healthz and REST answer 503 (system code); once it is back, empty: the library is
    loaded again, and the gateway, finding its node record gone, keeps its clients and logs their sessions
    in again (the same connections: no reconnect, friends see them online, pushes flow).

    Versions restarted with the data: a client of the resume protocol (its LOGIN carried lastEventId) is told
    so by an unasked LOGINACK with resumed false and the new cursor, before any push of the new versions; a
    seed client (no lastEventId) gets no frame it did not have before."""
    from presence.config import AppConfig, Settings
    from presence.server import start
    from tests.clients import KEY

    settings = Settings(
        redis_url=own_redis.url,
        tcp_port=free_port(),
        ws_port=free_port(),
        http_port=free_port(),
        node_ttl=1,
        offline_grace=0,
        redis_timeout=0.5,
        redis_retry_for=0.5,
        apps={APP: AppConfig(private_key=KEY, login_model=3)},
    )
    node = await start(settings)
    try:
        bob = await WsClient.connect(node.ws_port, imei="bob-tab")
        await bob.login("bob")
        # cleo speaks the resume protocol; ann's custom status reaches her as v1..v3 before Redis dies.
        cleo = await WsClient.connect(node.ws_port, imei="cleo-tab")
        assert set((await cleo.login("cleo", lastEventId=None)).data) == {"userId", "lastEventId"}
        await node.presence.add_friend(APP, "ann", "cleo")
        assert set((await expect(cleo, Command.FRIENDSHIP_NOTIFY)).data["friends"]) == {"ann"}
        seen = []
        for text in ("one", "two", "three"):
            await node.presence.set_custom_status(APP, "ann", 1, text)
            seen.append((await expect(cleo, Command.CUSTOM_NOTIFY)).data["version"])
        assert seen == sorted(seen) and len(set(seen)) == 3
        own_redis.kill()
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{node.http_port}"
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 503
            params = {"appId": str(APP), "identifier": "bob", "userSign": sign("bob")}
            async with http.post(f"{base}/v1/user/queryUserOnlineStatus", params=params, json={"userList": ["a"]}) as r:
                assert r.status == 503 and (await r.json())["code"] == 90000

            own_redis.start()  # same port, no data, no functions

            async def healthy() -> bool:
                async with http.get(f"{base}/healthz") as resp:
                    return resp.status == 200

            await eventually(healthy, 10, "/healthz 200 again")

            async def bob_online() -> bool:
                return (await node.presence.query_users(APP, ["bob"]))["bob"].status == 1

            await eventually(bob_online, 10, "bob's session logged in again by the gateway")
        reset = await expect(cleo, Command.LOGINACK)  # unasked: the server's state of her was lost
        assert reset.data == {"userId": "cleo", "lastEventId": reset.data["lastEventId"], "resumed": False}
        await node.presence.add_friend(APP, "alice", "bob")
        # The next frame (no LOGINACK before it): the seed's protocol has no second LOGINACK.
        friendship = await expect(bob, Command.FRIENDSHIP_NOTIFY)  # the same connection, still logged in
        assert friendship.data["action"] == "add" and set(friendship.data["friends"]) == {"alice"}
        # Pushes flow after the new cursor, with versions that restarted below what cleo saw.
        await node.presence.add_friend(APP, "ann", "cleo")
        again = await expect(cleo, Command.FRIENDSHIP_NOTIFY)
        assert set(again.data["friends"]) == {"ann"} and ws_pack(again)["eventId"] > reset.data["lastEventId"]
        await node.presence.set_custom_status(APP, "ann", 1, "after")
        custom = await expect(cleo, Command.CUSTOM_NOTIFY)
        assert custom.data["customText"] == "after" and custom.data["version"] <= seen[0]
        await cleo.close()
        alice = await TcpClient.connect(node.tcp_port)
        assert (await alice.login("alice")).command == Command.LOGINACK
        assert (await expect(bob, Command.NOTIFY)).data["userId"] == "alice"
        await alice.close()
        await bob.close()
    finally:
        await node.stop()


# --- restarts under the same node id, and deploys ---


async def test_restart_under_the_same_node_id_logs_out_the_predecessors_sessions(
    make_node: MakeNode, facade: Presence, store_url: str
) -> None:
    peer = await make_node()
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(peer.ws_port, imei="bob-tab")
    await bob.login("bob")
    args = ["--redis", store_url, "--node-ttl", "30", "--offline-grace", "0", "--node-id", "phoenix"]
    first = ServeProcess(args)
    try:
        alice = await TcpClient.connect(first.tcp_port)
        await alice.login("alice")
        await expect(bob, Command.NOTIFY)
        first.kill()
        last_beat = await facade.nodes.last_beat("phoenix")
        second = ServeProcess(args)  # within node_ttl: no peer would reap it for 30 s
        try:
            msg = await expect(bob, Command.NOTIFY, timeout=1.0)  # within 1 s of the start
            assert msg.data["userId"] == "alice" and msg.data["status"] == 2
            last_seen = (await facade.query_users(APP, ["alice"]))["alice"].lastSeen
            assert last_beat is not None and last_seen is not None and abs(last_seen - last_beat) < 1000
        finally:
            second.kill()
    finally:
        first.kill()
    await bob.close()


async def test_restart_under_the_same_node_id_with_the_device_back_within_the_grace_shows_nothing(
    make_node: MakeNode, facade: Presence, store_url: str
) -> None:
    peer = await make_node()
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(peer.ws_port, imei="bob-tab")
    await bob.login("bob")
    args = ["--redis", store_url, "--node-ttl", "30", "--offline-grace", "3", "--node-id", "phoenix"]
    first = ServeProcess(args)
    second = None
    try:
        alice = await TcpClient.connect(first.tcp_port, imei="phone")
        await alice.login("alice")
        await expect(bob, Command.NOTIFY)
        old = await facade.nodes.session_members("phoenix")
        first.kill()
        second = ServeProcess(args)
        alice = await TcpClient.connect(second.tcp_port, imei="phone")
        assert (await alice.login("alice")).command == Command.LOGINACK

        async def predecessor_done() -> bool:
            return not (old & await facade.nodes.session_members("phoenix"))

        await eventually(predecessor_done, 10, "the predecessor's sessions handled")
        assert await marker_is_next(facade, bob, "alice", "same-device") == [], "friends saw nothing"
        assert (await facade.query_users(APP, ["alice"]))["alice"].status == 1
        await alice.close()
    finally:
        first.kill()
        if second is not None:
            second.kill()
    await bob.close()


async def test_sigterm_hands_sessions_over_to_another_gateway(
    make_node: MakeNode, facade: Presence, store_url: str
) -> None:
    """A deploy: alice reconnects to another gateway within the grace and resumes (the push she missed is
    replayed); friends see nothing of her. Dave does not come back: offline after the grace, lastSeen = close."""
    peer = await make_node()
    await facade.import_friends(APP, "bob", ["alice", "dave"])
    await facade.add_friend(APP, "alice", "carol")
    bob = await WsClient.connect(peer.ws_port, imei="bob-tab")
    await bob.login("bob")
    leaving = ServeProcess(["--redis", store_url, "--offline-grace", "2", "--node-id", "leaving"])
    try:
        alice = await WsClient.connect(leaving.ws_port, imei="alice-tab")
        cursor = (await alice.login("alice", lastEventId=None)).data["lastEventId"]
        dave = await TcpClient.connect(leaving.tcp_port)
        await dave.login("dave")
        await messages_until(bob, lambda got: len(got) == 2)  # alice and dave online

        told_at = await facade.nodes.redis_time_ms()
        leaving.signal(signal.SIGTERM)
        assert await alice.closed() == HANDOVER_CODE
        await facade.set_custom_status(APP, "carol", 1, "missed")  # while alice is between gateways
        alice = await WsClient.connect(peer.ws_port, imei="alice-tab")
        ack = await alice.login("alice", lastEventId=cursor)
        assert ack.data["resumed"] is True
        assert (await expect(alice, Command.CUSTOM_NOTIFY)).data["customText"] == "missed"
        assert await asyncio.to_thread(leaving.wait) == 0

        before = await marker_is_next(facade, bob, "alice", "deployed")
        assert [m.data["userId"] for m in before] == ["dave"] and offline(before, "dave")
        state = await facade.query_users(APP, ["alice", "dave"])
        assert state["alice"].status == 1 and state["alice"].session[0].brokerId == peer.hub.node_id
        assert state["dave"].lastSeen is not None and abs(state["dave"].lastSeen - told_at) < 1000
        await alice.close()
    finally:
        leaving.kill()
    await bob.close()


# --- lastSeen is the evidence ---


@pytest.mark.parametrize("how", ["logout", "drop", "silent"])
async def test_last_seen_is_the_evidence(make_node: MakeNode, facade: Presence, how: str) -> None:
    """LOGOUT: its time. A drop: the close, not the end of the grace (1.5 s later). A silent connection:
    its last frame, not the heartbeat timeout plus grace (2.5 s later)."""
    node = await make_node(offline_grace=1.5, heartbeat_timeout=1.0)
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    await bob.login("bob")
    bob_pings = asyncio.ensure_future(_keep_alive(bob))
    try:
        alice = await TcpClient.connect(node.tcp_port)
        await alice.login("alice")
        await expect_data(bob, Command.NOTIFY)
        evidence = await facade.nodes.redis_time_ms()
        if how == "logout":
            alice.send(Command.LOGOUT)
        elif how == "drop":
            await alice.close()
        # "silent": alice sends nothing more
        msg = await expect_data(bob, Command.NOTIFY, timeout=10)
        assert msg.data["status"] == 2
        last_seen = (await facade.query_users(APP, ["alice"]))["alice"].lastSeen
        assert last_seen is not None and abs(last_seen - evidence) < 1000, (how, last_seen, evidence)
        await alice.close()
    finally:
        bob_pings.cancel()
    await bob.close()


async def test_last_seen_of_a_logout_during_a_stall_is_its_time_not_the_wake(
    make_node: MakeNode, facade: Presence, stall: Stall
) -> None:
    """Follow-up D: a LOGOUT sent while Redis sleeps 2.5 s runs at wake; lastSeen is still when it was sent
    (the gateway sends the evidence on the Redis clock, not as an age counted at execution)."""
    node = await make_node(redis_timeout=0.5, redis_retry_for=10)
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    await bob.login("bob")
    alice = await TcpClient.connect(node.tcp_port)
    await alice.login("alice")
    await expect_data(bob, Command.NOTIFY)
    base, base_mono = await facade.nodes.redis_time_ms(), time.monotonic()
    await stall(2.5)
    alice.send(Command.LOGOUT)
    evidence = base + (time.monotonic() - base_mono) * 1000
    msg = await expect_data(bob, Command.NOTIFY, timeout=10)
    assert msg.data["status"] == 2
    last_seen = (await facade.query_users(APP, ["alice"]))["alice"].lastSeen
    assert last_seen is not None and abs(last_seen - evidence) < 1000, (last_seen, evidence)
    await alice.close()
    await bob.close()


async def _keep_alive(client: WsClient) -> None:
    while True:
        await client.send(Command.PING)
        await asyncio.sleep(0.3)


async def expect_data(client: WsClient, command: int, timeout: float = 5) -> Any:
    """The next message of ``command``, skipping PING replies."""
    while True:
        msg = await client.recv(timeout)
        if msg.command != Command.PING:
            assert msg.command == command, msg
            return msg
