"""The change feed relay and the online counters: what the user's own functions write besides the state.

Both are the optional KEYS[6..7] of presence_login / presence_logout / presence_set_custom_status: the
user's feed **outbox** (a STREAM in the user's slot, so its entry is atomic with the change) and the
**online counters** HASH of the user's slot. Contract for consumers: gateway/FEED.md.

``FeedRelay`` moves a user's outbox entries to the app's feed shard (presence_feed_append, in another
slot): right after each change, in the change's fan-out pipeline (``Presence._spread``), and in the
gateways' periodic sweep of the outboxes (``relay_outboxes``) for an entry whose caller died between the
two steps. ``OnlineCounters`` names the counters keys and sums them (``online_counts``).
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from collections.abc import Sequence
from typing import Any

from presence import functions
from presence.config import Settings
from presence.functions import Arg, Call, FeedAppendReply, Functions, Pending
from presence.keys import FeedKeys, KeySchema, slot_tags, user_slot
from presence.metrics import FEED_ENTRIES
from presence.models import OnlineCount
from presence.store import Store

log = logging.getLogger("presence.feed")

OUTBOX_READ = 100  # unrelayed feed entries of one user taken per change
OUTBOX_MAXLEN = 1000  # a user's unrelayed feed entries kept at most (only a relay that keeps failing fills it)
OUTBOX_SWEEP_INTERVAL_S = 2.0  # one SCAN step (COUNT 500) per primary each time
FEED_CURSOR_TTL_MS = 7 * 86400 * 1000  # how long a relay remembers a user's last relayed entry

OutboxEntry = tuple[bytes, dict[bytes, bytes]]
"""One outbox entry as redis-py's XRANGE gives it: (id, {field: value})."""


class OnlineCounters:
    """The online counters: one HASH per cluster slot (one in all off a cluster), moved by the user's own
    functions in the same call as the session they count."""

    def __init__(self, fn: Functions, keys: KeySchema, cluster: bool) -> None:
        self.fn = fn
        self.keys = keys
        self.cluster = cluster

    def key(self, app_id: int, user_id: str) -> str:
        """The counters HASH in the user's slot (one per slot on a cluster, one in all elsewhere)."""
        return self.keys.counters(slot_tags()[user_slot(app_id, user_id)] if self.cluster else "0")

    def all_keys(self) -> list[str]:
        """Every online counters HASH there can be."""
        return [self.keys.counters(t) for t in slot_tags()] if self.cluster else [self.keys.counters("0")]

    async def online_counts(self) -> dict[int, OnlineCount]:
        """Users online and sessions by client type, per app, summed over every counters HASH (exact:
        each moves in the same function call as the session it counts). One pipeline per primary."""
        batch = self.fn.batch()
        reads = [batch.command(k, "HGETALL", k) for k in self.all_keys()]
        await batch.run()
        out: dict[int, OnlineCount] = {}
        for read in reads:
            for name, value in (read.result() or {}).items():
                app, _, rest = _text(name).partition(":")
                if not app.isdigit():
                    continue
                count = out.setdefault(int(app), OnlineCount())
                n = int(value)
                if rest == "u":
                    count.onlineUsers += n
                elif rest.startswith("s:"):
                    ct = rest[2:]
                    count.sessionsByClientType[ct] = count.sessionsByClientType.get(ct, 0) + n
                    count.onlineSessions += n
        return out


class Relay:
    """One relay of a user's pending outbox entries: the presence_feed_append call and the last outbox id
    it carries (what the outbox may be trimmed up to once it succeeded)."""

    __slots__ = ("app_id", "call", "last_id", "user_id")

    def __init__(self, app_id: int, user_id: str, call: Call[FeedAppendReply], last_id: str) -> None:
        self.app_id = app_id
        self.user_id = user_id
        self.call = call
        self.last_id = last_id


class FeedRelay:
    """Relays users' outbox entries to their app's feed shards (crc32(userId) mod ``feed_shards``)."""

    def __init__(self, fn: Functions, keys: KeySchema, settings: Settings, store: Store, counters: OnlineCounters):
        self.fn = fn
        self.keys = keys
        self.settings = settings
        self.store = store
        self.counters = counters

    def shard_of(self, app_id: int, user_id: str) -> int:
        """The feed shard of a user: zlib's CRC-32 of the UTF-8 userId mod ``feed_shards`` (FEED.md section 2)."""
        return binascii.crc32(user_id.encode()) % self.settings.feed_shards

    def shards(self, app_id: int) -> list[str]:
        """The app's feed streams, shard 0 first."""
        return [self.keys.feed_shard(app_id, k) for k in range(self.settings.feed_shards)]

    def feed_keys(self, app_id: int, user_id: str) -> FeedKeys:
        """KEYS[6..7] of the user's own functions: the user's outbox and the counters of the user's slot."""
        return FeedKeys(outbox=self.keys.user(app_id, user_id).outbox, counters=self.counters.key(app_id, user_id))

    def read_outbox(self, batch: functions.Batch, app_id: int, user_id: str) -> Pending[Any]:
        """Queue the read of the user's unrelayed entries (right after the user's function, same pipeline)."""
        outbox = self.keys.user(app_id, user_id).outbox
        return batch.command(outbox, "XRANGE", outbox, "-", "+", "COUNT", OUTBOX_READ)

    def relay(self, app_id: int, user_id: str, pending: Pending[Any]) -> Relay | None:
        """presence_feed_append of what ``read_outbox`` found (None: nothing, or the read failed)."""
        if pending.failed:
            return None
        entries: Sequence[OutboxEntry] = pending.result()
        if not entries:
            return None
        shard = self.shard_of(app_id, user_id)
        # One server: the trim of the outbox rides in the same call (a cluster has it in another slot).
        outbox = None if self.store.cluster else self.keys.user(app_id, user_id).outbox
        flat: list[tuple[str, list[Arg]]] = []
        last = ""
        for raw_id, fields in entries:
            last = _text(raw_id)
            items: list[Arg] = ["eventId", f"{app_id}:{user_id}:{last}"]
            for name, value in fields.items():
                items += [name, value]
            flat.append((last, items))
        call = functions.feed_append(
            self.keys.feed_shard(app_id, shard),
            self.keys.feed_cursor(app_id, shard, user_id),
            outbox,
            self.settings.feed_maxlen,
            FEED_CURSOR_TTL_MS,
            flat,
        )
        return Relay(app_id, user_id, call, last)

    def trim_after(self, relay: Relay, appended: Pending[FeedAppendReply]) -> Call[int] | None:
        """On a cluster the outbox is trimmed by a separate call (another slot than the feed shard), once
        the relay succeeded: presence_outbox_trim, or None (one server trimmed already; a failed relay
        trims nothing)."""
        if not self.store.cluster or appended.failed:
            return None
        return functions.outbox_trim(self.keys.user(relay.app_id, relay.user_id).outbox, relay.last_id)

    def relayed(self, relay: Relay, appended: Pending[FeedAppendReply], trimmed: Pending[int] | None) -> None:
        """After the feed append: count it; log a failed relay or trim (both converge on the next change)."""
        if appended.failed:  # left in the outbox: the user's next change relays it
            log.warning(
                "feed relay of %s/%s failed (%r); it goes with the next change",
                relay.app_id,
                relay.user_id,
                appended.error,
            )
            return
        FEED_ENTRIES.inc(appended.result().appended)
        if trimmed is not None and trimmed.failed:  # a later relay skips what was appended and trims again
            log.warning("feed outbox trim of %s/%s failed (%r)", relay.app_id, relay.user_id, trimmed.error)

    async def sweep_outboxes(self, interval: float = OUTBOX_SWEEP_INTERVAL_S) -> None:
        """Every ``interval`` s, relay feed entries left in users' outboxes by a caller that died between the
        change and its relay (one ``relay_outboxes`` step); runs until cancelled."""
        cursors: dict[Any, int] = {}
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.relay_outboxes(cursors):
                    log.info("relayed change feed entries left in outboxes")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox sweep failed; retrying next round")

    async def relay_outboxes(self, cursors: dict[Any, int], count: int = 500) -> int:
        """One SCAN step per primary over the users' feed outboxes; relays any that still hold entries.

        The normal path relays a change's entry right after it; this catches an entry whose caller died
        between the two steps and whose user changes no more. ``cursors`` (primary -> SCAN cursor) is
        kept by the caller between rounds; a full pass visits every key once. Returns entries relayed.
        """
        pattern = self.keys.outbox_pattern
        relayed = 0
        for node in self.store.primaries():
            try:
                reply = await self.store.on_node(
                    node, "SCAN", cursors.get(node, 0), "MATCH", pattern, "COUNT", count, "TYPE", "stream"
                )
                cursor, keys = reply
                if isinstance(cursor, dict):  # a cluster client names the node: ({node: cursor}, keys)
                    (cursor,) = cursor.values()
            except Exception as exc:  # next round
                log.debug("outbox scan failed: %r", exc)
                continue
            cursors[node] = int(cursor)
            for raw in keys:
                parsed = self.keys.outbox_user(_text(raw))
                if parsed is not None:
                    relayed += await self.relay_user(*parsed)
        return relayed

    async def relay_user(self, app_id: int, user_id: str) -> int:
        """Relay whatever waits in one user's outbox (idempotent: the cursor skips what was appended)."""
        read = self.fn.batch()
        pending = self.read_outbox(read, app_id, user_id)
        await read.run()
        pending.result()  # a failed read raises, as any command
        relay = self.relay(app_id, user_id, pending)
        if relay is None:
            return 0
        batch = self.fn.batch()
        appended = batch.add(relay.call)
        await batch.run()
        trimmed: Pending[int] | None = None
        trim = self.trim_after(relay, appended)
        if trim is not None:
            then = self.fn.batch()
            trimmed = then.add(trim)
            await then.run()
        self.relayed(relay, appended, trimmed)
        return 0 if appended.failed else appended.result().appended


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
