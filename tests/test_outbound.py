"""Outbound messages: one encoding per wire format shared by every recipient, and our WebSocket framing."""

from __future__ import annotations

import json
import struct

import pytest

from presence.gateway.codec import SERVER_HEADER, Command, encode_pack, encode_tcp, pack_tail
from presence.gateway.outbound import Encoded, websocket_header


def read_frame(frame: bytes) -> tuple[bool, int, bytes]:
    """(FIN, opcode, payload) of one whole unmasked server frame, read as RFC 6455 5.2 says; nothing left over."""
    first, second = frame[0], frame[1]
    assert second & 0x80 == 0, "a server frame is never masked"
    assert first & 0x70 == 0, "no extension bits (no compression)"
    size, at = second & 0x7F, 2
    if size == 126:
        (size,), at = struct.unpack_from("!H", frame, 2), 4
        assert size >= 126, "the shortest length form"
    elif size == 127:
        (size,), at = struct.unpack_from("!Q", frame, 2), 10
        assert size >= 1 << 16, "the shortest length form"
    assert len(frame) == at + size
    return bool(first & 0x80), first & 0x0F, frame[at:]


@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536, 70_000])
@pytest.mark.parametrize("text", [True, False], ids=["text", "binary"])
def test_websocket_header_length_forms(size: int, text: bool) -> None:
    payload = b"x" * size
    fin, opcode, got = read_frame(websocket_header(size, text=text) + payload)
    assert (fin, opcode, got) == (True, 0x1 if text else 0x2, payload)


def data_of(size: int) -> bytes:
    """A ``data`` JSON object of exactly ``size`` bytes (at least 8)."""
    return b'{"s":"' + b"x" * (size - 8) + b'"}'


TAIL = pack_tail(2, "phone")


def pack_of(data: bytes) -> bytes:
    return encode_pack(Command.NOTIFY, data, app_id=7, user_id="bob", client_type=2, imei="phone", event_id="1-3")


PACK_OVERHEAD = len(pack_of(data_of(8))) - 8  # a pack's bytes besides its data


# Whole packs around each frame length limit (125 / 126, 65,535 / 65,536): a binary frame's payload is
# 8 bytes more, so it crosses each limit 8 bytes before a text frame does.
@pytest.mark.parametrize("pack_size", [117, 118, 125, 126, 65_527, 65_528, 65_535, 65_536, 70_000])
def test_frames_carry_the_recipients_pack(pack_size: int) -> None:
    data = data_of(pack_size - PACK_OVERHEAD)
    message = Encoded(Command.NOTIFY, data, 7, "bob", "1-3")
    pack = pack_of(data)
    assert len(pack) == pack_size and message.pack(TAIL) == pack
    assert read_frame(message.ws_text_frame(TAIL)) == (True, 0x1, pack)
    fin, opcode, payload = read_frame(message.ws_binary_frame(TAIL))
    assert (fin, opcode) == (True, 0x2)
    assert SERVER_HEADER.unpack_from(payload) == (Command.NOTIFY, len(pack)) and payload[SERVER_HEADER.size :] == pack
    assert message.tcp() == encode_tcp(Command.NOTIFY, data)  # TCP carries only data, the same for every recipient
    assert json.loads(pack)["eventId"] == "1-3"


def test_shared_parts_are_encoded_once_for_every_recipient() -> None:
    message = Encoded(Command.CUSTOM_NOTIFY, b'{"customText":"hi"}', 7, "bob", "1-1")
    assert message.tcp() is message.tcp()
    head = message.head()
    phone, tab = pack_tail(2, "phone"), pack_tail(1, "tab")
    assert message.pack(phone) == head + phone and message.pack(tab) == head + tab
    assert message.head() is head
    for tail in (phone, tab):
        assert read_frame(message.ws_text_frame(tail))[2] == head + tail


def test_a_reply_has_no_event_id() -> None:
    reply = Encoded(Command.LOGINACK, b'{"userId":"bob"}', 7, "bob", None)
    assert "eventId" not in json.loads(reply.pack(pack_tail(0, "")))
