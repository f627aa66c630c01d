"""The raw TCP transport: seed binary frames in, 8-byte-header frames out (asyncio Protocol)."""

from __future__ import annotations

import asyncio
import socket

from presence.gateway.codec import FrameDecoder, FrameError
from presence.gateway.hub import Encoded, Hub
from presence.gateway.session import ClientConnection


class TcpConnection(ClientConnection, asyncio.Protocol):
    transport_name = "tcp"

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self.decoder = FrameDecoder()
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.hub.closing or not self.hub.has_room(self.transport_name):
            transport.abort()  # frees the descriptor now; no LOGIN could be served anyway
            self.ended = True
            return
        self._counted = True
        self.hub.gate.tcp_open += 1
        self.hub.opened(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            self.feed(exc.frames, exc)
            return
        self.feed(frames)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.hub.gate.tcp_open -= 1
        self.hub._spawn(self.hub.end(self, "close"))

    def frame(self, message: Encoded) -> bytes:
        return message.tcp()

    def close(self, code: int, reason: str) -> None:
        if self.transport is not None:
            self.transport.close()  # flushes what was written first


async def start_tcp_server(hub: Hub, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
    """``reuse_port``: SO_REUSEPORT, so several worker processes share the port (``--workers``)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: TcpConnection(hub), host, port, reuse_address=True, reuse_port=reuse_port or None
    )
