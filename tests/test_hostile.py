"""Hostile input and resource limits (issue 12): every input the issue lists, against real sockets and Redis.

Each test names the input it replays; on the code before issue 12 each of them failed (a 500, a
dropped connection without an ERROR frame, a key without TTL, a 50 MB inflate, a silent config).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import resource
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from presence.auth import generate_user_sign, verify_user_sign
from presence.config import AppConfig, Settings
from presence.errors import AuthError, Code, LimitError, ParamError
from presence.gateway.codec import (
    Command,
    FrameDecoder,
    FrameError,
    decode_binary_message,
    decode_text_message,
    encode_client_frame,
)
from presence.http.app import MALFORMED_LOG_INTERVAL, EnvelopeRequestHandler, create_app
from presence.ids import check_imei, check_user_id
from presence.metrics import REGISTRY
from presence.service import Presence
from tests.clients import APP, KEY, TcpClient, WsClient, expect, sign, ws_pack
from tests.conftest import MakeNode, free_port
from tests.serve_process import ServeProcess

WEBAPI = 0
_TO_URL = str.maketrans({"+": "*", "/": "-", "=": "_"})
FUZZ_TARGET = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_presence.py"


def packed_sign(doc: bytes, level: int = 9) -> str:
    """Any bytes packed the way a userSign is (deflate, base64, URL alphabet): a forged sign."""
    return base64.b64encode(zlib.compress(doc, level)).decode().translate(_TO_URL)


def sign_doc(identifier: str = "alice", **override: str) -> bytes:
    """A sign's JSON with raw (already JSON) values substituted, e.g. ``app_id="1e999"``."""
    fields = {
        "TLS.identifier": json.dumps(identifier),
        "TLS.appId": str(APP),
        "TLS.expire": "3600",
        "TLS.expireTime": "1700000000",
        "TLS.sig": '"c2lnbmF0dXJl"',
    }
    names = {"app_id": "TLS.appId", "sig": "TLS.sig", "identifier": "TLS.identifier", "expire": "TLS.expire"}
    for name, raw in override.items():
        fields[names[name]] = raw
    return ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()


async def rest_client(presence: Presence, settings: Settings) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(presence, settings), host="127.0.0.1", port=0)) as client:
        yield client


SETTINGS = Settings(apps={APP: AppConfig(private_key=KEY)})
QUERY_USERS = "/v1/user/queryUserOnlineStatus"
SUBSCRIBE = "/v1/user/subscribeUserOnlineStatus"


@pytest.fixture
async def rest(real_redis: Redis) -> AsyncIterator[TestClient]:
    async for client in rest_client(Presence(real_redis, SETTINGS), SETTINGS):
        yield client


async def rest_post(
    client: TestClient, path: str, body: bytes, *, user: str = "alice", user_sign: str | None = None
) -> tuple[int, dict[str, Any]]:
    params = {"appId": str(APP), "identifier": user, "userSign": sign(user) if user_sign is None else user_sign}
    resp = await client.post(path, params=params, data=body, headers={"Content-Type": "application/json"})
    return resp.status, await resp.json()


# --- 1. zlib bomb in the userSign --------------------------------------------------------------------


def peak_bytes_while(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _verify_expecting_invalid(user_sign: str) -> None:
    with pytest.raises(AuthError) as info:
        verify_user_sign(user_sign, APP, KEY, "alice")
    assert info.value.code == Code.USER_SIGN_INVALID


def test_issue_zlib_bomb_sign_of_64816_chars_is_refused_without_inflating() -> None:
    bomb = packed_sign(b"[" * 50_000_000)  # the issue's bomb: about 65,000 characters inflating to 50 MB
    assert 60_000 < len(bomb) < 70_000
    peak = peak_bytes_while(lambda: _verify_expecting_invalid(bomb))
    assert peak < 1_000_000, f"verifying a bomb allocated {peak} bytes"


def test_small_zlib_bomb_under_the_length_cap_stops_at_the_inflate_cap() -> None:
    bomb = packed_sign(b" " * 1_000_000)  # 1 MB of JSON whitespace in under the 2048-character cap
    assert len(bomb) < 2048
    peak = peak_bytes_while(lambda: _verify_expecting_invalid(bomb))
    assert peak < 200_000, f"verifying a bomb allocated {peak} bytes"
    with pytest.raises(AuthError, match="inflates to more than 2048 bytes"):
        verify_user_sign(bomb, APP, KEY, "alice")


async def test_zlib_bomb_login_gets_60003_and_other_clients_keep_answering(make_node: MakeNode) -> None:
    node = await make_node()
    other = await WsClient.connect(node.ws_port)
    await other.login("bob")
    attackers = [await TcpClient.connect(node.tcp_port, imei=f"bomb-{i}") for i in range(20)]
    bomb = packed_sign(b"[" * 50_000_000)
    for attacker in attackers:
        attacker.send(Command.LOGIN, {"userId": "alice", "userSign": bomb})
    for attacker in attackers:
        error = await expect(attacker, Command.ERROR)
        assert error.data["code"] == Code.USER_SIGN_INVALID and error.data["requestId"]
        assert await attacker.closed()
    await other.send(Command.PING)
    await expect(other, Command.PING)
    await other.close()


# --- 2. parser errors: deep nesting, overflow, lone surrogates, bad UTF-8 -------------------------------


def _frame_with_body(body: bytes, command: int = Command.LOGIN) -> bytes:
    """A client frame carrying ``body`` as is (any bytes, not necessarily JSON)."""
    head = encode_client_frame(command, None, imei="dev-1")
    return head[:24] + len(body).to_bytes(4, "big") + head[28:] + body


def test_codec_refuses_30000_nested_brackets_as_a_frame_error() -> None:
    deep = b"[" * 30_000 + b"]" * 30_000
    raw = _frame_with_body(b'{"userId":"alice","x":' + deep + b"}")
    for decode in (
        lambda: FrameDecoder(max_body=1 << 20).feed(raw),
        lambda: decode_binary_message(raw, max_body=1 << 20),
    ):
        with pytest.raises(FrameError, match="nested too deeply") as info:
            decode()
        assert info.value.code == Code.PARAMETER_ERROR
    text = '{"command":9000,"data":{"x":' + "[" * 30_000 + "]" * 30_000 + "}}"
    with pytest.raises(FrameError, match="nested too deeply"):
        decode_text_message(text, max_body=1 << 20)


@pytest.mark.parametrize("transport", ["tcp", "ws-binary", "ws-text"])
async def test_socket_body_of_30000_nested_brackets_gets_an_error_frame(make_node: MakeNode, transport: str) -> None:
    node = await make_node()
    deep = b"[" * 30_000 + b"]" * 30_000
    if transport == "tcp":
        tcp = await TcpClient.connect(node.tcp_port)
        tcp.send_raw(_frame_with_body(deep))
        client: TcpClient | WsClient = tcp
    else:
        client = await WsClient.connect(node.ws_port, text=transport == "ws-text")
        if transport == "ws-text":
            await client.ws.send_str('{"command":9000,"appId":10000,"imei":"i","data":{"x":' + deep.decode() + "}}")
        else:
            await client.ws.send_bytes(_frame_with_body(deep))
    error = await expect(client, Command.ERROR)
    assert error.data["code"] == Code.PARAMETER_ERROR and "nested too deeply" in error.data["msg"]
    assert await client.closed()


FORGED_SIGNS = {
    "appId 1e999": sign_doc(app_id="1e999"),
    "appId 10**400": sign_doc(app_id="1" + "0" * 400),
    "200000 nested [": sign_doc(identifier="alice", sig="[" * 200_000 + "]" * 200_000),
    "40 nested [ in a small sign": sign_doc(sig="[" * 40 + "]" * 40),
    "lone surrogate in TLS.sig": sign_doc(sig='"\\ud800"'),
    "non-ASCII TLS.sig": sign_doc(sig='"\\u00e9t\\u00e9"'),
    "TLS.sig a number": sign_doc(sig="1"),
    "expire a float": sign_doc(expire="1.5"),
    "expire negative": sign_doc(expire="-1"),
    "not an object": b"[1,2,3]",
    "invalid UTF-8": b'{"TLS.identifier":"\xff"}',
}


@pytest.mark.parametrize("doc", FORGED_SIGNS.values(), ids=FORGED_SIGNS.keys())
async def test_forged_sign_is_401_60003_over_rest(rest: TestClient, doc: bytes) -> None:
    status, env = await rest_post(rest, QUERY_USERS, b'{"userList":["bob"]}', user_sign=packed_sign(doc))
    assert (status, env["code"]) == (401, Code.USER_SIGN_INVALID), env
    assert env["msg"].startswith("userSign is invalid") and env["requestId"]


@pytest.mark.parametrize("doc", list(FORGED_SIGNS.values())[:5], ids=list(FORGED_SIGNS)[:5])
async def test_forged_sign_is_60003_over_the_socket(make_node: MakeNode, doc: bytes) -> None:
    node = await make_node()
    client = await TcpClient.connect(node.tcp_port)
    client.send(Command.LOGIN, {"userId": "alice", "userSign": packed_sign(doc)})
    error = await expect(client, Command.ERROR)
    assert error.data["code"] == Code.USER_SIGN_INVALID
    assert await client.closed()


@pytest.mark.parametrize(
    "body",
    [b'{"userList":["\xff"]}', b"\xff\xfe{}", b'{"userList":["bob"],"x":"\xed\xa0\x80"}'],
    ids=["in-a-string", "outside-strings", "surrogate-bytes"],
)
async def test_rest_body_not_utf8_is_400(rest: TestClient, body: bytes) -> None:
    status, env = await rest_post(rest, QUERY_USERS, body)
    assert (status, env["code"]) == (400, Code.PARAMETER_ERROR), env


# --- 3. live sessions per user ------------------------------------------------------------------------


async def test_webapi_sessions_are_capped_and_the_new_login_is_refused(
    make_node: MakeNode, store_redis: Redis, facade: Presence
) -> None:
    node = await make_node()
    clients = []
    for i in range(10):
        client = await TcpClient.connect(node.tcp_port, client_type=WEBAPI, imei=f"api-{i}")
        assert (await client.login("alice")).command == Command.LOGINACK
        clients.append(client)
    extra = await TcpClient.connect(node.tcp_port, client_type=WEBAPI, imei="api-10")
    error = await extra.login("alice")
    assert error.command == Command.ERROR and error.data["code"] == Code.SESSION_LIMIT.value == 90005
    assert "10 live sessions" in error.data["msg"]
    assert await extra.closed()
    sessions_key = facade.user(APP, "alice").sessions
    assert await store_redis.hlen(sessions_key) == 10
    assert len([m for m in await facade.nodes.session_members(node.hub.node_id) if "|alice|" in m]) == 10
    # The same device coming back is a replacement, not an 11th session.
    await clients[0].close()
    again = await TcpClient.connect(node.tcp_port, client_type=WEBAPI, imei="api-0")
    assert (await again.login("alice")).command == Command.LOGINACK
    assert await store_redis.hlen(sessions_key) == 10
    for client in [*clients[1:], again]:
        await client.close()


async def test_session_cap_is_per_app_and_atomic_in_the_function(presence: Presence) -> None:
    for i in range(3):
        await presence.login(APP, "alice", WEBAPI, f"api-{i}", max_sessions=3)
    inbox = presence.keys.user(APP, "alice").inbox
    entries = await presence.redis.xlen(inbox)
    with pytest.raises(LimitError) as info:
        await presence.login(APP, "alice", 3, "phone", max_sessions=3, login_model=1)
    assert info.value.code == 90005 and info.value.http_status == 429
    # Refused before any write: model 1 would have kicked nothing here (WEBAPI), and wrote nothing.
    assert await presence.redis.hlen(presence.user(APP, "alice").sessions) == 3
    assert await presence.redis.xlen(inbox) == entries
    # A login that kicks one of the sessions makes room for itself.
    await presence.login(APP, "bob", 3, "phone-1", max_sessions=1)
    result = await presence.login(APP, "bob", 2, "phone-2", max_sessions=1)
    assert result.kicked == 1


# --- 4. keys a request can create carry a TTL ------------------------------------------------------------


async def test_subscriptions_to_unknown_users_leave_no_key_without_ttl(presence: Presence) -> None:
    users = [f"ghost-{i}" for i in range(100)]
    await presence.subscribe(APP, "alice", users, 1)
    await presence.subscribe(APP, "alice", users[:10], 60_000)
    redis = presence.redis
    keys = [k async for k in redis.scan_iter(match="presence:*")]
    assert len(keys) >= 11
    ttls = {k: await redis.pttl(k) for k in keys}
    assert all(ttl != -1 for ttl in ttls.values()), {k: t for k, t in ttls.items() if t == -1}
    # Each set expires with its latest subscription: the 60 s ones live ~60 s, the index too.
    assert 0 < await redis.pttl(presence.user(APP, "ghost-0").subscribers) <= 60_000
    assert 0 < await redis.pttl(presence.user(APP, "alice").subscriptions) <= 60_000
    # A shorter subscription later never cuts a longer one short.
    await presence.subscribe(APP, "bob", ["ghost-0"], 5)
    assert await redis.pttl(presence.user(APP, "ghost-0").subscribers) > 5_000


# --- 6. errors never leak Redis internals; the client gets a request id that the log has ---------------


@pytest.fixture
async def out_of_memory(real_redis: Redis) -> AsyncIterator[None]:
    """A real fault whose message names Redis internals: writes refused with OOM."""
    await real_redis.config_set("maxmemory-policy", "noeviction")
    await real_redis.config_set("maxmemory", 1)
    try:
        yield
    finally:
        await real_redis.config_set("maxmemory", 0)


async def test_socket_system_error_has_request_id_and_no_internals(
    make_node: MakeNode, store_redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    node = await make_node()
    client = await TcpClient.connect(node.tcp_port)
    await store_redis.config_set("maxmemory-policy", "noeviction")
    await store_redis.config_set("maxmemory", 1)
    try:
        with caplog.at_level(logging.ERROR, logger="presence.gateway"):
            error = await client.login("alice")
    finally:
        await store_redis.config_set("maxmemory", 0)
    assert error.command == Command.ERROR
    assert (error.data["code"], error.data["msg"]) == (Code.SYSTEM_ERROR, "system error")
    assert "OOM" not in json.dumps(error.data) and "maxmemory" not in json.dumps(error.data)
    rid = error.data["requestId"]
    logged = [r.getMessage() for r in caplog.records if rid in r.getMessage()]
    assert logged and "maxmemory" in logged[0], caplog.text


async def test_rest_system_error_has_request_id_and_no_internals(
    rest: TestClient, out_of_memory: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="presence.http"):
        status, env = await rest_post(rest, SUBSCRIBE, b'{"subUserId":["bob"],"subTime":1000}')
    assert (status, env["code"], env["msg"]) == (500, Code.SYSTEM_ERROR, "system error")
    assert "maxmemory" not in json.dumps(env)
    logged = [r.getMessage() for r in caplog.records if env["requestId"] in r.getMessage()]
    assert logged and "maxmemory" in logged[0], caplog.text


async def test_rest_client_error_carries_a_request_id_header(rest: TestClient) -> None:
    resp = await rest.post(QUERY_USERS, params={"appId": str(APP), "identifier": "alice"}, data=b"{}")
    env = await resp.json()
    assert resp.status == 401 and env["requestId"] == resp.headers["X-Request-Id"]


# --- 7. descriptors, capacity and the login deadline ---------------------------------------------------


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_at_capacity_new_connections_are_refused_and_rest_stays_up(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    node = await make_node(max_connections=3, http_port=free_port())
    assert node.hub.capacity == 3
    held = [await TcpClient.connect(node.tcp_port, imei=f"i{i}") for i in range(3)]
    # Accepted in order: once the last one answers, the server holds all three.
    assert (await held[-1].login("carol")).command == Command.LOGINACK
    before = _metric("presence_connections_refused_total", transport="tcp")
    with caplog.at_level(logging.WARNING, logger="presence.gateway"):
        refused = [await TcpClient.connect(node.tcp_port) for _ in range(3)]
        for client in refused:
            assert await client.closed(), "a connection over capacity was kept"
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(f"http://127.0.0.1:{node.ws_port}/ws")
            assert info.value.status == 503
            async with http.get(f"http://127.0.0.1:{node.http_port}/healthz") as resp:
                assert resp.status == 200
            params = {"appId": str(APP), "identifier": "alice", "userSign": sign("alice")}
            async with http.post(
                f"http://127.0.0.1:{node.http_port}{QUERY_USERS}", params=params, json={"userList": ["carol"]}
            ) as resp:
                assert resp.status == 200 and (await resp.json())["data"]["carol"]["status"] == 1
    assert _metric("presence_connections_refused_total", transport="tcp") == before + 3
    lines = [r for r in caplog.records if "at capacity" in r.getMessage()]
    assert len(lines) == 1, "the refusal log line is rate-limited"
    for client in held:
        await client.close()


async def test_a_connection_without_login_is_closed_at_the_deadline_even_if_it_pings(make_node: MakeNode) -> None:
    node = await make_node(login_timeout=0.5)
    before = _metric("presence_login_timeouts_total")
    idle = await WsClient.connect(node.ws_port, imei="idle")
    member = await WsClient.connect(node.ws_port, imei="member")
    await member.login("alice")

    async def keep_pinging() -> None:
        while True:
            await idle.send(Command.PING)
            await asyncio.sleep(0.1)  # a client's ping interval, not a wait for a push

    pinger = asyncio.create_task(keep_pinging())
    try:
        while True:
            msg = await idle.recv(timeout=5)
            if msg.command == Command.ERROR:
                break
            assert msg.command == Command.PING
    finally:
        pinger.cancel()
    assert msg.data["code"] == Code.PARAMETER_ERROR and "no LOGIN (9000) within 0.5 s" in msg.data["msg"]
    assert await idle.closed() == 4001
    assert _metric("presence_login_timeouts_total") == before + 1
    # The logged-in connection opened at the same time is not touched by the deadline.
    await member.send(Command.PING)
    await expect(member, Command.PING)
    await member.close()


def _low_nofile(soft: int, hard: int) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def test_serve_raises_the_descriptor_limit_and_logs_capacity_and_admins() -> None:
    proc = ServeProcess([], preexec_fn=_low_nofile(256, 1024))
    try:
        proc.wait_for_line(r"file descriptors: soft limit 1024 \(was 256\); up to 896 client connections")
        proc.wait_for_line(r"app 10000: admins \['admin'\], login_model 3, max_sessions 10, unsigned_login off")
    finally:
        proc.kill()


async def test_serve_out_of_descriptors_refuses_clients_but_answers_healthz() -> None:
    proc = ServeProcess([], preexec_fn=_low_nofile(200, 200))  # capacity 200 - 128 = 72
    clients: list[TcpClient] = []
    try:
        proc.wait_for_line(r"up to 72 client connections")
        for i in range(90):
            clients.append(await TcpClient.connect(proc.tcp_port, imei=f"c{i}"))
        closed = await asyncio.gather(*(c.closed(timeout=1) for c in clients[72:]))
        assert all(closed)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{proc.http_port}/healthz") as resp:
                assert resp.status == 200
        proc.wait_for_line(r"at capacity \(72 connections\): refused")
        late = await TcpClient.connect(proc.tcp_port)
        assert await late.closed(timeout=2)
        await clients[0].close()
        # A freed slot takes a new client again.
        for _ in range(50):
            fresh = await TcpClient.connect(proc.tcp_port, imei="fresh")
            fresh.send(Command.LOGIN, {"userId": "dave", "userSign": sign("dave")})
            try:
                msg = await fresh.recv(timeout=2)
            except (ConnectionError, TimeoutError):
                await asyncio.sleep(0.05)  # the server may not have seen the close yet
                continue
            assert msg.command == Command.LOGINACK
            break
        else:
            raise AssertionError("no slot freed")
    finally:
        for client in clients:
            client.writer.close()
        proc.kill()


# --- 8. identifiers ------------------------------------------------------------------------------------

BAD_USER_IDS = ["a\nb", "a\x00b", "a\x7fb", "a\u0085b", "a\u2028b", "a\tb", "a|b", "a{b", "a}b", "é" * 32 + "x", ""]
GOOD_USER_IDS = ["alice", "é" * 32, "😀" * 16, "x" * 64, "a b", "日本", "a:b", "\u00a0", 'O\'Brien "x"']


@pytest.mark.parametrize("user", BAD_USER_IDS)
def test_bad_user_ids_are_refused_in_python(user: str) -> None:
    with pytest.raises(ParamError):
        check_user_id("userId", user)


@pytest.mark.parametrize("imei", ["a\nb", "a|b", "\x1b[31m", "x" * 129])
def test_bad_imeis_are_refused(imei: str) -> None:
    with pytest.raises(ParamError):
        check_imei("imei", imei)


async def test_lua_applies_the_same_identifier_rule(any_redis: Redis) -> None:
    """presence_friends_add validates both ids in Lua: it must accept exactly what ids.py accepts."""
    presence = Presence(any_redis)
    for user in BAD_USER_IDS + GOOD_USER_IDS:
        try:  # the owner's side: one key, a (userId, friendId) pair
            await any_redis.fcall("presence_friends_add", 1, presence.user(APP, "anchor").friends, "anchor", user)
            lua_ok = True
        except Exception as exc:
            assert "PRESENCE_PARAM" in str(exc)
            lua_ok = False
        assert lua_ok == (user in GOOD_USER_IDS), user
    # Bytes no Python str can carry: invalid UTF-8, CESU surrogates, overlong forms.
    for raw in (b"\xff", b"a\xc0\xafb", b"\xed\xa0\x80", b"\xe2\x80", b"\xf4\x90\x80\x80"):
        with pytest.raises(Exception, match="PRESENCE_PARAM"):
            await any_redis.fcall("presence_friends_add", 1, "k1", "anchor", raw)


async def test_newline_user_id_is_refused_everywhere(
    make_node: MakeNode, store_redis: Redis, real_redis: Redis, rest: TestClient
) -> None:
    node = await make_node()
    client = await TcpClient.connect(node.tcp_port)
    error = await client.login("eve\nil")
    assert error.command == Command.ERROR and error.data["code"] == Code.PARAMETER_ERROR
    assert "must not contain '\\n'" in error.data["msg"]
    for redis in (store_redis, real_redis):  # the gateway's store, and the REST app's
        assert not [k async for k in redis.scan_iter(match="presence:{*eve*")]
    status, env = await rest_post(rest, QUERY_USERS, b'{"userList":["bob"]}', user="eve\nil")
    assert (status, env["code"]) == (400, Code.PARAMETER_ERROR)
    status, env = await rest_post(rest, QUERY_USERS, b'{"userList":["bob\\u2028x"]}')
    assert (status, env["code"]) == (400, Code.PARAMETER_ERROR) and "userList[0]" in env["msg"]
    bad_imei = await TcpClient.connect(node.tcp_port, imei="dev|1")
    error = await bad_imei.login("alice")
    assert error.command == Command.ERROR and "imei must not contain '|'" in error.data["msg"]


# --- the fuzz target, briefly (make fuzz runs it for a minute) -----------------------------------------


def test_fuzz_codec_and_sign_verifier_briefly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(FUZZ_TARGET),
            "-max_total_time=4",
            "-print_final_stats=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done" in proc.stderr and not list(tmp_path.iterdir())


def test_generate_still_verifies() -> None:  # the bounds must not refuse a real sign with a long identifier
    user = "é" * 32
    verify_user_sign(generate_user_sign(APP, KEY, user), APP, KEY, user)


# --- follow-ups (found by attacking the landed work) ----------------------------------------------------

# A. lastEventId must be a stream id Redis accepts, and one user's inbox must never block another's pushes.
BAD_EVENT_IDS = ["0-99999999999999999999", "18446744073709551616-0", "1-1\n", "\u0661-\u0661", "1-", "-1"]


@pytest.mark.parametrize("last", BAD_EVENT_IDS, ids=["seq>uint64", "ms>uint64", "newline", "arabic-digits", "1-", "-1"])
async def test_followup_a_last_event_id_out_of_range_is_refused(make_node: MakeNode, last: str) -> None:
    node = await make_node(offline_grace=30)
    client = await WsClient.connect(node.ws_port, imei="tab")
    await client.login("alice", lastEventId=None)
    await client.close()  # dropped: the session lives on for the grace
    client = await WsClient.connect(node.ws_port, imei="tab")
    error = await client.login("alice", lastEventId=last)
    assert error.command == Command.ERROR and error.data["code"] == Code.PARAMETER_ERROR
    assert "lastEventId must be a stream id" in error.data["msg"]
    assert await client.closed()


async def test_followup_a_last_event_id_beyond_the_inbox_does_not_resume(make_node: MakeNode, facade: Presence) -> None:
    node = await make_node(offline_grace=30)
    await facade.add_friend(APP, "carol", "alice")
    client = await WsClient.connect(node.ws_port, imei="tab")
    await client.login("alice", lastEventId=None)
    await facade.set_custom_status(APP, "carol", 1, "one")
    seen = await expect(client, Command.CUSTOM_NOTIFY)
    await client.close()
    client = await WsClient.connect(node.ws_port, imei="tab")
    ms = int(ws_pack(seen)["eventId"].split("-")[0])
    future = f"{ms + 10**9}-0"  # an id the inbox never held
    ack = await client.login("alice", lastEventId=future)
    assert ack.command == Command.LOGINACK and ack.data["resumed"] is False
    assert ack.data["lastEventId"] != future
    await facade.set_custom_status(APP, "carol", 1, "two")  # pushes still flow from the real cursor
    assert (await expect(client, Command.CUSTOM_NOTIFY)).data["customText"] == "two"
    await client.close()


async def test_followup_a_an_unreadable_inbox_does_not_block_other_users_pushes(
    make_node: MakeNode, facade: Presence, store_redis: Any
) -> None:
    node = await make_node()
    await facade.add_friend(APP, "carol", "bob")
    alice = await WsClient.connect(node.ws_port, imei="alice-tab")
    await alice.login("alice")
    bob = await WsClient.connect(node.ws_port, imei="bob-tab")
    await bob.login("bob")
    # Alice's inbox turns into something XREAD refuses (WRONGTYPE, like an id Redis calls invalid), and a
    # doorbell makes the delivery loop read it: every batch holding it used to fail, bob's pushes too.
    inbox = node.presence.keys.user(APP, "alice").inbox
    await store_redis.delete(inbox)
    await store_redis.set(inbox, "not a stream")
    await store_redis.publish(node.presence.keys.doorbell(node.hub.node_id), json.dumps([inbox]))
    error = await expect(alice, Command.ERROR)
    assert error.data == {"code": Code.SYSTEM_ERROR, "msg": "system error", "requestId": error.data["requestId"]}
    await facade.set_custom_status(APP, "carol", 1, "still here")
    assert (await expect(bob, Command.CUSTOM_NOTIFY, timeout=3)).data["customText"] == "still here"
    await alice.close()
    await bob.close()


# B. Every socket of every port counts against the capacity; idle HTTP sockets are closed at a deadline.


async def _healthz(port: int) -> int | None:
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


@pytest.mark.parametrize("port", ["http", "ws"])
async def test_followup_b_idle_sockets_to_http_ports_are_counted_refused_and_closed(port: str) -> None:
    # capacity 200 - 128 = 72 sockets, plus 32 only the HTTP listeners may use; idle deadline 1 s.
    proc = ServeProcess(
        [], env={"PRESENCE_APPS": f"{APP}:{KEY}", "PRESENCE_LOGIN_TIMEOUT": "1"}, preexec_fn=_low_nofile(200, 200)
    )
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        proc.wait_for_line(r"up to 72 client connections")
        target = proc.http_port if port == "http" else proc.ws_port
        for _ in range(185):  # the tester's flood: connect, send nothing
            idle.append(await asyncio.open_connection("127.0.0.1", target))
        # Over capacity + spare the server closes a socket at once; the rest at the idle deadline.
        ends = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in idle), return_exceptions=True)
        assert all(end == b"" or isinstance(end, ConnectionError) for end in ends), ends
        proc.wait_for_line(r"at capacity \(72 connections\): refused \d+ new connection")
        assert await _healthz(proc.http_port) == 200
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{proc.http_port}/metrics") as resp:
                metrics = await resp.text()
        refused = re.search(rf'presence_connections_refused_total{{transport="{port}"}} (\S+)', metrics)
        assert refused and float(refused.group(1)) >= 185 - 72 - 32, metrics
        gateway = await TcpClient.connect(proc.tcp_port)
        assert (await gateway.login("dave")).command == Command.LOGINACK
        await gateway.close()
        assert "Traceback" not in proc.output()
    finally:
        for _, writer in idle:
            writer.close()
        proc.kill()


async def test_followup_b_rest_sockets_count_against_gateway_capacity(make_node: MakeNode) -> None:
    node = await make_node(max_connections=3, http_port=free_port())
    held = [await asyncio.open_connection("127.0.0.1", node.http_port) for _ in range(3)]
    assert await _healthz(node.http_port) == 200  # the spare keeps REST answering at capacity
    client = await TcpClient.connect(node.tcp_port)
    assert await client.closed(), "a gateway socket beyond the capacity was kept"
    for _, writer in held:
        writer.close()


# H. A sign with bytes after its zlib stream; query values that are not UTF-8; a refusal burst's total.


def test_followup_h_sign_with_bytes_after_the_zlib_stream_is_invalid() -> None:
    good = generate_user_sign(APP, KEY, "alice")
    packed = base64.b64decode(good.translate(str.maketrans("*-_", "+/=")))
    for tail in (b"\x00", b"junk", zlib.compress(b"{}")):
        forged = base64.b64encode(packed + tail).decode().translate(_TO_URL)
        with pytest.raises(AuthError) as info:
            verify_user_sign(forged, APP, KEY, "alice")
        assert info.value.code == Code.USER_SIGN_INVALID
    verify_user_sign(good, APP, KEY, "alice")


@pytest.mark.parametrize("query", ["identifier=%FF", "identifier=%FE", "appId=10000&userSign=%C3", "x%FF=1"])
async def test_followup_h_query_not_utf8_is_400_naming_the_parameter(rest: TestClient, query: str) -> None:
    resp = await rest.post(f"{QUERY_USERS}?{query}", data=b"{}")
    env = await resp.json()
    assert (resp.status, env["code"]) == (400, Code.PARAMETER_ERROR), env
    name = query.rsplit("&", 1)[-1].split("=")[0]
    assert f"query parameter {name} is not valid UTF-8" in env["msg"]


async def test_followup_h_a_refusal_burst_is_reported_without_a_later_refusal(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("presence.sockets.REFUSED_LOG_INTERVAL", 0.5)
    node = await make_node(max_connections=1)
    held = await TcpClient.connect(node.tcp_port)
    assert (await held.login("carol")).command == Command.LOGINACK
    with caplog.at_level(logging.WARNING, logger="presence.gateway"):
        for _ in range(4):
            assert await (await TcpClient.connect(node.tcp_port)).closed()
        reports: list[str] = []
        for _ in range(100):  # the timer's report, at most one interval after the first
            reports = [r.getMessage() for r in caplog.records if "at capacity" in r.getMessage()]
            if len(reports) == 2:
                break
            await asyncio.sleep(0.05)
    assert [re.search(r"refused (\d+)", r).group(1) for r in reports] == ["1", "3"], reports  # type: ignore[union-attr]
    await held.close()


# G. Malformed HTTP: an envelope that does not echo the input, one log line without traceback.

MALFORMED_HTTP = {
    "long URL": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "long header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"b" * 9000 + b"\r\n\r\n",
    "bad method": b"G<script>T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad chunk size": b"POST " + QUERY_USERS.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/json\r\n\r\nzz<script>\r\n{}\r\n0\r\n\r\n",
    "CL with TE": b"POST " + QUERY_USERS.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "bad header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon <script>\r\n\r\n",
}


async def _raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


@pytest.mark.parametrize("port", ["http", "ws"])
async def test_followup_g_malformed_http_gets_an_envelope_without_echo_and_one_log_line(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, port: str
) -> None:
    # The report is rate-limited per process: start this test with no report in the interval.
    monkeypatch.setattr(EnvelopeRequestHandler, "_logged_at", -MALFORMED_LOG_INTERVAL)
    node = await make_node(http_port=free_port())
    target = node.http_port if port == "http" else node.ws_port
    with caplog.at_level(logging.DEBUG):
        for name, request in MALFORMED_HTTP.items():
            status, headers, body = await _raw_http(target, request)
            assert status == 400, (name, status, body)
            assert headers["content-type"].startswith("application/json"), (name, headers)
            env = json.loads(body)
            assert env["code"] == Code.PARAMETER_ERROR and env["requestId"] == headers["x-request-id"], env
            for echoed in (b"aaaa", b"bbbb", b"<script>", b"zz"):
                assert echoed not in body, (name, body)
    # (asyncio's own "Unclosed client" reports come from other tests' garbage, collected meanwhile)
    assert not [r for r in caplog.records if r.name != "asyncio" and (r.exc_info or r.levelno >= logging.ERROR)], [
        r.getMessage() for r in caplog.records if r.name != "asyncio" and (r.exc_info or r.levelno >= logging.ERROR)
    ]
    malformed = [r.getMessage() for r in caplog.records if "malformed HTTP request from" in r.getMessage()]
    assert len(malformed) == 1 and "<script>" not in malformed[0], malformed


# F. Invalid UTF-8 in a WebSocket text message: close code 1007, documented.

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "gateway" / "PROTOCOL.md"


async def test_followup_f_invalid_utf8_text_message_closes_1007_as_documented(make_node: MakeNode) -> None:
    node = await make_node()
    reader, writer = await asyncio.open_connection("127.0.0.1", node.ws_port)
    key = base64.b64encode(b"0123456789abcdef").decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert b" 101 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    payload, mask = b'{"command":9999,"x":"\xff"}', b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)  # a client text frame, masked
    first, size = await asyncio.wait_for(reader.readexactly(2), 5)
    body = await reader.readexactly(size)
    writer.close()
    assert first == 0x88, "expected a close frame"
    code = int.from_bytes(body[:2], "big")
    assert code == 1007
    close_codes = next(p for p in PROTOCOL_MD.read_text().split("\n\n") if p.startswith("WebSocket close codes"))
    assert f"{code} a text message that is not valid UTF-8" in close_codes.replace("\n", " ")
