"""The gateway end to end: real servers on free ports, real Redis, real TCP and WebSocket clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from presence import nodes
from presence.config import Settings
from presence.gateway.codec import HEADER, Command, encode_client_frame
from presence.gateway.hub import CLOCK_PROBE_MAX_RTT_S
from presence.inbox import EventId
from presence.server import Running
from presence.service import Presence
from tests.clients import APP, TcpClient, WsClient, expect, sign, ws_pack
from tests.conftest import MakeNode

WEB, IOS, ANDROID, WINDOWS, MAC = 1, 2, 3, 4, 5


async def friends_online(node: Running, facade: Presence) -> tuple[WsClient, TcpClient]:
    """bob (WebSocket) and alice (TCP), friends, both logged in; bob has seen alice come online."""
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port)
    await bob.login("bob")
    alice = await TcpClient.connect(node.tcp_port)
    await alice.login("alice")
    await expect(bob, Command.NOTIFY)
    return bob, alice


async def test_tcp_login_gets_loginack(make_node: MakeNode) -> None:
    node = await make_node()
    alice = await TcpClient.connect(node.tcp_port)
    ack = await alice.login("alice", lastEventId=None)  # null: no cursor yet, but report it
    assert ack.command == Command.LOGINACK and ack.data["userId"] == "alice"
    assert "-" in ack.data["lastEventId"] and "resumed" not in ack.data
    await alice.close()


@pytest.mark.parametrize("text", [True, False], ids=["ws-text", "ws-binary"])
async def test_friend_fanout_reaches_websocket_and_tcp(make_node: MakeNode, facade: Presence, text: bool) -> None:
    node = await make_node()
    await facade.import_friends(APP, "alice", ["bob", "carol"])
    bob = await WsClient.connect(node.ws_port, text=text)
    await bob.login("bob")
    carol = await TcpClient.connect(node.tcp_port)
    await carol.login("carol")
    alice = await TcpClient.connect(node.tcp_port, client_type=IOS, imei="alice-phone")
    await alice.login("alice")
    for client in (bob, carol):
        msg = await expect(client, Command.NOTIFY)
        assert msg.data["userId"] == "alice" and msg.data["status"] == 1
        assert msg.data["client"][0]["imei"] == "alice-phone"
    pack = (await asyncio.gather(alice.close(), expect(bob, Command.NOTIFY)))[1]
    assert pack.data["status"] == 2 and pack.data["client"] == []
    assert ws_pack(pack)["userId"] == "bob" and ws_pack(pack)["eventId"]
    await bob.close()
    await carol.close()


async def test_sync_goes_to_own_other_devices_not_the_origin(make_node: MakeNode) -> None:
    node = await make_node()
    phone = await TcpClient.connect(node.tcp_port, client_type=IOS, imei="phone")
    await phone.login("alice")
    pc = await WsClient.connect(node.ws_port, client_type=WINDOWS, imei="pc")
    await pc.login("alice")
    sync = await expect(phone, Command.NOTIFY_SYNC)
    assert {s["imei"] for s in sync.data["client"]} == {"phone", "pc"}
    # The origin gets nothing: the next thing it receives is the answer to its own PING.
    await pc.send(Command.PING)
    await expect(pc, Command.PING)
    await phone.close()
    await pc.close()


async def test_custom_status_4006_to_friends_4007_to_own_devices(make_node: MakeNode, facade: Presence) -> None:
    node = await make_node()
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port)
    await bob.login("bob")
    alice = await WsClient.connect(node.ws_port, client_type=IOS, imei="phone")
    await alice.login("alice")
    await expect(bob, Command.NOTIFY)
    await facade.set_custom_status(APP, "alice", 2, "lunch")
    custom = await expect(bob, Command.CUSTOM_NOTIFY)
    assert custom.data == {"userId": "alice", "customStatus": 2, "customText": "lunch", "version": 2}
    own = await expect(alice, Command.CUSTOM_NOTIFY_SYNC)
    assert own.data["customText"] == "lunch"
    await alice.close()
    await bob.close()


async def test_subscription_over_socket_notifies_until_expiry(
    make_node: MakeNode, facade: Presence, store_redis: Redis
) -> None:
    node = await make_node()
    carol = await WsClient.connect(node.ws_port)
    await carol.login("carol")
    await carol.send(Command.SUBSCRIBE, {"subUserId": ["alice", "dave"], "subTime": 60_000})
    reply = await expect(carol, Command.SUBSCRIBE)
    assert reply.data["code"] == 200 and reply.data["data"]["liveSubscriptions"] == 2
    alice = await TcpClient.connect(node.tcp_port)
    await alice.login("alice")
    assert (await expect(carol, Command.NOTIFY)).data["userId"] == "alice"
    # Expire carol's subscription to alice: alice's next change must not reach carol, dave's must.
    await store_redis.zadd(facade.user(APP, "alice").subscribers, {"carol": 1})
    await alice.close()
    dave = await TcpClient.connect(node.tcp_port)
    await dave.login("dave")
    assert (await expect(carol, Command.NOTIFY)).data["userId"] == "dave"
    await dave.close()
    await carol.close()


async def test_bad_socket_requests_get_rest_style_errors_and_keep_the_connection(make_node: MakeNode) -> None:
    node = await make_node()
    carol = await WsClient.connect(node.ws_port)
    await carol.login("carol")
    await carol.send(Command.SUBSCRIBE, {"subUserId": ["alice"], "subTime": 0})
    reply = await expect(carol, Command.SUBSCRIBE)
    assert reply.data["code"] == 90001 and "subTime must be between 1 and" in reply.data["msg"]
    await carol.send(Command.PULL, {"userList": ["x"] * 501})
    reply = await expect(carol, Command.PULL)
    assert reply.data["code"] == 90001 and "at most 500" in reply.data["msg"]
    await carol.send(Command.PULL, {"userList": ["carol"]})
    reply = await expect(carol, Command.PULL)
    assert reply.data["data"]["carol"]["status"] == 1
    await carol.close()


async def test_pull_friends_over_socket(make_node: MakeNode, facade: Presence) -> None:
    node = await make_node()
    await facade.import_friends(APP, "alice", ["bob", "carol"])
    alice = await TcpClient.connect(node.tcp_port)
    await alice.login("alice")
    alice.send(Command.PULL, {})
    reply = await expect(alice, Command.PULL)
    assert set(reply.data["data"]) == {"bob", "carol"} and reply.data["code"] == 200
    await alice.close()


@pytest.mark.parametrize(
    ("model", "first", "second", "kicked"),
    [
        (1, WEB, IOS, True),
        (2, IOS, WINDOWS, True),
        (2, IOS, WEB, False),
        (3, IOS, ANDROID, True),
        (3, IOS, MAC, False),
        (4, IOS, IOS, False),
    ],
)
async def test_multi_login_kicks_with_9002_then_closes(
    make_node: MakeNode, model: int, first: int, second: int, kicked: bool
) -> None:
    node = await make_node(login_model=model)
    a = await TcpClient.connect(node.tcp_port, client_type=first, imei="first")
    await a.login("alice")
    b = await WsClient.connect(node.ws_port, client_type=second, imei="second")
    await b.login("alice")
    if kicked:
        msg = await expect(a, Command.MUTUALLOGIN)
        assert msg.data["clientType"] == second and msg.data["imei"] == "second"
        assert await a.closed()
    else:
        assert (await expect(a, Command.NOTIFY_SYNC)).data["status"] == 1
        a.send(Command.PING)
        await expect(a, Command.PING)
    await a.close()
    await b.close()


async def test_heartbeat_timeout_closes_and_logs_out(make_node: MakeNode, facade: Presence) -> None:
    node = await make_node(heartbeat_timeout=0.6)
    bob, alice = await friends_online(node, facade)

    # bob keeps pinging; alice goes silent and is dropped.
    async def keep_alive() -> None:
        while True:
            await bob.send(Command.PING)
            await asyncio.sleep(0.2)

    pinger = asyncio.create_task(keep_alive())
    try:
        assert await alice.closed(timeout=5)
        while (msg := await bob.recv()).command == Command.PING:
            pass
        assert msg.command == Command.NOTIFY and msg.data["status"] == 2
    finally:
        pinger.cancel()
    await bob.close()


async def test_bad_sign_gets_readable_error_and_close(make_node: MakeNode) -> None:
    node = await make_node()
    c = await TcpClient.connect(node.tcp_port)
    c.send(Command.LOGIN, {"userId": "alice", "userSign": sign("mallory")})
    err = await expect(c, Command.ERROR)
    assert err.data["code"] == 60005 and "does not match" in err.data["msg"]
    assert await c.closed()
    w = await WsClient.connect(node.ws_port)
    await w.send(Command.LOGIN, {"userId": "alice", "userSign": sign("alice", key="wrong")})
    err = await expect(w, Command.ERROR)
    assert err.data["code"] == 60003
    await w.closed()
    await w.close()


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (HEADER.pack(9000, 1, 1, 0, APP, 500, 2) + b"x" * 502, "imeiLength 500"),
        (HEADER.pack(9000, 1, 1, 0, APP, 1, 70_000), "bodyLength"),
        (HEADER.pack(9000, 1, 1, 1, APP, 0, 0), "messageType"),
        (HEADER.pack(9000, 1, 1, 0, APP, 0, 5) + b"nope!", "JSON"),
    ],
)
async def test_malformed_frame_closes_only_that_connection(make_node: MakeNode, raw: bytes, fragment: str) -> None:
    node = await make_node()
    good = await TcpClient.connect(node.tcp_port, imei="good")
    await good.login("bob")
    bad = await TcpClient.connect(node.tcp_port, imei="bad")
    bad.send_raw(raw)
    err = await expect(bad, Command.ERROR)
    assert err.data["code"] == 90001 and fragment.lower() in err.data["msg"].lower()
    assert await bad.closed()
    good.send(Command.PING)
    await expect(good, Command.PING)
    await good.close()


async def test_malformed_first_text_message_gets_its_error_as_text(make_node: MakeNode) -> None:
    node = await make_node()
    bad = await WsClient.connect(node.ws_port, imei="bad")
    await bad.ws.send_str('{"command": 9000, "appId": "nope"}')
    msg = await bad.ws.receive(5)
    assert msg.type == aiohttp.WSMsgType.TEXT  # presence-client.js reads text messages only
    assert json.loads(msg.data)["data"]["code"] == 90001
    assert await bad.closed()
    await bad.close()


async def test_oversize_websocket_message_closes_only_that_connection(make_node: MakeNode) -> None:
    node = await make_node()
    good = await WsClient.connect(node.ws_port, imei="good")
    await good.login("bob")
    bad = await WsClient.connect(node.ws_port, imei="bad")
    await bad.ws.send_str("x" * 80_000)
    assert await bad.closed() == 1009  # message too big
    await bad.close()
    await good.send(Command.PING)
    await expect(good, Command.PING)
    await good.close()


async def test_frames_split_across_reads_and_batched_in_one_write(make_node: MakeNode) -> None:
    node = await make_node()
    c = await TcpClient.connect(node.tcp_port)
    login = encode_client_frame(
        Command.LOGIN, {"userId": "alice", "userSign": sign("alice"), "pong": True}, imei="tcp-1"
    )
    for i in range(len(login)):  # one byte at a time
        c.send_raw(login[i : i + 1])
        await c.writer.drain()
    await expect(c, Command.LOGINACK)
    c.send_raw(encode_client_frame(Command.PING, imei="tcp-1") * 3)
    for _ in range(3):
        await expect(c, Command.PING)
    await c.close()


async def test_commands_before_login_are_refused(make_node: MakeNode) -> None:
    node = await make_node()
    c = await TcpClient.connect(node.tcp_port)
    c.send(Command.PULL, {})
    err = await expect(c, Command.ERROR)
    assert "LOGIN" in err.data["msg"]
    assert await c.closed()


async def test_resume_replays_missed_entries_within_grace(make_node: MakeNode, facade: Presence) -> None:
    node = await make_node(offline_grace=30)
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    ack = await bob.login("bob", lastEventId=None)
    first = EventId.parse(ack.data["lastEventId"])  # the cursor: pushes come after it
    await facade.set_custom_status(APP, "alice", 1, "one")
    seen = await expect(bob, Command.CUSTOM_NOTIFY)
    assert EventId.parse(ws_pack(seen)["eventId"]) > first
    await bob.close()  # dropped: bob stays online for the grace
    await facade.set_custom_status(APP, "alice", 1, "two")
    await facade.set_custom_status(APP, "alice", 1, "three")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    ack = await bob.login("bob", lastEventId=ws_pack(seen)["eventId"])
    assert ack.data["resumed"] is True and ack.data["lastEventId"] == ws_pack(seen)["eventId"]
    missed = [await expect(bob, Command.CUSTOM_NOTIFY) for _ in range(2)]
    assert [m.data["customText"] for m in missed] == ["two", "three"]  # what it missed, not "one" again
    ids = [EventId.parse(ws_pack(m)["eventId"]) for m in missed]
    assert EventId.parse(ws_pack(seen)["eventId"]) < ids[0] < ids[1]
    await bob.close()


async def test_resume_after_more_changes_than_the_inbox_keeps_asks_for_a_pull(
    make_node: MakeNode, store_redis: Any
) -> None:
    """More changes than ``inbox_maxlen`` while the device is away: the oldest it missed were dropped, so
    LOGINACK says resumed:false (pull) and nothing old is replayed, although the session survived."""
    node = await make_node(offline_grace=30, inbox_maxlen=3)
    changes = Presence(store_redis, Settings(inbox_maxlen=3))
    await changes.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    await bob.login("bob", lastEventId=None)
    await changes.set_custom_status(APP, "alice", 1, "one")
    seen = await expect(bob, Command.CUSTOM_NOTIFY)
    await bob.close()  # dropped: bob stays online for the grace
    for text in ("two", "three", "four", "five"):  # "two" is dropped from the inbox of 3
        await changes.set_custom_status(APP, "alice", 1, text)
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    ack = await bob.login("bob", lastEventId=ws_pack(seen)["eventId"])
    assert ack.data["resumed"] is False and EventId.parse(ack.data["lastEventId"]) > EventId.parse(
        ws_pack(seen)["eventId"]
    )
    await changes.set_custom_status(APP, "alice", 1, "six")
    assert (await expect(bob, Command.CUSTOM_NOTIFY)).data["customText"] == "six"  # no replay of "three".."five"
    await bob.close()


async def test_resume_after_exactly_as_many_changes_as_the_inbox_keeps_replays_them_all(
    make_node: MakeNode, store_redis: Any
) -> None:
    """The reconnect's own kick entry (9002 for its dead predecessor) must not push out a push the device
    missed: ``inbox_maxlen`` missed pushes still resume, all of them replayed."""
    node = await make_node(offline_grace=30, inbox_maxlen=3)
    changes = Presence(store_redis, Settings(inbox_maxlen=3))
    await changes.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    await bob.login("bob", lastEventId=None)
    await changes.set_custom_status(APP, "alice", 1, "one")
    seen = await expect(bob, Command.CUSTOM_NOTIFY)
    await bob.close()  # dropped: bob stays online for the grace
    for text in ("two", "three", "four"):  # exactly what the inbox keeps
        await changes.set_custom_status(APP, "alice", 1, text)
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    ack = await bob.login("bob", lastEventId=ws_pack(seen)["eventId"])
    assert ack.data["resumed"] is True
    missed = [await expect(bob, Command.CUSTOM_NOTIFY) for _ in range(3)]
    assert [m.data["customText"] for m in missed] == ["two", "three", "four"]
    await bob.close()


async def test_resume_from_an_old_id_after_the_inbox_was_trimmed_empty_asks_for_a_pull(
    make_node: MakeNode, facade: Presence
) -> None:
    """The gateway trimmed the inbox empty and deleted it; the device comes back with an id older than what
    was trimmed (a saved cursor): its login's own kick entry makes a new inbox, which must not pass for one
    that lost nothing."""
    node = await make_node(offline_grace=30)
    await facade.add_friend(APP, "alice", "bob")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    await bob.login("bob", lastEventId=None)
    await facade.set_custom_status(APP, "alice", 1, "one")
    old = await expect(bob, Command.CUSTOM_NOTIFY)
    await facade.set_custom_status(APP, "alice", 1, "two")
    last = await expect(bob, Command.CUSTOM_NOTIFY)
    inbox = facade.keys.user(APP, "bob").inbox
    await node.hub.inboxes.trim({inbox: EventId.parse(ws_pack(last)["eventId"])}, window_ms=1)
    assert await facade.redis.exists(inbox) == 0, "trimmed empty and deleted"
    await bob.close()
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    ack = await bob.login("bob", lastEventId=ws_pack(old)["eventId"])  # "two" came after it, and is gone
    assert ack.data["resumed"] is False
    await bob.close()


async def test_resume_after_the_trim_dropped_what_the_device_missed_asks_for_a_pull(
    make_node: MakeNode, facade: Presence
) -> None:
    """bob's pc received what bob's tab missed, and the gateway's trim dropped it (entries every attached
    session received): the tab, back within the grace, is told to pull. The pc, back after the same trim,
    resumes with exactly what it missed."""
    node = await make_node(offline_grace=30)
    await facade.add_friend(APP, "alice", "bob")
    tab = await WsClient.connect(node.ws_port, imei="bob-tab")
    await tab.login("bob", lastEventId=None)
    pc = await WsClient.connect(node.ws_port, imei="bob-pc")
    await pc.login("bob", lastEventId=None)
    await expect(tab, Command.NOTIFY_SYNC)  # the pc came online
    await facade.set_custom_status(APP, "alice", 1, "one")
    tab_seen = await expect(tab, Command.CUSTOM_NOTIFY)
    await expect(pc, Command.CUSTOM_NOTIFY)
    await tab.close()  # dropped: the tab's session stays for the grace
    for text in ("two", "three"):
        await facade.set_custom_status(APP, "alice", 1, text)
    two, three = [await expect(pc, Command.CUSTOM_NOTIFY) for _ in range(2)]
    await asyncio.sleep(0.01)  # "one" and "two" are now older than a 1 ms window
    inbox = node.hub.inboxes.key(APP, "bob")
    await node.hub.inboxes.trim({inbox: EventId.parse(ws_pack(two)["eventId"])}, window_ms=1)  # the pc's received
    await pc.close()
    await facade.set_custom_status(APP, "alice", 1, "four")

    tab = await WsClient.connect(node.ws_port, imei="bob-tab")
    ack = await tab.login("bob", lastEventId=ws_pack(tab_seen)["eventId"])
    assert ack.data["resumed"] is False  # "two" is gone: the tab must pull
    pc = await WsClient.connect(node.ws_port, imei="bob-pc")
    ack = await pc.login("bob", lastEventId=ws_pack(two)["eventId"])
    assert ack.data["resumed"] is True and ack.data["lastEventId"] == ws_pack(two)["eventId"]
    missed = [await expect(pc, Command.CUSTOM_NOTIFY) for _ in range(2)]
    assert [m.data["customText"] for m in missed] == ["three", "four"]
    assert ws_pack(missed[0])["eventId"] == ws_pack(three)["eventId"]
    await tab.close()
    await pc.close()


async def test_resume_after_the_session_ended_asks_for_a_pull(make_node: MakeNode, facade: Presence) -> None:
    node = await make_node(offline_grace=0)
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    ack = await bob.login("bob", lastEventId=None)
    await bob.send(Command.LOGOUT)
    await bob.closed()
    await bob.close()
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    ack2 = await bob.login("bob", lastEventId=ack.data["lastEventId"])
    assert ack2.data["resumed"] is False
    await bob.close()


async def test_anti_flap_reconnect_within_grace_is_invisible_to_friends(make_node: MakeNode, facade: Presence) -> None:
    node = await make_node(offline_grace=30)
    await facade.import_friends(APP, "bob", ["alice", "dave"])
    bob = await WsClient.connect(node.ws_port)
    await bob.login("bob")
    alice = await TcpClient.connect(node.tcp_port, imei="alice-phone")
    await alice.login("alice")
    assert (await expect(bob, Command.NOTIFY)).data["userId"] == "alice"
    await alice.close()  # a mobile network drop, no LOGOUT
    alice = await TcpClient.connect(node.tcp_port, imei="alice-phone")
    await alice.login("alice")
    dave = await TcpClient.connect(node.tcp_port)
    await dave.login("dave")
    # Neither alice's offline nor a second online: the next thing bob hears is dave.
    assert (await expect(bob, Command.NOTIFY)).data["userId"] == "dave"
    for c in (alice, dave):
        await c.close()
    await bob.close()


async def test_drop_without_reconnect_is_announced_after_the_grace(make_node: MakeNode, facade: Presence) -> None:
    """Friends hear of the drop once the grace is over, and lastSeen is the drop (the evidence), not then.

    Both times are on the Redis clock: the push's eventId is when the logout was written, lastSeen the drop.
    """
    grace_ms = 500
    node = await make_node(offline_grace=grace_ms / 1000)
    bob, alice = await friends_online(node, facade)
    await alice.close()
    msg = await expect(bob, Command.NOTIFY)
    assert msg.data["userId"] == "alice" and msg.data["status"] == 2
    announced_ms = EventId.parse(ws_pack(msg)["eventId"]).ms
    last_seen = (await facade.query_users(APP, ["alice"]))["alice"].lastSeen
    # The drop's time is placed on the Redis clock within half a quick TIME round trip (hub.CLOCK_PROBE_MAX_RTT_S).
    assert last_seen is not None and announced_ms - last_seen >= grace_ms - CLOCK_PROBE_MAX_RTT_S * 1000 / 2
    await bob.close()


async def test_node_reaped_while_alive_keeps_its_clients_and_logs_them_in_again(
    make_node: MakeNode, facade: Presence, store_redis: Redis
) -> None:
    """Its clients are still connected: the node, finding its record gone at its next beat, logs their
    sessions in again under the same connections instead of closing them."""
    node = await make_node(node_ttl=0.5, node_id="sleepy")
    alice = await TcpClient.connect(node.tcp_port)
    await alice.login("alice")
    await facade.nodes.reap("sleepy")  # as a peer would after a long pause of this node
    assert (await facade.query_users(APP, ["alice"]))["alice"].status == 2
    deadline = asyncio.get_running_loop().time() + 5
    while (await facade.query_users(APP, ["alice"]))["alice"].status != 1:
        assert asyncio.get_running_loop().time() < deadline, "alice's session was not logged in again"
        await asyncio.sleep(0.05)
    alice.send(Command.PING)
    await expect(alice, Command.PING)  # the same connection
    assert await facade.nodes.session_count("sleepy") == 1, "recorded for the node again: a reaper finds it"
    await alice.close()


async def test_reconcile_logs_out_sessions_no_connection_holds(make_node: MakeNode, facade: Presence) -> None:
    """A logout lost to a Redis error is caught by the node's own reconciliation: no ghost online."""
    node = await make_node(node_id="keeper")
    alice = await TcpClient.connect(node.tcp_port)
    await alice.login("alice")
    await facade.login(APP, "ghost", IOS, "lost", conn_id="gone", node_id="keeper")  # its logout never came
    assert await node.hub.reconcile() == 0  # first sighting: maybe a login in flight
    assert await node.hub.reconcile() == 1
    state = await facade.query_users(APP, ["ghost", "alice"])
    assert state["ghost"].status == 2 and state["alice"].status == 1
    await alice.close()


async def test_reconcile_leaves_the_sessions_of_a_namesake_process(
    make_node: MakeNode, facade: Presence, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes beat one node id (got past the start-up claim): the set holds the other's sessions too,
    so reconciling logs none of them out while the namesake beats; once it stopped beating, they are stale."""
    monkeypatch.setattr(nodes, "SHARED_ID_HOLD_S", 0.5)
    node = await make_node(node_id="twin")
    await facade.login(APP, "carol", IOS, "pc", conn_id="namesake-conn", node_id="twin")  # held over there
    await facade.nodes.beat("twin", "namesake-incarnation")
    await node.hub.keeper.beat()  # sees the other incarnation's beat before its own
    assert node.hub.keeper.id_shared()
    assert await node.hub.reconcile() == 0
    assert await node.hub.reconcile() == 0
    assert (await facade.query_users(APP, ["carol"]))["carol"].status == 1
    while node.hub.keeper.id_shared():  # the namesake beats no more: the hold runs out
        await asyncio.sleep(0.05)
    assert await node.hub.reconcile() == 0  # first sighting
    assert await node.hub.reconcile() == 1
    assert (await facade.query_users(APP, ["carol"]))["carol"].status == 2


@pytest.mark.parametrize("text", [True, False], ids=["ws-text", "ws-binary"])
async def test_large_pull_reply_crosses_the_64k_websocket_frame_size(
    make_node: MakeNode, facade: Presence, text: bool
) -> None:
    """Pushes and replies are framed by us: a reply over 65,535 bytes needs the 8-byte length form."""
    node = await make_node()
    users = [f"user-with-a-long-name-{i:03d}" for i in range(500)]
    for user in users[:250]:
        await facade.set_custom_status(APP, user, 1, "x" * 100)
    carol = await WsClient.connect(node.ws_port, text=text)
    await carol.login("carol")
    await carol.send(Command.PULL, {"userList": users})
    reply = await expect(carol, Command.PULL)
    assert len(reply.data["data"]) == 500 and reply.data["data"][users[0]]["customText"] == "x" * 100
    assert len(json.dumps(reply.pack, separators=(",", ":"))) > 65_535
    await carol.close()
