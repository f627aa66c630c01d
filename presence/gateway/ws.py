"""The WebSocket transport (aiohttp): binary seed frames or JSON text, at ``/ws``."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from aiohttp import WSMsgType, web

from presence.appkeys import HUB
from presence.gateway.codec import HEADER, MAX_BODY, MAX_IMEI, FrameError, decode_binary_message, decode_text_message
from presence.gateway.hub import Encoded, Hub
from presence.gateway.session import ClientConnection

log = logging.getLogger("presence.gateway.ws")

MAX_QUEUED = 10_000  # frames waiting for a slow client before it is dropped


class WsConnection(ClientConnection):
    transport_name = "ws"

    def __init__(self, hub: Hub, ws: web.WebSocketResponse) -> None:
        super().__init__(hub)
        self.ws = ws
        self.text_mode = False
        self._out: deque[bytes | str | tuple[int, str]] = deque()
        self._writer: asyncio.Task[None] | None = None

    def send(self, message: Encoded) -> None:
        self._queue(message.pack().decode() if self.text_mode else message.ws_binary())

    def close(self, code: int, reason: str) -> None:
        self._queue((code, reason))

    async def settle(self) -> None:
        if self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._writer is not None:
            await asyncio.shield(self._writer)

    def _queue(self, item: bytes | str | tuple[int, str]) -> None:
        if len(self._out) >= MAX_QUEUED:
            log.warning("dropping slow WebSocket client %s", self.user_id)
            self._out.clear()
            item = (1008, "too slow")
        self._out.append(item)
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        # One writer at a time keeps frames in order; it exits when the queue is empty.
        ws = self.ws
        try:
            while self._out:
                item = self._out.popleft()
                if ws.closed:
                    self._out.clear()
                    break
                if isinstance(item, tuple):
                    self._out.clear()
                    await ws.close(code=item[0], message=item[1].encode()[:120])
                    break
                if isinstance(item, str):
                    await ws.send_str(item)
                else:
                    await ws.send_bytes(item)
        except (ConnectionError, RuntimeError):
            self._out.clear()
        finally:
            self._writer = None


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    hub = request.app[HUB]
    ws = web.WebSocketResponse(max_msg_size=HEADER.size + MAX_IMEI + MAX_BODY, autoping=True)
    if hub.closing:
        raise web.HTTPServiceUnavailable(text="server is shutting down")
    await ws.prepare(request)
    conn = WsConnection(hub, ws)
    hub.opened(conn)
    try:
        async for msg in ws:
            try:
                if msg.type == WSMsgType.BINARY:
                    frame = decode_binary_message(msg.data)
                    conn.text_mode = False
                elif msg.type == WSMsgType.TEXT:
                    frame = decode_text_message(msg.data)
                    conn.text_mode = True
                else:
                    break
            except FrameError as exc:
                conn.feed([], exc)
                break
            conn.feed([frame])
        # Let queued frames finish (an ERROR or a kick is written before the socket goes).
        await conn.settle()
    finally:
        await hub.end(conn, "close")
    return ws


def create_ws_app(hub: Hub) -> web.Application:
    app = web.Application()
    app[HUB] = hub
    app.router.add_get("/ws", ws_handler)
    return app
