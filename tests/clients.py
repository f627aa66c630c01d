"""Real protocol clients for tests: raw TCP speaking seed frames, aiohttp WebSocket (binary or text); typed views
of the replies tests read (a WebSocket pack, a Redis stream range)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import aiohttp

from presence.auth import generate_user_sign
from presence.gateway.codec import Command, decode_server_frames, encode_client_frame

APP = 10000
KEY = "test-private-key"
TIMEOUT = 5.0


def sign(user: str, key: str = KEY, app: int = APP) -> str:
    return generate_user_sign(app, key, user)


class Msg:
    """A server message, normalised: command and data (the pack's data on every transport)."""

    def __init__(self, command: int, data: Any, pack: dict[str, Any] | None = None) -> None:
        self.command, self.data, self.pack = command, data, pack

    def __repr__(self) -> str:
        return f"Msg({self.command}, {self.data!r})"


class TcpClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client_type: int, imei: str):
        self.reader, self.writer = reader, writer
        self.client_type, self.imei = client_type, imei
        self.buf = bytearray()
        self.pending: list[Msg] = []

    @classmethod
    async def connect(cls, port: int, client_type: int = 3, imei: str = "tcp-1") -> TcpClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, client_type, imei)

    def send(self, command: int, data: dict[str, Any] | None = None, **kw: Any) -> None:
        kw.setdefault("client_type", self.client_type)
        kw.setdefault("imei", self.imei)
        self.writer.write(encode_client_frame(command, data, **kw))

    def send_raw(self, raw: bytes) -> None:
        self.writer.write(raw)

    async def recv(self, timeout: float = TIMEOUT) -> Msg:
        while not self.pending:
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not chunk:
                raise ConnectionError("closed by server")
            self.buf += chunk
            self.pending += [Msg(c, json.loads(p)) for c, p in decode_server_frames(self.buf)]
        return self.pending.pop(0)

    async def closed(self, timeout: float = TIMEOUT) -> bool:
        """True once the server closed the socket (messages before the close are skipped)."""
        try:
            while True:
                chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
                if not chunk:
                    return True
        except (ConnectionError, TimeoutError):
            return False

    async def login(self, user: str, app: int = APP, key: str = KEY, **extra: Any) -> Msg:
        """LOGIN asking for PING replies (``pong``, opt-in for binary clients): tests use a PING as a barrier."""
        extra.setdefault("pong", True)
        self.send(Command.LOGIN, {"userId": user, "userSign": sign(user, key, app), **extra}, app_id=app)
        return await self.recv()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


class WsClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        ws: aiohttp.ClientWebSocketResponse,
        text: bool,
        client_type: int,
        imei: str,
    ) -> None:
        self.session, self.ws, self.text = session, ws, text
        self.client_type, self.imei = client_type, imei

    @classmethod
    async def connect(cls, port: int, text: bool = True, client_type: int = 1, imei: str = "ws-1") -> WsClient:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(f"http://127.0.0.1:{port}/ws")
        return cls(session, ws, text, client_type, imei)

    async def send(self, command: int, data: dict[str, Any] | None = None, app: int = APP) -> None:
        if self.text:
            await self.ws.send_str(
                json.dumps(
                    {
                        "command": command,
                        "appId": app,
                        "clientType": self.client_type,
                        "imei": self.imei,
                        "version": 1,
                        "data": data or {},
                    }
                )
            )
        else:
            await self.ws.send_bytes(
                encode_client_frame(command, data, client_type=self.client_type, imei=self.imei, app_id=app)
            )

    async def recv(self, timeout: float = TIMEOUT) -> Msg:
        msg = await self.ws.receive(timeout)
        if msg.type == aiohttp.WSMsgType.TEXT:
            pack = json.loads(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            buf = bytearray(msg.data)
            ((command, payload),) = decode_server_frames(buf)
            pack = json.loads(payload)
            assert pack["command"] == command
        else:
            raise ConnectionError(f"websocket {msg.type.name}: {self.ws.close_code}")
        return Msg(pack["command"], pack["data"], pack)

    async def closed(self, timeout: float = TIMEOUT) -> int | None:
        """The close code once the server closed (messages before it are skipped)."""
        while True:
            msg = await self.ws.receive(timeout)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code

    async def login(self, user: str, app: int = APP, key: str = KEY, **extra: Any) -> Msg:
        """LOGIN; a binary client asks for PING replies (``pong``) so tests can use a PING as a barrier."""
        if not self.text:
            extra.setdefault("pong", True)
        await self.send(Command.LOGIN, {"userId": user, "userSign": sign(user, key, app), **extra}, app=app)
        return await self.recv()

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


async def expect(client: TcpClient | WsClient, command: int, timeout: float = TIMEOUT) -> Msg:
    """The next message, which must have this command (pings are not expected unasked)."""
    msg = await client.recv(timeout)
    assert msg.command == command, f"expected {command}, got {msg}"
    return msg


def ws_pack(msg: Msg) -> dict[str, Any]:
    """The whole pack of a message received over a WebSocket (a TCP frame carries the data alone)."""
    assert msg.pack is not None, f"{msg} has no pack: not received over a WebSocket"
    return msg.pack


def stream_entries(reply: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """An XRANGE/XREVRANGE reply as the suite's clients get it (``decode_responses=False``): ids and fields bytes.

    redis-py types the reply for every client setting (``... | None``, ``bytes | str``, fields ``None``).
    """
    assert isinstance(reply, list), f"not a stream range reply: {reply!r}"
    entries = []
    for entry_id, fields in reply:
        assert isinstance(entry_id, bytes) and isinstance(fields, dict), (entry_id, fields)
        assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in fields.items()), fields
        entries.append((entry_id, cast("dict[bytes, bytes]", fields)))  # each key and value checked just above
    return entries
