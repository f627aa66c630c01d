"""The WebSocket transport (aiohttp): binary seed frames or JSON text, at ``/ws``."""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType, web

from presence.appkeys import HUB
from presence.gateway.codec import HEADER, MAX_BODY, MAX_IMEI, FrameError, decode_binary_message, decode_text_message
from presence.gateway.hub import Encoded, Hub
from presence.gateway.session import ClientConnection


class WsConnection(ClientConnection):
    """Pushes are written as ready-made WebSocket frames straight to the transport.

    A push's pack is encoded once (``Encoded.head``) and framed per connection with the connection's
    own ``clientType``/``imei`` tail (``Encoded.ws_text_frame`` / ``ws_binary_frame``); aiohttp's writer
    is only used for the close handshake. This is safe because the response is created without
    compression (no per-connection state in frames).
    """

    transport_name = "ws"

    def __init__(self, hub: Hub, ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> None:
        super().__init__(hub)
        self.ws = ws
        self.transport = transport
        self._closer: asyncio.Future[bool] | None = None

    def frame(self, message: Encoded) -> bytes:
        if self.text_mode:
            return message.ws_text_frame(self.pack_tail)
        return message.ws_binary_frame(self.pack_tail)

    def write(self, data: bytes) -> None:
        if self._closer is None:  # nothing after the close handshake has begun
            super().write(data)

    def close(self, code: int, reason: str) -> None:
        if self._closer is None and not self.ws.closed:
            self._closer = asyncio.ensure_future(self.ws.close(code=code, message=reason.encode()[:120]))

    async def settle(self) -> None:
        """Let queued frames finish: an ERROR or a kick goes out before the socket does."""
        if self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._closer is not None:
            try:
                await asyncio.shield(self._closer)
            except (ConnectionError, RuntimeError):
                pass


async def ws_handler(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    ws = web.WebSocketResponse(max_msg_size=HEADER.size + MAX_IMEI + MAX_BODY, autoping=True, compress=False)
    if hub.closing:
        raise web.HTTPServiceUnavailable(text="server is shutting down")
    if not hub.has_room(WsConnection.transport_name):
        refusal = web.Response(status=503, text="server is at capacity, try another node or later")
        refusal.force_close()  # give the descriptor back now, not after a keep-alive timeout
        return refusal
    await ws.prepare(request)
    conn = WsConnection(hub, ws, request.transport)
    hub.opened(conn)
    try:
        async for msg in ws:
            try:
                # The mode is set before decoding, so even a malformed message is answered in its own mode.
                if msg.type == WSMsgType.BINARY:
                    conn.text_mode = False
                    frame = decode_binary_message(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    conn.text_mode = True
                    frame = decode_text_message(msg.data)
                else:
                    break
            except FrameError as exc:
                conn.feed([], exc)
                break
            conn.feed([frame])
        await conn.settle()
    finally:
        await hub.end(conn, "close")
    return ws


def create_ws_app(hub: Hub) -> web.Application:
    app = web.Application()
    app[HUB] = hub
    app.router.add_get("/ws", ws_handler)
    return app
