"""Friendship events (4010) to both sides, the subscribe snapshot and the subscription list (REST and socket).

On one redis-server and on a 3-primary cluster, through real gateways and real clients.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from presence.gateway.codec import Command
from presence.service import Presence
from tests.clients import APP, TcpClient, WsClient, expect, sign, ws_pack
from tests.conftest import MakeNode, free_port

IOS = 2


async def rest(port: int, path: str, user: str, body: dict[str, Any]) -> Any:
    params = {"appId": str(APP), "identifier": user, "userSign": sign(user)}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}{path}", params=params, json=body) as resp:
            env = await resp.json()
            assert resp.status == 200 and env["code"] == 200, env
            return env["data"]


async def test_add_import_and_delete_friend_push_4010_to_both_sides_with_status(make_node: MakeNode) -> None:
    node = await make_node(http_port=free_port())
    alice = await WsClient.connect(node.ws_port)
    await alice.login("alice")
    bob = await TcpClient.connect(node.tcp_port, client_type=IOS, imei="bob-phone")
    await bob.login("bob")
    await rest(node.http_port, "/v1/user/setUserCustomerStatus", "bob", {"customStatus": 1, "customText": "hi"})
    await expect(bob, Command.CUSTOM_NOTIFY_SYNC)  # set by REST: bob's device is told

    await rest(node.http_port, "/v1/friendship/addFriend", "admin", {"fromId": "alice", "toItem": {"toId": "bob"}})
    to_alice = await expect(alice, Command.FRIENDSHIP_NOTIFY)
    to_bob = await expect(bob, Command.FRIENDSHIP_NOTIFY)
    assert to_alice.data["action"] == "add" and set(to_alice.data["friends"]) == {"bob"}
    bob_now = to_alice.data["friends"]["bob"]
    assert bob_now["status"] == 1 and bob_now["customText"] == "hi"
    assert bob_now["session"][0]["imei"] == "bob-phone"
    assert to_bob.data["action"] == "add" and to_bob.data["friends"]["alice"]["status"] == 1
    assert ws_pack(to_alice)["userId"] == "alice"  # the WebSocket pack names its recipient

    # import: the owner gets one entry naming every new friend (offline ones too), each online new friend one
    # entry; alice, already bob's friend, is not re-announced (nothing changed for her)
    body = {"fromId": "bob", "friendItem": [{"toId": "carol"}, {"toId": "alice"}]}
    await rest(node.http_port, "/v1/friendship/importFriend", "admin", body)
    to_bob = await expect(bob, Command.FRIENDSHIP_NOTIFY)
    assert set(to_bob.data["friends"]) == {"carol"} and to_bob.data["friends"]["carol"]["status"] == 2

    await rest(node.http_port, "/v1/friendship/deleteFriend", "admin", {"fromId": "bob", "toId": "alice"})
    for client, other in ((alice, "bob"), (bob, "alice")):
        msg = await expect(client, Command.FRIENDSHIP_NOTIFY)  # alice's first 4010 since the add: not the import
        assert msg.data["action"] == "delete" and set(msg.data["friends"]) == {other}
    await alice.close()
    await bob.close()


async def test_friendship_calls_that_change_nothing_push_nothing(make_node: MakeNode) -> None:
    node = await make_node(http_port=free_port())
    alice = await WsClient.connect(node.ws_port)
    await alice.login("alice")
    bob = await TcpClient.connect(node.tcp_port, client_type=IOS, imei="bob-phone")
    await bob.login("bob")
    add = {"fromId": "alice", "toItem": {"toId": "bob"}}
    assert (await rest(node.http_port, "/v1/friendship/addFriend", "admin", add))["added"] == 1
    for client in (alice, bob):
        assert (await expect(client, Command.FRIENDSHIP_NOTIFY)).data["action"] == "add"
    # again: added 0, and an import naming bob again: no 4010 to anyone
    assert (await rest(node.http_port, "/v1/friendship/addFriend", "admin", add))["added"] == 0
    body = {"fromId": "bob", "friendItem": [{"toId": "alice"}]}
    await rest(node.http_port, "/v1/friendship/importFriend", "admin", body)
    delete = {"fromId": "bob", "toId": "alice"}
    assert (await rest(node.http_port, "/v1/friendship/deleteFriend", "admin", delete))["removed"] == 1
    for client in (alice, bob):  # the next 4010 each side gets is the delete: the repeats pushed nothing
        assert (await expect(client, Command.FRIENDSHIP_NOTIFY)).data["action"] == "delete"
    assert (await rest(node.http_port, "/v1/friendship/deleteFriend", "admin", delete))["removed"] == 0
    assert (await rest(node.http_port, "/v1/friendship/addFriend", "admin", add))["added"] == 1
    for client in (alice, bob):  # and the removed: 0 delete pushed nothing either
        assert (await expect(client, Command.FRIENDSHIP_NOTIFY)).data["action"] == "add"
    await alice.close()
    await bob.close()


async def test_subscribe_returns_the_targets_status_and_subscriptions_are_listed(
    make_node: MakeNode, facade: Presence
) -> None:
    node = await make_node(http_port=free_port())
    await facade.login(APP, "dave", IOS, "d-phone")
    await facade.set_custom_status(APP, "erin", 3, "away")
    body = {"subUserId": ["dave", "erin", "frank"], "subTime": 60_000}
    sub = await rest(node.http_port, "/v1/user/subscribeUserOnlineStatus", "carol", body)
    assert sub["liveSubscriptions"] == 3 and set(sub["users"]) == {"dave", "erin", "frank"}
    assert sub["users"]["dave"]["status"] == 1 and sub["users"]["dave"]["session"][0]["imei"] == "d-phone"
    assert sub["users"]["erin"] == {
        "session": [],
        "customStatus": 3,
        "customText": "away",
        "status": 2,
        "lastSeen": None,
        "version": 1,
    }
    # the same shape as a query
    query = await rest(node.http_port, "/v1/user/queryUserOnlineStatus", "carol", {"userList": ["dave", "erin"]})
    assert query == {u: sub["users"][u] for u in ("dave", "erin")}

    await rest(node.http_port, "/v1/user/subscribeUserOnlineStatus", "carol", {"subUserId": ["gina"], "subTime": 5000})
    listed = await rest(node.http_port, "/v1/user/querySubscriptions", "carol", {})
    assert [s["userId"] for s in listed["subscriptions"]] == ["gina", "dave", "erin", "frank"][:1] + sorted(
        ["dave", "erin", "frank"]
    )
    assert listed["subscriptions"][1]["expireAt"] == sub["expireAt"]
    assert listed["serverTime"] < listed["subscriptions"][0]["expireAt"] <= listed["serverTime"] + 5000
    # an expired one is not listed
    await facade.redis.zadd(facade.user(APP, "carol").subscriptions, {"gina": 1})
    listed = await rest(node.http_port, "/v1/user/querySubscriptions", "carol", {})
    assert "gina" not in [s["userId"] for s in listed["subscriptions"]] and len(listed["subscriptions"]) == 3


async def test_socket_subscribe_snapshot_and_4011_subscription_list(make_node: MakeNode, facade: Presence) -> None:
    node = await make_node()
    await facade.login(APP, "dave", IOS, "d-phone")
    carol = await WsClient.connect(node.ws_port)
    await carol.login("carol")
    await carol.send(Command.SUBSCRIBE, {"subUserId": ["dave", "frank"], "subTime": 60_000})
    reply = await expect(carol, Command.SUBSCRIBE)
    users = reply.data["data"]["users"]
    assert users["dave"]["status"] == 1 and users["frank"]["status"] == 2
    await carol.send(Command.QUERY_SUBSCRIPTIONS, {})
    listed = await expect(carol, Command.QUERY_SUBSCRIPTIONS)
    assert listed.data["code"] == 200
    subs = listed.data["data"]["subscriptions"]
    assert sorted(s["userId"] for s in subs) == ["dave", "frank"]
    assert {s["expireAt"] for s in subs} == {reply.data["data"]["expireAt"]}
    await carol.close()
