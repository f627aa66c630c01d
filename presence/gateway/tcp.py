"""The raw TCP transport: seed binary frames in, 8-byte-header frames out (an asyncio Protocol)."""

from __future__ import annotations

import asyncio
import socket
from typing import cast

from presence.gateway.codec import FrameDecoder, FrameError
from presence.gateway.connection import MAX_WRITE_BUFFER, ClientConnection
from presence.gateway.hub import Hub
from presence.gateway.outbound import Encoded


class TcpConnection(ClientConnection, asyncio.Protocol):
    """Back-pressure is asyncio's: the transport's high-water mark is ``MAX_WRITE_BUFFER``, and a client whose
    unsent bytes pass it (``pause_writing``) is dropped at once rather than waited for."""

    transport_name = "tcp"

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self._decoder = FrameDecoder()
        self._transport: asyncio.Transport | None = None
        self._counted = False

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.hub.closing or not self.hub.has_room(self.transport_name):
            self.session.begin_close()
            self._transport.abort()  # frees the descriptor now; no LOGIN could be served anyway
            return
        self._transport.set_write_buffer_limits(high=MAX_WRITE_BUFFER)
        self._counted = True
        self.hub.gate.tcp_open += 1
        self.hub.opened(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            self.feed(exc.frames, exc)
            return
        self.feed(frames)

    def pause_writing(self) -> None:
        """More than ``MAX_WRITE_BUFFER`` bytes wait for the client: it is too slow, drop it."""
        if self._transport is not None and not self._transport.is_closing():
            self.drop_slow(self._transport)

    def resume_writing(self) -> None:
        """Never waited for: a client that paused the writes was dropped."""

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.hub.gate.tcp_open -= 1
        self.hub.connection_lost(self)

    # --- ClientConnection ---

    def frame(self, message: Encoded) -> bytes:
        return message.tcp()

    def write(self, data: bytes) -> None:
        """The one write path of a TCP connection (replies and pushes)."""
        transport = self._transport
        if transport is None or transport.is_closing():  # closing the session closes the transport at once
            return
        transport.write(data)

    def close(self, code: int, reason: str) -> None:
        if self.session.begin_close() and self._transport is not None:
            self._transport.close()  # flushes what was written first


async def start_tcp_server(hub: Hub, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
    """``reuse_port``: SO_REUSEPORT, so several worker processes share the port (``--workers``)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: TcpConnection(hub), host, port, reuse_address=True, reuse_port=reuse_port or None
    )
