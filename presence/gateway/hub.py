"""The gateway node: its connections and the life cycle of their sessions.

The hub keeps the registry of local connections (its own record of each: login deadline, session, what
re-asserting it repeats) and runs every session's life: login, activation (pushes start: ``Delivery``),
the end (at once, or after the offline grace), reconciliation with this node's session set, re-asserting
sessions Redis lost, the heartbeat check, and the handover on shutdown. Transports call it; it calls the
Presence facade. It never writes to a socket: connections do (``connection.ClientConnection``).

Ends of sessions: lastSeen is the evidence (the connection's last frame for a silent loss, the close
for a drop, LOGOUT), not the moment the logout runs. A restart under the same node id logs out what
the predecessor left, after what remains of its grace. SIGTERM hands sessions over: clients are told
to reconnect (WebSocket close ``1012``), sessions are kept for ``offline_grace`` and only those that
did not come back anywhere are logged out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from presence.config import Settings
from presence.errors import Code, PresenceError, UnavailableError
from presence.gateway.delivery import Delivery, PushTarget
from presence.gateway.session import LoginOutcome, LoginRequest, SessionId
from presence.inbox import NO_EVENT, EventId, Inboxes
from presence.metrics import CONNECTIONS, LOGIN_TIMEOUTS, LOGINS, LOGOUTS
from presence.models import ChangeResult
from presence.nodes import NodeKeeper, Predecessor, parse_node_member
from presence.service import Presence, new_conn_id
from presence.sockets import SocketGate

log = logging.getLogger("presence.gateway")

LOGOUT_ATTEMPTS = 5
CLOCK_PROBE_MAX_RTT_S = 0.05  # s: a slower TIME round trip says too little about the offset
RECONCILE_AFTER_OUTAGE_S = 2.0  # s between reconcile rounds while and just after Redis is away
# WebSocket close of a deploy (RFC 6455 1012 "service restart"): reconnect, to any gateway, and resume.
HANDOVER_CODE = 1012
HANDOVER_REASON = "server restart: reconnect"
STOP_STEP_S = 5.0  # most seconds each step of a shutdown waits for Redis


async def _within(awaitable: Awaitable[object], seconds: float) -> bool:
    """Await at most ``seconds``; False (the work cancelled, not awaited) when it took longer or failed."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its late error is no one's
        return False
    return not task.cancelled() and task.exception() is None


class Connection(PushTarget, Protocol):
    """What the hub needs of a client connection, whatever its transport."""

    @property
    def transport_name(self) -> str: ...

    @property
    def last_active(self) -> float:
        """Monotonic time of the last frame received."""
        ...

    @property
    def heartbeat_timeout(self) -> float:
        """Seconds of silence after which the connection is closed; 0 = never."""
        ...

    @property
    def logging_in(self) -> bool:
        """A LOGIN is being served: the client waits on us, so its silence is not its fault."""
        ...

    def ended(self) -> None:
        """Told by ``Hub.end``: the session is over, serve no more requests."""
        ...

    def reasserted(self, cursor: EventId) -> None:
        """Told by ``Hub.reassert``: Redis lost the session and it was logged in again; pushes restart
        after ``cursor`` (the client's versions and cursor from before mean nothing now)."""
        ...


@dataclass(slots=True)
class _Registered:
    """The hub's own record of one open connection."""

    login_deadline: asyncio.TimerHandle | None = None  # closes a silent newcomer
    session: SessionId | None = None  # once logged in
    login: LoginRequest | None = None  # the LOGIN, repeated to re-assert the session
    cursor: EventId = NO_EVENT  # where pushes start once it is activated


class Hub:
    """One gateway node's view of its clients; transports call it, it calls the Presence facade."""

    def __init__(self, presence: Presence, settings: Settings, node_id: str, node_host: str = "") -> None:
        self.presence = presence
        self.settings = settings
        self.node_id = node_id
        self.node_host = node_host
        self.inboxes = Inboxes(presence.store, presence.keys)
        self.delivery: Delivery[Connection] = Delivery(
            self.inboxes, node_id, settings, spawn=self._spawn, end_kicked=self._end_kicked
        )
        self._registry: dict[Connection, _Registered] = {}
        # session -> its logout timer (None while a SIGTERM handover holds it: Hub.stop logs it out)
        self._grace: dict[SessionId, asyncio.TimerHandle | None] = {}
        # session -> (monotonic time of the evidence, or None; Redis-clock ms of it, or 0): what lastSeen becomes
        self._evidence: dict[SessionId, tuple[float | None, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Future[object]] = set()
        self.reconcile_interval = 30.0
        # Redis TIME minus our monotonic clock (ms), learned from quick round trips: evidence is sent as
        # an absolute time on the Redis clock, so a call delayed by a stall does not make lastSeen late.
        self._redis_offset_ms: float | None = None
        self._suspects: set[SessionId] = set()
        self.keeper = NodeKeeper(
            presence, node_id, settings.node_ttl, on_reaped=self._reaped_meanwhile, stall=settings.redis_timeout
        )
        self.closing = False
        # Client sockets of every listener; the server sizes it from the file descriptor limit at start.
        self.gate = SocketGate(settings.max_connections or None)
        self._reasserting: asyncio.Task[int] | None = None
        # One re-assertion at a time (data lost, the node record gone and reconcile can all start one):
        # two would both find a session lost and log it in, and tell its client twice.
        self._reassert_lock = asyncio.Lock()
        self._logouts_failed = 0  # logouts given up (left in this node's set): a stop then keeps the node record
        presence.on_data_lost = self.reassert_soon

    # --- lifecycle ---

    async def start(self) -> None:
        """Start serving; raises NodeIdInUseError (nothing started) while another process beats this node id."""
        # The node id is this process's before anything of it is used (server.py claims it even earlier,
        # before the webhook worker starts): the first beat, once no live process beats it.
        predecessor = await self.keeper.claim()
        await self.delivery.open()
        # A new incarnation of this node id: whatever sessions the set still records are the predecessor's
        # (no connection of ours exists yet).
        left = await self._recorded_sessions()
        await self._learn_redis_clock()
        if left:
            self._adopt_predecessor(left, predecessor)
        self.delivery.start()
        loops = (self._idle_check(), self._reconcile_loop(), self.presence.feed.sweep_outboxes(), self.keeper.run())
        for coro in loops:
            self._tasks.append(asyncio.create_task(coro))

    def _adopt_predecessor(self, sessions: set[SessionId], predecessor: Predecessor) -> None:
        """Log out the predecessor's sessions once its grace (counted from its last heartbeat) is over.

        The claim's wait for a recent beat to prove dead does not count: the devices could not reconnect
        here meanwhile. A device that reconnects (here or elsewhere) replaces its session with a new
        connection id, so the logout, conditional on the old one, changes nothing: friends see nothing.
        """
        grace = self.settings.offline_grace
        last_beat, age = predecessor
        delay = max(grace - age, 0.0)
        log.warning(
            "node %s: new incarnation; %d sessions of the predecessor (last beat %.1f s before the start) end "
            "in %.1f s unless their devices reconnect",
            self.node_id,
            len(sessions),
            age,
            delay,
        )
        loop = asyncio.get_running_loop()
        for session in sessions:
            self._evidence[session] = (None, last_beat or 0)
            self._grace[session] = loop.call_later(delay, self._grace_expired, session, "restarted")

    async def stop(self, *, logout: bool = True, handover: float = 0.0) -> None:
        """Stop serving. ``handover`` > 0 (SIGTERM): tell clients to reconnect (close 1012), keep their sessions
        that long, then log out only those that did not come back anywhere. Otherwise log them out at once.
        """
        self.closing = True
        self.delivery.begin_stop()
        conns = list(self._registry)
        for conn in conns:
            if handover > 0:
                conn.close(HANDOVER_CODE, HANDOVER_REASON)
            else:
                conn.close(1001, "server is shutting down")
        reason = "handover" if handover > 0 else "shutdown"
        # Each step is bounded: a Redis that is away or rejects this node must not hold the exit for the
        # whole retry window. What is not logged out stays in this node's set, for a peer's reaper.
        finished = await _within(
            asyncio.gather(*(self.end(conn, reason) for conn in conns), return_exceptions=True), STOP_STEP_S
        )
        if handover > 0 and self._grace:
            # Heartbeats go on meanwhile: no peer reaps these sessions before they had their chance.
            log.info("handing over %d sessions: %.1f s for their devices to reconnect", len(self._grace), handover)
            await asyncio.sleep(handover)
        for handle in list(self._grace.values()):
            if handle is not None:
                handle.cancel()
        pending = list(self._grace)
        self._grace.clear()
        if logout and pending:
            finished &= await _within(
                asyncio.gather(*(self._logout_session(s, reason) for s in pending), return_exceptions=True),
                STOP_STEP_S,
            )
        if self._pending:
            await asyncio.wait(self._pending, timeout=STOP_STEP_S)
        self.keeper.stopped = True
        for task in self._tasks:
            task.cancel()
        self.gate.close()
        # redis-py can swallow a cancel that lands mid-command; never let that hang the shutdown.
        await asyncio.gather(self._tasks_ended(2.0), self.delivery.stop())
        if logout and finished and not self._logouts_failed:
            # Only once every session is logged out: the record is what lets a peer's reaper find the rest.
            if not await _within(self.presence.nodes.leave(self.node_id), STOP_STEP_S):
                log.warning("node %s: leaving failed; peers reap it after node_ttl", self.node_id)
        elif logout:
            log.warning("node %s: stopped with sessions left; a peer's reaper logs them out", self.node_id)

    async def _tasks_ended(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        self._tasks.clear()

    # --- connections ---

    @property
    def capacity(self) -> int | None:
        """Most client sockets at once (all listeners), None = no limit."""
        return self.gate.capacity

    @capacity.setter
    def capacity(self, value: int | None) -> None:
        self.gate.capacity = value

    def has_room(self, transport: str) -> bool:
        """False (counted, and logged at most every 10 s) when a new connection would exceed the capacity.

        The capacity leaves a reserve of file descriptors, so Redis, /healthz and REST keep working
        while the gateway is full (presence/sockets.py). A WebSocket's own socket is already counted.
        """
        return self.gate.admit(transport, held=1 if transport == "ws" else 0)

    def opened(self, conn: Connection) -> None:
        """Register a new connection; without a LOGIN within ``login_timeout`` it is closed."""
        record = self._registry[conn] = _Registered()
        CONNECTIONS.labels(conn.transport_name).inc()
        timeout = self.settings.login_timeout
        if timeout > 0:
            record.login_deadline = asyncio.get_running_loop().call_later(timeout, self._login_expired, conn)

    def connection_lost(self, conn: Connection) -> None:
        """The socket is gone: end the connection (in the background)."""
        self._spawn(self.end(conn, "close"))

    def login_started(self, conn: Connection) -> None:
        """A LOGIN is being served: the login deadline no longer applies (a failed login closes the connection)."""
        record = self._registry.get(conn)
        if record is not None and record.login_deadline is not None:
            record.login_deadline.cancel()
            record.login_deadline = None

    def _login_expired(self, conn: Connection) -> None:
        record = self._registry.get(conn)
        if record is None or record.session is not None:
            return
        record.login_deadline = None
        LOGIN_TIMEOUTS.inc()
        self._spawn(conn.fail(Code.PARAMETER_ERROR, f"no LOGIN (9000) within {self.settings.login_timeout:g} s"))

    async def login(self, conn: Connection, request: LoginRequest) -> LoginOutcome | None:
        """Log the connection's session in; None when the connection ended meanwhile (its session is then
        logged out again). Raises what the facade raises (the client is told the login failed)."""
        session = SessionId(request.app_id, request.user_id, request.client_type, request.imei, new_conn_id())
        try:
            result = await self._presence_login(session, request)
        except Exception as exc:
            if not isinstance(exc, PresenceError) or exc.http_status >= 500:
                # Unknown outcome (Redis timed out or went away): the client is told the login failed, so
                # make sure no session of this connection stays behind (the logout is conditional on it).
                self._spawn(self._do_logout(session, "login-failed"))
            raise
        cursor = EventId.parse(result.inbox_last_id)
        resumed: bool | None = None
        asked = request.resume_after
        if asked is not None:
            # Only a device whose session survived (a reconnect within the grace) can have missed nothing.
            # An id beyond the inbox's last entry was never delivered: no resume from the future. No inbox
            # before this login (cursor 0-0) cannot tell "never written" from "trimmed empty" or "expired".
            resumed = (
                not result.changed
                and cursor != NO_EVENT
                and asked <= cursor
                and await self.inboxes.can_resume(session.app_id, session.user_id, asked)
            )
            if resumed:
                cursor = asked
        record = self._registry.get(conn)
        if record is None:  # the socket went away while we were logging in
            await self._do_logout(session, "close")
            return None
        record.session, record.login, record.cursor = session, request, cursor
        if record.login_deadline is not None:
            record.login_deadline.cancel()
            record.login_deadline = None
        LOGINS.labels(conn.transport_name).inc()
        return LoginOutcome(session, cursor, resumed)

    async def _presence_login(self, session: SessionId, request: LoginRequest) -> ChangeResult:
        return await self.presence.login(
            session.app_id,
            session.user_id,
            session.client_type,
            session.imei,
            conn_id=session.conn_id,
            node_id=self.node_id,
            node_host=self.node_host,
            version=request.version,
            login_model=request.login_model,
            max_sessions=request.max_sessions,
        )

    def activate(self, conn: Connection) -> None:
        """Start pushing to a logged-in connection (after its LOGINACK went out)."""
        record = self._registry.get(conn)
        if record is None or record.session is None:
            return
        self.delivery.attach(conn, record.session, record.cursor)

    async def end(self, conn: Connection, reason: str) -> None:
        """The one way a connection ends: logout (at once or after the grace) exactly once."""
        record = self._registry.pop(conn, None)
        if record is None:
            return
        conn.ended()
        if record.login_deadline is not None:
            record.login_deadline.cancel()
            record.login_deadline = None
        CONNECTIONS.labels(conn.transport_name).dec()
        self.delivery.detach(conn)
        session = record.session
        if session is None:
            return
        # The evidence of the user's last presence: the last frame of a silent connection, else now.
        seen = conn.last_active if reason == "timeout" else time.monotonic()
        grace = self.settings.offline_grace
        if (reason in ("close", "timeout", "error") and grace > 0 and not self.closing) or reason == "handover":
            self._evidence[session] = (seen, 0)
            if reason == "handover":  # Hub.stop waits the grace and logs out what is left
                self._grace[session] = None
                return
            loop = asyncio.get_running_loop()
            self._grace[session] = loop.call_later(grace, self._grace_expired, session, reason)
            return
        await self._do_logout(session, reason, seen)

    async def _end_kicked(self, conn: Connection) -> None:
        await self.end(conn, "kicked")

    # --- logouts ---

    def _grace_expired(self, session: SessionId, reason: str) -> None:
        if self._grace.pop(session, None) is not None:
            self._spawn(self._logout_session(session, reason))

    async def _logout_session(self, session: SessionId, reason: str) -> None:
        mono, at_ms = self._evidence.pop(session, (None, 0))
        await self._do_logout(session, reason, mono, at_ms)

    async def _do_logout(self, session: SessionId, reason: str, seen: float | None = None, seen_at_ms: int = 0) -> None:
        """Log a session out, retried; ``seen`` (monotonic) or ``seen_at_ms`` (Redis clock) is the evidence.

        Every attempt carries the same operation id: an attempt whose reply was lost but which Redis applied
        makes the next one a replay that still fans the change out (never a silent no-op).
        """
        op_id = new_conn_id()
        if seen is None and not seen_at_ms:
            seen = time.monotonic()  # a LOGOUT, a kick: the evidence is now, not when Redis runs the call
        if not seen_at_ms and seen is not None and self._redis_offset_ms is not None:
            seen_at_ms = int(seen * 1000 + self._redis_offset_ms)
        for attempt in range(LOGOUT_ATTEMPTS):
            age_ms = int((time.monotonic() - seen) * 1000) if seen is not None else 0
            try:
                result = await self.presence.logout(
                    session.app_id,
                    session.user_id,
                    session.client_type,
                    session.imei,
                    conn_id=session.conn_id,
                    node_id=self.node_id,
                    op_id=op_id,
                    seen_age_ms=age_ms,
                    seen_at_ms=seen_at_ms,
                    reason=reason,
                )
            except UnavailableError:
                # Unknown outcome after redis_retry_for: the facade's resolver replays this very logout
                # (same op id) until Redis answers, so it is applied and pushed without waiting for reconcile().
                log.warning("logout of %s/%s: redis unavailable, left to the resolver", session.user_id, session.imei)
                return
            except Exception as exc:
                if attempt == LOGOUT_ATTEMPTS - 1 or self.closing:
                    # The session stays in this node's set: reconcile() (or a reaper) logs it out later.
                    log.error(
                        "logout of %s/%s failed (%r); left for reconciliation", session.user_id, session.imei, exc
                    )
                    self._logouts_failed += 1
                    return
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            if result.changed:
                LOGOUTS.labels(reason).inc()
            return

    # --- reconciliation ---

    async def _recorded_sessions(self) -> set[SessionId]:
        """The sessions this node's set records in Redis (a member that is not one is logged and skipped)."""
        out: set[SessionId] = set()
        for member in await self.presence.nodes.session_members(self.node_id):
            try:
                out.add(SessionId(*parse_node_member(member)))
            except ValueError:
                log.error("node %s: ignoring %r in its session set: not a session member", self.node_id, member)
        return out

    async def reconcile(self) -> int:
        """Log out sessions this node's set records but no local connection holds (a lost logout).

        A session counts as stale only when two rounds in a row find it so, which leaves room for a
        login in flight (recorded before its connection is marked logged in). None is while another process
        beats this node id (a misconfiguration, logged by the keeper): its sessions are in the same set.
        """
        await self.reassert()
        if self.keeper.id_shared():
            self._suspects = set()
            return 0
        live = {r.session for r in self._registry.values() if r.session is not None} | set(self._grace)
        stale = {s for s in await self._recorded_sessions() if s not in live}
        confirmed, self._suspects = stale & self._suspects, stale
        for session in confirmed:
            await self._logout_session(session, "reconciled")
        return len(confirmed)

    async def _reconcile_loop(self) -> None:
        pause, recovering = self.reconcile_interval, False
        while not self.closing:
            await asyncio.sleep(pause)
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not recovering:
                    log.error("reconciling this node's sessions failed (%r); retrying soon", exc)
                # Redis away: reconcile again soon after it answers, not a whole period later.
                pause, recovering = RECONCILE_AFTER_OUTAGE_S, True
                continue
            await self._learn_redis_clock()
            # The first round after an outage marks suspects; a second soon after confirms them.
            pause = RECONCILE_AFTER_OUTAGE_S if recovering else self.reconcile_interval
            recovering = False

    async def _learn_redis_clock(self) -> None:
        """Refresh ``_redis_offset_ms`` from one TIME call, kept only if its round trip was quick."""
        before = time.monotonic()
        try:
            redis_ms = await self.presence.nodes.redis_time_ms()
        except Exception:  # Redis away: keep the offset we have
            return
        after = time.monotonic()
        if after - before < CLOCK_PROBE_MAX_RTT_S:
            self._redis_offset_ms = redis_ms - (before + after) * 500

    # --- liveness ---

    async def _idle_check(self) -> None:
        """Close connections silent for their heartbeat timeout (the app's, else the global; 0 = never)."""
        timeouts = [self.settings.heartbeat_timeout, *(a.heartbeat_timeout for a in self.settings.apps.values())]
        positive = [t for t in timeouts if t is not None and t > 0]
        if not positive:
            return
        interval = min(1.0, min(positive) / 3)
        while not self.closing:
            await asyncio.sleep(interval)
            now = time.monotonic()
            idle = [c for c in self._registry if 0 < c.heartbeat_timeout < now - c.last_active and not c.logging_in]
            for conn in idle:
                conn.close(4000, "heartbeat timeout")
                await self.end(conn, "timeout")

    async def _reaped_meanwhile(self) -> None:
        """This node's record was gone at a heartbeat (which registered it again): a peer reaped it (we were
        silent too long) or Redis lost it (the primary holding ``presence:nodes`` restarted empty).

        Either way the connections are live: keep them and log in again every session Redis no longer holds
        (``reassert``). If that cannot be done, close them and log their sessions out (no ghost online).
        """
        log.warning(
            "node %s: its node record was gone (reaped by a peer, or lost by Redis); re-asserting", self.node_id
        )
        try:
            await self.reassert()
        except Exception as exc:
            log.error(
                "node %s: re-asserting sessions failed (%r); closing %d connections",
                self.node_id,
                exc,
                len(self._registry),
            )
            for conn in list(self._registry):
                conn.close(1012, "node restarted its sessions, reconnect")
                await self.end(conn, "reaped")

    def reassert_soon(self) -> None:
        """A Redis node lost its data (it had no library): re-assert this node's sessions in the background."""
        if self.closing or (self._reasserting is not None and not self._reasserting.done()):
            return
        self._reasserting = asyncio.ensure_future(self._reassert_logged())

    async def _reassert_logged(self) -> int:
        try:
            return await self.reassert()
        except Exception as exc:  # the reconcile loop tries again
            log.warning("re-asserting sessions failed (%r); the next reconciliation tries again", exc)
            return 0

    async def reassert(self) -> int:
        """Log in again, under the same connection id, the session of every live local connection that Redis
        no longer holds (its primary restarted empty, or a peer reaped this node): friends see the user
        online again and pushes flow. A device whose session another connection holds now is left alone.
        Returns the sessions logged in again.
        """
        async with self._reassert_lock:
            return await self._reassert()

    async def _reassert(self) -> int:
        live = [
            (conn, r.session, r.login)
            for conn, r in self._registry.items()
            if r.session is not None and r.login is not None
        ]
        if not live:
            return 0
        held = await self.presence.nodes.sessions_held([session for _, session, _ in live])
        lost = [item for item, h in zip(live, held, strict=True) if h is False]
        for conn, session, request in lost:
            # No pushes while it is logged in again: what follows the new login (and the LOGINACK telling
            # the client so) comes from the inbox as it is then, not from a cursor into the data lost.
            paused = self.delivery.detach(conn)
            try:
                result = await self._presence_login(session, request)
            except BaseException as exc:
                if isinstance(exc, PresenceError) and exc.http_status < 500:
                    # Refused now (e.g. the user's other devices took every session meanwhile): end this one.
                    conn.close(4001, "session lost")
                    await self.end(conn, "error")
                    continue
                self._resume_pushes(conn, session, paused)  # unknown outcome: the next round decides
                raise
            record = self._registry.get(conn)
            if record is None or record.session != session:  # the connection ended meanwhile
                continue
            # Versions restart with the data lost: the client hears that its state is gone (a LOGINACK
            # with resumed false, if it speaks the resume protocol), then pushes after the new cursor.
            record.cursor = EventId.parse(result.inbox_last_id)
            conn.reasserted(record.cursor)
            self.delivery.attach(conn, session, record.cursor)
        if lost:
            log.warning("node %s: %d sessions Redis had lost were logged in again", self.node_id, len(lost))
        return len(lost)

    def _resume_pushes(self, conn: Connection, session: SessionId, cursor: EventId | None) -> None:
        """Push again from where it was paused, to a connection still holding ``session``."""
        record = self._registry.get(conn)
        if cursor is not None and record is not None and record.session == session:
            self.delivery.attach(conn, session, cursor)

    # --- background work ---

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task: asyncio.Future[object] = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
