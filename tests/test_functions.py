"""The Redis Functions library, on a real redis-server and on fakeredis (the same assertions)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ResponseError

from presence import functions
from presence.errors import ParamError
from presence.keys import FeedKeys
from presence.library import ensure_library, library_source
from presence.models import (
    KickPack,
    Session,
    UserCustomStatusChangeNotifyPack,
    UserOnlineStatus,
    UserStatusChangeNotifyPack,
)
from presence.service import Presence
from tests.clients import stream_entries

APP = 10000
WEBAPI, WEB, IOS, ANDROID, WINDOWS, MAC = range(6)


async def login(
    p: Presence, user: str, ct: int = IOS, imei: str = "dev", *, model: int = 3, conn: str = "", node: str = "n1"
):
    return await p.login(APP, user, ct, imei, conn_id=conn or f"c-{user}-{ct}-{imei}", node_id=node, login_model=model)


async def inbox(p: Presence, user: str) -> list[dict[str, Any]]:
    entries = stream_entries(await p.redis.xrange(p.keys.user(APP, user).inbox))
    out = []
    for _, fields in entries:
        e: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items()}
        e["d"] = json.loads(e["d"])
        out.append(e)
    return out


async def test_library_loads_once_and_reports_version(any_redis: Redis) -> None:
    assert await ensure_library(any_redis) is False  # the fixture loaded this exact code already
    assert (await any_redis.fcall_ro("presence_version", 0)) == b"4.1.3"


async def test_login_writes_session_and_friend_gets_4004(presence: Presence) -> None:
    await presence.add_friend(APP, "alice", "bob")
    await login(presence, "bob")
    result = await login(presence, "alice")
    assert result.changed and result.recipients == 1 and result.delivered == 1
    (entry,) = await inbox(presence, "bob")
    assert entry["c"] == "4004"
    assert entry["d"]["userId"] == "alice" and entry["d"]["status"] == 1
    assert [s["imei"] for s in entry["d"]["client"]] == ["dev"]


async def test_fanout_skips_offline_recipients(presence: Presence) -> None:
    await presence.import_friends(APP, "alice", ["bob", "carol"])
    await login(presence, "bob")
    result = await login(presence, "alice")
    assert result.recipients == 2 and result.delivered == 1
    assert not await presence.redis.exists(presence.keys.user(APP, "carol").inbox)


async def test_sync_4005_goes_to_other_sessions_only(presence: Presence) -> None:
    await login(presence, "alice", IOS, "phone")
    await login(presence, "alice", WINDOWS, "pc")
    entries = await inbox(presence, "alice")
    assert [(e["c"], e.get("x")) for e in entries] == [("4005", f"c-alice-{WINDOWS}-pc")]
    assert {s["imei"] for s in entries[0]["d"]["client"]} == {"phone", "pc"}


async def test_logout_last_session_sets_last_seen_and_tells_friends_offline(presence: Presence) -> None:
    await presence.add_friend(APP, "alice", "bob")
    await login(presence, "bob")
    await login(presence, "alice")
    result = await presence.logout(APP, "alice", IOS, "dev", conn_id="c-alice-2-dev", node_id="n1")
    assert result.changed and result.delivered == 1
    last = (await inbox(presence, "bob"))[-1]
    assert last["c"] == "4004" and last["d"]["status"] == 2 and last["d"]["client"] == []
    status = (await presence.query_users(APP, ["alice"]))["alice"]
    assert status.status == 2 and status.lastSeen and status.session == []


async def test_late_logout_of_old_connection_keeps_newer_login(presence: Presence) -> None:
    await login(presence, "alice", conn="old")
    await login(presence, "alice", conn="new")
    result = await presence.logout(APP, "alice", IOS, "dev", conn_id="old")
    assert not result.changed
    (state,) = (await presence.query_users(APP, ["alice"])).values()
    assert state.status == 1 and state.session[0].connId == "new"


async def test_relogin_of_same_device_is_silent_for_friends_and_kicks_old_connection(presence: Presence) -> None:
    await presence.add_friend(APP, "alice", "bob")
    await login(presence, "bob")
    await login(presence, "alice", conn="old")
    before = len(await inbox(presence, "bob"))
    result = await login(presence, "alice", conn="new")
    assert not result.changed and result.kicked == 1
    assert len(await inbox(presence, "bob")) == before
    kick = (await inbox(presence, "alice"))[-1]
    assert kick["c"] == "9002" and kick["t"] == "old"


@pytest.mark.parametrize(
    ("model", "existing", "new", "kicked"),
    [
        (1, [WEB, IOS, WINDOWS], ANDROID, {WEB, IOS, WINDOWS}),
        (1, [WEBAPI], IOS, set()),
        (2, [WEB, IOS], WINDOWS, {IOS}),
        (2, [IOS, WINDOWS], WEB, set()),
        (3, [IOS, WINDOWS, WEB], ANDROID, {IOS}),
        (3, [IOS, WINDOWS, WEB], MAC, {WINDOWS}),
        (3, [IOS, WINDOWS], WEB, set()),
        (4, [WEB, IOS, ANDROID, WINDOWS, MAC], IOS, set()),
    ],
)
async def test_multi_login_models(
    presence: Presence, model: int, existing: list[int], new: int, kicked: set[int]
) -> None:
    for ct in existing:
        await login(presence, "alice", ct, f"old{ct}", model=4)  # build the state without kicks
    result = await login(presence, "alice", new, "newdev", model=model)
    assert result.kicked == len(kicked)
    entries = await inbox(presence, "alice")
    kicks = {e["t"] for e in entries if e["c"] == "9002"}
    assert kicks == {f"c-alice-{ct}-old{ct}" for ct in kicked}
    (state,) = (await presence.query_users(APP, ["alice"])).values()
    assert {s.clientType for s in state.session} == (set(existing) - kicked) | {new}


async def test_custom_status_4006_to_friends_and_4007_to_own_sessions(presence: Presence) -> None:
    await presence.add_friend(APP, "alice", "bob")
    await login(presence, "bob")
    await login(presence, "alice", IOS, "phone")
    await login(presence, "alice", WINDOWS, "pc")
    result = await presence.set_custom_status(APP, "alice", 3, "in a meeting", origin_conn_id="c-alice-2-phone")
    assert result.delivered == 1
    to_bob = (await inbox(presence, "bob"))[-1]
    assert to_bob["c"] == "4006"
    assert to_bob["d"] == {"userId": "alice", "customStatus": 3, "customText": "in a meeting", "version": 3}
    sync = (await inbox(presence, "alice"))[-1]
    assert sync["c"] == "4007" and sync["x"] == "c-alice-2-phone"
    state = (await presence.query_users(APP, ["alice"]))["alice"]
    assert (state.customStatus, state.customText) == (3, "in a meeting")


async def test_subscribers_are_notified_until_expiry(presence: Presence) -> None:
    await login(presence, "carol")
    await presence.subscribe(APP, "carol", ["alice"], 60_000)
    assert (await login(presence, "alice")).delivered == 1
    # An expired subscription is pruned by the next change instead of being notified.
    sub_key = presence.user(APP, "alice").subscribers
    await presence.redis.zadd(sub_key, {"carol": 1})
    result = await presence.logout(APP, "alice", IOS, "dev")
    assert result.recipients == 0 and result.delivered == 0
    assert await presence.redis.zcard(sub_key) == 0


async def test_resubscribe_overwrites_expiry(presence: Presence) -> None:
    first = await presence.subscribe(APP, "carol", ["alice"], 10_000)
    second = await presence.subscribe(APP, "carol", ["alice"], 1_000)
    assert second.expireAt < first.expireAt and second.liveSubscriptions == 1
    score = await presence.redis.zscore(presence.user(APP, "alice").subscribers, "carol")
    assert score is not None and int(score) == second.expireAt


async def test_live_subscription_cap_is_enforced_in_lua(any_redis: Redis, presence: Presence) -> None:
    index = presence.user(APP, "carol").subscriptions
    await presence.fn.call(functions.subscribe(index, "carol", [f"u{i}" for i in range(3)], 60_000, 3))
    with pytest.raises(ParamError, match="at most 3 live subscriptions"):
        await presence.fn.call(functions.subscribe(index, "carol", ["u9"], 60_000, 3))
    # Re-subscribing to a live target does not count twice.
    again = await presence.fn.call(functions.subscribe(index, "carol", ["u0"], 60_000, 3))
    assert again.live == 3


async def test_unsubscribe_removes_both_sides(presence: Presence) -> None:
    await presence.subscribe(APP, "carol", ["alice", "bob"], 60_000)
    assert await presence.unsubscribe(APP, "carol", ["alice"]) == 1
    assert await presence.redis.zrange(presence.user(APP, "carol").subscriptions, 0, -1) == [b"bob"]
    assert await presence.redis.zcard(presence.user(APP, "alice").subscribers) == 0


async def test_friends_are_mutual_and_removable(presence: Presence) -> None:
    assert await presence.import_friends(APP, "alice", ["bob", "carol"]) == 2
    assert await presence.redis.smembers(presence.user(APP, "bob").friends) == {b"alice"}
    assert await presence.delete_friend(APP, "bob", "alice") == 1
    assert await presence.redis.smembers(presence.user(APP, "alice").friends) == {b"carol"}


async def test_query_friends_returns_status_for_each_friend(presence: Presence) -> None:
    await presence.import_friends(APP, "alice", ["bob", "carol"])
    await login(presence, "bob")
    await presence.set_custom_status(APP, "carol", 1, "away")
    result = await presence.query_friends(APP, "alice")
    assert set(result) == {"bob", "carol"}
    assert result["bob"].status == 1 and result["bob"].session[0].userId == "bob"
    assert result["carol"].status == 2 and result["carol"].customText == "away"
    assert result["carol"].lastSeen is None


async def test_doorbell_published_once_per_node(presence: Presence) -> None:
    await presence.import_friends(APP, "alice", ["bob", "carol", "dave"])
    await login(presence, "bob", node="n1")
    await login(presence, "carol", node="n1")
    await login(presence, "dave", node="n2")
    pubsub = presence.redis.pubsub()
    await pubsub.subscribe(presence.keys.doorbell("n1"), presence.keys.doorbell("n2"))
    for _ in range(2):
        await pubsub.get_message(timeout=1)  # subscribe confirmations
    await login(presence, "alice", node="n3")
    got = {}
    for _ in range(2):
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        assert msg is not None
        got[msg["channel"].decode()] = set(json.loads(msg["data"]))  # a JSON array: no key byte can split it
    await pubsub.aclose()
    assert got == {
        presence.keys.doorbell("n1"): {presence.keys.user(APP, "bob").inbox, presence.keys.user(APP, "carol").inbox},
        presence.keys.doorbell("n2"): {presence.keys.user(APP, "dave").inbox},
    }


async def test_inbox_is_trimmed(any_redis: Redis) -> None:
    """The inbox keeps exactly the ``inbox_maxlen`` newest entries (the library drops the oldest itself and
    records the drop for resumes: tests/test_inbox.py), and expires."""
    from presence.config import Settings

    p = Presence(any_redis, Settings(inbox_maxlen=10))
    await p.add_friend(APP, "alice", "bob")
    await login(p, "bob")
    for i in range(300):
        await p.set_custom_status(APP, "alice", i, "")
    kept = [e["d"]["customStatus"] for e in await inbox(p, "bob")]
    assert kept == list(range(290, 300)), "the newest entries, in order; the oldest were dropped"
    assert await any_redis.pttl(p.keys.user(APP, "bob").inbox) > 0


async def test_reaper_logs_out_sessions_of_a_dead_node(presence: Presence) -> None:
    await presence.add_friend(APP, "alice", "bob")
    await login(presence, "bob", node="live")
    await login(presence, "alice", IOS, "phone", node="dead")
    await login(presence, "alice", WINDOWS, "pc", node="dead")
    assert await presence.nodes.heartbeat("dead") is False
    assert await presence.nodes.heartbeat("dead") is True
    await presence.redis.zadd(presence.keys.nodes, {"dead": 1})  # last beat long ago
    assert await presence.nodes.expired(10) == ["dead"]
    assert await presence.nodes.reap("dead") == 2
    assert (await presence.query_users(APP, ["alice"]))["alice"].status == 2
    assert (await inbox(presence, "bob"))[-1]["d"]["status"] == 2
    assert await presence.nodes.expired(10) == []
    assert await presence.nodes.session_count("dead") == 0


def _login(p: Presence, **overrides: Any) -> functions.Call[functions.StatusChange]:
    """presence_login of user "a" straight from the builder: no Python validation on the way."""
    args: dict[str, Any] = {"app_id": APP, "user_id": "a", "conn_id": "c", "client_type": 1, "imei": "i"}
    return functions.login(p.user(APP, "a"), None, p.options, **{**args, **overrides})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: _login(p, client_type=9), "clientType must be 0..5"),
        (lambda p: _login(p, login_model=7), "loginModel must be 1..4"),
        (lambda p: _login(p, user_id="a" * 65), "userId must be 1..64 bytes"),
        (lambda p: _login(p, imei="i" * 129), "imei must be 1..128 bytes"),
        (lambda p: _login(p, broker_id="node 1"), "brokerId must be"),
        (lambda p: _login(p, max_sessions=0), "max sessions must be at least 1"),
        (
            lambda p: functions.set_custom_status(
                p.user(APP, "a"), None, p.options, app_id=APP, user_id="a", custom_status=1, custom_text="x" * 101
            ),
            "customText must be at most 100 bytes",
        ),
        (
            lambda p: functions.logout(
                p.user(APP, "a"), None, p.options, app_id=APP, user_id="a|b", client_type=1, imei="i"
            ),
            "userId must be 1..64 bytes without",
        ),
        (
            lambda p: functions.subscribe(p.user(APP, "a").subscriptions, "a", ["b"], 0, 10),
            "subTime must be between 1 and 2592000000 ms",
        ),
        (lambda p: functions.friends_add([p.user(APP, "a").friends], [("a", "a")]), "toId must differ"),
        (lambda p: functions.node_heartbeat(p.keys.nodes, ""), "takes 1 key and a node id"),
        (lambda p: functions.node_heartbeat(p.keys.nodes, "a|b"), "node id"),  # login refuses it as brokerId
        (
            lambda p: functions.node_heartbeat(p.keys.nodes, "n1", p.keys.node_incarnations, ""),
            "or 2 keys, a node id and an incarnation",
        ),
    ],
)
async def test_library_rejects_bad_arguments_itself(
    presence: Presence, build: Callable[[Presence], functions.Call[Any]], message: str
) -> None:
    """Other services call the functions directly, so the library validates, not only Python."""
    with pytest.raises(ParamError, match=message):
        await presence.fn.call(build(presence))
    assert await presence.redis.dbsize() == 0  # nothing half-written


async def test_status_changes_reply_in_one_layout(presence: Presence) -> None:
    """presence_login, presence_logout and presence_set_custom_status all answer {changed, pack, version,
    online, inbox last id, kicked, recipients...}."""
    await presence.add_friend(APP, "alice", "bob")
    keys = presence.user(APP, "alice")

    async def raw(call: functions.Call[Any]) -> list[Any]:
        (reply,) = await presence.store.run([call.command()], raise_errors=True)
        return list(reply)

    def log_in(ct: int, imei: str, conn: str) -> functions.Call[functions.StatusChange]:
        return functions.login(
            keys, None, presence.options, app_id=APP, user_id="alice", conn_id=conn, client_type=ct, imei=imei
        )

    def log_out(imei: str) -> functions.Call[functions.StatusChange]:
        return functions.logout(
            keys, None, presence.options, app_id=APP, user_id="alice", client_type=IOS, imei=imei, conn_id=f"c-{imei}"
        )

    await raw(log_in(IOS, "phone", "c-phone"))
    login = await raw(log_in(WINDOWS, "pc", "c-pc"))  # the phone's session gets a 4005, written after the start
    assert login[0] == 1 and login[2:4] == [2, 1] and login[4] == b"0-0" and login[5:] == [0, b"bob"]
    (newest,) = stream_entries(await presence.redis.xrevrange(keys.inbox, count=1))
    relogin = await raw(log_in(WINDOWS, "pc", "c-pc-2"))  # a reconnect: no change for others, the old one kicked
    assert relogin[0] == 0 and relogin[2:4] == [2, 1] and relogin[5:] == [1]
    assert relogin[4] == newest[0], "the session starts before its own kick entry, after what was there"
    status = await raw(
        functions.set_custom_status(
            keys, None, presence.options, app_id=APP, user_id="alice", custom_status=1, custom_text="hi"
        )
    )
    assert status[0] == 1 and status[2:] == [3, 1, b"", 0, b"bob"]
    logout = await raw(log_out("phone"))
    assert logout[0] == 1 and logout[2:] == [4, 1, b"", 0, b"bob"]
    assert await raw(log_out("phone")) == [0, b"", 0, 1, b"", 0]  # gone already: nothing changed, nobody told
    for reply in (login, relogin, status, logout):
        assert msgspec.json.decode(reply[1])["version"] == reply[2]


async def test_library_json_is_the_models_json(presence: Presence) -> None:
    """Stored sessions and the 4004/4005, 4006/4007 and 9002 data come from one JSON writer in the library:
    byte for byte what msgspec makes of the models (field order included), and so is presence_query's."""
    await presence.add_friend(APP, "alice", "bob")
    await login(presence, "bob")
    await login(presence, "alice", IOS, "phone")
    await login(presence, "alice", WINDOWS, "pc")  # 4005 to the phone
    await login(presence, "alice", ANDROID, "tab")  # model 3 kicks the phone (9002), 4005 to the pc
    await presence.set_custom_status(APP, "alice", 5, "in a meeting", origin_conn_id="c-alice-4-pc")  # 4006, 4007
    stored = await presence.redis.hvals(presence.user(APP, "alice").sessions)
    assert len(stored) == 2
    for value in stored:
        assert msgspec.json.encode(msgspec.json.decode(value, type=Session)) == value
    models: dict[str, type] = {
        "4004": UserStatusChangeNotifyPack,
        "4005": UserStatusChangeNotifyPack,
        "4006": UserCustomStatusChangeNotifyPack,
        "4007": UserCustomStatusChangeNotifyPack,
        "9002": KickPack,
    }
    seen = set()
    for user in ("alice", "bob"):
        for _, fields in stream_entries(await presence.redis.xrange(presence.keys.user(APP, user).inbox)):
            command, data = fields[b"c"].decode(), fields[b"d"]
            assert msgspec.json.encode(msgspec.json.decode(data, type=models[command])) == data, command
            seen.add(command)
    assert seen == set(models)
    keys = presence.user(APP, "alice")
    document = await presence.store.one(
        keys.sessions, *functions.query([(keys.sessions, keys.status)], ["alice"]).command()[1]
    )
    assert msgspec.json.encode(msgspec.json.decode(document, type=dict[str, UserOnlineStatus])) == document


async def test_query_result_decodes_to_models(presence: Presence) -> None:
    await login(presence, "alice")
    raw = await presence.redis.fcall_ro(
        "presence_query", 2, presence.user(APP, "alice").sessions, presence.user(APP, "alice").status, "alice"
    )
    doc = msgspec.json.decode(raw)
    assert doc["alice"]["status"] == 1 and doc["alice"]["customStatus"] is None


def test_redis_cli_loads_the_file_as_is(redis_url: str) -> None:
    """The README's one-liner for other services: redis-cli -x FUNCTION LOAD REPLACE < lua/presence.lua."""
    out = subprocess.run(
        ["redis-cli", "-u", redis_url, "-x", "FUNCTION", "LOAD", "REPLACE"],
        input=library_source().encode(),
        capture_output=True,
        check=True,
    )
    assert out.stdout.strip() == b"presence"
    out = subprocess.run(
        ["redis-cli", "-u", redis_url, "FCALL", "presence_version", "0"], capture_output=True, check=True
    )
    assert out.stdout.strip() == b"4.1.3"


# --- issue 10: versions, ordered fan-out, operation ids, lastSeen evidence (every store) ---


async def test_every_change_moves_the_version_and_a_reconnect_keeps_it(presence: Presence) -> None:
    first = await login(presence, "alice", IOS, "phone")
    assert first.version == 1
    assert (await presence.set_custom_status(APP, "alice", 1, "x")).version == 2
    again = await login(presence, "alice", IOS, "phone", conn="c-alice-again")  # the same device: a reconnect
    assert not again.changed and again.version == 2
    out = await presence.logout(APP, "alice", IOS, "phone", conn_id="c-alice-again")
    assert out.version == 3
    assert (await presence.query_users(APP, ["alice"]))["alice"].version == 3


async def test_fanout_never_writes_an_older_version_after_a_newer_one(presence: Presence) -> None:
    await presence.add_friend(APP, "alice", "bob")
    await login(presence, "bob")
    newer = b'{"userId":"alice","customStatus":2,"customText":"new","version":7}'
    older = b'{"userId":"alice","customStatus":1,"customText":"old","version":6}'
    assert await presence.fanout(APP, ["bob"], 4006, newer, user_id="alice", version=7) == 1
    assert await presence.fanout(APP, ["bob"], 4006, older, user_id="alice", version=6) == 0  # overtaken
    assert await presence.fanout(APP, ["bob"], 4006, newer, user_id="alice", version=7) == 0  # a repeat
    # Status (4004) and custom status (4006) are ordered separately: each pack is that kind's whole state.
    status = b'{"appId":10000,"userId":"alice","status":2,"client":[],"version":5}'
    assert await presence.fanout(APP, ["bob"], 4004, status, user_id="alice", version=5) == 1
    assert [e["d"]["version"] for e in await inbox(presence, "bob") if e["d"].get("userId") == "alice"] == [7, 5]


async def test_a_repeated_change_call_is_a_replay_that_still_names_the_recipients(presence: Presence) -> None:
    """What a retry after a lost reply sends: the same operation id. Nothing is applied twice; the reply is the
    stored state, with the recipients, so the caller can still fan it out."""
    await presence.add_friend(APP, "alice", "bob")
    await login(presence, "alice", IOS, "phone")
    keys = presence.user(APP, "alice")
    logout = functions.logout(
        keys,
        None,
        presence.options,
        app_id=APP,
        user_id="alice",
        client_type=IOS,
        imei="phone",
        conn_id="c-alice-2-phone",
        op_id="op-1",
    )
    first = await presence.fn.call(logout)
    again = await presence.fn.call(logout)
    assert first.changed and again.changed and again.recipients == ["bob"]
    assert first.data == again.data and again.version == 2
    one = await presence.fn.call(custom(presence, 3, "a", "op-2"))
    two = await presence.fn.call(custom(presence, 3, "a", "op-2"))
    assert one.version == two.version == 3 and two.recipients == ["bob"]
    # A login repeated with its connection id (its operation id) replays too.
    login_call = functions.login(
        keys, None, presence.options, app_id=APP, user_id="alice", conn_id="c-new", client_type=IOS, imei="phone"
    )
    a = await presence.fn.call(login_call)
    b = await presence.fn.call(login_call)
    assert a.changed and b.changed and a.version == b.version == 4 and b.recipients == ["bob"]


def custom(p: Presence, status: int, text: str, op_id: str) -> functions.Call[functions.StatusChange]:
    """alice's presence_set_custom_status with an operation id, straight from the builder."""
    return functions.set_custom_status(
        p.user(APP, "alice"),
        None,
        p.options,
        app_id=APP,
        user_id="alice",
        custom_status=status,
        custom_text=text,
        op_id=op_id,
    )


async def test_a_retry_after_a_later_change_is_still_a_replay_of_the_current_state(presence: Presence) -> None:
    """Follow-up A: a retry whose operation is no longer the user's latest (another change ran in between)
    applies nothing and replies the CURRENT state, so its fan-out carries the newest version."""
    await presence.add_friend(APP, "alice", "bob")
    await login(presence, "alice", IOS, "phone")
    logout = functions.logout(
        presence.user(APP, "alice"),
        None,
        presence.options,
        app_id=APP,
        user_id="alice",
        client_type=IOS,
        imei="phone",
        conn_id="c-alice-2-phone",
        op_id="op-logout",
    )
    first = await presence.fn.call(logout)  # v2: offline
    later = await presence.fn.call(custom(presence, 7, "later", "op-admin"))  # v3
    again = await presence.fn.call(logout)  # the logout's retry: no longer the latest operation
    assert first.changed and again.changed and again.recipients == ["bob"]
    assert again.version == later.version == 3 and b'"status":2' in again.data
    # A request A retried after B was applied does not apply A again: the stored value stays B.
    a = await presence.fn.call(custom(presence, 1, "A", "op-a"))
    b = await presence.fn.call(custom(presence, 2, "B", "op-b"))
    a_retry = await presence.fn.call(custom(presence, 1, "A", "op-a"))
    assert (a.version, b.version, a_retry.version) == (4, 5, 5)
    assert b'"customText":"B"' in a_retry.data
    assert (await presence.query_users(APP, ["alice"]))["alice"].version == 5


async def test_last_seen_is_the_evidence_and_never_moves_back(presence: Presence) -> None:
    before = await presence.nodes.redis_time_ms()
    await login(presence, "alice", IOS, "phone")  # seen at the login
    await login(presence, "alice", WINDOWS, "pc")
    await presence.logout(APP, "alice", IOS, "phone", seen_age_ms=60_000)  # evidence older than the login
    last = (await presence.query_users(APP, ["alice"]))["alice"].lastSeen
    assert last is not None and last >= before, "older evidence does not move lastSeen back"
    later = await presence.nodes.redis_time_ms()
    await presence.logout(APP, "alice", WINDOWS, "pc", seen_at_ms=later + 500)  # capped at the server's now
    last = (await presence.query_users(APP, ["alice"]))["alice"].lastSeen
    assert last is not None and later <= last < later + 500


async def test_a_conn_id_the_json_escapes_still_owns_its_session(presence: Presence) -> None:
    """The library reads a stored session's connId back without decoding it when it can; a connId that JSON
    writes escaped (a '/' becomes '\\/') is read by decoding: its repeat is a replay, its logout ends it."""
    first = await presence.login(APP, "alice", IOS, "phone", conn_id="gw/1")
    again = await presence.login(APP, "alice", IOS, "phone", conn_id="gw/1")  # a repeat, not a reconnect
    assert first.changed and again.changed and again.kicked == 0 and again.version == first.version
    assert (await presence.logout(APP, "alice", IOS, "phone", conn_id="gw/1")).changed
    assert (await presence.query_users(APP, ["alice"]))["alice"].status == 2


async def test_a_custom_status_of_53_bits_reaches_friends_exactly(presence: Presence) -> None:
    """The packs write integers in full (Lua's number format alone turned 2**53 - 1 into 9.007199254741e+15)."""
    await presence.add_friend(APP, "alice", "bob")
    await login(presence, "bob")
    for value in (2**53 - 1, -(2**53) + 1, 10**14):
        await presence.set_custom_status(APP, "alice", value, "big")
        assert (await inbox(presence, "bob"))[-1]["d"]["customStatus"] == value
        assert (await presence.query_users(APP, ["alice"]))["alice"].customStatus == value


# --- every ARGV is checked before the first write: a bad one is PRESENCE_PARAM and changes nothing ---


def _same_slot_as(user: str) -> str:
    """Another userId whose keys share ``user``'s cluster slot (two recipients in one fan-out call)."""
    slot = key_slot(f"presence:{{{APP}:{user}}}:x".encode())
    return next(u for u in (f"r{i}" for i in range(100_000)) if key_slot(f"presence:{{{APP}:{u}}}:x".encode()) == slot)


BOB_NEIGHBOUR = _same_slot_as("bob")


async def _argv_state(p: Presence) -> None:
    """Keys with content for every case below: sessions, versions, inboxes, pushed records, an outbox and
    counters, subscriptions with an expired entry, friends, a feed cursor, a node."""
    await p.add_friend(APP, "alice", "bob")
    await p.subscribe(APP, "carol", ["alice"], 60_000)
    await p.redis.zadd(p.user(APP, "carol").subscriptions, {"gone": 1})  # expired: a write would prune it
    for user in ("bob", BOB_NEIGHBOUR, "carol", "dave"):
        await login(p, user)
    await login(p, "alice", IOS, "phone")
    await login(p, "alice", WINDOWS, "pc")
    await p.set_custom_status(APP, "alice", 1, "hi")
    feed = p.feed.feed_keys(APP, "alice")
    await p.fn.call(_change_login(p, feed, conn="seed", ct=ANDROID, imei="tab"))
    await p.redis.xadd("presence:feed:{x}", {"f": "v"})
    await p.redis.set("presence:cursor:{x}", "1-0", px=60_000)
    await p.nodes.beat("n1", "inc-1")


def _change_login(
    p: Presence, feed: FeedKeys | None, *, conn: str = "new", ct: int = MAC, imei: str = "mac"
) -> functions.Call[functions.StatusChange]:
    """A login of alice that writes (kicks under model 3, syncs her other sessions, feed entries)."""
    return functions.login(
        p.user(APP, "alice"), feed, p.options, app_id=APP, user_id="alice", conn_id=conn, client_type=ct, imei=imei
    )


def _logout(p: Presence, user: str, ct: int, imei: str) -> functions.Call[functions.StatusChange]:
    return functions.logout(
        p.user(APP, user), p.feed.feed_keys(APP, user), p.options, app_id=APP, user_id=user, client_type=ct, imei=imei
    )


def _custom(p: Presence) -> functions.Call[functions.StatusChange]:
    return functions.set_custom_status(
        p.user(APP, "alice"),
        p.feed.feed_keys(APP, "alice"),
        p.options,
        app_id=APP,
        user_id="alice",
        custom_status=2,
        custom_text="busy",
        origin_conn_id="c-alice-2-phone",
    )


def _fanout(p: Presence, *, ordered: bool = True) -> functions.Call[functions.FanoutReply]:
    make = p.keys.recipient if ordered else p.keys.recipient_unordered
    users = ("bob", BOB_NEIGHBOUR)
    return functions.fanout(
        [make(APP, u) for u in users], p.options, 4004, b'{"v":9}', user_id="alice" if ordered else "", version=9
    )


def _feed_append(p: Presence) -> functions.Call[functions.FeedAppendReply]:
    entries = [("5-0", ["a", "1"]), ("6-0", ["b", "2"])]
    return functions.feed_append("presence:feed:{x}", "presence:cursor:{x}", None, 10, 60_000, entries)


ArgvCase = tuple[Callable[[Presence], functions.Call[Any]], int, str]
ARGV_CASES: dict[str, ArgvCase] = {
    # (the call on the state above, the 1-based ARGV index to spoil, the bad value)
    "login inbox MAXLEN abc": (lambda p: _change_login(p, p.feed.feed_keys(APP, "alice")), 1, "abc"),
    "login inbox MAXLEN -1": (lambda p: _change_login(p, None), 1, "-1"),
    "login inbox MAXLEN 1.5": (lambda p: _change_login(p, None), 1, "1.5"),
    "login inbox MAXLEN inf": (lambda p: _change_login(p, None), 1, "inf"),
    "login inbox TTL abc": (lambda p: _change_login(p, None), 2, "abc"),
    "login inbox TTL 20 digits": (lambda p: _change_login(p, None), 2, "9" * 20),
    "login outbox MAXLEN abc": (lambda p: _change_login(p, p.feed.feed_keys(APP, "alice")), 4, "abc"),
    "login outbox TTL -5": (lambda p: _change_login(p, p.feed.feed_keys(APP, "alice")), 5, "-5"),
    "login appId 1e3": (lambda p: _change_login(p, None), 6, "1e3"),
    "login appId -1": (lambda p: _change_login(p, None), 6, "-1"),
    "login appId 2^31": (lambda p: _change_login(p, None), 6, str(2**31)),
    "login client version v2": (lambda p: _change_login(p, None), 13, "v2"),
    "login max sessions many": (lambda p: _change_login(p, None), 15, "many"),
    "logout inbox MAXLEN abc": (lambda p: _logout(p, "alice", WINDOWS, "pc"), 1, "abc"),
    "logout inbox TTL abc": (lambda p: _logout(p, "alice", WINDOWS, "pc"), 2, "abc"),
    "logout outbox MAXLEN abc": (lambda p: _logout(p, "alice", WINDOWS, "pc"), 4, "abc"),
    "logout clientType x": (lambda p: _logout(p, "alice", WINDOWS, "pc"), 9, "x"),
    "logout offline TTL abc": (lambda p: _logout(p, "dave", IOS, "dev"), 13, "abc"),
    "logout offline TTL -1": (lambda p: _logout(p, "dave", IOS, "dev"), 13, "-1"),
    "logout evidence age x": (lambda p: _logout(p, "alice", WINDOWS, "pc"), 14, "x"),
    "logout evidence time x": (lambda p: _logout(p, "alice", WINDOWS, "pc"), 15, "x"),
    "custom status inbox MAXLEN abc": (_custom, 1, "abc"),
    "custom status inbox TTL abc": (_custom, 2, "abc"),
    "custom status outbox TTL x": (_custom, 5, "x"),
    "custom status 1.5": (_custom, 9, "1.5"),
    "fanout inbox MAXLEN abc": (_fanout, 1, "abc"),
    "fanout inbox TTL abc": (_fanout, 2, "abc"),
    "fanout command x": (_fanout, 4, "x"),
    "fanout version abc": (_fanout, 7, "abc"),
    "fanout version -1": (_fanout, 7, "-1"),
    "fanout pairs inbox MAXLEN abc": (lambda p: _fanout(p, ordered=False), 1, "abc"),
    "subscribe subTime abc": (
        lambda p: functions.subscribe(p.user(APP, "carol").subscriptions, "carol", ["x"], 1, 9),
        2,
        "abc",
    ),
    "subscribe limit abc": (
        lambda p: functions.subscribe(p.user(APP, "carol").subscriptions, "carol", ["x"], 1, 9),
        3,
        "abc",
    ),
    "subscribe target": (
        lambda p: functions.subscribe(p.user(APP, "carol").subscriptions, "carol", ["x", "y"], 1, 9),
        5,
        "a|b",
    ),
    "subscribe over the limit": (
        lambda p: functions.subscribe(p.user(APP, "carol").subscriptions, "carol", ["x", "y"], 1, 9),
        3,
        "2",
    ),
    "subscribers_add expireAt inf": (
        lambda p: functions.subscribers_add([p.user(APP, "alice").subscribers], "carol", 1),
        2,
        "inf",
    ),
    "unsubscribe subscriber": (
        lambda p: functions.unsubscribe(p.user(APP, "carol").subscriptions, "carol", ["alice"]),
        1,
        "",
    ),
    "subscribers_remove subscriber": (
        lambda p: functions.subscribers_remove([p.user(APP, "alice").subscribers], "carol"),
        1,
        "",
    ),
    "friends_remove friend": (
        lambda p: functions.friends_remove([p.user(APP, "alice").friends], [("alice", "bob")]),
        2,
        "",
    ),
    "feed_append TTL inf": (_feed_append, 2, "inf"),
    "feed_append second entry": (_feed_append, 8, "3"),
    "outbox_trim id of 21 digits": (
        lambda p: functions.outbox_trim(p.user(APP, "alice").outbox, "1-0"),
        1,
        "9" * 21 + "-0",
    ),
    "inbox_trim window inf": (lambda p: functions.inbox_trim(p.user(APP, "bob").inbox, 1, "9-0"), 1, "inf"),
    "node_heartbeat claim inf": (
        lambda p: functions.node_heartbeat(p.keys.nodes, "n1", p.keys.node_incarnations, "inc-2", 0),
        3,
        "inf",
    ),
}


async def _dump(p: Presence, keys: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """Each key's serialized value (streams with their deletion records) and absolute expiry."""
    return {k: (await p.redis.dump(k), await p.redis.pexpiretime(k)) for k in dict.fromkeys(keys)}


@pytest.mark.parametrize("case", ARGV_CASES)
async def test_a_bad_argument_is_presence_param_and_changes_no_key(presence: Presence, case: str) -> None:
    """Other services call the library directly: every ARGV is checked before the first write (a bad number
    once stored a login, or recorded a push in `pushed` and then failed with Redis's own ERR)."""
    build, index, bad = ARGV_CASES[case]
    await _argv_state(presence)
    call = build(presence)
    args = list(call.args)
    args[index - 1] = bad
    keys = [k for k in call.keys if k]
    before = await _dump(presence, keys)
    with pytest.raises(ResponseError, match=r"^PRESENCE_PARAM "):
        await presence.store.one(keys[0], *functions.fcall(call.name, keys, args))
    assert await _dump(presence, keys) == before
    # the untouched call is valid: it is the bad argument that was refused
    await presence.fn.call(functions.Call(call.name, keys, call.args, call.parse))


SURPLUS_CASES: dict[str, Callable[[Presence], functions.Call[Any]]] = {  # the builders give every ARGV
    "login": lambda p: _change_login(p, None),
    "logout": lambda p: _logout(p, "alice", WINDOWS, "pc"),
    "set_custom_status": _custom,
    "outbox_trim": lambda p: functions.outbox_trim(p.user(APP, "alice").outbox, "1-0"),
    "inbox_trim": lambda p: functions.inbox_trim(p.user(APP, "bob").inbox, 1, "9-0"),
    "node_heartbeat": lambda p: functions.node_heartbeat(p.keys.nodes, "n1", p.keys.node_incarnations, "inc-2", 0),
    "nodes_expired": lambda p: functions.nodes_expired(p.keys.nodes, 1000),
    "subscriptions": lambda p: functions.subscriptions(p.user(APP, "alice").subscriptions, 10),
}


@pytest.mark.parametrize("case", list(SURPLUS_CASES))
async def test_an_argv_beyond_what_a_function_takes_is_presence_param(presence: Presence, case: str) -> None:
    """A caller whose ARGV does not match the documented layout (a stray or shifted argument) is told so,
    instead of the library ignoring what it did not expect."""
    await _argv_state(presence)
    call = SURPLUS_CASES[case](presence)
    keys = [k for k in call.keys if k]
    args = list(call.args)
    before = await _dump(presence, keys)
    with pytest.raises(ResponseError, match=r"^PRESENCE_PARAM "):
        await presence.store.one(keys[0], *functions.fcall(call.name, keys, [*args, "1"], read_only=call.read_only))
    assert await _dump(presence, keys) == before
    # the same call without the surplus argument is valid: it is the count that was refused
    await presence.store.one(keys[0], *functions.fcall(call.name, keys, args, read_only=call.read_only))


async def test_a_bad_number_through_the_call_layer_is_a_param_error(presence: Presence) -> None:
    """presence/functions.py maps the library's PRESENCE_PARAM to ParamError; the keys stay as they were."""
    await _argv_state(presence)
    bad = msgspec.structs.replace(presence.options, inbox_maxlen=-1)
    login = functions.login(
        presence.user(APP, "alice"), None, bad, app_id=APP, user_id="alice", conn_id="new", client_type=MAC, imei="m"
    )
    fanout = functions.fanout([presence.keys.recipient(APP, "bob")], bad, 4004, b"{}", user_id="alice", version=9)
    calls: list[functions.Call[Any]] = [login, fanout]
    for call in calls:
        before = await _dump(presence, call.keys)
        with pytest.raises(ParamError, match="inbox MAXLEN"):
            await presence.fn.call(call)
        assert await _dump(presence, call.keys) == before, call.name
