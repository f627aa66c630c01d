"""Clients written for the seed's lld-im gateway work unchanged against ours.

Raw-socket clients that behave like the public forks' own: a TCP reader that reads in 4-byte steps and
skips bodies, a WebSocket binary client that treats any 9999 reply as an error, devices of one user on
every transport checking that each pack carries its own clientType/imei, and per-app heartbeat timeouts.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import aiohttp
import pytest

from presence.config import AppConfig
from presence.gateway.codec import HEADER, Command, decode_server_frames, encode_client_frame
from presence.service import Presence
from tests.clients import APP, KEY, TIMEOUT, TcpClient, WsClient, expect, sign
from tests.conftest import MakeNode

WEB, IOS, ANDROID, WINDOWS = 1, 2, 3, 4
KNOWN_COMMANDS = {int(c) for c in Command}


def seed_login(user: str, client_type: int, imei: str, app: int = APP) -> bytes:
    """The LOGIN a seed client sends: userId and userSign, nothing of ours (no lastEventId, no pong)."""
    body = {"userId": user, "userSign": sign(user, app=app)}
    return encode_client_frame(Command.LOGIN, body, client_type=client_type, imei=imei, app_id=app)


class SeedTcpReader:
    """Reads like the seed's sample Python client: ``struct.unpack('>i', recv(4))`` step by step.

    It was written against the seed, so it consumes the LOGINACK as the seed sent it (8 bytes of header
    and ``{"userId":"<id>"}``), then reads each later frame's command and length and skips the body.
    Any extra byte in the LOGINACK puts it out of step: the next "command" is a piece of JSON.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> SeedTcpReader:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def step(self) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(4), TIMEOUT)

    async def login(self, user: str, client_type: int, imei: str) -> bytes:
        """Send LOGIN; return the bytes read as the LOGINACK (the seed's size for this user)."""
        self.writer.write(seed_login(user, client_type, imei))
        seed_ack_size = 8 + len(json.dumps({"userId": user}, separators=(",", ":")))
        assert seed_ack_size % 4 == 0, "the sample client's own assumption; pick such a user id"
        return b"".join([await self.step() for _ in range(seed_ack_size // 4)])

    def ping(self) -> None:
        self.writer.write(encode_client_frame(Command.PING, client_type=ANDROID, imei="lld-phone"))

    async def next_command(self) -> int:
        (command,) = struct.unpack(">i", await self.step())
        (length,) = struct.unpack(">i", await self.step())
        assert command in KNOWN_COMMANDS and 0 <= length < 1 << 16, f"out of step: read {command}, {length}"
        for _ in range(length // 4):
            await self.step()
        await asyncio.wait_for(self.reader.readexactly(length % 4), TIMEOUT)
        return command

    async def at_eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), TIMEOUT) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class SeedWsClient:
    """A WebSocket binary client like the seed's web.html: any 9999 from the server is an error."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session, self.ws = session, ws

    @classmethod
    async def connect(cls, port: int) -> SeedWsClient:
        session = aiohttp.ClientSession()
        return cls(session, await session.ws_connect(f"http://127.0.0.1:{port}/ws"))

    async def send(self, raw: bytes) -> None:
        await self.ws.send_bytes(raw)

    async def recv(self) -> dict[str, Any]:
        msg = await self.ws.receive(TIMEOUT)
        assert msg.type == aiohttp.WSMsgType.BINARY, f"expected a binary message, got {msg.type.name}"
        ((command, payload),) = decode_server_frames(bytearray(msg.data))
        assert command != Command.PING, "the server answered a PING: web.html evals it and throws"
        pack: dict[str, Any] = json.loads(payload)
        assert pack["command"] == command
        return pack

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


async def test_seed_tcp_reader_gets_the_seed_loginack_and_reads_the_later_kick(make_node: MakeNode) -> None:
    node = await make_node(login_model=3)
    seed = await SeedTcpReader.connect(node.tcp_port)
    ack = await seed.login("lld", ANDROID, "lld-phone")
    assert ack == bytes.fromhex("00002329 00000010") + b'{"userId":"lld"}'  # the seed's 24 bytes exactly
    seed.ping()  # no opt-in: never answered
    seed.ping()
    tablet = await TcpClient.connect(node.tcp_port, client_type=IOS, imei="lld-ipad")  # same device group
    await tablet.login("lld")
    commands = []
    while Command.MUTUALLOGIN not in commands:
        commands.append(await seed.next_command())
    assert Command.PING not in commands
    assert await seed.at_eof()  # kicked connections are closed after the 9002
    await seed.close()
    await tablet.close()


async def test_seed_websocket_binary_client_never_gets_a_9999(make_node: MakeNode, facade: Presence) -> None:
    node = await make_node()
    await facade.add_friend(APP, "alice", "lld")
    seed = await SeedWsClient.connect(node.ws_port)
    await seed.send(seed_login("lld", WEB, "web-1"))
    ack = await seed.recv()
    assert ack["command"] == Command.LOGINACK and ack["data"] == {"userId": "lld"}
    assert (ack["clientType"], ack["imei"], ack["userId"], ack["toId"]) == (WEB, "web-1", "lld", "lld")
    for _ in range(3):
        await seed.send(encode_client_frame(Command.PING, client_type=WEB, imei="web-1"))
    alice = await TcpClient.connect(node.tcp_port, imei="alice-phone")
    await alice.login("alice")
    online = await seed.recv()  # a pong would have come first and failed the client
    assert online["command"] == Command.NOTIFY and online["data"]["status"] == 1
    assert (online["clientType"], online["imei"]) == (WEB, "web-1")
    # A chat command the seed's clients send on the same socket: an error frame, and the socket stays.
    await seed.send(encode_client_frame(1103, {"fromId": "lld", "toId": "alice"}, client_type=WEB, imei="web-1"))
    err = await seed.recv()
    assert err["command"] == Command.ERROR and err["data"]["code"] == 90001 and err["data"]["command"] == 1103
    await seed.send(encode_client_frame(Command.PING, client_type=WEB, imei="web-1"))
    await alice.close()
    offline = await seed.recv()
    assert offline["command"] == Command.NOTIFY and offline["data"]["status"] == 2
    await seed.close()


async def test_every_pack_carries_the_recipient_sessions_client_type_and_imei(
    make_node: MakeNode, facade: Presence
) -> None:
    """bob on three devices (WS binary, WS text, TCP): one push, each WebSocket pack with its own fields."""
    node = await make_node(login_model=3)  # a mobile, a desktop and a web session coexist
    await facade.add_friend(APP, "alice", "bob")
    phone = await WsClient.connect(node.ws_port, text=False, client_type=IOS, imei="bob-phone")
    tab = await WsClient.connect(node.ws_port, text=True, client_type=WEB, imei="bob-tab")
    pc = await TcpClient.connect(node.tcp_port, client_type=WINDOWS, imei="bob-pc")
    ack = await phone.login("bob")
    assert ack.pack is not None and (ack.pack["clientType"], ack.pack["imei"]) == (IOS, "bob-phone")
    ack = await tab.login("bob")
    assert ack.pack is not None and (ack.pack["clientType"], ack.pack["imei"]) == (WEB, "bob-tab")
    await expect(phone, Command.NOTIFY_SYNC)
    await pc.login("bob")
    for device, own in ((phone, (IOS, "bob-phone")), (tab, (WEB, "bob-tab"))):
        sync = await expect(device, Command.NOTIFY_SYNC)
        assert sync.pack is not None and (sync.pack["clientType"], sync.pack["imei"]) == own
    alice = await TcpClient.connect(node.tcp_port, client_type=ANDROID, imei="alice-phone")
    await alice.login("alice")
    on_phone, on_tab, on_pc = await asyncio.gather(
        expect(phone, Command.NOTIFY), expect(tab, Command.NOTIFY), expect(pc, Command.NOTIFY)
    )
    assert on_phone.pack is not None and on_tab.pack is not None
    assert (on_phone.pack["clientType"], on_phone.pack["imei"]) == (IOS, "bob-phone")
    assert (on_tab.pack["clientType"], on_tab.pack["imei"]) == (WEB, "bob-tab")
    for pack in (on_phone.pack, on_tab.pack):
        assert pack["userId"] == pack["toId"] == "bob" and pack["appId"] == APP
    assert on_phone.pack["eventId"] == on_tab.pack["eventId"]
    assert on_phone.data == on_tab.data == on_pc.data and on_pc.data["userId"] == "alice"  # TCP: data only
    # Replies too: a PULL answered on the binary socket names that socket's session.
    await phone.send(Command.PULL, {"userList": ["alice"]})
    reply = await expect(phone, Command.PULL)
    assert reply.pack is not None and (reply.pack["clientType"], reply.pack["imei"]) == (IOS, "bob-phone")
    for client in (alice, phone, tab, pc):
        await client.close()


@pytest.mark.parametrize(
    ("transport", "opt_in", "answered"),
    [
        ("tcp", False, False),
        ("tcp", True, True),
        ("ws-binary", False, False),
        ("ws-binary", True, True),
        ("ws-text", False, True),
    ],
)
async def test_ping_is_answered_for_text_clients_and_binary_ones_that_opt_in(
    make_node: MakeNode, transport: str, opt_in: bool, answered: bool
) -> None:
    node = await make_node()
    client: TcpClient | WsClient
    if transport == "tcp":
        client = await TcpClient.connect(node.tcp_port)
    else:
        client = await WsClient.connect(node.ws_port, text=transport == "ws-text")
    await client.login("alice", pong=opt_in)
    for command in (Command.PING, Command.PULL):
        if isinstance(client, TcpClient):
            client.send(command, {"userList": ["alice"]} if command == Command.PULL else None)
        else:
            await client.send(command, {"userList": ["alice"]} if command == Command.PULL else None)
    if answered:
        assert (await expect(client, Command.PING)).data == {}
    await expect(client, Command.PULL)  # without opt-in, the PULL reply is the next thing
    await client.close()


async def test_loginack_carries_our_cursor_only_when_the_login_asks(make_node: MakeNode) -> None:
    node = await make_node()
    plain = await WsClient.connect(node.ws_port, imei="a")
    assert (await plain.login("alice")).data == {"userId": "alice"}
    asking = await WsClient.connect(node.ws_port, imei="b")
    data = (await asking.login("alice", lastEventId=None)).data
    assert set(data) == {"userId", "lastEventId"} and "-" in data["lastEventId"]
    resuming = await TcpClient.connect(node.tcp_port, imei="c")
    data = (await resuming.login("alice", lastEventId=data["lastEventId"])).data
    assert set(data) == {"userId", "lastEventId", "resumed"}
    for client in (plain, asking, resuming):
        await client.close()


@pytest.mark.parametrize("transport", ["tcp", "ws-binary", "ws-text"])
async def test_unserved_commands_get_an_error_and_the_connection_stays(make_node: MakeNode, transport: str) -> None:
    node = await make_node()
    client: TcpClient | WsClient
    if transport == "tcp":
        client = await TcpClient.connect(node.tcp_port)
    else:
        client = await WsClient.connect(node.ws_port, text=transport == "ws-text")

    async def send(command: int, data: dict[str, Any] | None = None) -> None:
        if isinstance(client, TcpClient):
            client.send(command, data)
        else:
            await client.send(command, data)

    await send(1103, {"fromId": "alice", "toId": "bob", "messageBody": "hi"})  # before LOGIN too
    err = await expect(client, Command.ERROR)
    assert err.data == {
        "code": 90001,
        "msg": "command 1103 is not served by this gateway (it serves 9000, 9003, 9999, 4002, 4003, 4011)",
        "command": 1103,
    }
    await client.login("alice")
    await send(Command.LOGINACK, {})
    err = await expect(client, Command.ERROR)
    assert "server-to-client only" in err.data["msg"] and err.data["command"] == 9001
    await send(Command.PULL, {"userList": ["alice"]})
    assert (await expect(client, Command.PULL)).data["data"]["alice"]["status"] == 1
    # A malformed frame still closes the connection.
    if isinstance(client, TcpClient):
        client.send_raw(HEADER.pack(9999, 1, 1, 1, APP, 0, 0))
    elif transport == "ws-binary":
        await client.ws.send_bytes(HEADER.pack(9999, 1, 1, 1, APP, 0, 0))
    else:
        await client.ws.send_str('{"command":9999,"messageType":1}')
    assert "messageType" in (await expect(client, Command.ERROR)).data["msg"]
    assert await client.closed()
    await client.close()


async def test_heartbeat_timeout_per_app(make_node: MakeNode, facade: Presence) -> None:
    never, short, default = 10000, 10001, 10002
    node = await make_node(
        node_id="hb",
        node_ttl=0.5,  # the node notices its own reaping quickly
        heartbeat_timeout=0.8,
        apps={
            never: AppConfig(private_key=KEY, heartbeat_timeout=0),
            short: AppConfig(private_key=KEY, heartbeat_timeout=0.2),
            default: AppConfig(private_key=KEY),  # the global 0.8 s
        },
    )
    await facade.add_friend(never, "alice", "bob")
    bob = await WsClient.connect(node.ws_port)  # app `never` too: no PING needed to watch
    await bob.login("bob", app=never)
    alice = await TcpClient.connect(node.tcp_port, imei="alice-phone")  # silent from here on
    await alice.login("alice", app=never)
    await expect(bob, Command.NOTIFY)
    carol = await TcpClient.connect(node.tcp_port, imei="carol")
    await carol.login("carol", app=short)
    dave = await TcpClient.connect(node.tcp_port, imei="dave")
    await dave.login("dave", app=default)
    assert await carol.closed()
    dave.send(Command.PULL, {"userList": ["dave"]})  # still open after the short app's timeout
    await expect(dave, Command.PULL)
    assert await dave.closed()  # ... and closed after the global one
    alice.send(Command.PULL, {"userList": ["alice"]})  # silent longer than both: still open
    assert (await expect(alice, Command.PULL)).data["data"]["alice"]["status"] == 1
    state = await facade.query_users(short, ["carol"]) | await facade.query_users(default, ["dave"])
    assert state["carol"].status == state["dave"].status == 2
    # A never-timing-out connection still goes offline when it closes...
    await alice.close()
    assert (await expect(bob, Command.NOTIFY)).data["status"] == 2
    # A node reaped while alive (a long pause) keeps its connections and logs their sessions in again.
    await facade.nodes.reap("hb")
    assert (await facade.query_users(never, ["bob"]))["bob"].status == 2
    deadline = asyncio.get_running_loop().time() + 5
    while (await facade.query_users(never, ["bob"]))["bob"].status != 1:
        assert asyncio.get_running_loop().time() < deadline, "bob's session was not logged in again"
        await asyncio.sleep(0.05)
    await bob.send(Command.PING)
    await expect(bob, Command.PING)
    await bob.close()


async def test_pong_opt_in_must_be_a_boolean(make_node: MakeNode) -> None:
    node = await make_node()
    client = await TcpClient.connect(node.tcp_port)
    client.send(Command.LOGIN, {"userId": "alice", "userSign": sign("alice"), "pong": "yes"})
    err = await expect(client, Command.ERROR)
    assert (err.data["code"], err.data["msg"]) == (90001, "data.pong must be true or false")
    assert await client.closed()
    assert (await node.presence.query_users(APP, ["alice"]))["alice"].status == 2  # nothing half-done
