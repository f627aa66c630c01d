"""The asyncio side of one client connection, shared by the TCP and WebSocket transports.

It feeds decoded frames to the connection's ``Session`` (sans I/O) in order, one at a time, serves the
requests the session returns (against the hub and the presence facade) and writes the session's replies.
The transports (tcp.py, ws.py) implement ``frame``, ``close`` and ``write``: each has one write path, which
owns its back-pressure (a client more than ``MAX_WRITE_BUFFER`` bytes behind is dropped, not buffered
without end).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import secrets
import time
from collections import deque
from typing import ClassVar

import msgspec

from presence.errors import Code, ParamError, PresenceError
from presence.gateway.codec import Command, Frame, FrameError
from presence.gateway.hub import Hub
from presence.gateway.outbound import Encoded
from presence.gateway.session import (
    LoginRequest,
    LogoutRequest,
    Query,
    QuerySubscriptionsRequest,
    Session,
    State,
    SubscribeRequest,
)
from presence.inbox import EventId
from presence.models import ResponseVO

log = logging.getLogger("presence.gateway")

MAX_WRITE_BUFFER = 1 << 20  # bytes written but not yet sent to a client before it is dropped as too slow


class ClientConnection(abc.ABC):
    """One client socket: its session, the order its frames are served in, and its transport's hooks."""

    transport_name: ClassVar[str] = "?"

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.session = Session(hub.settings)
        self.last_active = time.monotonic()  # the last frame received (the heartbeat check reads it)
        self._queue: deque[Frame | FrameError] = deque()
        self._serving: asyncio.Task[None] | None = None

    @property
    def heartbeat_timeout(self) -> float:
        return self.session.heartbeat_timeout

    @property
    def logging_in(self) -> bool:
        """A LOGIN is being served (``State.LOGGING_IN``): the heartbeat check leaves it alone."""
        return self.session.state == State.LOGGING_IN

    # --- the transport's part ---

    @abc.abstractmethod
    def frame(self, message: Encoded) -> bytes:
        """The message in this connection's wire format (shared parts encoded once per format)."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Write whole frames now, without waiting; nothing once the close began (``Session.writable``)."""

    @abc.abstractmethod
    def close(self, code: int, reason: str) -> None:
        """Begin closing (WebSocket: the close handshake with ``code``); what was written goes out first."""

    def drop_slow(self, transport: asyncio.Transport) -> None:
        """Drop a client that reads too slowly: at once, without flushing what is queued for it."""
        log.warning("dropping slow %s client %s", self.transport_name, self.session.user_id)
        transport.abort()

    # --- the hub's part ---

    def ended(self) -> None:
        """The hub ended this connection's session (``Hub.end``): no more requests are served."""
        self.session.ended()

    def reasserted(self, cursor: EventId) -> None:
        """The hub logged this connection's session in again after Redis lost it (``Hub.reassert``)."""
        self.session.reasserted(cursor)
        self._flush()

    # --- input ---

    def feed(self, frames: list[Frame], error: FrameError | None = None) -> None:
        """Queue decoded frames (and the decoding error that followed them, if any)."""
        self.last_active = time.monotonic()
        self._queue.extend(frames)
        if error is not None:
            self._queue.append(error)
        if self._queue and (self._serving is None or self._serving.done()):
            self._serving = asyncio.ensure_future(self._serve())

    async def settle(self) -> None:
        """Wait until the frames received so far are served."""
        if self._serving is not None and not self._serving.done():
            await asyncio.shield(self._serving)

    async def _serve(self) -> None:
        while self._queue and self.session.serving:
            item = self._queue.popleft()
            if isinstance(item, FrameError):
                await self.fail(item.code, item.message)
                return
            try:
                await self._handle(item)
            except PresenceError as exc:
                if exc.http_status >= 500:  # its message may quote Redis: only the log gets it
                    await self.fail_system(f"frame {item.command} failed: {exc.message}", item)
                else:
                    await self.fail(exc.code, exc.message)
            except Exception as exc:
                await self.fail_system(f"frame {item.command} failed: {type(exc).__name__}", item, exc_info=True)

    async def _handle(self, frame: Frame) -> None:
        request = self.session.receive(frame)
        self._flush()
        if request is None:
            return
        if isinstance(request, LoginRequest):
            await self._login(request)
        elif isinstance(request, LogoutRequest):
            # Logged out before the close: a client that reconnects at once finds the session gone.
            await self.hub.end(self, "logout")
            self.close(1000, "logged out")
        else:
            await self._query(request)

    async def _login(self, request: LoginRequest) -> None:
        # A login in progress is not a silent newcomer: however long Redis takes (bounded by the retry
        # window), the login deadline must not answer it with a client error (90001).
        self.hub.login_started(self)
        outcome = await self.hub.login(self, request)
        if outcome is None:  # the connection ended meanwhile
            return
        self.session.logged_in(request, outcome)
        self._flush()
        self.hub.activate(self)

    async def _query(self, request: Query) -> None:
        presence, session = self.hub.presence, self.session
        app_id, user_id = session.app_id, session.user_id
        result: object
        try:
            if isinstance(request, SubscribeRequest):
                result = await presence.subscribe(app_id, user_id, request.body.subUserId, request.body.subTime)
            elif isinstance(request, QuerySubscriptionsRequest):
                result = await presence.subscriptions(app_id, user_id)
            elif request.users is not None:
                result = await presence.query_users(app_id, request.users)
            else:
                result = await presence.query_friends(app_id, user_id)
        except msgspec.ValidationError as exc:
            session.answer(request.command, ResponseVO(Code.PARAMETER_ERROR, str(exc)))
        except ParamError as exc:
            session.answer(request.command, ResponseVO(exc.code, exc.message))
        else:
            session.answer(request.command, ResponseVO(data=result))
        self._flush()

    # --- output ---

    def _flush(self) -> None:
        for message in self.session.replies():
            self.write(self.frame(message))

    async def fail(self, code: int, message: str, request_id: str | None = None) -> None:
        """The connection's last word: an ERROR (9100) frame with the code, reason and request id, then close."""
        rid = request_id or secrets.token_hex(8)
        if request_id is None:
            log.debug(
                "request %s: %s connection of %s: %s %s", rid, self.transport_name, self.session.user_id, code, message
            )
        self.session.error(code, message, request_id=rid)
        self._flush()
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
            self.session.user_id or "?",
            detail,
            exc_info=exc_info,
        )
        if self.session.id is not None and frame is not None and frame.command != Command.LOGIN:
            self.session.error(Code.SYSTEM_ERROR, "system error", request_id=rid, command=frame.command, frame=frame)
            self._flush()
            return
        await self.fail(Code.SYSTEM_ERROR, "system error", rid)
