"""The gateway node: local connections, login/logout bookkeeping and push delivery.

Delivery: a doorbell (pub/sub on this node's channel) names inboxes with new entries; the delivery
loop XREADs the dirty ones in one call from each inbox's lowest local cursor, encodes an entry once
per wire format and writes it to every targeted local connection. A periodic sweep marks every local
inbox dirty, so a lost doorbell only delays a push.

Ends of sessions: lastSeen is the evidence (the connection's last frame for a silent loss, the close
for a drop, LOGOUT), not the moment the logout runs. A restart under the same node id logs out what
the predecessor left, after what remains of its grace. SIGTERM hands sessions over: clients are told
to reconnect (WebSocket close ``1012``), sessions are kept for ``offline_grace`` and only those that
did not come back anywhere are logged out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
import time
from collections.abc import Awaitable
from typing import Protocol

import msgspec

from presence.config import Settings
from presence.errors import Code, PresenceError, UnavailableError
from presence.gateway.codec import SERVER_HEADER, Command, encode_tcp, pack_head
from presence.metrics import CONNECTIONS, DELIVERIES, DOORBELLS, LOGIN_TIMEOUTS, LOGINS, LOGOUTS
from presence.models import ChangeResult
from presence.nodes import NodeKeeper, node_member, parse_node_member
from presence.service import Presence, new_conn_id
from presence.sockets import SocketGate

log = logging.getLogger("presence.gateway")

EventId = tuple[int, int]
READ_COUNT = 100
READ_BATCH = 500
LOGOUT_ATTEMPTS = 5
CLOCK_PROBE_MAX_RTT_S = 0.05  # s: a slower TIME round trip says too little about the offset
RECONCILE_AFTER_OUTAGE_S = 2.0  # s between reconcile rounds while and just after Redis is away
# WebSocket close of a deploy (RFC 6455 1012 "service restart"): reconnect, to any gateway, and resume.
HANDOVER_CODE = 1012
HANDOVER_REASON = "server restart: reconnect"
STOP_STEP_S = 5.0  # most seconds each step of a shutdown waits for Redis
PUBSUB_PING_AFTER = 0.5  # seconds without a doorbell before the subscription is PINGed
PUBSUB_PONG_WITHIN = 1.0  # seconds for its PONG before it is made again
_doorbell_decoder = msgspec.json.Decoder(list[str])


async def _within(awaitable: Awaitable[object], seconds: float) -> bool:
    """Await at most ``seconds``; False (the work cancelled, not awaited) when it took longer or failed."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its late error is no one's
        return False
    return not task.cancelled() and task.exception() is None


def doorbell_inboxes(message: bytes) -> list[str]:
    """The inbox keys a doorbell names: a JSON array (so no byte of a key can split it)."""
    if message[:1] != b"[":  # a library older than the JSON framing: one key per line
        return message.decode().split("\n")
    return _doorbell_decoder.decode(message)


def parse_event_id(value: str | bytes) -> EventId:
    if isinstance(value, bytes):
        value = value.decode()
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def format_event_id(value: EventId) -> str:
    return f"{value[0]}-{value[1]}"


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
    """One entry's bytes per wire format, built on first use and shared by every connection.

    TCP frames carry only ``data``: one frame for all. A WebSocket pack also carries the recipient
    session's ``clientType`` and ``imei``, so it is a shared head (``pack_head``, encoded once) plus the
    connection's own ``pack_tail`` (encoded once per connection): per recipient only the lengths,
    two small headers and one join.
    """

    __slots__ = ("_head", "_tcp", "app_id", "command", "data", "event_id", "user_id")

    def __init__(self, command: int, data: bytes, app_id: int, user_id: str, event_id: str | None) -> None:
        self.command, self.data, self.app_id, self.user_id, self.event_id = command, data, app_id, user_id, event_id
        self._tcp: bytes | None = None
        self._head: bytes | None = None

    def tcp(self) -> bytes:
        if self._tcp is None:
            self._tcp = encode_tcp(self.command, self.data)
        return self._tcp

    def head(self) -> bytes:
        """The pack up to the recipient's fields (``eventId``, ours, lets a WebSocket client resume)."""
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


class Connection(Protocol):
    """What the hub needs of a client connection, whatever its transport."""

    transport_name: str
    conn_id: str
    app_id: int
    user_id: str
    client_type: int
    imei: str
    logged_in: bool
    ended: bool
    cursor: EventId
    last_active: float
    login_deadline: asyncio.TimerHandle | None
    heartbeat_timeout: float

    def frame(self, message: Encoded) -> bytes: ...

    async def fail(self, code: int, message: str, request_id: str | None = None) -> None: ...

    def write(self, data: bytes) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class Hub:
    """One gateway node's view of its clients; transports call it, it calls the Presence facade."""

    def __init__(self, presence: Presence, settings: Settings, node_id: str, node_host: str = "") -> None:
        self.presence = presence
        self.settings = settings
        self.node_id = node_id
        self.node_host = node_host
        self.by_inbox: dict[str, dict[str, Connection]] = {}
        self.connections: set[Connection] = set()
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        # member -> its logout timer (None while a SIGTERM handover holds it: Hub.stop logs it out)
        self._grace: dict[str, asyncio.TimerHandle | None] = {}
        # member -> (monotonic time of the evidence, or None; Redis-clock ms of it, or 0): what lastSeen becomes
        self._evidence: dict[str, tuple[float | None, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[object]] = set()
        self.sweep_interval = 5.0
        self.reconcile_interval = 30.0
        # Redis TIME minus our monotonic clock (ms), learned from quick round trips: evidence is sent as
        # an absolute time on the Redis clock, so a call delayed by a stall does not make lastSeen late.
        self._redis_offset_ms: float | None = None
        self.outbox_sweep_interval = 2.0  # one SCAN step (COUNT 500) per primary each time
        self._suspects: set[str] = set()
        self._trimmed: dict[str, EventId] = {}  # inbox -> the cursor it was last trimmed to
        self.keeper = NodeKeeper(
            presence, node_id, settings.node_ttl, on_reaped=self._reaped_meanwhile, stall=settings.redis_timeout
        )
        self.closing = False
        # Client sockets of every listener; the server sizes it from the file descriptor limit at start.
        self.gate = SocketGate(settings.max_connections or None)
        # conn id -> (version, loginModel, max sessions) of its LOGIN: what re-asserting a lost session repeats
        self._login_params: dict[str, tuple[int, int, int]] = {}
        self._reasserting: asyncio.Task[int] | None = None
        self._logouts_failed = 0  # logouts given up (left in this node's set): a stop then keeps the node record
        presence.on_data_lost = self.reassert_soon

    # --- lifecycle ---

    async def start(self) -> None:
        self.pubsub = self.presence.redis.pubsub()
        await self.pubsub.subscribe(self.presence.doorbell_channel(self.node_id))
        node = getattr(self.pubsub, "get_pubsub_node", lambda: None)()
        self._pubsub_node: str | None = node.name if node is not None else None
        # A new incarnation of this node id: whatever sessions the set still records are the predecessor's
        # (no connection of ours exists yet). Read before our first beat overwrites its last one.
        left = await self.presence.nodes.session_members(self.node_id)
        await self._learn_redis_clock()
        last_beat = await self.presence.nodes.last_beat(self.node_id) if left else None
        await self.keeper.beat()
        if left:
            await self._adopt_predecessor(left, last_beat)
        loops = (
            self._doorbells(),
            self._deliver(),
            self._sweep(),
            self._idle_check(),
            self._reconcile_loop(),
            self._outbox_sweep(),
            self._trim_inboxes(),
            self.keeper.run(),
        )
        for coro in loops:
            self._tasks.append(asyncio.create_task(coro))

    async def _adopt_predecessor(self, members: set[str], last_beat: int | None) -> None:
        """Log out the predecessor's sessions once its grace (counted from its last heartbeat) is over.

        A device that reconnects meanwhile (here or elsewhere) replaces its session with a new connection
        id, so the logout, conditional on the old one, changes nothing: friends see nothing.
        """
        grace = self.settings.offline_grace
        age = 0.0
        if last_beat is not None:
            age = max(await self.presence.nodes.redis_time_ms() - last_beat, 0) / 1000
        delay = max(grace - age, 0.0)
        log.warning(
            "node %s: new incarnation; %d sessions of the predecessor (last beat %.1f s ago) end in %.1f s "
            "unless their devices reconnect",
            self.node_id,
            len(members),
            age,
            delay,
        )
        loop = asyncio.get_running_loop()
        for member in members:
            self._evidence[member] = (None, last_beat or 0)
            self._grace[member] = loop.call_later(delay, self._grace_expired, member, "restarted")

    async def stop(self, *, logout: bool = True, handover: float = 0.0) -> None:
        """Stop serving. ``handover`` > 0 (SIGTERM): tell clients to reconnect (close 1012), keep their sessions
        that long, then log out only those that did not come back anywhere. Otherwise log them out at once.
        """
        self.closing = True
        conns = list(self.connections)
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
                asyncio.gather(*(self._logout_member(m, reason) for m in pending), return_exceptions=True),
                STOP_STEP_S,
            )
        if self._pending:
            await asyncio.wait(self._pending, timeout=STOP_STEP_S)
        self.keeper.stopped = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        self.gate.close()
        # redis-py can swallow a cancel that lands mid-command; never let that hang the shutdown.
        await asyncio.wait(self._tasks, timeout=2)
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await _within(self.pubsub.aclose(), 1.0)
        if logout and finished and not self._logouts_failed:
            # Only once every session is logged out: the record is what lets a peer's reaper find the rest.
            if not await _within(self.presence.nodes.leave(self.node_id), STOP_STEP_S):
                log.warning("node %s: leaving failed; peers reap it after node_ttl", self.node_id)
        elif logout:
            log.warning("node %s: stopped with sessions left; a peer's reaper logs them out", self.node_id)

    # --- sessions ---

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
        self.connections.add(conn)
        CONNECTIONS.labels(conn.transport_name).inc()
        timeout = self.settings.login_timeout
        if timeout > 0:
            conn.login_deadline = asyncio.get_running_loop().call_later(timeout, self._login_expired, conn)

    def login_started(self, conn: Connection) -> None:
        """A LOGIN is being served: the login deadline no longer applies (a failed login closes the connection)."""
        if conn.login_deadline is not None:
            conn.login_deadline.cancel()
            conn.login_deadline = None

    def _login_expired(self, conn: Connection) -> None:
        conn.login_deadline = None
        if conn.logged_in or conn.ended:
            return
        LOGIN_TIMEOUTS.inc()
        self._spawn(conn.fail(Code.PARAMETER_ERROR, f"no LOGIN (9000) within {self.settings.login_timeout:g} s"))

    async def login(
        self,
        conn: Connection,
        app_id: int,
        user_id: str,
        client_type: int,
        imei: str,
        version: int,
        login_model: int,
        last_event_id: str | None,
        max_sessions: int = 10,
    ) -> tuple[str, bool | None]:
        """Log the connection in; returns (cursor to report, resume outcome or None when not asked)."""
        conn.conn_id = new_conn_id()
        try:
            result: ChangeResult = await self.presence.login(
                app_id,
                user_id,
                client_type,
                imei,
                conn_id=conn.conn_id,
                node_id=self.node_id,
                node_host=self.node_host,
                version=version,
                login_model=login_model,
                max_sessions=max_sessions,
            )
        except Exception as exc:
            if not isinstance(exc, PresenceError) or exc.http_status >= 500:
                # Unknown outcome (Redis timed out or went away): the client is told the login failed, so
                # make sure no session of this connection stays behind (the logout is conditional on it).
                self._spawn(self._do_logout(app_id, user_id, client_type, imei, conn.conn_id, "login-failed"))
            raise
        conn.app_id, conn.user_id, conn.client_type, conn.imei = app_id, user_id, client_type, imei
        conn.cursor = parse_event_id(result.inbox_last_id)
        inbox = self.presence.inbox_key(app_id, user_id)
        resumed: bool | None = None
        if last_event_id is not None:
            # Only a device whose session survived (a reconnect within the grace) can have missed nothing.
            # An id beyond the inbox's last entry was never delivered: no resume from the future.
            asked = parse_event_id(last_event_id)
            resumed = (
                not result.changed and asked <= conn.cursor and await self.presence.inbox_resume(inbox, last_event_id)
            )
            if resumed:
                conn.cursor = asked
        if conn.ended:  # the socket went away while we were logging in
            await self._logout(conn, "close")
            return format_event_id(conn.cursor), resumed
        conn.logged_in = True
        self._login_params[conn.conn_id] = (version, login_model, max_sessions)
        if conn.login_deadline is not None:
            conn.login_deadline.cancel()
            conn.login_deadline = None
        LOGINS.labels(conn.transport_name).inc()
        return format_event_id(conn.cursor), resumed

    def activate(self, conn: Connection) -> None:
        """Start pushing to a logged-in connection (after its LOGINACK went out)."""
        if conn.ended or not conn.logged_in:
            return
        inbox = self.presence.inbox_key(conn.app_id, conn.user_id)
        self.by_inbox.setdefault(inbox, {})[conn.conn_id] = conn
        self._mark(inbox)

    async def end(self, conn: Connection, reason: str) -> None:
        """The one way a connection ends: logout (at once or after the grace) exactly once."""
        if conn.ended:
            return
        conn.ended = True
        if conn.login_deadline is not None:
            conn.login_deadline.cancel()
            conn.login_deadline = None
        if conn in self.connections:
            self.connections.discard(conn)
            CONNECTIONS.labels(conn.transport_name).dec()
        if conn.conn_id:
            self._login_params.pop(conn.conn_id, None)
            inbox = self.presence.inbox_key(conn.app_id, conn.user_id)
            local = self.by_inbox.get(inbox)
            if local is not None and local.pop(conn.conn_id, None) is not None and not local:
                del self.by_inbox[inbox]
        if not conn.logged_in:
            return
        # The evidence of the user's last presence: the last frame of a silent connection, else now.
        seen = conn.last_active if reason == "timeout" else time.monotonic()
        grace = self.settings.offline_grace
        if (reason in ("close", "timeout", "error") and grace > 0 and not self.closing) or reason == "handover":
            member = self._member(conn)
            self._evidence[member] = (seen, 0)
            if reason == "handover":  # Hub.stop waits the grace and logs out what is left
                self._grace[member] = None
                return
            loop = asyncio.get_running_loop()
            self._grace[member] = loop.call_later(grace, self._grace_expired, member, reason)
            return
        await self._do_logout(conn.app_id, conn.user_id, conn.client_type, conn.imei, conn.conn_id, reason, seen)

    def _member(self, conn: Connection) -> str:
        return node_member(conn.app_id, conn.user_id, conn.client_type, conn.imei, conn.conn_id)

    def _grace_expired(self, member: str, reason: str) -> None:
        if self._grace.pop(member, None) is not None:
            self._spawn(self._logout_member(member, reason))

    async def _logout_member(self, member: str, reason: str) -> None:
        mono, at_ms = self._evidence.pop(member, (None, 0))
        await self._do_logout(*parse_node_member(member), reason, mono, at_ms)

    async def _logout(self, conn: Connection, reason: str) -> None:
        await self._do_logout(conn.app_id, conn.user_id, conn.client_type, conn.imei, conn.conn_id, reason)

    async def _do_logout(
        self,
        app_id: int,
        user_id: str,
        ct: int,
        imei: str,
        conn_id: str,
        reason: str,
        seen: float | None = None,
        seen_at_ms: int = 0,
    ) -> None:
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
                    app_id,
                    user_id,
                    ct,
                    imei,
                    conn_id=conn_id,
                    node_id=self.node_id,
                    op_id=op_id,
                    seen_age_ms=age_ms,
                    seen_at_ms=seen_at_ms,
                    reason=reason,
                )
            except UnavailableError:
                # Unknown outcome after redis_retry_for: the facade's resolver replays this very logout
                # (same op id) until Redis answers, so it is applied and pushed without waiting for reconcile().
                log.warning("logout of %s/%s: redis unavailable, left to the resolver", user_id, imei)
                return
            except Exception as exc:
                if attempt == LOGOUT_ATTEMPTS - 1 or self.closing:
                    # The session stays in this node's set: reconcile() (or a reaper) logs it out later.
                    log.error("logout of %s/%s failed (%r); left for reconciliation", user_id, imei, exc)
                    self._logouts_failed += 1
                    return
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            if result.changed:
                LOGOUTS.labels(reason).inc()
            return

    async def reconcile(self) -> int:
        """Log out sessions this node's set records but no local connection holds (a lost logout).

        A member counts as stale only when two rounds in a row find it so, which leaves room for a
        login in flight (recorded before its connection is marked logged in).
        """
        await self.reassert()
        live = {self._member(c) for c in self.connections if c.logged_in} | set(self._grace)
        stale = {m for m in await self.presence.nodes.session_members(self.node_id) if m not in live}
        confirmed, self._suspects = stale & self._suspects, stale
        for member in confirmed:
            await self._logout_member(member, "reconciled")
        return len(confirmed)

    async def _outbox_sweep(self) -> None:
        """Relay feed entries left in users' outboxes by a caller that died between the two steps."""
        cursors: dict[object, int] = {}
        while not self.closing:
            await asyncio.sleep(self.outbox_sweep_interval)
            try:
                if await self.presence.feed.relay_outboxes(cursors):
                    log.info("relayed change feed entries left in outboxes")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox sweep failed; retrying next round")

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

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # --- delivery ---

    def _mark(self, inbox: str) -> None:
        self._dirty.add(inbox)
        self._wake.set()

    async def _doorbells(self) -> None:
        """Read doorbells. A subscription on a node that hangs (frozen, blackholed) raises nothing: after
        ``PUBSUB_PING_AFTER`` s of silence it is PINGed, and without its PONG within ``PUBSUB_PONG_WITHIN``
        s it is given up and made again (on the slot's new primary after a failover)."""
        heard, pinged = time.monotonic(), None
        while not self.closing:
            try:
                msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=PUBSUB_PING_AFTER / 2)
                now = time.monotonic()
                if msg is not None:
                    heard, pinged = now, None
                elif pinged is not None and now - pinged > PUBSUB_PONG_WITHIN:
                    raise ConnectionError(f"no PONG on the doorbell subscription within {PUBSUB_PONG_WITHIN:g} s")
                elif pinged is None and now - heard > PUBSUB_PING_AFTER:
                    await asyncio.wait_for(self.pubsub.ping(), PUBSUB_PONG_WITHIN)
                    pinged = now
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("doorbell subscription failed (%r); resubscribing", exc)
                pause = 0.0
                while not self.closing:
                    try:
                        await self._resubscribe(pause)
                        break
                    except asyncio.CancelledError:
                        raise
                    except Exception as again:
                        log.warning("doorbell resubscription failed (%r); trying again", again)
                        pause = 0.5
                heard, pinged = time.monotonic(), None
                continue
            if msg is None or msg.get("type") != "message":
                continue
            DOORBELLS.inc()
            try:
                inboxes = doorbell_inboxes(msg["data"])
            except (msgspec.DecodeError, UnicodeDecodeError):
                log.warning("ignoring a malformed doorbell on %s; the sweep delivers", msg.get("channel"))
                continue
            for inbox in inboxes:
                if inbox in self.by_inbox:
                    self._dirty.add(inbox)
            if self._dirty:
                self._wake.set()

    async def _resubscribe(self, pause: float = 0.0) -> None:
        """A fresh subscription (on a cluster, on the channel's primary in a freshly read slot map), then
        read every local inbox: doorbells rung while we were away are lost, the entries are not."""
        await asyncio.sleep(pause)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pubsub.aclose(), 1.0)
        store = self.presence.store
        failed = self._pubsub_node
        await store.refresh(time.monotonic() + PUBSUB_PONG_WITHIN, avoid=failed)
        # A cluster PUBLISH reaches every node: subscribe on any primary but the one that failed.
        node = store.any_primary(avoid=failed)
        self.pubsub = self.presence.redis.pubsub() if node is None else self.presence.redis.pubsub(node=node)
        self._pubsub_node = node.name if node is not None else None
        await asyncio.wait_for(self.pubsub.subscribe(self.presence.doorbell_channel(self.node_id)), PUBSUB_PONG_WITHIN)
        self._mark_all()

    def _mark_all(self) -> None:
        self._dirty.update(self.by_inbox)
        if self._dirty:
            self._wake.set()

    async def _sweep(self) -> None:
        while not self.closing:
            await asyncio.sleep(self.sweep_interval)
            self._mark_all()

    async def _deliver(self) -> None:
        while not self.closing:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                batch: dict[str, str] = {}
                read_from: dict[str, EventId] = {}
                while self._dirty and len(batch) < READ_BATCH:
                    inbox = self._dirty.pop()
                    local = self.by_inbox.get(inbox)
                    if local:
                        read_from[inbox] = min(c.cursor for c in local.values())
                        batch[inbox] = format_event_id(read_from[inbox])
                if not batch:
                    break
                try:
                    replies = await self._read(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("reading inboxes failed; retrying")
                    self._dirty.update(batch)  # not lost: read again once Redis answers
                    await asyncio.sleep(0.5)
                    continue
                for inbox, entries in replies:
                    if self.dispatch(inbox, entries, read_from.get(inbox)) or len(entries) >= READ_COUNT:
                        self._dirty.add(inbox)
                        self._wake.set()

    async def _read(self, batch: dict[str, str]) -> list[tuple[str, list[tuple[bytes, list[bytes]]]]]:
        """``read_inboxes``, but an inbox Redis refuses to read (a bad cursor, a key of another type) does
        not block the others: a refused batch is split in halves until the culprit reads alone, and its
        connections are closed with a system error (they reconnect and resume or re-pull).
        Redis being unreachable is raised as is (the caller retries the whole batch)."""
        try:
            return await self.presence.read_inboxes(batch, count=READ_COUNT)
        except UnavailableError:
            raise
        except Exception as exc:
            if len(batch) > 1:
                items = list(batch.items())
                half = len(items) // 2
                return await self._read(dict(items[:half])) + await self._read(dict(items[half:]))
            ((inbox, cursor),) = batch.items()
            self._unreadable(inbox, cursor, exc)
            return []

    def _unreadable(self, inbox: str, cursor: str, exc: Exception) -> None:
        rid = secrets.token_hex(8)
        log.error("request %s: reading inbox %s from %s failed (%r); closing its connections", rid, inbox, cursor, exc)
        for conn in list(self.by_inbox.pop(inbox, {}).values()):
            self._spawn(conn.fail(Code.SYSTEM_ERROR, "system error", rid))

    def dispatch(self, inbox: str, entries: list[tuple[bytes, list[bytes]]], read_from: EventId | None = None) -> bool:
        """Write the entries (read after ``read_from``) to the inbox's local connections.

        A connection activated while the read was in flight may have a cursor before ``read_from``: the
        entries in between were not read, so it is left out (its cursor untouched) and True is returned
        to read the inbox again from its cursor. Moving its cursor here would skip those entries (a kick,
        a sync) for good.
        """
        local = self.by_inbox.get(inbox)
        if not local:
            return False
        behind = read_from is not None and any(c.cursor < read_from for c in local.values())
        conns = [c for c in local.values() if read_from is None or c.cursor >= read_from]
        if not conns:
            return behind
        sample = conns[0]
        # Frames per connection, written with one write each: a backlog costs one syscall, not one per entry.
        out: dict[Connection, list[bytes]] = {}
        kicked: list[Connection] = []
        for raw_id, flat in entries:
            event_id = parse_event_id(raw_id)
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            target = fields.get(b"t")
            skip = fields.get(b"x")
            command = int(fields[b"c"])
            message: Encoded | None = None
            for conn in conns:
                if conn.cursor >= event_id or conn.ended:
                    continue
                conn.cursor = event_id
                if target is not None and target.decode() != conn.conn_id:
                    continue
                if skip is not None and skip.decode() == conn.conn_id:
                    continue
                if message is None:
                    message = Encoded(command, fields[b"d"], sample.app_id, sample.user_id, raw_id.decode())
                frames = out.get(conn)
                if frames is None:
                    out[conn] = [conn.frame(message)]
                else:
                    frames.append(conn.frame(message))
                if command == Command.MUTUALLOGIN:
                    kicked.append(conn)
        delivered = 0
        for conn, frames in out.items():
            conn.write(frames[0] if len(frames) == 1 else b"".join(frames))
            delivered += len(frames)
        for conn in kicked:
            conn.close(4002, "logged in elsewhere")
            self._spawn(self.end(conn, "kicked"))
        DELIVERIES.inc(delivered)
        return behind

    # --- inbox memory ---

    def trim_candidates(self, now_ms: int) -> dict[str, str]:
        """Local inboxes whose local sessions all received an entry older than the resume window: the
        entries up to it can go (``presence_inbox_trim`` checks the age again on the Redis clock)."""
        horizon = now_ms - int(self.settings.resume_window * 1000)
        out: dict[str, str] = {}
        for inbox, local in self.by_inbox.items():
            cursor = min(c.cursor for c in local.values())
            if 0 < cursor[0] <= horizon and self._trimmed.get(inbox) != cursor:
                out[inbox] = format_event_id(cursor)
        return out

    async def trim_inboxes(self) -> int:
        """One round of ``_trim_inboxes``; returns the inboxes trimmed."""
        self._trimmed = {k: v for k, v in self._trimmed.items() if k in self.by_inbox}
        batch = self.trim_candidates(int(time.time() * 1000))
        if not batch:
            return 0
        await self.presence.trim_inboxes(batch, int(self.settings.resume_window * 1000))
        for inbox, cursor in batch.items():
            self._trimmed[inbox] = parse_event_id(cursor)
        return len(batch)

    async def _trim_inboxes(self) -> None:
        """Delivered entries stay resumable for ``resume_window``, then go; an emptied inbox is deleted.

        Without it an inbox kept its delivered entries until MAXLEN or its TTL (24 h): ~4.7 KB of
        Redis per online user who received anything (BENCHMARKS.md, memory).
        """
        interval = min(30.0, max(0.5, self.settings.resume_window / 4))
        while not self.closing:
            await asyncio.sleep(interval)
            try:
                await self.trim_inboxes()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # next round
                log.warning("trimming delivered inbox entries failed (%r); retrying next round", exc)

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
            idle = [c for c in self.connections if 0 < c.heartbeat_timeout < now - c.last_active]
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
                len(self.connections),
            )
            for conn in list(self.connections):
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
        conns = [c for c in self.connections if c.logged_in and not c.ended and c.conn_id in self._login_params]
        if not conns:
            return 0
        held = await self.presence.nodes.sessions_held(
            [(c.app_id, c.user_id, c.client_type, c.imei, c.conn_id) for c in conns]
        )
        lost = [c for c, h in zip(conns, held, strict=True) if h is False]
        for conn in lost:
            version, login_model, max_sessions = self._login_params[conn.conn_id]
            try:
                await self.presence.login(
                    conn.app_id,
                    conn.user_id,
                    conn.client_type,
                    conn.imei,
                    conn_id=conn.conn_id,
                    node_id=self.node_id,
                    node_host=self.node_host,
                    version=version,
                    login_model=login_model,
                    max_sessions=max_sessions,
                )
            except PresenceError as exc:
                if exc.http_status >= 500:
                    raise
                # Refused now (e.g. the user's other devices took every session meanwhile): end this one.
                conn.close(4001, "session lost")
                await self.end(conn, "error")
        if lost:
            log.warning("node %s: %d sessions Redis had lost were logged in again", self.node_id, len(lost))
        return len(lost)
