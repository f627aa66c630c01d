"""The REST app over real HTTP (aiohttp TestServer on a free port) with Presence on the real redis-server."""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from presence.auth import generate_user_sign, verify_user_sign
from presence.config import AppConfig, Settings
from presence.http import MAX_BODY_BYTES, create_app
from presence.http.demo import DEMO_FILES
from presence.metrics import REGISTRY
from presence.resources import resource_path
from presence.service import Presence
from presence.store import Store

APP = 10000
KEY = "test-private-key"
OTHER_APP = 10001
OTHER_KEY = "other-private-key"
SETTINGS = Settings(apps={APP: AppConfig(private_key=KEY), OTHER_APP: AppConfig(private_key=OTHER_KEY)})
DEV_SETTINGS = Settings(apps={APP: AppConfig(private_key=KEY)}, dev_mode=True)

SUBSCRIBE = "/v1/user/subscribeUserOnlineStatus"
UNSUBSCRIBE = "/v1/user/unsubscribeUserOnlineStatus"
SET_STATUS = "/v1/user/setUserCustomerStatus"
QUERY_FRIENDS = "/v1/user/queryFriendOnlineStatus"
QUERY_USERS = "/v1/user/queryUserOnlineStatus"
ADD_FRIEND = "/v1/friendship/addFriend"
DELETE_FRIEND = "/v1/friendship/deleteFriend"
IMPORT_FRIEND = "/v1/friendship/importFriend"


def auth(user: str, app_id: int = APP, key: str = KEY) -> dict[str, str]:
    return {"appId": str(app_id), "identifier": user, "userSign": generate_user_sign(app_id, key, user)}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def svc(real_redis: Redis) -> Presence:
    return Presence(real_redis, SETTINGS)


async def _client(app: web.Application) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
        yield client


@pytest.fixture
async def client(svc: Presence) -> AsyncIterator[TestClient]:
    async for c in _client(create_app(svc, SETTINGS)):
        yield c


@pytest.fixture
async def dev_client(real_redis: Redis) -> AsyncIterator[TestClient]:
    async for c in _client(create_app(Presence(real_redis, DEV_SETTINGS), DEV_SETTINGS)):
        yield c


async def post(
    client: TestClient, path: str, body: Any = None, *, user: str = "alice", params: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON (raw when bytes) as ``user``; the HTTP status and the decoded envelope."""
    query = auth(user) if params is None else params
    if isinstance(body, bytes):
        resp = await client.post(path, params=query, data=body, headers={"Content-Type": "application/json"})
    else:
        resp = await client.post(path, params=query, json=body)
    assert resp.content_type == "application/json"
    return resp.status, await resp.json()


def ok(status: int, env: dict[str, Any]) -> Any:
    assert (status, env["code"], env["msg"]) == (200, 200, "success"), env
    return env["data"]


def error(status: int, env: dict[str, Any], http: int, code: int, msg: str | None = None) -> str:
    assert (status, env["code"], env["data"]) == (http, code, None), env
    if msg is not None:
        assert msg in env["msg"], env["msg"]
    return env["msg"]


# --- every endpoint's success path, checked through the facade ---


async def test_subscribe_makes_the_subscriber_get_the_targets_changes(client: TestClient, svc: Presence) -> None:
    await svc.login(APP, "alice", 1, "tab-a")
    before = time.time() * 1000
    data = ok(*await post(client, SUBSCRIBE, {"subUserId": ["bob", "carol", "bob"], "subTime": 60_000}))
    assert data["liveSubscriptions"] == 2
    assert before + 59_000 < data["expireAt"] < before + 61_000 + 1000
    # bob logging in now writes one entry: to alice's inbox, as his subscriber.
    assert (await svc.login(APP, "bob", 1, "tab-b")).delivered == 1


async def test_unsubscribe_stops_the_notifications(client: TestClient, svc: Presence) -> None:
    await svc.login(APP, "alice", 1, "tab-a")
    ok(*await post(client, SUBSCRIBE, {"subUserId": ["bob", "carol"], "subTime": 60_000}))
    assert ok(*await post(client, UNSUBSCRIBE, {"subUserId": ["bob", "dave"]})) == {"removed": 1}
    assert (await svc.login(APP, "bob", 1, "tab-b")).delivered == 0
    assert (await svc.login(APP, "carol", 1, "tab-c")).delivered == 1


async def test_set_own_custom_status_is_stored_and_pushed_to_friends(client: TestClient, svc: Presence) -> None:
    await svc.add_friend(APP, "alice", "bob")
    await svc.login(APP, "bob", 1, "tab-b")
    data = ok(*await post(client, SET_STATUS, {"customStatus": 3, "customText": "en réunion"}))
    assert data == {"changed": True, "recipients": 1, "delivered": 1}
    status = (await svc.query_users(APP, ["alice"]))["alice"]
    assert (status.customStatus, status.customText) == (3, "en réunion")
    # An explicit userId equal to the caller needs no admin; bob is offline now, so nothing is written.
    await svc.logout(APP, "bob", 1, "tab-b")
    data = ok(*await post(client, SET_STATUS, {"userId": "alice", "customStatus": 4, "customText": ""}))
    assert data == {"changed": True, "recipients": 1, "delivered": 0}


async def test_set_custom_status_text_defaults_to_empty(client: TestClient, svc: Presence) -> None:
    ok(*await post(client, SET_STATUS, {"customStatus": 7}))
    status = (await svc.query_users(APP, ["alice"]))["alice"]
    assert (status.customStatus, status.customText) == (7, "")


async def test_admin_sets_another_users_status(client: TestClient, svc: Presence) -> None:
    ok(*await post(client, SET_STATUS, {"userId": "bob", "customStatus": 2, "customText": "away"}, user="admin"))
    status = (await svc.query_users(APP, ["bob"]))["bob"]
    assert (status.customStatus, status.customText) == (2, "away")


async def test_non_admin_cannot_set_another_users_status(client: TestClient, svc: Presence) -> None:
    status, env = await post(client, SET_STATUS, {"userId": "bob", "customStatus": 2}, user="alice")
    error(status, env, 403, 60006, "not one")
    assert (await svc.query_users(APP, ["bob"]))["bob"].customStatus is None


@pytest.mark.parametrize("body", [None, b"", {}, {"ignored": [1, 2]}])
async def test_query_friend_online_status(client: TestClient, svc: Presence, body: Any) -> None:
    await svc.import_friends(APP, "alice", ["bob", "carol"])
    await svc.login(APP, "bob", 3, "phone-b", node_id="node-1")
    await svc.set_custom_status(APP, "carol", 5, "busy")
    data = ok(*await post(client, QUERY_FRIENDS, body))
    assert set(data) == {"bob", "carol"}
    assert data["bob"]["status"] == 1
    [session] = data["bob"]["session"]
    assert (session["userId"], session["clientType"], session["imei"], session["brokerId"]) == (
        "bob",
        3,
        "phone-b",
        "node-1",
    )
    assert data["carol"] == {
        "session": [],
        "customStatus": 5,
        "customText": "busy",
        "status": 2,
        "lastSeen": None,
        "version": 1,
    }


async def test_query_friend_online_status_without_friends_is_empty(client: TestClient) -> None:
    assert ok(*await post(client, QUERY_FRIENDS, {})) == {}


async def test_query_user_online_status(client: TestClient, svc: Presence) -> None:
    await svc.login(APP, "bob", 1, "tab-b")
    await svc.login(APP, "carol", 1, "tab-c")
    await svc.logout(APP, "carol", 1, "tab-c")
    data = ok(*await post(client, QUERY_USERS, {"userList": ["bob", "carol", "nobody", "bob"]}))
    assert set(data) == {"bob", "carol", "nobody"}
    assert data["bob"]["status"] == 1 and len(data["bob"]["session"]) == 1
    assert data["carol"]["status"] == 2 and data["carol"]["lastSeen"] > 0
    assert data["nobody"] == {
        "session": [],
        "customStatus": None,
        "customText": None,
        "status": 2,
        "lastSeen": None,
        "version": 0,
    }
    assert ok(*await post(client, QUERY_USERS, {"userList": []})) == {}


async def test_add_friend_is_mutual(client: TestClient, svc: Presence) -> None:
    body = {"fromId": "alice", "toItem": {"toId": "bob"}}
    assert ok(*await post(client, ADD_FRIEND, body, user="admin")) == {"added": 1}
    assert ok(*await post(client, ADD_FRIEND, body, user="admin")) == {"added": 0}
    assert list(await svc.query_friends(APP, "alice")) == ["bob"]
    assert list(await svc.query_friends(APP, "bob")) == ["alice"]


async def test_delete_friend_is_mutual(client: TestClient, svc: Presence) -> None:
    await svc.import_friends(APP, "alice", ["bob", "carol"])
    assert ok(*await post(client, DELETE_FRIEND, {"fromId": "bob", "toId": "alice"}, user="admin")) == {"removed": 1}
    assert list(await svc.query_friends(APP, "alice")) == ["carol"]
    assert await svc.query_friends(APP, "bob") == {}


async def test_import_friend(client: TestClient, svc: Presence) -> None:
    body = {"fromId": "alice", "friendItem": [{"toId": "bob"}, {"toId": "carol"}, {"toId": "bob"}]}
    assert ok(*await post(client, IMPORT_FRIEND, body, user="admin")) == {"added": 2}
    assert sorted(await svc.query_friends(APP, "alice")) == ["bob", "carol"]
    assert list(await svc.query_friends(APP, "carol")) == ["alice"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (ADD_FRIEND, {"fromId": "alice", "toItem": {"toId": "bob"}}),
        (DELETE_FRIEND, {"fromId": "alice", "toId": "bob"}),
        (IMPORT_FRIEND, {"fromId": "alice", "friendItem": [{"toId": "bob"}]}),
    ],
)
async def test_friendship_needs_an_admin(client: TestClient, svc: Presence, path: str, body: Any) -> None:
    await svc.add_friend(APP, "alice", "carol")
    # Even the user's own friend list: friendships are managed by the app's backend, not by clients.
    error(*await post(client, path, body, user="alice"), 403, 60006)
    assert list(await svc.query_friends(APP, "alice")) == ["carol"]


# --- authentication ---


def _sign(user: str, **kw: Any) -> str:
    return generate_user_sign(kw.pop("app_id", APP), kw.pop("key", KEY), user, **kw)


AUTH_CASES = {
    "appId missing": ({"identifier": "alice", "userSign": _sign("alice")}, 60001, "appId is missing"),
    "appId not an integer": ({"appId": "abc", "identifier": "alice", "userSign": _sign("alice")}, 60001, "integer"),
    "appId with sign": ({"appId": "-10000", "identifier": "alice", "userSign": _sign("alice")}, 60001, "integer"),
    "appId unknown": ({"appId": "99999", "identifier": "alice", "userSign": _sign("alice")}, 60001, "99999"),
    "identifier missing": ({"appId": str(APP), "userSign": _sign("alice")}, 60002, "identifier is missing"),
    "identifier empty": ({"appId": str(APP), "identifier": "", "userSign": _sign("")}, 60002, None),
    "userSign missing": ({"appId": str(APP), "identifier": "alice"}, 60000, "userSign is missing"),
    "userSign garbage": ({"appId": str(APP), "identifier": "alice", "userSign": "not-a-sign"}, 60003, None),
    "userSign wrong key": (
        {"appId": str(APP), "identifier": "alice", "userSign": _sign("alice", key="stolen")},
        60003,
        "bad signature",
    ),
    "userSign expired": (
        {"appId": str(APP), "identifier": "alice", "userSign": _sign("alice", expire=60, now=int(time.time()) - 120)},
        60004,
        "expired",
    ),
    "userSign of another user": ({"appId": str(APP), "identifier": "alice", "userSign": _sign("bob")}, 60005, None),
    "userSign of another app": (
        {"appId": str(APP), "identifier": "alice", "userSign": _sign("alice", app_id=OTHER_APP, key=OTHER_KEY)},
        60005,
        None,
    ),
}


@pytest.mark.parametrize("case", list(AUTH_CASES))
@pytest.mark.parametrize("path", [SUBSCRIBE, QUERY_FRIENDS, ADD_FRIEND])
async def test_auth_failures(client: TestClient, svc: Presence, case: str, path: str) -> None:
    params, code, msg = AUTH_CASES[case]
    body = {"subUserId": ["bob"], "subTime": 1000}
    error(*await post(client, path, body, params=params), 401, code, msg)
    assert (await svc.query_users(APP, ["bob"]))["bob"].status == 2


async def test_sign_of_another_app_works_with_its_app(client: TestClient) -> None:
    ok(*await post(client, QUERY_USERS, {"userList": ["bob"]}, params=auth("alice", OTHER_APP, OTHER_KEY)))


async def test_auth_comes_before_the_body(client: TestClient) -> None:
    error(*await post(client, SUBSCRIBE, b"not json", params={"appId": str(APP)}), 401, 60002)


async def test_identifier_must_be_a_valid_user_id(client: TestClient) -> None:
    error(*await post(client, QUERY_USERS, {"userList": []}, user="a|b"), 400, 90001, "identifier must not contain")


# --- limits and body errors ---


LIMIT_CASES = {
    "subscribe 101 users": (SUBSCRIBE, {"subUserId": [f"u{i}" for i in range(101)], "subTime": 1000}, "101 items"),
    "subscribe no users": (SUBSCRIBE, {"subUserId": [], "subTime": 1000}, "subUserId must name at least one user"),
    "subscribe itself": (SUBSCRIBE, {"subUserId": ["admin"], "subTime": 1000}, "must not contain the subscriber"),
    "subTime 0": (SUBSCRIBE, {"subUserId": ["bob"], "subTime": 0}, "subTime must be between 1 and 2592000000 ms"),
    "subTime negative": (SUBSCRIBE, {"subUserId": ["bob"], "subTime": -5}, "subTime must be between 1 and"),
    "subTime over 30 days": (
        SUBSCRIBE,
        {"subUserId": ["bob"], "subTime": 30 * 86400 * 1000 + 1},
        "subTime must be between 1 and 2592000000 ms",
    ),
    "subTime beyond int64": (SUBSCRIBE, {"subUserId": ["bob"], "subTime": 2**70}, "subTime must be between"),
    "subUserId 65 bytes": (SUBSCRIBE, {"subUserId": ["x" * 65], "subTime": 1000}, "subUserId[0] must be at most 64"),
    "subUserId with |": (SUBSCRIBE, {"subUserId": ["bob", "a|b"], "subTime": 1000}, "subUserId[1] must not contain"),
    "unsubscribe 101 users": (UNSUBSCRIBE, {"subUserId": [f"u{i}" for i in range(101)]}, "101 items, at most 100"),
    "userList 501": (QUERY_USERS, {"userList": [f"u{i}" for i in range(501)]}, "userList has 501 items, at most 500"),
    "userList with {": (QUERY_USERS, {"userList": ["a{b"]}, "userList[0] must not contain"),
    "customText 101 bytes": (
        SET_STATUS,
        {"customStatus": 1, "customText": "x" * 101},
        "customText must be at most 100 UTF-8 bytes, got 101",
    ),
    # 34 characters, 102 bytes: the limit is on bytes, not characters.
    "customText 34 euro signs": (
        SET_STATUS,
        {"customStatus": 1, "customText": "€" * 34},
        "customText must be at most 100 UTF-8 bytes, got 102",
    ),
    "customStatus beyond 53 bits": (SET_STATUS, {"customStatus": 2**53}, "customStatus must fit in 53 bits"),
    "userId 65 bytes": (SET_STATUS, {"userId": "é" * 32 + "x", "customStatus": 1}, "userId must be at most 64 bytes"),
    "userId with |": (SET_STATUS, {"userId": "a|b", "customStatus": 1}, "userId must not contain"),
    "userId empty": (SET_STATUS, {"userId": "", "customStatus": 1}, "userId must be a non-empty string"),
    "addFriend itself": (ADD_FRIEND, {"fromId": "bob", "toItem": {"toId": "bob"}}, "toId must not contain fromId"),
    "importFriend none": (IMPORT_FRIEND, {"fromId": "bob", "friendItem": []}, "friendItem must name at least one"),
    "importFriend 1001": (
        IMPORT_FRIEND,
        {"fromId": "bob", "friendItem": [{"toId": f"u{i}"} for i in range(1001)]},
        "friendItem has 1001 items, at most 1000",
    ),
    "fromId with }": (DELETE_FRIEND, {"fromId": "b}", "toId": "c"}, "fromId must not contain"),
    # Body decoding: msgspec's message names the rule and the field path.
    "bad JSON": (SUBSCRIBE, b'{"subUserId": [', "Input data was truncated"),
    "not JSON at all": (QUERY_FRIENDS, b"hello", "JSON is malformed"),
    "body not an object": (QUERY_USERS, [1, 2], "Expected `object`, got `array`"),
    "subTime a string": (
        SUBSCRIBE,
        {"subUserId": ["bob"], "subTime": "1000"},
        "Expected `int`, got `str` - at `$.subTime`",
    ),
    "subTime a float": (
        SUBSCRIBE,
        {"subUserId": ["bob"], "subTime": 1.5},
        "Expected `int`, got `float` - at `$.subTime`",
    ),
    "subUserId item a number": (
        SUBSCRIBE,
        {"subUserId": [7], "subTime": 1},
        "Expected `str`, got `int` - at `$.subUserId[0]`",
    ),
    "subUserId missing": (SUBSCRIBE, {"subTime": 1000}, "Object missing required field `subUserId`"),
    "empty body where fields are required": (QUERY_USERS, b"", "Object missing required field `userList`"),
    "customText null": (SET_STATUS, {"customStatus": 1, "customText": None}, "Expected `str`, got `null`"),
    "toItem wrong shape": (ADD_FRIEND, {"fromId": "a", "toItem": "b"}, "Expected `object`, got `str` - at `$.toItem`"),
    "friendItem item without toId": (
        IMPORT_FRIEND,
        {"fromId": "a", "friendItem": [{"toId": "b"}, {}]},
        "Object missing required field `toId` - at `$.friendItem[1]`",
    ),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
async def test_limits_and_bad_bodies_are_400(client: TestClient, svc: Presence, case: str) -> None:
    path, body, msg = LIMIT_CASES[case]
    error(*await post(client, path, body, user="admin"), 400, 90001, msg)
    # Nothing was written.
    assert await svc.query_friends(APP, "bob") == {}
    assert await svc.query_friends(APP, "admin") == {}
    status = await svc.query_users(APP, ["admin", "bob"])
    assert status["admin"].customStatus is None and status["bob"].customStatus is None


async def test_limits_inclusive_bounds_are_accepted(client: TestClient, svc: Presence) -> None:
    users = [f"u{i}" for i in range(100)]
    assert (
        ok(*await post(client, SUBSCRIBE, {"subUserId": users, "subTime": 30 * 86400 * 1000}))["liveSubscriptions"]
        == 100
    )
    ok(*await post(client, SUBSCRIBE, {"subUserId": ["bob"], "subTime": 1}))
    assert len(ok(*await post(client, QUERY_USERS, {"userList": [f"u{i}" for i in range(500)]}))) == 500
    text = "é" * 50  # 50 characters, exactly 100 bytes
    ok(*await post(client, SET_STATUS, {"customStatus": -(2**53) + 1, "customText": text}))
    assert (await svc.query_users(APP, ["alice"]))["alice"].customText == text
    long_id = "é" * 32  # 64 bytes
    ok(*await post(client, SET_STATUS, {"userId": long_id, "customStatus": 1}, user="admin"))
    assert (await svc.query_users(APP, [long_id]))[long_id].customStatus == 1


async def test_integral_floats_are_integers(client: TestClient, svc: Presence) -> None:
    # JSON Schema's "integer" includes 60000.0, and Java clients (the seed's Jackson) send it.
    assert ok(*await post(client, SUBSCRIBE, {"subUserId": ["bob"], "subTime": 60000.0}))["liveSubscriptions"] == 1
    ok(*await post(client, SET_STATUS, {"customStatus": 2.0}))
    assert (await svc.query_users(APP, ["alice"]))["alice"].customStatus == 2
    msg = "Expected `int`, got `float` - at `$.subTime`"
    error(*await post(client, SUBSCRIBE, {"subUserId": ["bob"], "subTime": 0.5}), 400, 90001, msg)
    msg = "Expected `array`, got `str` - at `$.subUserId`"
    error(*await post(client, SUBSCRIBE, {"subUserId": "bob", "subTime": 1.0}), 400, 90001, msg)


async def test_deeply_nested_json_is_400(client: TestClient) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    body = b'{"userList": [], "ignored": ' + deep + b"}"
    error(*await post(client, QUERY_USERS, body), 400, 90001, "nested too deeply")
    # Depth is checked before any decoding, whatever else is wrong with the body.
    body = b'{"subUserId": ["bob"], "subTime": 1.0, "ignored": ' + deep + b"}"
    error(*await post(client, SUBSCRIBE, body), 400, 90001, "nested too deeply (more than 32 levels)")


async def test_unknown_body_fields_are_ignored(client: TestClient, svc: Presence) -> None:
    body = {"subUserId": ["bob"], "subTime": 1000, "clientType": 1, "extra": {"nested": [1]}}
    assert ok(*await post(client, SUBSCRIBE, body))["liveSubscriptions"] == 1


# --- HTTP-level errors ---


async def test_unknown_route_is_404_envelope(client: TestClient) -> None:
    error(*await post(client, "/v1/user/nothingHere", {}), 404, 90004, "/v1/user/nothingHere")
    resp = await client.get("/")
    assert resp.status == 404 and (await resp.json())["code"] == 90004


async def test_wrong_method_is_405_with_allow(client: TestClient) -> None:
    resp = await client.get(SUBSCRIBE, params=auth("alice"))
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST"
    env = await resp.json()
    assert (env["code"], env["data"]) == (90001, None) and "POST" in env["msg"]
    resp = await client.post("/healthz")
    assert resp.status == 405 and "GET" in resp.headers["Allow"]


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_64_kib_is_413(client: TestClient, svc: Presence, chunked: bool) -> None:
    users = ",".join(f'"{"u" * 60}{i:04d}"' for i in range(1100))
    body = f'{{"userList": [{users}]}}'.encode()
    assert len(body) > MAX_BODY_BYTES
    data: Any = body
    if chunked:  # no Content-Length: the limit must hold while reading, too

        async def gen() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 8192):
                yield body[i : i + 8192]

        data = gen()
    resp = await client.post(QUERY_USERS, params=auth("alice"), data=data)
    assert resp.status == 413
    env = await resp.json()
    assert (env["code"], env["data"]) == (90001, None) and "65536 bytes" in env["msg"]


async def test_body_of_exactly_64_kib_is_read(client: TestClient) -> None:
    body = b'{"userList": []}'
    body += b" " * (MAX_BODY_BYTES - len(body))
    assert ok(*await post(client, QUERY_USERS, body)) == {}


async def test_redis_down_is_503_without_details(caplog: pytest.LogCaptureFixture) -> None:
    """Redis away for the whole retry window: the seed's system code with 503 (retry later), never a 500."""
    dead = Redis.from_url(f"redis://127.0.0.1:{closed_port()}")
    try:
        presence = Presence(Store.wrap(dead, retry_for=0.3), SETTINGS)
        async for client in _client(create_app(presence, SETTINGS)):
            with caplog.at_level(logging.ERROR, logger="presence.http"):
                status, env = await post(client, QUERY_USERS, {"userList": ["bob"]})
            rid = env.pop("requestId")
            assert (status, env) == (503, {"code": 90000, "msg": "system error", "data": None})
            assert "Traceback" not in str(env)
            # ... but the log says why, under the request id the client got.
            logged = [r.getMessage() for r in caplog.records if r.name == "presence.http"]
            assert any(rid in line and "redis is unavailable" in line for line in logged)
    finally:
        await dead.aclose()


# --- operations ---


async def test_healthz_ok(client: TestClient) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_healthz_503_when_redis_is_down() -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{closed_port()}")
    try:
        async for client in _client(create_app(Presence(dead, SETTINGS), SETTINGS)):
            resp = await client.get("/healthz")
            assert resp.status == 503
            assert (await resp.json())["status"] == "unavailable"
    finally:
        await dead.aclose()


def _count(route: str, status: str) -> float:
    return REGISTRY.get_sample_value("presence_rest_requests_total", {"route": route, "status": status}) or 0.0


async def test_metrics_count_requests_by_route_and_status(client: TestClient) -> None:
    before = {
        "ok": _count(QUERY_USERS, "200"),
        "bad": _count(QUERY_USERS, "400"),
        "auth": _count(QUERY_USERS, "401"),
        "unmatched": _count("unmatched", "404"),
    }
    ok(*await post(client, QUERY_USERS, {"userList": ["bob"]}))
    ok(*await post(client, QUERY_USERS, {"userList": ["bob"]}))
    await post(client, QUERY_USERS, {"userList": "bob"})
    await post(client, QUERY_USERS, {"userList": ["bob"]}, params={})
    await client.get("/no/such/thing")
    assert _count(QUERY_USERS, "200") == before["ok"] + 2
    assert _count(QUERY_USERS, "400") == before["bad"] + 1
    assert _count(QUERY_USERS, "401") == before["auth"] + 1
    assert _count("unmatched", "404") == before["unmatched"] + 1

    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = await resp.text()
    assert "# TYPE presence_rest_requests_total counter" in text
    assert re.search(r'presence_rest_requests_total\{route="/v1/user/queryUserOnlineStatus",status="200"\} \d', text)


async def test_openapi_is_served_and_documents_every_route(dev_client: TestClient) -> None:
    resp = await dev_client.get("/openapi.yaml")
    assert resp.status == 200
    assert resp.content_type == "application/yaml"
    body = await resp.read()
    assert body == resource_path("http/openapi.yaml").read_bytes()
    spec = yaml.safe_load(body)
    assert spec["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    served = {
        (route.method, route.resource.canonical)
        for route in dev_client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    served -= {("GET", path) for path in dev_client.app.get(DEMO_FILES, ())}  # pages, not API
    assert served == documented


# --- dev mode ---


async def test_dev_endpoints_do_not_exist_outside_dev_mode(client: TestClient, svc: Presence) -> None:
    resp = await client.get("/v1/dev/userSign", params={"userId": "alice"})
    assert resp.status == 404 and (await resp.json())["code"] == 90004
    resp = await client.post("/v1/dev/friends", params={"userId": "alice", "friendId": "bob"})
    assert resp.status == 404 and (await resp.json())["code"] == 90004
    assert await svc.query_friends(APP, "alice") == {}


async def test_dev_user_sign_works_for_the_api(dev_client: TestClient) -> None:
    resp = await dev_client.get("/v1/dev/userSign", params={"userId": "alice"})
    data = ok(resp.status, await resp.json())
    assert (data["appId"], data["userId"]) == (APP, "alice")
    verify_user_sign(data["userSign"], APP, KEY, "alice")
    params = {"appId": str(APP), "identifier": "alice", "userSign": data["userSign"]}
    ok(*await post(dev_client, QUERY_FRIENDS, {}, params=params))


async def test_dev_user_sign_needs_a_valid_user_id(dev_client: TestClient) -> None:
    resp = await dev_client.get("/v1/dev/userSign")
    error(resp.status, await resp.json(), 400, 90001, "userId must be a non-empty string")
    resp = await dev_client.get("/v1/dev/userSign", params={"userId": "a|b"})
    error(resp.status, await resp.json(), 400, 90001, "userId must not contain")


async def test_dev_friends_makes_friends(dev_client: TestClient, real_redis: Redis) -> None:
    svc = Presence(real_redis, DEV_SETTINGS)
    resp = await dev_client.post("/v1/dev/friends", params={"userId": "alice", "friendId": "bob"})
    assert ok(resp.status, await resp.json()) == {"added": 1}
    assert list(await svc.query_friends(APP, "bob")) == ["alice"]
    resp = await dev_client.post("/v1/dev/friends", params={"userId": "alice", "friendId": "alice"})
    error(resp.status, await resp.json(), 400, 90001, "friendId must differ from userId")


# --- the examples in http/requests.http run as written ---


def _parse_http_file(text: str) -> tuple[dict[str, str], list[tuple[str, str, str, dict[str, str], str]]]:
    """Variables and (title, method, url, headers, body) of each request of a REST Client file."""
    variables: dict[str, str] = {}
    requests = []
    for i, block in enumerate(re.split(r"^###", text, flags=re.M)):
        lines = block.splitlines()
        title = lines[0].strip() if i else ""  # the text after ### names the request
        rest = [ln for ln in lines[1 if i else 0 :] if not ln.startswith("#")]
        for ln in list(rest):
            if m := re.fullmatch(r"@(\w+)\s*=\s*(.*)", ln.strip()):
                variables[m[1]] = m[2]
                rest.remove(ln)
        while rest and not rest[0].strip():
            rest.pop(0)
        if not rest:
            continue
        method, url = rest[0].split(None, 1)
        headers = {}
        n = 1
        while n < len(rest) and rest[n].strip():
            name, _, value = rest[n].partition(":")
            headers[name.strip()] = value.strip()
            n += 1
        requests.append((title, method, url.strip(), headers, "\n".join(rest[n:]).strip()))
    return variables, requests


def _expand(text: str, variables: dict[str, str]) -> str:
    while m := re.search(r"\{\{(\w+)\}\}", text):
        text = text.replace(m[0], variables[m[1]])
    return text


async def test_requests_http_examples_run(dev_client: TestClient) -> None:
    variables, requests = _parse_http_file(resource_path("http/requests.http").read_text())
    assert variables["host"] == "http://127.0.0.1:8000" and variables["appId"] == str(APP)
    # The reader pastes a userSign from the dev endpoint (or `presence sign`); do the same.
    resp = await dev_client.get("/v1/dev/userSign", params={"userId": variables["identifier"]})
    variables["userSign"] = ok(resp.status, await resp.json())["userSign"]
    variables["host"] = ""  # the test server's base URL instead
    tried = set()
    for title, method, url, headers, body in requests:
        resp = await dev_client.request(method, _expand(url, variables), headers=headers, data=body.encode() or None)
        assert resp.status == 200, (title, await resp.text())
        tried.add((method, _expand(url, variables).split("?")[0]))
    spec = yaml.safe_load(resource_path("http/openapi.yaml").read_text())
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    assert tried == documented, "requests.http must have an example for every endpoint"
