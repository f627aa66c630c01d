"""Push delivery on one gateway node: doorbells in, inbox entries out to the local connections.

A doorbell (pub/sub on this node's channel) names inboxes with new entries; they are marked dirty and the
delivery loop reads the dirty ones in one call (``Inboxes.read``), each from its lowest local cursor, encodes
an entry once per wire format (``Encoded``) and writes it to every targeted local connection. A periodic
sweep marks every local inbox dirty, so a lost doorbell only delays a push. Entries every local session
received stay resumable for ``resume_window``, then the trim loop deletes them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar

from presence.config import Settings
from presence.errors import Code, UnavailableError
from presence.gateway.codec import Command
from presence.gateway.outbound import Encoded
from presence.gateway.session import SessionId
from presence.inbox import DoorbellSubscription, EventId, InboxEntry, Inboxes, InboxRead
from presence.metrics import PUSHES_WRITTEN

log = logging.getLogger("presence.gateway")

READ_COUNT = 100  # entries read per inbox per XREAD
READ_BATCH = 500  # inboxes per XREAD round
PUBSUB_PING_AFTER = 0.5  # seconds without a doorbell before the subscription is PINGed
PUBSUB_PONG_WITHIN = 1.0  # seconds for its PONG before it is made again
KICK_CODE = 4002  # WebSocket close after a MUTUALLOGIN (9002) push: logged in elsewhere

Spawn = Callable[[Coroutine[Any, Any, object]], None]


class PushTarget(Protocol):
    """What delivery needs of a client connection."""

    def frame(self, message: Encoded) -> bytes:
        """The message in the connection's wire format (shared parts encoded once per format)."""
        ...

    def write(self, data: bytes) -> None:
        """Write whole frames without waiting (the transport owns back-pressure)."""
        ...

    def close(self, code: int, reason: str) -> None: ...

    async def fail(self, code: int, message: str, request_id: str | None = None) -> None:
        """An ERROR (9100) as the connection's last word, then close and end it."""
        ...


C = TypeVar("C", bound=PushTarget)


class Recipient(Generic[C]):
    """One activated connection as delivery sees it: its session and how far its inbox was pushed."""

    __slots__ = ("conn", "conn_id", "cursor", "frame", "inbox", "session")

    def __init__(self, conn: C, session: SessionId, inbox: str, cursor: EventId) -> None:
        self.conn = conn
        self.frame = conn.frame
        self.session = session
        self.conn_id = session.conn_id
        self.inbox = inbox
        self.cursor = cursor  # the last entry pushed (or skipped: not for this connection)


class Delivery(Generic[C]):
    """The push path of one node: which local connections read which inbox, and the loops that feed them.

    ``spawn`` runs a coroutine in the background (the hub waits for them on stop); ``end_kicked`` ends a
    connection a MUTUALLOGIN was pushed to, once the push is written and its close begun.
    """

    def __init__(
        self,
        inboxes: Inboxes,
        node_id: str,
        settings: Settings,
        *,
        spawn: Spawn,
        end_kicked: Callable[[C], Coroutine[Any, Any, None]],
    ) -> None:
        self.inboxes = inboxes
        self.settings = settings
        self._spawn = spawn
        self._end_kicked = end_kicked
        self._doorbells: DoorbellSubscription = inboxes.doorbells(node_id)
        self._by_inbox: dict[str, dict[str, Recipient[C]]] = {}
        self._recipients: dict[C, Recipient[C]] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._trimmed: dict[str, EventId] = {}  # inbox -> the cursor it was last trimmed to
        self._tasks: list[asyncio.Task[None]] = []
        self.sweep_interval = 5.0
        self.closing = False

    # --- life cycle ---

    async def open(self) -> None:
        """Subscribe to this node's doorbells."""
        await self._doorbells.open()

    def start(self) -> None:
        """Start the loops: doorbells, delivery, sweep, trim."""
        for coro in (self._doorbell_loop(), self._deliver_loop(), self._sweep_loop(), self._trim_loop()):
            self._tasks.append(asyncio.create_task(coro))

    def begin_stop(self) -> None:
        """The loops end at their next turn."""
        self.closing = True

    async def stop(self) -> None:
        """End the loops (waiting at most 2 s: redis-py can swallow a cancel mid-command) and the subscription."""
        self.closing = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        self._tasks.clear()
        await self._doorbells.close(1.0)

    # --- recipients ---

    def attach(self, conn: C, session: SessionId, cursor: EventId) -> None:
        """Start pushing the session's inbox entries after ``cursor`` to ``conn``."""
        inbox = self.inboxes.key(session.app_id, session.user_id)
        recipient = Recipient(conn, session, inbox, cursor)
        self._recipients[conn] = recipient
        self._by_inbox.setdefault(inbox, {})[recipient.conn_id] = recipient
        self._mark(inbox)

    def detach(self, conn: C) -> EventId | None:
        """Push nothing more to ``conn``; returns its cursor (None when it was not attached)."""
        recipient = self._recipients.pop(conn, None)
        if recipient is None:
            return None
        local = self._by_inbox.get(recipient.inbox)
        if local is not None and local.get(recipient.conn_id) is recipient:
            del local[recipient.conn_id]
            if not local:
                del self._by_inbox[recipient.inbox]
        return recipient.cursor

    # --- doorbells and the dirty set ---

    def _mark(self, inbox: str) -> None:
        self._dirty.add(inbox)
        self._wake.set()

    def _mark_all(self) -> None:
        self._dirty.update(self._by_inbox)
        if self._dirty:
            self._wake.set()

    async def _doorbell_loop(self) -> None:
        """Read doorbells. A subscription on a node that hangs (frozen, blackholed) raises nothing: after
        ``PUBSUB_PING_AFTER`` s of silence it is PINGed, and without its PONG within ``PUBSUB_PONG_WITHIN``
        s it is given up and made again (on the slot's new primary after a failover)."""
        heard, pinged = time.monotonic(), None
        while not self.closing:
            try:
                inboxes = await self._doorbells.receive(PUBSUB_PING_AFTER / 2)
                now = time.monotonic()
                if inboxes is not None:
                    heard, pinged = now, None
                elif pinged is not None and now - pinged > PUBSUB_PONG_WITHIN:
                    raise ConnectionError(f"no PONG on the doorbell subscription within {PUBSUB_PONG_WITHIN:g} s")
                elif pinged is None and now - heard > PUBSUB_PING_AFTER:
                    await self._doorbells.ping(PUBSUB_PONG_WITHIN)
                    pinged = now
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("doorbell subscription failed (%r); resubscribing", exc)
                await self._resubscribe()
                heard, pinged = time.monotonic(), None
                continue
            if not inboxes:
                continue
            for inbox in inboxes:
                if inbox in self._by_inbox:
                    self._dirty.add(inbox)
            if self._dirty:
                self._wake.set()

    async def _resubscribe(self) -> None:
        """Subscribe again until it works, then read every local inbox: doorbells rung while the subscription
        was away are lost, the entries are not."""
        pause = 0.0
        while not self.closing:
            try:
                await asyncio.sleep(pause)
                await self._doorbells.reopen(PUBSUB_PONG_WITHIN)
            except asyncio.CancelledError:
                raise
            except Exception as again:
                log.warning("doorbell resubscription failed (%r); trying again", again)
                pause = 0.5
                continue
            self._mark_all()
            return

    async def _sweep_loop(self) -> None:
        while not self.closing:
            await asyncio.sleep(self.sweep_interval)
            self._mark_all()

    # --- reads ---

    async def _deliver_loop(self) -> None:
        while not self.closing:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty:
                batch: dict[str, EventId] = {}
                while self._dirty and len(batch) < READ_BATCH:
                    inbox = self._dirty.pop()
                    local = self._by_inbox.get(inbox)
                    if local:
                        batch[inbox] = min(r.cursor for r in local.values())
                if not batch:
                    break
                try:
                    reads = await self._read(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("reading inboxes failed; retrying")
                    self._dirty.update(batch)  # not lost: read again once Redis answers
                    await asyncio.sleep(0.5)
                    continue
                for inbox, entries in reads:
                    if self.dispatch(inbox, entries, batch.get(inbox)) or len(entries) >= READ_COUNT:
                        self._dirty.add(inbox)
                        self._wake.set()

    async def _read(self, batch: dict[str, EventId]) -> list[InboxRead]:
        """``Inboxes.read``, but an inbox Redis refuses to read (a bad cursor, a key of another type) or that
        holds an entry that is not the library's does not block the others: a refused batch is split in halves
        until the culprit reads alone, and its connections are closed with a system error (they reconnect and
        resume or re-pull). Redis being unreachable is raised as is (the caller retries the whole batch)."""
        try:
            return await self.inboxes.read(batch, count=READ_COUNT)
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

    def _unreadable(self, inbox: str, cursor: EventId, exc: Exception) -> None:
        rid = secrets.token_hex(8)
        log.error("request %s: reading inbox %s from %s failed (%r); closing its connections", rid, inbox, cursor, exc)
        for recipient in list(self._by_inbox.pop(inbox, {}).values()):
            self._recipients.pop(recipient.conn, None)
            self._spawn(recipient.conn.fail(Code.SYSTEM_ERROR, "system error", rid))

    # --- writes ---

    def dispatch(self, inbox: str, entries: list[InboxEntry], read_from: EventId | None = None) -> bool:
        """Write the entries (read after ``read_from``) to the inbox's local connections.

        A connection activated while the read was in flight may have a cursor before ``read_from``: the
        entries in between were not read, so it is left out (its cursor untouched) and True is returned
        to read the inbox again from its cursor. Moving its cursor here would skip those entries (a kick,
        a sync) for good.
        """
        local = self._by_inbox.get(inbox)
        if not local:
            return False
        behind = read_from is not None and any(r.cursor < read_from for r in local.values())
        recipients = [r for r in local.values() if read_from is None or r.cursor >= read_from]
        if not recipients:
            return behind
        owner = recipients[0].session  # every recipient is a session of the inbox's user
        # Frames per connection, written with one write each: a backlog costs one syscall, not one per entry.
        out: dict[Recipient[C], list[bytes]] = {}
        kicked: list[C] = []
        for entry in entries:
            event_id, target, exclude = entry.id, entry.target, entry.exclude
            message: Encoded | None = None
            for recipient in recipients:
                if recipient.cursor >= event_id:
                    continue
                recipient.cursor = event_id
                if target is not None and target != recipient.conn_id:
                    continue
                if exclude is not None and exclude == recipient.conn_id:
                    continue
                if message is None:
                    message = Encoded(entry.command, entry.data, owner.app_id, owner.user_id, entry.id_text)
                frames = out.get(recipient)
                if frames is None:
                    out[recipient] = [recipient.frame(message)]
                else:
                    frames.append(recipient.frame(message))
                if entry.command == Command.MUTUALLOGIN:
                    kicked.append(recipient.conn)
        written = 0
        for recipient, frames in out.items():
            recipient.conn.write(frames[0] if len(frames) == 1 else b"".join(frames))
            written += len(frames)
        for conn in kicked:
            conn.close(KICK_CODE, "logged in elsewhere")
            self._spawn(self._end_kicked(conn))
        PUSHES_WRITTEN.inc(written)
        return behind

    # --- inbox memory ---

    def trim_candidates(self, now_ms: int) -> dict[str, EventId]:
        """Local inboxes whose local sessions all received an entry older than the resume window: the
        entries up to it can go (``presence_inbox_trim`` checks the age again on the Redis clock)."""
        horizon = now_ms - int(self.settings.resume_window * 1000)
        out: dict[str, EventId] = {}
        for inbox, local in self._by_inbox.items():
            cursor = min(r.cursor for r in local.values())
            if 0 < cursor.ms <= horizon and self._trimmed.get(inbox) != cursor:
                out[inbox] = cursor
        return out

    async def trim_inboxes(self) -> int:
        """One round of the trim loop; returns the inboxes trimmed."""
        self._trimmed = {k: v for k, v in self._trimmed.items() if k in self._by_inbox}
        batch = self.trim_candidates(int(time.time() * 1000))
        if not batch:
            return 0
        await self.inboxes.trim(batch, int(self.settings.resume_window * 1000))
        self._trimmed.update(batch)
        return len(batch)

    async def _trim_loop(self) -> None:
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
