"""One regression test per bug of the seed (shared PROTOCOL-NOTES.md, "The seed's bugs")."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from presence.auth import generate_user_sign
from presence.config import AppConfig, Settings
from presence.errors import ParamError
from presence.gateway.codec import Command
from presence.http import create_app
from presence.service import Presence
from tests.clients import APP, KEY, TcpClient, WsClient, expect
from tests.conftest import MakeNode

IOS = 2


async def test_subscribers_are_notified_and_their_entries_expire(presence: Presence) -> None:
    """Seed: subscribe wrote `subscribe:{id}`, dispatch read `subscribe{id}`: nobody notified, nothing expired."""
    await presence.login(APP, "carol", IOS, "c")
    await presence.subscribe(APP, "carol", ["alice"], 60_000)
    assert (await presence.login(APP, "alice", IOS, "a")).delivered == 1
    await presence.redis.zadd(presence.user(APP, "alice").subscribers, {"carol": 1})  # now expired
    assert (await presence.logout(APP, "alice", IOS, "a")).delivered == 0
    assert await presence.redis.zcard(presence.user(APP, "alice").subscribers) == 0


@pytest.mark.parametrize("sub_time", [0, -5])
async def test_non_positive_sub_time_is_a_parameter_error(presence: Presence, sub_time: int) -> None:
    """Seed: subTime <= 0 stored 0, which dispatch deleted: a subscription that silently did nothing."""
    with pytest.raises(ParamError, match="subTime must be between 1 and 2592000000 ms"):
        await presence.subscribe(APP, "carol", ["alice"], sub_time)
    assert await presence.redis.dbsize() == 0


async def test_custom_status_has_its_own_commands(make_node: MakeNode, facade: Presence) -> None:
    """Seed: custom status went out as 4004/4005, indistinguishable from online status."""
    node = await make_node()
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port)
    await bob.login("bob")
    alice = await WsClient.connect(node.ws_port, imei="tab")
    await alice.login("alice")
    await expect(bob, Command.NOTIFY)
    await facade.set_custom_status(APP, "alice", 1, "busy")
    assert (await bob.recv()).command == Command.CUSTOM_NOTIFY.value == 4006
    assert (await alice.recv()).command == Command.CUSTOM_NOTIFY_SYNC.value == 4007
    await alice.close()
    await bob.close()


async def test_heartbeat_timeout_fires(make_node: MakeNode) -> None:
    """Seed: the idle handler was commented out, so a silent client stayed forever."""
    node = await make_node(heartbeat_timeout=0.3)
    alice = await TcpClient.connect(node.tcp_port)
    await alice.login("alice")
    assert await alice.closed(timeout=3)


async def test_kicked_connection_is_closed(make_node: MakeNode) -> None:
    """Seed: a 9002 MUTUALLOGIN was sent but the kicked channel stayed open."""
    node = await make_node(login_model=1)
    first = await TcpClient.connect(node.tcp_port, imei="one")
    await first.login("alice")
    second = await TcpClient.connect(node.tcp_port, imei="two")
    await second.login("alice")
    await expect(first, Command.MUTUALLOGIN)
    assert await first.closed()


async def test_logout_emits_offline_once(make_node: MakeNode, facade: Presence) -> None:
    """Seed: LOGOUT and the channel close both sent "offline": friends got it twice."""
    node = await make_node()
    await facade.import_friends(APP, "bob", ["alice", "dave"])
    bob = await WsClient.connect(node.ws_port)
    await bob.login("bob")
    alice = await TcpClient.connect(node.tcp_port)
    await alice.login("alice")
    await expect(bob, Command.NOTIFY)
    alice.send(Command.LOGOUT)
    assert await alice.closed()
    assert (await expect(bob, Command.NOTIFY)).data["status"] == 2
    dave = await TcpClient.connect(node.tcp_port)
    await dave.login("dave")
    assert (await expect(bob, Command.NOTIFY)).data["userId"] == "dave"  # not a second "alice offline"


async def test_crashed_gateway_sessions_are_reaped(facade: Presence) -> None:
    """Seed: a crashed gateway left its sessions "online" forever (no TTL, no reaper)."""
    await facade.login(APP, "alice", IOS, "a", node_id="crashed")
    await facade.nodes.heartbeat("crashed")
    await facade.redis.zadd(facade.keys.nodes, {"crashed": 1})
    (dead,) = await facade.nodes.expired(10)
    assert await facade.nodes.reap(dead) == 1
    assert (await facade.query_users(APP, ["alice"]))["alice"].status == 2


async def test_subscription_pruning_is_by_score_not_a_scan(real_redis: Redis) -> None:
    """Seed: every change scanned the whole subscription hash; we prune a sorted set by expiry."""
    facade = Presence(real_redis)
    key = facade.user(APP, "alice").subscribers
    await real_redis.zadd(key, {f"old{i}": i for i in range(1, 1001)})
    await real_redis.zadd(key, {"live": 2**52})
    await real_redis.config_resetstat()
    result = await facade.set_custom_status(APP, "alice", 1, "x")
    stats = await real_redis.info("commandstats")
    assert stats["cmdstat_zremrangebyscore"]["calls"] == 1
    assert not {"cmdstat_hgetall", "cmdstat_hkeys", "cmdstat_hscan"} & set(stats)
    assert result.recipients == 1 and await real_redis.zcard(key) == 1
    assert await real_redis.type(key) == b"zset"


async def test_only_an_admin_sets_another_users_custom_status(real_redis: Redis) -> None:
    """Seed: setUserCustomerStatus took userId from the body, so anyone could set anyone's status."""
    settings = Settings(apps={APP: AppConfig(private_key=KEY)})
    presence = Presence(real_redis, settings)
    body = {"userId": "alice", "customStatus": 1, "customText": "pwned"}

    def as_user(user: str) -> dict[str, str]:
        return {"appId": str(APP), "identifier": user, "userSign": generate_user_sign(APP, KEY, user)}

    async with TestClient(TestServer(create_app(presence, settings), host="127.0.0.1", port=0)) as client:
        resp = await client.post("/v1/user/setUserCustomerStatus", params=as_user("mallory"), json=body)
        assert resp.status == 403 and (await resp.json())["code"] == 60006
        assert (await presence.query_users(APP, ["alice"]))["alice"].customText is None
        resp = await client.post("/v1/user/setUserCustomerStatus", params=as_user("admin"), json=body)
        assert resp.status == 200
    assert (await presence.query_users(APP, ["alice"]))["alice"].customText == "pwned"
