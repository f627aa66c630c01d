"""One client connection's protocol, sans I/O: decoded frames in; requests to serve and replies out.

No sockets, no asyncio, no Redis (the websockets model): ``connection.ClientConnection`` serves the requests
(against the hub and the presence facade) and writes the replies; the transports (tcp.py, ws.py) own the
sockets. Frames are handled strictly in order, one at a time (a LOGIN must finish before the PING behind it
is answered). Replies are ``Encoded`` messages: the transport frames them in its wire format.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, NamedTuple

import msgspec

from presence.auth import verify_user_sign
from presence.config import Settings
from presence.errors import AuthError, Code, ParamError
from presence.gateway.codec import Command, Frame, pack_tail, unserved_reason
from presence.gateway.outbound import Encoded
from presence.ids import check_imei, check_user_id
from presence.inbox import EventId
from presence.models import PullUserOnlineStatusReq, ResponseVO, SubscribeUserOnlineStatusReq

_json = msgspec.json.Encoder()


class State(enum.IntEnum):
    """Where one client connection is; it only moves forward (``Session.state``).

    - ``AWAITING_LOGIN``: open, no session; commands other than LOGIN and PING are refused; the hub's login
      deadline runs.
    - ``LOGGING_IN``: a LOGIN is being served.
    - ``LOGGED_IN``: the connection holds a session; pushes flow once the hub activates it.
    - ``ENDED``: the hub ended it (LOGOUT, the socket gone, a logout after a failed request): no more requests
      are served; only the close may still be written.
    - ``CLOSING``: the server began closing it (an error, a kick, a timeout, a shutdown): no more requests are
      served and nothing more is written.
    """

    AWAITING_LOGIN = 1
    LOGGING_IN = 2
    LOGGED_IN = 3
    ENDED = 4
    CLOSING = 5


class SessionId(NamedTuple):
    """One session: the device (app, user, clientType, imei) and the id of the connection that holds it."""

    app_id: int
    user_id: str
    client_type: int
    imei: str
    conn_id: str


class LoginRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A valid LOGIN: the session to log in, and what logging it in again (re-asserting it) repeats."""

    command: ClassVar[int] = Command.LOGIN
    app_id: int
    user_id: str
    client_type: int
    imei: str
    version: int
    login_model: int  # the app's multi-login model (1..4)
    max_sessions: int  # the app's most live sessions per user
    resume_after: EventId | None = None  # the client's lastEventId: it asks to resume after that entry
    report_cursor: bool = False  # the LOGIN carried lastEventId (an id or null): the LOGINACK reports the cursor
    pong: bool = False  # the client wants its PINGs answered (binary and TCP clients; text mode always is)


class LoginOutcome(NamedTuple):
    """What the hub made of a LOGIN."""

    session: SessionId
    cursor: EventId  # pushes start after it: the inbox's last entry, or the one the client resumed after
    resumed: bool | None  # whether the resume worked (None when the client did not ask)


class LogoutRequest(msgspec.Struct, frozen=True):
    command: ClassVar[int] = Command.LOGOUT


class SubscribeRequest(msgspec.Struct, frozen=True):
    command: ClassVar[int] = Command.SUBSCRIBE
    body: SubscribeUserOnlineStatusReq


class PullRequest(msgspec.Struct, frozen=True):
    command: ClassVar[int] = Command.PULL
    users: list[str] | None  # None: the caller's friends


class QuerySubscriptionsRequest(msgspec.Struct, frozen=True):
    command: ClassVar[int] = Command.QUERY_SUBSCRIPTIONS


Request = LoginRequest | LogoutRequest | SubscribeRequest | PullRequest | QuerySubscriptionsRequest
Query = SubscribeRequest | PullRequest | QuerySubscriptionsRequest  # answered like REST answers them


class Session:
    """The protocol state of one connection: what it may do next, who it is, and the replies it owes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = State.AWAITING_LOGIN
        self.id: SessionId | None = None  # once logged in
        self.app_id = 0
        self.user_id = ""
        # The recipient fields every pack to this connection ends with (the LOGIN's, once logged in).
        self.pack_tail = pack_tail(0, "")
        # WebSocket text mode (ours): always answered PING. Binary/TCP clients only when LOGIN asked ("pong").
        self.text_mode = False
        self.pong = False
        self.heartbeat_timeout = settings.heartbeat_timeout  # s of silence before the hub closes it; 0 = never
        self.report_cursor = False  # the LOGIN carried lastEventId: LOGINACKs report the cursor and resume outcome
        self._replies: list[Encoded] = []

    @property
    def serving(self) -> bool:
        """Whether requests are still served (neither ended nor closing)."""
        return self.state < State.ENDED

    @property
    def writable(self) -> bool:
        """Whether anything may still be written (the close has not begun)."""
        return self.state < State.CLOSING

    # --- input ---

    def receive(self, frame: Frame) -> Request | None:
        """What a frame asks for: a request to serve, or None when it was answered here (``replies``).

        Raises PresenceError (AuthError, ParamError) for a frame that ends the connection: the caller answers
        it with an ERROR (9100) and closes.
        """
        command = frame.command
        if self.state < State.LOGGED_IN:
            self.pack_tail = pack_tail(frame.clientType, frame.imei)
        reason = unserved_reason(command)
        if reason is not None:
            # A seed client also sends chat commands (1103, ...) on this socket: say no, keep the connection.
            self.error(Code.PARAMETER_ERROR, reason, command=command)
            return None
        if command == Command.PING:
            # The seed never answered PING and its clients break on a reply (web.html evals every 9999).
            if self.text_mode or self.pong:
                self._reply(Command.PING, b"{}", frame)
            return None
        if command == Command.LOGIN:
            return self._login(frame)
        if self.state < State.LOGGED_IN:
            raise ParamError(f"command {command} needs a LOGIN (9000) first")
        if command == Command.LOGOUT:
            return LogoutRequest()
        # A bad request is answered like REST answers it; the connection stays up.
        try:
            if command == Command.SUBSCRIBE:
                return SubscribeRequest(msgspec.convert(frame.data, SubscribeUserOnlineStatusReq))
            if command == Command.QUERY_SUBSCRIPTIONS:
                return QuerySubscriptionsRequest()
            if "userList" in frame.data:
                return PullRequest(msgspec.convert(frame.data, PullUserOnlineStatusReq).userList)
            return PullRequest(None)
        except msgspec.ValidationError as exc:
            self.answer(command, ResponseVO(Code.PARAMETER_ERROR, str(exc)))
            return None

    def _login(self, frame: Frame) -> LoginRequest:
        if self.state >= State.LOGGED_IN:
            raise ParamError("this connection is already logged in")
        data = frame.data
        user_id, user_sign, last = data.get("userId"), data.get("userSign"), data.get("lastEventId")
        app = self.settings.app(frame.appId)
        if app is None:
            raise AuthError(f"unknown appId {frame.appId}", Code.APP_ID_MISSING)
        if user_id is None or user_id == "":
            raise AuthError("data.userId is missing", Code.IDENTIFIER_MISSING)
        if not isinstance(user_id, str):
            raise ParamError(f"data.userId must be a string, got {type(user_id).__name__}")
        check_user_id("data.userId", user_id)
        check_imei("imei", frame.imei)
        if not (user_sign is None and app.unsigned_login):
            verify_user_sign(user_sign if isinstance(user_sign, str) else "", frame.appId, app.private_key, user_id)
        resume_after = None
        if last is not None:
            resume_after = EventId.from_client(last)
            if resume_after is None:
                raise ParamError("lastEventId must be a stream id like 1700000000000-0 (both parts 0..2^64-1)")
        pong = data.get("pong", False)
        if not isinstance(pong, bool):
            raise ParamError("data.pong must be true or false")
        self.state = State.LOGGING_IN
        return LoginRequest(
            app_id=frame.appId,
            user_id=user_id,
            client_type=frame.clientType,
            imei=frame.imei,
            version=frame.version,
            login_model=app.login_model,
            max_sessions=app.max_sessions,
            resume_after=resume_after,
            report_cursor="lastEventId" in data,
            pong=pong,
        )

    # --- outcomes ---

    def logged_in(self, request: LoginRequest, outcome: LoginOutcome) -> None:
        """The hub logged the session in: acknowledge it (LOGINACK 9001)."""
        self.id = outcome.session
        self.app_id, self.user_id = request.app_id, request.user_id
        self.state = max(self.state, State.LOGGED_IN)
        self.pong = request.pong
        self.report_cursor = request.report_cursor
        self.heartbeat_timeout = self.settings.heartbeat_timeout_for(request.app_id)
        # The seed's LOGINACK is {"userId"} exactly, and its clients read it by that size: our cursor and
        # resume outcome only for a LOGIN that carries lastEventId (a stream id, or null for "none yet").
        ack: dict[str, Any] = {"userId": request.user_id}
        if request.report_cursor:
            ack["lastEventId"] = str(outcome.cursor)
            if outcome.resumed is not None:
                ack["resumed"] = outcome.resumed
        self._reply(Command.LOGINACK, _json.encode(ack))

    def reasserted(self, cursor: EventId) -> None:
        """Redis lost the session (an empty restart) and the hub logged it in again on this connection: the
        user's versions restarted and the cursor from before points into data that is gone. A client of the
        resume protocol (its LOGIN carried lastEventId) gets an unasked LOGINACK ``{"userId", "lastEventId":
        <the new cursor>, "resumed": false}`` (PROTOCOL.md section 6): forget versions, re-pull. The seed's
        clients get nothing: they keep no versions, and a second LOGINACK is not in their protocol."""
        if self.state != State.LOGGED_IN or not self.report_cursor:
            return
        ack = {"userId": self.user_id, "lastEventId": str(cursor), "resumed": False}
        self._reply(Command.LOGINACK, _json.encode(ack))

    def answer(self, command: int, response: ResponseVO) -> None:
        """Answer a request (SUBSCRIBE, PULL, QUERY_SUBSCRIPTIONS) with the seed's envelope."""
        self._reply(command, _json.encode(response))

    def error(
        self,
        code: int,
        message: str,
        *,
        request_id: str | None = None,
        command: int | None = None,
        frame: Frame | None = None,
    ) -> None:
        """An ERROR (9100): the code, the reason, the request id (when logged) and the command it answers."""
        data: dict[str, Any] = {"code": int(code), "msg": message}
        if request_id is not None:
            data["requestId"] = request_id
        if command is not None:
            data["command"] = command
        self._reply(Command.ERROR, _json.encode(data), frame)

    def ended(self) -> None:
        """The hub ended the session: serve nothing more."""
        self.state = max(self.state, State.ENDED)

    def begin_close(self) -> bool:
        """The server closes the connection: write nothing more. False when it already began."""
        if self.state >= State.CLOSING:
            return False
        self.state = State.CLOSING
        return True

    # --- output ---

    def replies(self) -> list[Encoded]:
        """The replies owed, oldest first, handed over once."""
        out, self._replies = self._replies, []
        return out

    def _reply(self, command: int, data_json: bytes, frame: Frame | None = None) -> None:
        user = self.user_id or (frame.data.get("userId") if frame else "") or ""
        app = self.app_id or (frame.appId if frame else 0)
        self._replies.append(Encoded(command, data_json, app, str(user), None))
