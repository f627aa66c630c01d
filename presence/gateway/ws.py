"""The WebSocket transport (aiohttp): binary seed frames or JSON text, at ``/ws``."""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType, web

from presence.appkeys import HUB
from presence.gateway.codec import HEADER, MAX_BODY, MAX_IMEI, FrameError, decode_binary_message, decode_text_message
from presence.gateway.connection import MAX_WRITE_BUFFER, ClientConnection
from presence.gateway.hub import Hub
from presence.gateway.outbound import Encoded


class WsConnection(ClientConnection):
    """Messages are written as ready-made WebSocket frames to the request's transport (``write``).

    Why not ``WebSocketResponse.send_bytes``/``send_str``: they are coroutines that frame one payload
    each, so a push to N connections would cost N awaits (tasks, from the synchronous delivery loop) and
    N copies of the pack. A push's pack is encoded once (``Encoded.head``) and framed per connection with
    the connection's own ``clientType``/``imei`` tail (``Encoded.ws_text_frame`` / ``ws_binary_frame``),
    and a connection's backlog goes out in one write. This is safe because the response is created without
    compression (no per-connection state in frames) and aiohttp writes each of its own frames (pongs, the
    close) with synchronous transport writes, so frames never interleave. aiohttp's writer is only used for
    the close handshake. aiohttp's protocol gets the transport's ``pause_writing``, not us: back-pressure
    is the buffer size, checked after each write.
    """

    transport_name = "ws"

    def __init__(self, hub: Hub, ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> None:
        super().__init__(hub)
        self._ws = ws
        self._transport = transport
        self._close_handshake: asyncio.Future[bool] | None = None

    def frame(self, message: Encoded) -> bytes:
        if self.session.text_mode:
            return message.ws_text_frame(self.session.pack_tail)
        return message.ws_binary_frame(self.session.pack_tail)

    def write(self, data: bytes) -> None:
        """The one write path of a WebSocket connection (replies and pushes): whole frames, below aiohttp's
        writer (see the class docstring); a client more than ``MAX_WRITE_BUFFER`` bytes behind is dropped."""
        transport = self._transport
        if transport is None or not self.session.writable or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.drop_slow(transport)

    def close(self, code: int, reason: str) -> None:
        if self.session.begin_close() and not self._ws.closed:
            self._close_handshake = asyncio.ensure_future(self._ws.close(code=code, message=reason.encode()[:120]))

    def receive_mode(self, text: bool) -> None:
        """The client's last message was text (JSON) or binary (seed frames): answer in the same mode."""
        self.session.text_mode = text

    async def settle(self) -> None:
        """Let queued frames finish: an ERROR or a kick goes out before the socket does."""
        await super().settle()
        if self._close_handshake is not None:
            try:
                await asyncio.shield(self._close_handshake)
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
                    conn.receive_mode(text=False)
                    frame = decode_binary_message(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    conn.receive_mode(text=True)
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
