"""Gateway nodes in Redis: who is alive, which sessions each holds, and the reaper of silent nodes.

``NodeRegistry`` is the bookkeeping: heartbeats into ``presence:nodes`` (a ZSET: node id -> last beat ms,
Redis clock), the set of sessions each node holds (``presence:node:<id>:sessions``, members
``appId|userId|clientType|imei|connId``: ``node_member``), and reaping a node: logging out every
session it still holds. ``NodeKeeper`` runs a node's heartbeat and reaper loop on it.

The reaper is what makes a crashed gateway's users go offline: any node (or the REST app) logs out
every session still recorded for a node whose last heartbeat is older than ``node_ttl``.

Incarnations: every process draws a random incarnation id, and each of its beats records it beside the
beat (``{presence:nodes}:incarnations``, in the same library call). A node id is one process's at a time:
a starting process claims it (``NodeKeeper.claim``) and refuses to start (``NodeIdInUseError``) while
another process beats it; a last beat that stays unchanged until it is ``claim_window`` old is a dead
predecessor's, whose sessions the new incarnation logs out. A running node that finds another
incarnation's beat before its own logs an error: two processes were started with one node id.

Liveness lives in Redis, so a node that could not reach Redis cannot tell a dead peer from a dead
backplane: after a failover every peer's last beat is old. A node therefore judges peers only once its
own rounds have succeeded for a full ``node_ttl`` in a row (plus the socket timeout a peer's beat may have
hung on a frozen node); by then every live peer has beaten again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import msgspec

from presence import functions
from presence.errors import PresenceError
from presence.functions import Functions, Heartbeat
from presence.keys import KeySchema
from presence.metrics import REAPED_SESSIONS
from presence.models import ChangeResult

if TYPE_CHECKING:
    from presence.service import Presence

log = logging.getLogger("presence.nodes")

CLAIM_BEATS = 3  # a recent beat must stay unchanged this many heartbeat intervals to be a dead process's
ANOTHER_INCARNATION_LOG_EVERY_S = 30.0
# How long after another incarnation's beat was last seen this node still takes its id for shared: its set then
# holds the namesake's sessions too, so none of them is judged stale (a namesake stopped that long ago is gone).
SHARED_ID_HOLD_S = 60.0


class NodeIdInUseError(PresenceError):
    """Another live process beats this node id (two processes were started with one ``--node-id``)."""


class BeatRecord(NamedTuple):
    """A node's last heartbeat: when (ms, Redis clock) and by which incarnation ('' when none recorded)."""

    at_ms: int
    incarnation: str


class Predecessor(NamedTuple):
    """What a starting process found of its node id: the last beat of the dead process that held it (ms,
    Redis clock; None when the node was not registered) and how old that beat was at the first look, in s
    (before the claim waited: the wait does not count against the predecessor's sessions' grace)."""

    last_beat_ms: int | None
    age_s: float


class _Owner(msgspec.Struct):
    """The one field of a stored session (``models.Session``) that says which connection owns it."""

    connId: str = ""


_owner = msgspec.json.Decoder(_Owner)


class NodeMember(NamedTuple):
    """One session a node holds, as its member of ``presence:node:<id>:sessions`` spells it."""

    app_id: int
    user_id: str
    client_type: int
    imei: str
    conn_id: str


def node_member(app_id: int, user_id: str, client_type: int, imei: str, conn_id: str) -> str:
    """``appId|userId|clientType|imei|connId`` (no id may contain ``|``: presence/ids.py)."""
    return f"{app_id}|{user_id}|{client_type}|{imei}|{conn_id}"


def parse_node_member(member: str) -> NodeMember:
    head, _, conn_id = member.rpartition("|")
    app_id, user_id, client_type, imei = head.split("|", 3)
    return NodeMember(int(app_id), user_id, int(client_type), imei, conn_id)


class SessionEnder(Protocol):
    """``Presence.logout`` as the reaper calls it."""

    def __call__(
        self,
        app_id: int,
        user_id: str,
        client_type: int,
        imei: str,
        *,
        conn_id: str = "",
        node_id: str = "",
        seen_at_ms: int = 0,
        reason: str = "logout",
    ) -> Awaitable[ChangeResult]: ...


class NodeRegistry:
    """The gateway nodes' records in Redis (``presence:nodes`` and each node's session set)."""

    def __init__(self, fn: Functions, keys: KeySchema, logout: SessionEnder) -> None:
        self.fn = fn
        self.keys = keys
        self._logout = logout

    async def heartbeat(self, node_id: str) -> bool:
        """Beat without an incarnation; False when the node was not registered (first beat, or reaped meanwhile)."""
        beat = await self.fn.call(functions.node_heartbeat(self.keys.nodes, node_id))
        return beat.was_registered

    async def beat(self, node_id: str, incarnation: str, claim: int | None = None) -> Heartbeat:
        """Beat as process ``incarnation``; the reply names the beat this one replaced and its incarnation.
        ``claim``: beat only if the last beat is still this one (ms; 0: the node is not registered)."""
        keys = self.keys
        call = functions.node_heartbeat(keys.nodes, node_id, keys.node_incarnations, incarnation, claim)
        return await self.fn.call(call)

    async def last_record(self, node_id: str) -> tuple[BeatRecord | None, int]:
        """The node's last beat (None when it is not registered) and now (ms, Redis clock): one round trip."""
        nodes, incarnations = self.keys.nodes, self.keys.node_incarnations
        batch = self.fn.batch()
        score = batch.command(nodes, "ZSCORE", nodes, node_id)
        incarnation = batch.command(incarnations, "HGET", incarnations, node_id)
        clock = batch.command(nodes, "TIME")
        await batch.run()
        secs, micros = clock.result()
        now = int(secs) * 1000 + int(micros) // 1000
        at, by = score.result(), incarnation.result()
        if at is None:
            return None, now
        return BeatRecord(int(float(at)), by.decode() if isinstance(by, bytes) else (by or "")), now

    async def redis_time_ms(self) -> int:
        """Now on the clock the heartbeats use (the node holding ``presence:nodes``), in ms."""
        secs, micros = await self.fn.command(self.keys.nodes, "TIME")
        return int(secs) * 1000 + int(micros) // 1000

    async def last_beat(self, node_id: str) -> int | None:
        """The node's last heartbeat (ms, Redis clock), or None when it is not registered."""
        beat = await self.fn.command(self.keys.nodes, "ZSCORE", self.keys.nodes, node_id)
        return int(float(beat)) if beat is not None else None

    async def leave(self, node_id: str) -> None:
        """Forget the node (a clean stop: its sessions were logged out or handed over) and its incarnation."""
        nodes, incarnations = self.keys.nodes, self.keys.node_incarnations
        batch = self.fn.batch()
        removed = [
            batch.command(nodes, "ZREM", nodes, node_id),
            batch.command(incarnations, "HDEL", incarnations, node_id),
        ]
        await batch.run()
        for reply in removed:
            reply.result()  # raises its error

    async def expired(self, ttl_s: float) -> list[str]:
        """Nodes whose last heartbeat is older than ``ttl_s`` seconds."""
        return await self.fn.call(functions.nodes_expired(self.keys.nodes, int(ttl_s * 1000)))

    async def reap(self, node_id: str, batch: int = 200) -> int:
        """Log out every session a node still holds, then forget the node. Safe to run twice at once.

        lastSeen of its users is the node's last heartbeat: the last moment they were known connected.
        Returns the sessions logged out.
        """
        key = self.keys.node_sessions(node_id)
        seen_at = await self.last_beat(node_id) or 0
        reaped = 0
        while True:
            members = [m.decode() for m in await self.fn.command(key, "SRANDMEMBER", key, batch)]
            if not members:
                break
            for member in members:
                app_id, user_id, client_type, imei, conn_id = parse_node_member(member)
                result = await self._logout(
                    app_id,
                    user_id,
                    client_type,
                    imei,
                    conn_id=conn_id,
                    node_id=node_id,
                    seen_at_ms=seen_at,
                    reason="reaped",
                )
                reaped += int(result.changed)
        await self.leave(node_id)
        return reaped

    async def sessions_held(self, sessions: Sequence[tuple[int, str, int, str, str]]) -> list[bool | None]:
        """For each ``(appId, userId, clientType, imei, connId)``: True when Redis holds that session for that
        connection, None when the device's session is another connection's, False when there is none (a
        primary that restarted empty lost it). One HGET each, one pipeline per primary."""
        batch = self.fn.batch()
        reads = []
        for app_id, user_id, client_type, imei, _ in sessions:
            key = self.keys.user(app_id, user_id).sessions
            reads.append(batch.command(key, "HGET", key, f"{client_type}:{imei}"))
        await batch.run()
        held: list[bool | None] = []
        for (*_, conn_id), read in zip(sessions, reads, strict=True):
            raw = read.result()
            if raw is None:
                held.append(False)
            else:
                held.append(True if _owner.decode(raw).connId == conn_id else None)
        return held

    async def session_count(self, node_id: str) -> int:
        """How many sessions are recorded for a node."""
        key = self.keys.node_sessions(node_id)
        return int(await self.fn.command(key, "SCARD", key))

    async def session_members(self, node_id: str) -> set[str]:
        """``appId|userId|clientType|imei|connId`` of every session recorded for a node."""
        key = self.keys.node_sessions(node_id)
        return {m.decode() for m in await self.fn.command(key, "SMEMBERS", key)}


class NodeKeeper:
    """Beats for ``node_id`` (None: a reaper only) and reaps expired peers, every ``interval`` seconds.

    ``incarnation`` is this process's random id, recorded with each beat. ``claim`` makes the node id this
    process's before anything uses it; a beat that replaced another incarnation's is logged as an error.
    """

    def __init__(
        self,
        presence: Presence,
        node_id: str | None,
        node_ttl: float,
        on_reaped: Callable[[], Awaitable[None]] | None = None,
        interval: float = 1.0,
        stall: float = 0.0,
    ) -> None:
        self.presence = presence
        self.node_id = node_id
        self.node_ttl = node_ttl
        # A live peer's beat may hang up to the socket timeout on a node that froze before it failed over:
        # judging waits that much longer, so such a peer has beaten again too.
        self.stall = stall
        self.on_reaped = on_reaped
        self.interval = min(interval, max(node_ttl / 3, 0.05))
        # A live namesake beats every ``interval`` (1 s unless node_ttl is under 3 s): a beat unchanged for
        # CLAIM_BEATS of them, late beats included, is a dead process's. Never longer than node_ttl, after
        # which any peer would reap it.
        self.claim_window = min(node_ttl, CLAIM_BEATS * interval)
        self.incarnation = secrets.token_hex(8)
        self._predecessor: Predecessor | None = None  # set by claim()
        self._another_logged: float | None = None  # monotonic time another incarnation was last logged
        self._another_seen: float | None = None  # monotonic time another incarnation's beat was last seen
        self._beaten = False
        self._healthy_since: float | None = None  # monotonic start of the current run of good beats
        self._last_ok: float | None = None
        self._after_gap = False  # the current run of good beats follows a failure (not the start)
        self._failed = False  # a beat failed since the last good one
        self.stopped = False  # loops also check a flag: redis-py may swallow a cancel mid-command

    def id_shared(self) -> bool:
        """Whether another live process beat this node id within ``SHARED_ID_HOLD_S``: the node's session set
        then holds that process's sessions too, which no connection of ours holds."""
        return self._another_seen is not None and time.monotonic() - self._another_seen < SHARED_ID_HOLD_S

    def may_judge(self) -> bool:
        """Whether this node's own beats have succeeded for a full ``node_ttl`` (plus ``stall`` after a
        failure), the last one just now."""
        if self._healthy_since is None or self._last_ok is None:
            return False
        now = time.monotonic()
        need = self.node_ttl + (self.stall if self._after_gap else 0.0)
        return now - self._healthy_since >= need and now - self._last_ok <= self.node_ttl / 2

    async def claim(self) -> Predecessor:
        """Make ``node_id`` this incarnation's: its first beat, once no other live process beats the id.

        A beat older than ``claim_window`` is a dead process's; a more recent one is watched until it is
        that old (a restart right after a crash waits at most ``claim_window``): if it changes, another
        process is alive. The first beat is written only if it replaces exactly the beat watched (one
        library call), so of two processes starting at once one wins and the other writes nothing.
        Returns the predecessor (the dead process that beat last); a second call returns it again.

        Raises NodeIdInUseError while another process beats the id; nothing of the node was written then.
        """
        if self._predecessor is not None:
            return self._predecessor
        node_id = self.node_id
        if node_id is None:
            raise ValueError("a reaper-only keeper has no node id to claim")
        nodes = self.presence.nodes
        window_ms = int(self.claim_window * 1000)
        seen, now = await nodes.last_record(node_id)
        predecessor = (
            Predecessor(None, 0.0) if seen is None else Predecessor(seen.at_ms, max(now - seen.at_ms, 0) / 1000)
        )
        if seen is not None and now - seen.at_ms < window_ms:
            log.info(
                "node %s: its last heartbeat is %.1f s old; waiting until it is %.1f s old to tell a dead "
                "predecessor from a live process with this node id",
                node_id,
                predecessor.age_s,
                self.claim_window,
            )
        while seen is not None and now - seen.at_ms < window_ms:
            await asyncio.sleep(min(self.interval / 2, (window_ms - (now - seen.at_ms)) / 1000))
            again, now = await nodes.last_record(node_id)
            if again is None:  # it left, or a peer reaped it: the id is free
                seen = None
            elif again != seen:
                raise NodeIdInUseError(self._in_use(again, now))
        beat = await nodes.beat(node_id, self.incarnation, claim=0 if seen is None else seen.at_ms)
        if not beat.written and not beat.was_registered:  # gone since: a peer reaped the predecessor, or it left
            beat = await nodes.beat(node_id, self.incarnation, claim=0)
        if not beat.written:  # another process beat it since we looked (or started at the same moment)
            raise NodeIdInUseError(self._in_use(BeatRecord(beat.previous_ms, beat.previous_incarnation), beat.now_ms))
        self._beaten = True
        self._beat_ok()
        self._predecessor = predecessor
        if seen is not None:
            log.info(
                "node %s: new incarnation %s; the predecessor's last heartbeat was %.1f s before the start",
                node_id,
                self.incarnation,
                predecessor.age_s,
            )
        return predecessor

    def _in_use(self, beat: BeatRecord, now_ms: int) -> str:
        who = f" (incarnation {beat.incarnation})" if beat.incarnation else ""
        age = max(now_ms - beat.at_ms, 0) / 1000
        return (
            f"node id {self.node_id!r} is in use: another process{who} beat it {age:.1f} s ago, after this one "
            "started; give every process its own --node-id (PRESENCE_NODE_ID)"
        )

    async def beat(self) -> None:
        if self.node_id is not None:
            await self._beat(self.node_id)
        else:  # a reaper only: a round trip still proves Redis answers (no judging right after an outage)
            await self.presence.nodes.redis_time_ms()
        self._beat_ok()

    def _beat_ok(self) -> None:
        now = time.monotonic()
        # The first beat, or the first after a gap (a failure, or a beat that waited out a failover):
        # a new run of good beats starts.
        if self._last_ok is None or self._healthy_since is None or now - self._last_ok > self.node_ttl / 2:
            # A failed beat, or one that waited a full node_ttl (a frozen node): peers' beats may have hung
            # as long. Not a beat merely late under load.
            self._after_gap = self._failed or (self._last_ok is not None and now - self._last_ok >= self.node_ttl)
            self._failed = False
            self._healthy_since = now
        self._last_ok = now

    async def _beat(self, node_id: str) -> None:
        beat = await self.presence.nodes.beat(node_id, self.incarnation)
        if beat.previous_incarnation not in ("", self.incarnation):
            self._another_incarnation(beat)
        if self._beaten and not beat.was_registered and self.on_reaped is not None:
            await self.on_reaped()
        self._beaten = True

    def _another_incarnation(self, beat: Heartbeat) -> None:
        """Another process beat this node id since our last beat: two processes run with one node id."""
        now = time.monotonic()
        self._another_seen = now
        if self._another_logged is not None and now - self._another_logged < ANOTHER_INCARNATION_LOG_EVERY_S:
            return
        self._another_logged = now
        log.error(
            "node %s: another process (incarnation %s; this one is %s) beats this node id too, %.1f s ago: two "
            "processes run with one node id, so neither is seen die and each takes the other's sessions and "
            "doorbells for its own. Stop one and give every process its own --node-id (PRESENCE_NODE_ID)",
            self.node_id,
            beat.previous_incarnation,
            self.incarnation,
            max(beat.now_ms - beat.previous_ms, 0) / 1000,
        )

    async def reap(self) -> int:
        total = 0
        if not self.may_judge():
            return 0
        for node in await self.presence.nodes.expired(self.node_ttl):
            if node == self.node_id:
                continue
            count = await self.presence.nodes.reap(node)
            log.warning("reaped node %s: %d sessions logged out", node, count)
            REAPED_SESSIONS.inc(count)
            total += count
        return total

    async def _reap_logged(self) -> None:
        try:
            await self.reap()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reaper round failed; retrying")

    async def run(self) -> None:
        # Reaping a dead peer takes a logout per session, which may last seconds: it runs beside the beats,
        # so this node's own beats keep their period (peers, and a namesake that starts, judge it by them).
        reaping: asyncio.Task[None] | None = None
        try:
            while not self.stopped:
                await asyncio.sleep(self.interval)
                try:
                    await self.beat()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self._healthy_since = None
                    self._failed = True
                    log.exception("node heartbeat failed; retrying (peers are not judged until Redis is back)")
                    continue
                if reaping is None or reaping.done():
                    reaping = asyncio.create_task(self._reap_logged())
        finally:
            if reaping is not None and not reaping.done():
                reaping.cancel()
                await asyncio.wait({reaping}, timeout=2.0)  # redis-py may swallow a cancel mid-command
