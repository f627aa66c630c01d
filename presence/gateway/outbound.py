"""What the gateway sends, per wire format: one message encoded once and shared by every recipient.

Wire formats (gateway/PROTOCOL.md): TCP frames carry the pack's ``data`` after the seed's 8-byte header
(command, length); WebSocket messages carry the whole pack, as a binary message (the same 8-byte header,
then the pack JSON) or as a text message (the pack JSON). A pack ends with the recipient session's
``clientType`` and ``imei`` (``codec.pack_tail``), so it is a shared head plus a per-connection tail.

WebSocket frames are built here (RFC 6455 5.2): unmasked, unfragmented, uncompressed server frames.
"""

from __future__ import annotations

import struct

from presence.gateway.codec import SERVER_HEADER, encode_tcp, pack_head

# WebSocket frame headers (RFC 6455 5.2: FIN + opcode, then the 7-bit, 16-bit or 64-bit length form), and
# the same followed by the seed's 8-byte server header (command, length), packed in one call per frame.
_TEXT, _BINARY = 0x81, 0x82
_WS_SHORT, _WS_MEDIUM, _WS_LONG = (struct.Struct(f) for f in ("!BB", "!BBH", "!BBQ"))
_SEED_SHORT, _SEED_MEDIUM, _SEED_LONG = (struct.Struct(f) for f in ("!BB2i", "!BBH2i", "!BBQ2i"))


def websocket_header(size: int, *, text: bool) -> bytes:
    """The header of an unmasked, unfragmented, uncompressed server frame of ``size`` payload bytes."""
    first = _TEXT if text else _BINARY
    if size < 126:
        return _WS_SHORT.pack(first, size)
    if size < 1 << 16:
        return _WS_MEDIUM.pack(first, 126, size)
    return _WS_LONG.pack(first, 127, size)


class Encoded:
    """One message's bytes per wire format, built on first use and shared by every connection.

    TCP frames carry only ``data``: one frame for all. A WebSocket pack also carries the recipient
    session's ``clientType`` and ``imei``, so it is a shared head (``pack_head``, encoded once) plus the
    connection's own ``pack_tail`` (encoded once per connection): per recipient only the lengths,
    two small headers and one join.

    ``event_id`` is the inbox entry's id as Redis wrote it (``InboxEntry.id_text``): the pack's ``eventId``,
    which lets a WebSocket client resume. None for a reply.
    """

    __slots__ = ("_head", "_tcp", "app_id", "command", "data", "event_id", "user_id")

    def __init__(self, command: int, data: bytes, app_id: int, user_id: str, event_id: str | None) -> None:
        self.command, self.data, self.app_id, self.user_id, self.event_id = command, data, app_id, user_id, event_id
        self._tcp: bytes | None = None
        self._head: bytes | None = None

    def tcp(self) -> bytes:
        """The whole TCP frame (the same for every recipient)."""
        if self._tcp is None:
            self._tcp = encode_tcp(self.command, self.data)
        return self._tcp

    def head(self) -> bytes:
        """The pack up to the recipient's fields."""
        if self._head is None:
            self._head = pack_head(
                self.command, self.data, app_id=self.app_id, user_id=self.user_id, event_id=self.event_id
            )
        return self._head

    def pack(self, tail: bytes) -> bytes:
        """The whole pack JSON for the session whose ``pack_tail`` is ``tail``."""
        return self.head() + tail

    def ws_binary_frame(self, tail: bytes) -> bytes:
        """A whole WebSocket binary frame: the seed's 8-byte header and the recipient's pack."""
        head = self._head or self.head()
        size = len(head) + len(tail)
        total = size + SERVER_HEADER.size  # the seed's header is part of the WebSocket payload
        if total < 126:
            prefix = _SEED_SHORT.pack(_BINARY, total, self.command, size)
        elif total < 1 << 16:
            prefix = _SEED_MEDIUM.pack(_BINARY, 126, total, self.command, size)
        else:
            prefix = _SEED_LONG.pack(_BINARY, 127, total, self.command, size)
        return b"".join((prefix, head, tail))

    def ws_text_frame(self, tail: bytes) -> bytes:
        """A whole WebSocket text frame: the recipient's pack as JSON."""
        head = self._head or self.head()
        return b"".join((websocket_header(len(head) + len(tail), text=True), head, tail))
