"""One client connection's protocol logic, shared by the TCP and WebSocket transports.

Frames are handled strictly in order, one at a time (a LOGIN must finish before the PING behind it
is answered). Transports only move bytes: they call ``feed`` and implement ``_write``/``_shutdown``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import deque
from typing import Any

import msgspec

from presence.auth import verify_user_sign
from presence.errors import AuthError, Code, ParamError, PresenceError
from presence.gateway.codec import Command, Frame, FrameError, pack_tail, unserved_reason
from presence.gateway.hub import Encoded, EventId, Hub
from presence.ids import check_imei, check_user_id
from presence.models import PullUserOnlineStatusReq, ResponseVO, SubscribeUserOnlineStatusReq

log = logging.getLogger("presence.gateway")

MAX_WRITE_BUFFER = 1 << 20
# ASCII digits only (\d also takes other scripts' digits), the whole string (``$`` allows a trailing "\n").
_EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_UINT64_MAX = (1 << 64) - 1
_json = msgspec.json.Encoder()


def is_event_id(value: object) -> bool:
    """Whether ``value`` is a Redis stream id ``ms-seq``: both parts unsigned 64-bit integers."""
    found = _EVENT_ID.fullmatch(value) if isinstance(value, str) else None
    return found is not None and int(found[1]) <= _UINT64_MAX and int(found[2]) <= _UINT64_MAX


class ClientConnection:
    """Transport-independent state and handlers of one socket."""

    transport_name = "?"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.conn_id = ""
        self.app_id = 0
        self.user_id = ""
        self.client_type = 0
        self.imei = ""
        # The recipient fields every pack to this connection ends with (the LOGIN's, once logged in).
        self.pack_tail = pack_tail(0, "")
        # WebSocket text mode (ours): always answered PING. Binary/TCP clients only when LOGIN asked ("pong").
        self.text_mode = False
        self.pong = False
        self.heartbeat_timeout = hub.settings.heartbeat_timeout
        self.logged_in = False
        self.ended = False
        self.cursor: EventId = (0, 0)
        self.last_active = time.monotonic()
        self._inbox: deque[Frame | FrameError] = deque()
        self._busy = False
        self._task: asyncio.Future[None] | None = None
        self.transport: asyncio.WriteTransport | None = None
        self.login_deadline: asyncio.TimerHandle | None = None  # set by the hub; closes a silent newcomer

    # --- transport hooks ---

    def frame(self, message: Encoded) -> bytes:
        """The message in this connection's wire format (shared, encoded once per format)."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        """Write whole frames without waiting; a client far behind is dropped, not buffered without end."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("dropping slow %s client %s", self.transport_name, self.user_id)
            transport.abort()

    def send(self, message: Encoded) -> None:
        self.write(self.frame(message))

    def close(self, code: int, reason: str) -> None:
        raise NotImplementedError

    # --- input ---

    def feed(self, frames: list[Frame], error: FrameError | None = None) -> None:
        """Queue decoded frames (and the decoding error that followed them, if any)."""
        self.last_active = time.monotonic()
        self._inbox.extend(frames)
        if error is not None:
            self._inbox.append(error)
        if not self._busy and self._inbox:
            self._busy = True
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while self._inbox and not self.ended:
                item = self._inbox.popleft()
                if isinstance(item, FrameError):
                    await self.fail(item.code, item.message)
                    return
                try:
                    await self.handle(item)
                except PresenceError as exc:
                    if exc.http_status >= 500:  # its message may quote Redis: only the log gets it
                        await self.fail_system(f"frame {item.command} failed: {exc.message}", item)
                    else:
                        await self.fail(exc.code, exc.message)
                except Exception as exc:
                    await self.fail_system(f"frame {item.command} failed: {type(exc).__name__}", item, exc_info=True)
        finally:
            self._busy = False

    async def handle(self, frame: Frame) -> None:
        command = frame.command
        if not self.logged_in:
            self.pack_tail = pack_tail(frame.clientType, frame.imei)
        reason = unserved_reason(command)
        if reason is not None:
            # A seed client also sends chat commands (1103, ...) on this socket: say no, keep the connection.
            self.reply(Command.ERROR, _json.encode({"code": Code.PARAMETER_ERROR, "msg": reason, "command": command}))
        elif command == Command.PING:
            # The seed never answered PING and its clients break on a reply (web.html evals every 9999).
            if self.text_mode or self.pong:
                self.reply(Command.PING, b"{}", frame)
        elif command == Command.LOGIN:
            await self._login(frame)
        elif not self.logged_in:
            await self.fail(Code.PARAMETER_ERROR, f"command {command} needs a LOGIN (9000) first")
        elif command == Command.LOGOUT:
            # Logged out before the close: a client that reconnects at once finds the session gone.
            await self.hub.end(self, "logout")
            self.close(1000, "logged out")
        elif command in (Command.SUBSCRIBE, Command.PULL, Command.QUERY_SUBSCRIPTIONS):
            # A bad request is answered like REST answers it; the connection stays up.
            try:
                if command == Command.SUBSCRIBE:
                    result = await self._subscribe(msgspec.convert(frame.data, SubscribeUserOnlineStatusReq))
                elif command == Command.QUERY_SUBSCRIPTIONS:
                    result = await self.hub.presence.subscriptions(self.app_id, self.user_id)
                else:
                    result = await self._pull(frame.data)
            except msgspec.ValidationError as exc:
                self.reply(command, _json.encode(ResponseVO(Code.PARAMETER_ERROR, str(exc))))
            except ParamError as exc:
                self.reply(command, _json.encode(ResponseVO(exc.code, exc.message)))
            else:
                self.reply(command, _json.encode(ResponseVO(data=result)))

    # --- handlers ---

    async def _login(self, frame: Frame) -> None:
        if self.logged_in:
            raise ParamError("this connection is already logged in")
        data = frame.data
        user_id, user_sign, last = data.get("userId"), data.get("userSign"), data.get("lastEventId")
        app = self.hub.settings.app(frame.appId)
        if app is None:
            raise AuthError(f"unknown appId {frame.appId}", Code.APP_ID_MISSING)
        if not isinstance(user_id, str) or not user_id:
            raise AuthError("data.userId is missing", Code.IDENTIFIER_MISSING)
        check_user_id("data.userId", user_id)
        check_imei("imei", frame.imei)
        if not (user_sign is None and app.unsigned_login):
            verify_user_sign(user_sign if isinstance(user_sign, str) else "", frame.appId, app.private_key, user_id)
        if last is not None and not is_event_id(last):
            raise ParamError("lastEventId must be a stream id like 1700000000000-0 (both parts 0..2^64-1)")
        pong = data.get("pong", False)
        if not isinstance(pong, bool):
            raise ParamError("data.pong must be true or false")
        # A login in progress is not a silent newcomer: however long Redis takes (bounded by the retry
        # window), the login deadline must not answer it with a client error (90001).
        self.hub.login_started(self)
        cursor, resumed = await self.hub.login(
            self,
            frame.appId,
            user_id,
            frame.clientType,
            frame.imei,
            frame.version,
            app.login_model,
            last,
            max_sessions=app.max_sessions,
        )
        if self.ended:
            return
        self.pong = pong
        self.heartbeat_timeout = self.hub.settings.heartbeat_timeout_for(frame.appId)
        # The seed's LOGINACK is {"userId"} exactly, and its clients read it by that size: our cursor and
        # resume outcome only for a LOGIN that carries lastEventId (a stream id, or null for "none yet").
        ack: dict[str, Any] = {"userId": user_id}
        if "lastEventId" in data:
            ack["lastEventId"] = cursor
            if resumed is not None:
                ack["resumed"] = resumed
        self.reply(Command.LOGINACK, _json.encode(ack), frame)
        self.hub.activate(self)

    async def _subscribe(self, req: SubscribeUserOnlineStatusReq) -> object:
        return await self.hub.presence.subscribe(self.app_id, self.user_id, req.subUserId, req.subTime)

    async def _pull(self, data: dict[str, Any]) -> object:
        presence = self.hub.presence
        if "userList" in data:
            req = msgspec.convert(data, PullUserOnlineStatusReq)
            return await presence.query_users(self.app_id, req.userList)
        return await presence.query_friends(self.app_id, self.user_id)

    # --- output ---

    def reply(self, command: int, data_json: bytes, frame: Frame | None = None) -> None:
        user = self.user_id or (frame.data.get("userId") if frame else "") or ""
        app = self.app_id or (frame.appId if frame else 0)
        self.send(Encoded(command, data_json, app, str(user), None))

    async def fail(self, code: int, message: str, request_id: str | None = None) -> None:
        """The connection's last word: an ERROR (9100) frame with the code, reason and request id, then close."""
        rid = request_id or secrets.token_hex(8)
        if request_id is None:
            log.debug("request %s: %s connection of %s: %s %s", rid, self.transport_name, self.user_id, code, message)
        self.reply(Command.ERROR, _json.encode({"code": int(code), "msg": message, "requestId": rid}))
        self.close(4001, message[:120])
        await self.hub.end(self, "error")

    async def fail_system(self, detail: str, frame: Frame | None = None, *, exc_info: bool = False) -> None:
        """90000 ``system error`` to the client; the detail (maybe naming Redis internals) only to the log.

        Not the client's fault (Redis away past the retry window, a bug): a logged-in connection stays open
        and its session with it; the ERROR names the command. A LOGIN that failed so closes the connection
        after the ERROR (the client reconnects with backoff and logs in again: 90000 is retried).
        """
        rid = secrets.token_hex(8)
        log.error(
            "request %s: %s connection of %s: %s",
            rid,
            self.transport_name,
            self.user_id or "?",
            detail,
            exc_info=exc_info,
        )
        if self.logged_in and frame is not None and frame.command != Command.LOGIN:
            data = {"code": int(Code.SYSTEM_ERROR), "msg": "system error", "requestId": rid, "command": frame.command}
            self.reply(Command.ERROR, _json.encode(data), frame)
            return
        await self.fail(Code.SYSTEM_ERROR, "system error", rid)
