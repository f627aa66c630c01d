"""The sans-I/O frame codec: pure bytes in and out, no sockets."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from presence.gateway.codec import (
    CLIENT_COMMANDS,
    HEADER,
    MAX_BODY,
    MAX_IMEI,
    SERVER_HEADER,
    Command,
    Frame,
    FrameDecoder,
    FrameError,
    decode_binary_message,
    decode_server_frames,
    decode_text_message,
    encode_client_frame,
    encode_pack,
    encode_tcp,
    encode_ws_binary,
    pack_head,
    pack_tail,
    unserved_reason,
)

LOGIN_DATA = {"userId": "alice", "userSign": "x"}
# The login frame documented in gateway/PROTOCOL.md (2.1), written out by hand so the layout is pinned.
LOGIN_HEADER_HEX = (
    "00002328"  # command 9000
    "00000001"  # version 1
    "00000003"  # clientType 3 (ANDROID)
    "00000000"  # messageType 0 (JSON)
    "00002710"  # appId 10000
    "00000006"  # imeiLength 6
    "00000021"  # bodyLength 33
)
LOGIN_FRAME = (
    bytes.fromhex(LOGIN_HEADER_HEX) + b"imei-1" + b'{"userId":"alice","userSign":"x"}'  # compact JSON, 33 bytes
)


def raw_frame(
    command: int = Command.PING,
    *,
    message_type: int = 0,
    imei: bytes = b"",
    body: bytes = b"",
    imei_len: int | None = None,
    body_len: int | None = None,
) -> bytes:
    """A frame with every header field under the test's control, lies included."""
    header = HEADER.pack(
        command,
        1,
        1,
        message_type,
        10000,
        len(imei) if imei_len is None else imei_len,
        len(body) if body_len is None else body_len,
    )
    return header + imei + body


def sample_frames() -> list[bytes]:
    return [
        encode_client_frame(Command.LOGIN, LOGIN_DATA, client_type=3, imei="imei-1"),
        encode_client_frame(Command.PING),
        encode_client_frame(Command.SUBSCRIBE, {"subUserId": ["bob", "é"], "subTime": 60000}, imei="ünï"),
        encode_client_frame(Command.PULL, {"userList": []}, version=7, app_id=-5),
        encode_client_frame(Command.LOGOUT, {}),
    ]


def expected_frames() -> list[Frame]:
    return [
        Frame(command=9000, version=1, clientType=3, appId=10000, imei="imei-1", data=LOGIN_DATA),
        Frame(command=9999, version=1, clientType=1, appId=10000),
        Frame(
            command=4002,
            version=1,
            clientType=1,
            appId=10000,
            imei="ünï",
            data={"subUserId": ["bob", "é"], "subTime": 60000},
        ),
        Frame(command=4003, version=7, clientType=1, appId=-5, data={"userList": []}),
        Frame(command=9003, version=1, clientType=1, appId=10000),
    ]


# --- layout ---------------------------------------------------------------------------------------


def test_constants() -> None:
    assert HEADER.size == 28
    assert SERVER_HEADER.size == 8
    assert (MAX_IMEI, MAX_BODY) == (128, 65536)
    assert {
        Command.LOGIN,
        Command.LOGOUT,
        Command.PING,
        Command.SUBSCRIBE,
        Command.PULL,
        Command.QUERY_SUBSCRIPTIONS,
    } == CLIENT_COMMANDS


def test_login_frame_bytes() -> None:
    encoded = encode_client_frame(Command.LOGIN, LOGIN_DATA, version=1, client_type=3, app_id=10000, imei="imei-1")
    assert encoded[:28].hex() == LOGIN_HEADER_HEX
    assert encoded == LOGIN_FRAME
    assert len(encoded) == 28 + 6 + 33


def test_protocol_md_login_frame_example_is_what_the_codec_writes() -> None:
    doc = (Path(__file__).resolve().parent.parent / "gateway" / "PROTOCOL.md").read_text()
    spaced = " ".join(LOGIN_HEADER_HEX[i : i + 8] for i in range(0, len(LOGIN_HEADER_HEX), 8))
    assert f"As one hex string (header only):\n`{spaced}`." in doc
    assert f"body `{LOGIN_FRAME[34:].decode()}` ({len(LOGIN_FRAME) - 34} bytes). {len(LOGIN_FRAME)} bytes in all" in doc


def test_login_frame_decodes() -> None:
    frame = decode_binary_message(LOGIN_FRAME)
    assert frame == Frame(
        command=Command.LOGIN, version=1, clientType=3, messageType=0, appId=10000, imei="imei-1", data=LOGIN_DATA
    )


def test_header_fields_are_signed() -> None:
    frame = decode_binary_message(encode_client_frame(Command.PING, version=-1, client_type=-2, app_id=-(2**31)))
    assert (frame.version, frame.clientType, frame.appId) == (-1, -2, -(2**31))


def test_empty_body_means_empty_object() -> None:
    assert encode_client_frame(Command.PING)[24:28] == b"\0\0\0\0"
    assert decode_binary_message(encode_client_frame(Command.PING)).data == {}


# --- round trips and the stream decoder -----------------------------------------------------------


def test_round_trip_binary_message() -> None:
    for raw, expected in zip(sample_frames(), expected_frames(), strict=True):
        assert decode_binary_message(raw) == expected


def test_stream_several_frames_in_one_chunk() -> None:
    assert FrameDecoder().feed(b"".join(sample_frames())) == expected_frames()


def test_stream_split_at_every_offset() -> None:
    stream = b"".join(sample_frames())
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == expected_frames(), cut


def test_stream_byte_by_byte() -> None:
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i, byte in enumerate(b"".join(sample_frames())):
        got += decoder.feed(bytes([byte]))
        assert len(got) <= len(expected_frames()), i
    assert got == expected_frames()


def test_stream_accepts_memoryview_and_bytearray() -> None:
    stream = b"".join(sample_frames())
    decoder = FrameDecoder()
    assert decoder.feed(memoryview(stream)[:40]) + decoder.feed(bytearray(stream[40:])) == expected_frames()


def test_stream_rejects_oversize_header_before_payload_arrives() -> None:
    # Only the 28-byte header is here: the decoder must not wait for (or buffer) 1 MiB first.
    with pytest.raises(FrameError, match="bodyLength"):
        FrameDecoder().feed(raw_frame(body_len=1 << 20))


def test_stream_is_unusable_after_error_and_keeps_earlier_frames() -> None:
    decoder = FrameDecoder()
    good = encode_client_frame(Command.LOGOUT)
    with pytest.raises(FrameError, match="messageType") as info:
        decoder.feed(good + raw_frame(message_type=1))
    assert info.value.frames == [Frame(command=9003, version=1, clientType=1, appId=10000)]
    with pytest.raises(FrameError, match="messageType"):
        decoder.feed(good)


def test_custom_limits() -> None:
    decoder = FrameDecoder(max_imei=4, max_body=10)
    assert decoder.feed(raw_frame(imei=b"abcd", body=b'{"a":1234}'))[0].data == {"a": 1234}  # both at the limit
    with pytest.raises(FrameError, match="imeiLength 5 exceeds 4 bytes"):
        decode_binary_message(raw_frame(imei=b"abcde"), max_imei=4)
    with pytest.raises(FrameError, match="bodyLength 11 exceeds 10 bytes"):
        FrameDecoder(max_body=10).feed(raw_frame(body=b'{"a":12345}'))


# --- validation -----------------------------------------------------------------------------------

BAD_FRAMES = [
    pytest.param(raw_frame(imei_len=-1), "negative imeiLength -1", id="negative-imei"),
    pytest.param(raw_frame(body_len=-7), "negative bodyLength -7", id="negative-body"),
    pytest.param(raw_frame(imei_len=300), "imeiLength 300 exceeds 128 bytes", id="imei-too-long"),
    pytest.param(raw_frame(body_len=MAX_BODY + 1), f"bodyLength {MAX_BODY + 1} exceeds {MAX_BODY} bytes", id="body"),
    pytest.param(raw_frame(message_type=1), "unknown messageType 1: only 0 (JSON) is supported", id="protobuf"),
    pytest.param(raw_frame(imei=b"\xff\xfe"), "imei is not valid UTF-8", id="imei-utf8"),
    pytest.param(raw_frame(body=b'{"a":"\xff"}'), "body is not valid UTF-8", id="body-utf8"),
    pytest.param(raw_frame(body=b"[1,2]"), "body must be a JSON object", id="body-array"),
    pytest.param(raw_frame(body=b'"s"'), "body must be a JSON object", id="body-string"),
    pytest.param(raw_frame(body=b"{"), "body is not valid JSON", id="body-truncated"),
    pytest.param(raw_frame(body=b"{} {}"), "body is not valid JSON", id="body-trailing"),
    pytest.param(raw_frame(body=b"  "), "body is not valid JSON", id="body-blank"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_FRAMES)
def test_bad_frame_binary(raw: bytes, message: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_binary_message(raw)
    assert message in info.value.message
    assert str(info.value) == info.value.message
    assert info.value.code == 90001


@pytest.mark.parametrize(("raw", "message"), BAD_FRAMES)
def test_bad_frame_stream(raw: bytes, message: str) -> None:
    # Pad so the declared lengths are satisfiable where they are not negative: the error must still come.
    with pytest.raises(FrameError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FrameDecoder().feed(raw + b"\0" * 300)


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (1103, "command 1103 is not served by this gateway (it serves 9000, 9003, 9999, 4002, 4003, 4011)"),
        (-5, "command -5 is not served"),
        (Command.LOGINACK, "command 9001 (LOGINACK) is server-to-client only, not accepted from clients"),
        (Command.ERROR, "command 9100 (ERROR) is server-to-client only"),
        (Command.NOTIFY, "command 4004 (NOTIFY) is server-to-client only"),
    ],
)
def test_unserved_commands_decode_and_have_a_reason(command: int, reason: str) -> None:
    """A well-formed frame with a command we do not serve is not malformed: it decodes, the session answers."""
    raw = encode_client_frame(command, {"msg": "hi"})
    assert decode_binary_message(raw).command == command
    assert FrameDecoder().feed(raw + raw)[1].command == command
    assert decode_text_message(json.dumps({"command": command})).command == command
    assert reason in (unserved_reason(command) or "")


def test_served_commands_have_no_unserved_reason() -> None:
    assert all(unserved_reason(c) is None for c in CLIENT_COMMANDS)


def test_binary_message_must_be_exactly_one_frame() -> None:
    ping = encode_client_frame(Command.PING, {"a": 1})
    with pytest.raises(FrameError, match="shorter than the 28-byte header"):
        decode_binary_message(ping[:27])
    with pytest.raises(FrameError, match="header declares"):
        decode_binary_message(ping[:-1])
    with pytest.raises(FrameError, match="header declares"):
        decode_binary_message(ping + ping)


# --- WebSocket text -------------------------------------------------------------------------------


def test_text_message_valid() -> None:
    text = '{"command":9000,"appId":10000,"clientType":1,"imei":"tab-1","version":1,"data":{"userId":"a","n":[1]}}'
    expected = Frame(command=9000, appId=10000, clientType=1, imei="tab-1", version=1, data={"userId": "a", "n": [1]})
    assert decode_text_message(text) == expected
    assert decode_text_message(text.encode()) == expected


def test_text_message_defaults_and_unknown_fields() -> None:
    assert decode_text_message('{"command":9999,"toId":"ignored"}') == Frame(command=9999)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"appId":1}', "missing required field `command`"),
        ('{"command":"9000"}', "$.command"),
        ('{"command":9000.0}', "$.command"),
        ('{"command":9000,"data":[1]}', "$.data"),
        ('{"command":9000,"data":null}', "$.data"),
        ('{"command":9000,"appId":4294967296}', "$.appId"),
        ('{"command":9000,"imei":7}', "$.imei"),
        ('{"command":9000,"messageType":2}', "unknown messageType 2"),
        ('{"command":9000,"imei":"' + "x" * 129 + '"}', "imei of 129 bytes exceeds 128 bytes"),
        ("[9000]", "Expected `object`"),
        ("{", "invalid text message"),
        ("", "invalid text message"),
    ],
)
def test_text_message_invalid(text: str, message: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_text_message(text)
    assert message in info.value.message
    assert info.value.code == 90001


def test_text_message_invalid_utf8_bytes() -> None:
    with pytest.raises(FrameError, match="UTF-8"):
        decode_text_message(b'{"command":9000,"imei":"\xff"}')


def test_text_message_size_limit_counts_utf8_bytes() -> None:
    small = '{"command":9999,"data":{"s":"' + "é" * 10 + '"}}'  # 42 code points, 52 UTF-8 bytes
    assert decode_text_message(small, max_body=52).data == {"s": "é" * 10}
    with pytest.raises(FrameError, match="text message of 52 bytes exceeds 51 bytes"):
        decode_text_message(small, max_body=51)
    with pytest.raises(FrameError, match=f"exceeds {MAX_BODY} bytes"):
        decode_text_message(b'{"command":9999,"data":{"s":"' + b"x" * MAX_BODY + b'"}}')


# --- server -> client -----------------------------------------------------------------------------


def test_encode_tcp() -> None:
    data = b'{"userId":"alice"}'
    assert encode_tcp(Command.LOGINACK, data) == bytes.fromhex("00002329 00000012") + data


def test_encode_pack_splices_data() -> None:
    data = b'{"z":1, "a" : [1,2]}'  # odd spacing survives: the bytes are spliced, not re-encoded
    pack = encode_pack(Command.NOTIFY, data, app_id=10000, user_id='bob "the" \u2603', client_type=3, imei="i\n1")
    assert data in pack
    parsed: dict[str, Any] = json.loads(pack)
    assert parsed == {
        "userId": 'bob "the" \u2603',
        "appId": 10000,
        "toId": 'bob "the" \u2603',
        "clientType": 3,
        "imei": "i\n1",
        "command": 4004,
        "data": {"z": 1, "a": [1, 2]},
    }
    # The recipient session's fields last: a shared head, a per-session tail.
    assert list(parsed) == ["userId", "appId", "toId", "command", "data", "clientType", "imei"]


def test_pack_is_a_shared_head_and_a_per_session_tail() -> None:
    head = pack_head(Command.NOTIFY, b'{"s":1}', app_id=7, user_id="bob", event_id="1-2")
    phone, tab = pack_tail(2, "phone \u2603"), pack_tail(1, 'tab "1"')
    assert json.loads(head + phone) == {
        "userId": "bob",
        "appId": 7,
        "toId": "bob",
        "command": 4004,
        "data": {"s": 1},
        "eventId": "1-2",
        "clientType": 2,
        "imei": "phone \u2603",
    }
    assert json.loads(head + tab)["imei"] == 'tab "1"' and json.loads(head + tab)["clientType"] == 1
    assert head + phone == encode_pack(
        Command.NOTIFY, b'{"s":1}', app_id=7, user_id="bob", client_type=2, imei="phone \u2603", event_id="1-2"
    )


def test_encode_pack_defaults_and_empty_data() -> None:
    assert json.loads(encode_pack(Command.PING, b"", app_id=1, user_id="u")) == {
        "userId": "u",
        "appId": 1,
        "toId": "u",
        "clientType": 0,
        "imei": "",
        "command": 9999,
        "data": {},
    }


def test_encode_ws_binary() -> None:
    pack = encode_pack(Command.LOGINACK, b'{"userId":"a"}', app_id=1, user_id="a")
    framed = encode_ws_binary(Command.LOGINACK, pack)
    assert struct.unpack(">2i", framed[:8]) == (9001, len(pack))
    assert framed[8:] == pack


def test_decode_server_frames_partial() -> None:
    stream = encode_tcp(Command.LOGINACK, b'{"userId":"a"}') + encode_tcp(Command.PING, b"") + encode_tcp(4004, b"{}")
    for cut in range(len(stream) + 1):
        buf = bytearray(stream[:cut])
        got = decode_server_frames(buf)
        buf += stream[cut:]
        got += decode_server_frames(buf)
        assert got == [(9001, b'{"userId":"a"}'), (9999, b""), (4004, b"{}")], cut
        assert buf == b""


def test_decode_server_frames_leaves_partial_frame() -> None:
    buf = bytearray(encode_tcp(Command.PING, b"") + encode_tcp(Command.NOTIFY, b'{"a":1}')[:-2])
    assert decode_server_frames(buf) == [(9999, b"")]
    assert bytes(buf) == SERVER_HEADER.pack(4004, 7) + b'{"a":'
    assert decode_server_frames(buf) == []
    buf += b"1}"
    assert decode_server_frames(buf) == [(4004, b'{"a":1}')]


def test_decode_server_frames_negative_length() -> None:
    with pytest.raises(FrameError, match="negative length"):
        decode_server_frames(bytearray(SERVER_HEADER.pack(9001, -1)))


def test_protocol_md_pack_example_is_what_the_server_sends() -> None:
    doc = (Path(__file__).resolve().parent.parent / "gateway" / "PROTOCOL.md").read_text()
    pack = encode_pack(
        Command.LOGINACK, b'{"userId":"alice"}', app_id=10000, user_id="alice", client_type=3, imei="imei-1"
    )
    assert f"```json\n{pack.decode()}\n```" in doc
    assert f"followed by the {len(pack)}-byte pack above" in doc
    assert encode_ws_binary(Command.LOGINACK, pack)[:8].hex() == "0000232900000077"
