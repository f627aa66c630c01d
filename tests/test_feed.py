"""The change feed and the online counters, on one redis-server and on a 3-primary cluster.

Every change (login, a kick, logout with its reason, custom status, a node reaped) is one entry in the
app's feed shard of the user, in the user's order, with its version, device, reason and time; the
counters move in the same function call as the session they count.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from presence import functions
from presence.config import Settings
from presence.gateway.codec import Command
from presence.service import Presence
from tests.clients import APP, TcpClient, WsClient, expect, sign, stream_entries
from tests.conftest import MakeNode, free_port
from tests.serve_process import ServeProcess

FEED_MD = Path(__file__).resolve().parent.parent / "gateway" / "FEED.md"
API, WEB, IOS, ANDROID, WINDOWS = 0, 1, 2, 3, 4


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def entries(presence: Presence, user: str) -> list[dict[str, str]]:
    """The user's feed entries, in shard order, fields decoded."""
    shard = presence.keys.feed_shard(APP, presence.feed.shard_of(APP, user))
    out = []
    for _, fields in stream_entries(await presence.redis.xrange(shard)):
        entry = {_s(k): _s(v) for k, v in fields.items()}
        if entry["userId"] == user:
            out.append(entry)
    return out


def own_logout(p: Presence, user: str) -> functions.Call[functions.StatusChange]:
    """The user's own logout call (feed keys included, reason close) without the fan-out or the relay."""
    return functions.logout(
        p.user(APP, user),
        p.feed.feed_keys(APP, user),
        p.options,
        app_id=APP,
        user_id=user,
        client_type=IOS,
        imei="phone",
        reason="close",
    )


async def test_every_kind_of_change_is_one_entry_in_user_order(facade: Presence) -> None:
    p = facade
    await p.login(APP, "alice", IOS, "phone", node_id="n1", login_model=1)
    await p.login(APP, "alice", WINDOWS, "pc", node_id="n1", login_model=1)  # model 1 kicks the phone
    await p.set_custom_status(APP, "alice", 2, "busy")
    await p.login(APP, "alice", API, "tab", node_id="n1", login_model=1)  # WEBAPI kicks nobody
    await p.logout(APP, "alice", API, "tab", reason="timeout")
    await p.logout(APP, "alice", WINDOWS, "pc", reason="close")
    await p.login(APP, "alice", ANDROID, "a1", node_id="doomed")
    assert await p.nodes.reap("doomed") == 1
    got = await entries(p, "alice")
    assert [(e["event"], e["reason"], e["clientType"], e["imei"], e["status"], e["sessions"]) for e in got] == [
        ("login", "login", "2", "phone", "1", "1"),
        ("logout", "kicked", "2", "phone", "1", "0"),
        ("login", "login", "4", "pc", "1", "1"),
        ("status", "", "0", "", "1", "1"),
        ("login", "login", "0", "tab", "1", "2"),
        ("logout", "timeout", "0", "tab", "1", "1"),
        ("logout", "close", "4", "pc", "2", "0"),
        ("login", "login", "3", "a1", "1", "1"),
        ("logout", "reaped", "3", "a1", "2", "0"),
    ]
    assert got[3]["customStatus"] == "2" and got[3]["customText"] == "busy"
    assert all(e["appId"] == str(APP) for e in got)
    # The user's version after each change; the kick goes with the login that caused it.
    assert [int(e["version"]) for e in got] == [1, 2, 2, 3, 4, 5, 6, 7, 8]
    times = [int(e["time"]) for e in got]
    assert times == sorted(times) and times[0] > 1_600_000_000_000
    ids = [e["eventId"] for e in got]
    assert len(set(ids)) == len(ids) and all(i.startswith(f"{APP}:alice:") for i in ids)
    # Relayed entries leave the outbox: nothing waits there, and the empty stream expires soon.
    outbox = p.user(APP, "alice").outbox
    assert await p.redis.xlen(outbox) == 0 and 0 < await p.redis.pttl(outbox) <= 60_000


async def test_a_reconnect_of_the_same_device_is_no_entry(facade: Presence) -> None:
    await facade.login(APP, "bob", IOS, "phone", conn_id="c1")
    await facade.login(APP, "bob", IOS, "phone", conn_id="c2")  # the same device again: nobody is told
    assert [e["event"] for e in await entries(facade, "bob")] == ["login"]


async def test_an_entry_whose_relay_was_lost_goes_with_the_next_change_once(facade: Presence) -> None:
    """The caller died between the user's function and the relay: the outbox keeps the entry, the next
    change relays both in order; repeating a relay (a retry) appends nothing twice."""
    p = facade
    await p.login(APP, "carol", IOS, "phone")
    # Only the user's own call, as if the process died right after it.
    await p.fn.call(own_logout(p, "carol"))
    assert [e["event"] for e in await entries(p, "carol")] == ["login"]
    read = p.fn.batch()
    pending = p.feed.read_outbox(read, APP, "carol")
    await read.run()
    assert len(pending.result()) == 1
    await p.set_custom_status(APP, "carol", 1, "back")
    assert [(e["event"], e["reason"]) for e in await entries(p, "carol")] == [
        ("login", "login"),
        ("logout", "close"),
        ("status", ""),
    ]
    relay = p.feed.relay(APP, "carol", pending)  # the lost relay, repeated late: the cursor skips it
    assert relay is not None
    reply = await p.fn.call(relay.call)
    assert reply.appended == 0 and reply.cursor > _s(pending.result()[0][0])
    assert len(await entries(p, "carol")) == 3


async def test_online_counts_move_with_every_session(facade: Presence) -> None:
    p = facade
    assert (await p.counters.online_counts()).get(APP) is None
    await p.login(APP, "u1", IOS, "a")
    await p.login(APP, "u1", WEB, "b")
    await p.login(APP, "u2", IOS, "c")
    await p.login(APP, "u2", IOS, "c")  # a reconnect counts once
    await p.login(APP, "u3", WINDOWS, "d", login_model=1)
    await p.login(APP, "u3", ANDROID, "e", login_model=1)  # kicks d
    await p.login(APP + 1, "u1", IOS, "x")  # another app
    c = (await p.counters.online_counts())[APP]
    assert (c.onlineUsers, c.onlineSessions) == (3, 4)
    assert {k: v for k, v in c.sessionsByClientType.items() if v} == {"1": 1, "2": 2, "3": 1}
    await p.logout(APP, "u1", IOS, "a")
    await p.logout(APP, "u1", WEB, "b")
    await p.logout(APP, "u1", WEB, "b")  # a repeat changes nothing
    c = (await p.counters.online_counts())[APP]
    assert (c.onlineUsers, c.onlineSessions) == (2, 2)
    assert (await p.counters.online_counts())[APP + 1].onlineUsers == 1


def feed_example() -> str:
    block = FEED_MD.read_text().split("<!-- feed-example -->")[1].split("<!-- /feed-example -->")[0]
    return re.search(r"```sh\n(.*?)```", block, re.S).group(1)  # type: ignore[union-attr]


async def test_feed_md_consumer_group_example_runs(store_redis: Any, store_url: str) -> None:
    """gateway/FEED.md's redis-cli example, as printed (with -c on a cluster), reads alice's login."""
    p = Presence(store_redis, Settings())
    assert p.feed.shard_of(APP, "alice") == 3  # the example names shard 3
    await p.login(APP, "alice", IOS, "phone")
    await p.set_custom_status(APP, "alice", 1, "in a meeting")
    cli = f"redis-cli -u {store_url} " + ("" if not p.store.cluster else "-c ")
    script = feed_example().replace("redis-cli ", cli)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, check=True)
    lines = out.stdout.split("\n")
    assert "login" in lines and "in a meeting" in lines and "alice" in lines
    assert lines[lines.index("event") + 1] == "login"
    groups = await p.redis.xinfo_groups(p.keys.feed_shard(APP, 3))
    assert [(_s(g["name"]), g["pending"]) for g in groups] == [("analytics", 0)]  # read, then acknowledged


async def rest(port: int, path: str, user: str, body: dict[str, Any]) -> Any:
    params = {"appId": str(APP), "identifier": user, "userSign": sign(user)}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}{path}", params=params, json=body) as resp:
            env = await resp.json()
            assert resp.status == 200 and env["code"] == 200, env
            return env["data"]


async def test_online_count_is_exact_after_a_gateway_is_killed_and_reaped(
    make_node: MakeNode, facade: Presence, store_url: str
) -> None:
    await facade.import_friends(APP, "bob", ["alice", "carol"])
    survivor = await make_node(node_ttl=1.0, http_port=free_port())
    bob = await WsClient.connect(survivor.ws_port)  # WEB (1)
    await bob.login("bob")
    doomed = ServeProcess(["--redis", store_url, "--node-ttl", "1", "--offline-grace", "0", "--node-id", "doomed"])
    try:
        alice = await TcpClient.connect(doomed.tcp_port, client_type=IOS, imei="alice-phone")
        await alice.login("alice")
        carol = await TcpClient.connect(doomed.tcp_port, client_type=ANDROID, imei="carol-phone")
        await carol.login("carol")
        for _ in range(2):
            assert (await expect(bob, Command.NOTIFY)).data["status"] == 1
        count = await rest(survivor.http_port, "/v1/user/queryOnlineCount", "admin", {})
        assert count == {"onlineUsers": 3, "onlineSessions": 3, "sessionsByClientType": {"1": 1, "2": 1, "3": 1}}
        doomed.kill()  # SIGKILL: no logout from it; the survivor's reaper logs its sessions out
        gone = {(await expect(bob, Command.NOTIFY, timeout=5.0)).data["userId"] for _ in range(2)}
        assert gone == {"alice", "carol"}
        count = await rest(survivor.http_port, "/v1/user/queryOnlineCount", "admin", {})
        assert count["onlineUsers"] == 1 and count["onlineSessions"] == 1
        assert {k: v for k, v in count["sessionsByClientType"].items() if v} == {"1": 1}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{survivor.http_port}/metrics") as resp:
                text = await resp.text()
        assert f'presence_online_users{{app="{APP}"}} 1.0' in text
        assert f'presence_online_sessions{{app="{APP}",client_type="2"}} 0.0' in text
    finally:
        doomed.kill()
    await bob.close()


async def test_online_count_needs_an_app_admin(make_node: MakeNode) -> None:
    node = await make_node(http_port=free_port())
    params = {"appId": str(APP), "identifier": "alice", "userSign": sign("alice")}
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{node.http_port}/v1/user/queryOnlineCount"
        async with http.post(url, params=params, json={}) as resp:
            assert resp.status == 403 and "admin" in (await resp.json())["msg"]


async def test_the_outbox_sweep_relays_an_entry_whose_user_changes_no_more(facade: Presence) -> None:
    """The caller died after the user's own call and the user does nothing more: a gateway's periodic
    sweep (a SCAN over the outboxes, one step per primary per round) relays the entry."""
    p = facade
    await p.login(APP, "dora", IOS, "phone")
    keys = p.user(APP, "dora")
    await p.fn.call(own_logout(p, "dora"))
    assert [e["event"] for e in await entries(p, "dora")] == ["login"]
    cursors: dict[Any, int] = {}
    relayed = await p.feed.relay_outboxes(cursors)
    while any(cursors.values()):  # the rest of the SCAN pass
        relayed += await p.feed.relay_outboxes(cursors)
    assert relayed == 1
    assert [(e["event"], e["reason"]) for e in await entries(p, "dora")] == [("login", "login"), ("logout", "close")]
    assert await p.redis.xlen(keys.outbox) == 0
    assert await p.feed.relay_outboxes({}) == 0  # nothing twice
    assert len(await entries(p, "dora")) == 2
