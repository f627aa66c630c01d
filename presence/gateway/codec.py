"""Sans-I/O frame codec for the gateway: bytes in, frames out, and back. No sockets, no asyncio.

Client -> server (TCP stream, or one WebSocket binary message): a 28-byte header of seven signed
big-endian int32 (command, version, clientType, messageType, appId, imeiLength, bodyLength), then the
imei (UTF-8), then the body (a UTF-8 JSON object; empty means ``{}``). Browsers may instead send the
same fields as one JSON text message.

Server -> client: an 8-byte header (command, length) then JSON: the pack's ``data`` on TCP, the whole
pack on WebSocket. See gateway/PROTOCOL.md.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Annotated, Any

import msgspec

from presence.bounded import MAX_JSON_DEPTH, too_deep
from presence.errors import Code
from presence.limits import IMEI_BYTES


class Command(IntEnum):
    LOGIN = 9000
    LOGINACK = 9001
    MUTUALLOGIN = 9002
    LOGOUT = 9003
    PING = 9999
    USER_ONLINE_STATUS_CHANGE = 4001
    SUBSCRIBE = 4002
    PULL = 4003
    NOTIFY = 4004
    NOTIFY_SYNC = 4005
    CUSTOM_NOTIFY = 4006
    CUSTOM_NOTIFY_SYNC = 4007
    FRIENDSHIP_NOTIFY = 4010  # ours: a friendship was added or deleted; data carries the friend's status
    QUERY_SUBSCRIPTIONS = 4011  # ours: the caller's live subscriptions with their expiry
    ERROR = 9100  # ours: the server's last word (code + message) before it closes a bad connection


# The commands the server serves; any other command in a well-formed frame gets a (non-fatal) ERROR.
CLIENT_COMMANDS = frozenset(
    {Command.LOGIN, Command.LOGOUT, Command.PING, Command.SUBSCRIBE, Command.PULL, Command.QUERY_SUBSCRIPTIONS}
)

HEADER = struct.Struct(">7i")  # command, version, clientType, messageType, appId, imeiLength, bodyLength
SERVER_HEADER = struct.Struct(">2i")  # command, length
MAX_IMEI = IMEI_BYTES  # the library's limit: a longer imei could never log in, so the frame is refused early
# A frame's body. REST has its own bound on a request body (presence/http/app.py MAX_BODY_BYTES): the same
# 64 KiB today, but the two bound different transports' buffers and may change apart.
MAX_BODY = 64 * 1024

_INT32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]  # text frames: same range as binary ones


class FrameError(Exception):
    """A client broke the framing rules; the connection must be closed after reporting it.

    ``frames`` holds the good frames that came before the bad one in the same ``feed`` call, so a
    caller may still act on them (a LOGOUT, say) before closing.
    """

    def __init__(self, message: str, code: int = Code.PARAMETER_ERROR) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.frames: list[Frame] = []


class Frame(msgspec.Struct, kw_only=True):
    """One decoded client message, whatever transport it came on."""

    command: _INT32
    version: _INT32 = 0
    clientType: _INT32 = 0
    messageType: _INT32 = 0
    appId: _INT32 = 0
    imei: str = ""
    data: dict[str, Any] = msgspec.field(default_factory=dict)


# Built once: decoders and encoders cache their type info, per-call construction would redo it.
_BODY_DECODER = msgspec.json.Decoder(dict[str, Any])
_TEXT_DECODER = msgspec.json.Decoder(Frame)
_ENCODER = msgspec.json.Encoder()


def _check_header(message_type: int, imei_len: int, body_len: int, max_imei: int, max_body: int) -> None:
    """Validate a header as soon as it arrives, so an oversize frame is refused before it is buffered.

    The command is not checked here: a well-formed frame with a command we do not serve is answered
    with an ERROR and the connection stays open (see ``unserved_reason``).
    """
    if imei_len < 0:
        raise FrameError(f"negative imeiLength {imei_len}")
    if body_len < 0:
        raise FrameError(f"negative bodyLength {body_len}")
    if imei_len > max_imei:
        raise FrameError(f"imeiLength {imei_len} exceeds {max_imei} bytes")
    if body_len > max_body:
        raise FrameError(f"bodyLength {body_len} exceeds {max_body} bytes")
    if message_type != 0:
        raise FrameError(f"unknown messageType {message_type}: only 0 (JSON) is supported")


def unserved_reason(command: int) -> str | None:
    """Why a well-formed frame's command is not served (None when it is): answered, not fatal."""
    if command in CLIENT_COMMANDS:
        return None
    try:
        name = Command(command).name
    except ValueError:
        return f"command {command} is not served by this gateway (it serves 9000, 9003, 9999, 4002, 4003, 4011)"
    return f"command {command} ({name}) is server-to-client only, not accepted from clients"


def _decode_imei(raw: bytes | memoryview) -> str:
    if not raw:
        return ""
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError:
        raise FrameError("imei is not valid UTF-8") from None


def _is_utf8(raw: bytes | memoryview) -> bool:
    try:
        bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _decode_body(raw: bytes | memoryview) -> dict[str, Any]:
    if not raw:
        return {}
    if too_deep(raw):
        raise FrameError(f"body is JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    try:
        return _BODY_DECODER.decode(raw)
    except msgspec.ValidationError as e:
        raise FrameError(f"body must be a JSON object: {e}") from None
    except msgspec.DecodeError as e:
        # msgspec checks UTF-8 inside strings (raised as DecodeError since 0.23); bytes outside them are
        # malformed JSON. Tell the two apart only on this error path.
        if not _is_utf8(raw):
            raise FrameError("body is not valid UTF-8") from None
        raise FrameError(f"body is not valid JSON: {e}") from None
    except UnicodeDecodeError:  # msgspec before 0.23
        raise FrameError("body is not valid UTF-8") from None
    except RecursionError:  # unreachable after too_deep; kept so no parser error can escape as another type
        raise FrameError("body is JSON nested too deeply") from None


class FrameDecoder:
    """Incremental decoder for a TCP byte stream; feed it whatever recv() returned.

    After it raises FrameError it is unusable: every later feed raises the same error.
    """

    __slots__ = ("_buf", "_error", "_head", "_max_body", "_max_imei")

    def __init__(self, max_imei: int = MAX_IMEI, max_body: int = MAX_BODY) -> None:
        self._max_imei = max_imei
        self._max_body = max_body
        self._buf = bytearray()
        # Header of the frame whose payload is still arriving (already validated), or None.
        self._head: tuple[int, int, int, int, int, int, int] | None = None
        self._error: FrameError | None = None

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Frame]:
        if self._error is not None:
            raise self._error
        # Fast path: with nothing buffered, parse the chunk in place and copy only its incomplete tail.
        if self._buf:
            self._buf += chunk
            data: bytes | bytearray | memoryview = self._buf
        else:
            data = chunk
        frames: list[Frame] = []
        try:
            with memoryview(data) as view:
                pos = self._parse(view, frames)
                if data is not self._buf and pos < len(view):
                    self._buf = bytearray(view[pos:])
        except FrameError as e:
            e.frames = frames
            self._error = e
            self._buf = bytearray()
            self._head = None
            raise
        if data is self._buf:
            del self._buf[:pos]  # only once `view` is released: a bytearray with live views cannot resize
        return frames

    def _parse(self, view: memoryview, frames: list[Frame]) -> int:
        """Append every complete frame in view to frames; return how many bytes were consumed."""
        pos, end, head = 0, len(view), self._head
        while True:
            if head is None:
                if end - pos < HEADER.size:
                    break
                head = HEADER.unpack_from(view, pos)
                _check_header(head[3], head[5], head[6], self._max_imei, self._max_body)
                pos += HEADER.size
            imei_end = pos + head[5]
            body_end = imei_end + head[6]
            if body_end > end:
                break
            frames.append(
                Frame(
                    command=head[0],
                    version=head[1],
                    clientType=head[2],
                    messageType=head[3],
                    appId=head[4],
                    imei=_decode_imei(view[pos:imei_end]),
                    data=_decode_body(view[imei_end:body_end]),
                )
            )
            pos, head = body_end, None
        self._head = head
        return pos


def decode_binary_message(msg: bytes, max_imei: int = MAX_IMEI, max_body: int = MAX_BODY) -> Frame:
    """One WebSocket binary message carries exactly one frame: no more, no less."""
    if len(msg) < HEADER.size:
        raise FrameError(f"binary message is {len(msg)} bytes, shorter than the {HEADER.size}-byte header")
    command, version, client_type, message_type, app_id, imei_len, body_len = HEADER.unpack_from(msg)
    _check_header(message_type, imei_len, body_len, max_imei, max_body)
    expected = HEADER.size + imei_len + body_len
    if len(msg) != expected:
        raise FrameError(
            f"binary message is {len(msg)} bytes but its header declares {expected} "
            f"({HEADER.size} + imeiLength {imei_len} + bodyLength {body_len})"
        )
    with memoryview(msg) as view:
        imei_end = HEADER.size + imei_len
        return Frame(
            command=command,
            version=version,
            clientType=client_type,
            messageType=message_type,
            appId=app_id,
            imei=_decode_imei(view[HEADER.size : imei_end]),
            data=_decode_body(view[imei_end:]),
        )


def decode_text_message(msg: str | bytes, max_body: int = MAX_BODY, *, max_imei: int = MAX_IMEI) -> Frame:
    """A WebSocket text message: the header fields and ``data`` as one JSON object."""
    # len(str) counts code points; only measure UTF-8 bytes when it could matter (<= 4 bytes per point).
    size = len(msg)
    if isinstance(msg, str) and size * 4 > max_body:
        size = len(msg.encode("utf-8", "surrogatepass"))
    if size > max_body:
        raise FrameError(f"text message of {size} bytes exceeds {max_body} bytes")
    if too_deep(msg):
        raise FrameError(f"text message is JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    try:
        frame = _TEXT_DECODER.decode(msg)
    except msgspec.DecodeError as e:  # ValidationError included: names the field, e.g. "at `$.data`"
        raise FrameError(f"invalid text message: {e}") from None
    except UnicodeDecodeError:
        raise FrameError("text message is not valid UTF-8") from None
    except RecursionError:
        raise FrameError("text message is JSON nested too deeply") from None
    if frame.messageType != 0:
        raise FrameError(f"unknown messageType {frame.messageType}: only 0 (JSON) is supported")
    imei_len = len(frame.imei.encode("utf-8", "surrogatepass"))
    if imei_len > max_imei:
        raise FrameError(f"imei of {imei_len} bytes exceeds {max_imei} bytes")
    return frame


def encode_client_frame(
    command: int,
    data: dict[str, Any] | None = None,
    *,
    version: int = 1,
    client_type: int = 1,
    message_type: int = 0,
    app_id: int = 10000,
    imei: str = "",
) -> bytes:
    """What a client sends (tests, benchmark clients). ``data=None`` sends an empty body, read as ``{}``."""
    body = b"" if data is None else _ENCODER.encode(data)
    imei_b = imei.encode()
    header = HEADER.pack(command, version, client_type, message_type, app_id, len(imei_b), len(body))
    return b"".join((header, imei_b, body))


def encode_tcp(command: int, data_json: bytes) -> bytes:
    """Server -> client on TCP: 8-byte header, then the pack's ``data`` JSON."""
    return SERVER_HEADER.pack(command, len(data_json)) + data_json


class _PackHead(msgspec.Struct, omit_defaults=True):
    """The seed's MessagePack, minus the recipient session's fields (see ``pack_tail``); ``eventId`` is ours."""

    userId: str
    appId: int
    toId: str
    command: int
    data: msgspec.Raw
    eventId: str | None = None


class _PackTail(msgspec.Struct):
    clientType: int
    imei: str


def pack_head(command: int, data_json: bytes, *, app_id: int, user_id: str, event_id: str | None = None) -> bytes:
    """The whole pack but the recipient session's fields, open-ended: ``{"userId":..,...,"data":..`` (no ``}``).

    Shared by every recipient of a push; ``pack_head(...) + pack_tail(...)`` is one pack. The pre-encoded
    ``data_json`` is spliced in as is (never re-parsed); it must be one JSON value, empty means ``{}``.
    ``toId`` is the recipient user, as ``userId``: a pack goes to that user's sessions only.
    """
    head = _PackHead(user_id, app_id, user_id, command, msgspec.Raw(data_json or b"{}"), event_id)
    return _ENCODER.encode(head)[:-1]


def pack_tail(client_type: int, imei: str) -> bytes:
    """The recipient session's fields that close a pack: ``,"clientType":3,"imei":"phone"}``.

    The seed filled ``clientType`` and ``imei`` of every server pack per session; built once per connection.
    """
    return b"," + _ENCODER.encode(_PackTail(client_type, imei))[1:]


def encode_pack(
    command: int,
    data_json: bytes,
    *,
    app_id: int,
    user_id: str,
    client_type: int = 0,
    imei: str = "",
    event_id: str | None = None,
) -> bytes:
    """The whole MessagePack as JSON for one recipient session (see ``pack_head`` and ``pack_tail``)."""
    return pack_head(command, data_json, app_id=app_id, user_id=user_id, event_id=event_id) + pack_tail(
        client_type, imei
    )


def encode_ws_binary(command: int, pack_json: bytes) -> bytes:
    """Server -> client as a WebSocket binary message: 8-byte header, then the whole pack JSON."""
    return SERVER_HEADER.pack(command, len(pack_json)) + pack_json


def decode_server_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Client side (tests, bench): pop every complete (command, payload) off ``buf``; leave a partial one."""
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(buf)
    while end - pos >= SERVER_HEADER.size:
        command, length = SERVER_HEADER.unpack_from(buf, pos)
        if length < 0:
            raise FrameError(f"negative length {length} in server frame")
        stop = pos + SERVER_HEADER.size + length
        if stop > end:
            break
        out.append((command, bytes(buf[pos + SERVER_HEADER.size : stop])))
        pos = stop
    del buf[:pos]
    return out
