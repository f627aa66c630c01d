"""The gateway's side of the users' inboxes: reading, trimming and resuming them, and this node's doorbells.

An inbox is a Redis stream per user (``<prefix>:{appId:userId}:inbox``) that the library's functions append to
(lua/presence.lua writes every entry and every doorbell; this module only reads them):

- entry fields: ``c`` the pack's command, ``d`` its ``data`` JSON, and at most one of ``t`` (only the
  connection with this id gets it: a kick) or ``x`` (every connection but this one: the change's origin).
  ``InboxEntry`` is an entry parsed once, here; nothing else knows the field names.
- a doorbell: a PUBLISH on ``<prefix>:node:<nodeId>`` naming the inboxes that got entries, as a JSON array of
  keys. ``DoorbellSubscription`` is the one owner of the gateway's pub/sub connection.

Entry ids are the pushes' ``eventId`` (``EventId``), and what a reconnecting client resumes after.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import KeyT, StreamIdT

from presence.errors import ParamError
from presence.functions import Functions, Pending, inbox_trim, raise_mapped, unavailable
from presence.keys import KeySchema
from presence.metrics import DOORBELLS
from presence.store import RedisUnavailable, Store

log = logging.getLogger("presence.gateway")

# ASCII digits only (\d also takes other scripts' digits), the whole string (``$`` allows a trailing "\n").
_CLIENT_EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_UINT64_MAX = (1 << 64) - 1
_doorbell_decoder = msgspec.json.Decoder(list[str])
_new_tuple = tuple.__new__


class EventId(NamedTuple):
    """A Redis stream entry id ``ms-seq``: an inbox entry's id, the ``eventId`` of its push, a delivery cursor.

    Ordered as Redis orders entries (a tuple compares ``ms`` then ``seq``); ``str()`` gives ``ms-seq``.
    """

    ms: int
    seq: int

    @classmethod
    def parse(cls, value: str | bytes) -> EventId:
        """An id as Redis writes it (``ms-seq``; ``ms`` alone means ``ms-0``); ParamError for anything else."""
        # Read for every inbox entry pushed: no decode (int() takes ASCII bytes), no NamedTuple __new__ call.
        ms, _, seq = value.partition(b"-") if isinstance(value, bytes) else value.partition("-")
        try:
            return _new_tuple(cls, (int(ms), int(seq or 0)))
        except ValueError:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            raise ParamError(f"{text!r} is not a stream id like 1700000000000-0") from None

    @classmethod
    def from_client(cls, value: object) -> EventId | None:
        """A client's ``lastEventId``: exactly ``ms-seq`` in ASCII digits, both parts unsigned 64-bit
        (what Redis accepts as an XREAD cursor); None for anything else."""
        found = _CLIENT_EVENT_ID.fullmatch(value) if isinstance(value, str) else None
        if found is None:
            return None
        ms, seq = int(found[1]), int(found[2])
        return cls(ms, seq) if ms <= _UINT64_MAX and seq <= _UINT64_MAX else None

    def __str__(self) -> str:
        return "%d-%d" % self  # noqa: UP031  # the quickest form: formatted for every push (its ``eventId``)


NO_EVENT = EventId(0, 0)  # before every entry: the cursor of an inbox never written


class InboxEntry(msgspec.Struct, frozen=True, gc=False):
    """One inbox entry, parsed once: which pack to push, and to which of the user's connections."""

    id: EventId
    id_text: str  # the id as Redis wrote it: the push's ``eventId`` (kept, not formatted again per push)
    command: int
    data: bytes  # the pack's ``data`` JSON as the library wrote it (spliced into packs, never re-parsed)
    target: str | None = None  # ``t``: only the connection with this id gets it
    exclude: str | None = None  # ``x``: every connection but the one with this id gets it

    @classmethod
    def parse(cls, entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> InboxEntry:
        """An entry from its id and fields; KeyError/ValueError when ``c`` or ``d`` is missing or bad."""
        return _entry(entry_id, fields[b"c"], fields[b"d"], fields.get(b"t"), fields.get(b"x"))

    @classmethod
    def parse_flat(cls, entry_id: bytes | str, flat: list[bytes]) -> InboxEntry:
        """An entry from its id and its fields as XREAD sends them: ``[field, value, ...]``."""
        # Read for every entry pushed: the library's own layout (c, d, then t or x) without building a dict.
        size = len(flat)
        if (size == 4 or size == 6) and flat[0] == b"c" and flat[2] == b"d":
            if size == 4:
                return _entry(entry_id, flat[1], flat[3], None, None)
            if flat[4] == b"t":
                return _entry(entry_id, flat[1], flat[3], flat[5], None)
            if flat[4] == b"x":
                return _entry(entry_id, flat[1], flat[3], None, flat[5])
        return cls.parse(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))


def _entry(
    entry_id: bytes | str, command: bytes, data: bytes, target: bytes | None, exclude: bytes | None
) -> InboxEntry:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return InboxEntry(
        EventId.parse(text),
        text,
        int(command),
        data,
        None if target is None else target.decode(),
        None if exclude is None else exclude.decode(),
    )


InboxRead = tuple[str, list[InboxEntry]]  # an inbox key and its entries after the cursor, oldest first


def parse_doorbell(message: bytes) -> list[str]:
    """The inbox keys a doorbell names: a JSON array (so no byte of a key can split it).

    Raises msgspec.DecodeError or UnicodeDecodeError for a malformed one.
    """
    if message[:1] != b"[":  # a library older than the JSON framing: one key per line
        return message.decode().split("\n")
    return _doorbell_decoder.decode(message)


class Inboxes:
    """The inboxes and doorbell channels of one key schema, read through one store (standalone or cluster)."""

    def __init__(self, store: Store, keys: KeySchema) -> None:
        self.store = store
        self.keys = keys
        self.fn = Functions(store)
        self._raw_reader: Redis | None = None
        client = store.client
        if isinstance(client, Redis):
            # Shares the pool but skips redis-py's reply parsing: every push is read through here, and turning
            # each entry into a dict cost more than the read.
            self._raw_reader = Redis(connection_pool=client.connection_pool)
            self._raw_reader.set_response_callback("XREAD", lambda response, **_: response)

    def key(self, app_id: int, user_id: str) -> str:
        """The user's inbox key."""
        return self.keys.user(app_id, user_id).inbox

    def doorbell_channel(self, node_id: str) -> str:
        return self.keys.doorbell(node_id)

    def doorbells(self, node_id: str) -> DoorbellSubscription:
        """This node's doorbell subscription (not yet open)."""
        return DoorbellSubscription(self.store, self.doorbell_channel(node_id))

    async def read(self, cursors: Mapping[str, EventId], count: int = 100) -> list[InboxRead]:
        """Up to ``count`` entries after each inbox's cursor: one XREAD for all inboxes on one server; on a cluster
        one XREAD per slot (XREAD may name one slot only), pipelined per primary, primaries in parallel.

        Raises UnavailableError when Redis stays away for the retry window; PresenceError quoting Redis for a
        refused read (a key of another type); KeyError/ValueError for an entry that is not the library's.
        Errors are mapped by ``presence/functions.py``: on one server the XREAD skips ``Batch`` (and
        redis-py's reply parsing) for speed, so no latency is observed for it.
        """
        if not cursors:
            return []
        reader = self._raw_reader
        if reader is not None:
            streams: dict[KeyT, StreamIdT] = {inbox: str(cursor) for inbox, cursor in cursors.items()}
            try:
                reply = await self.store.retrying(lambda: reader.xread(streams, count=count))
            except RedisUnavailable as exc:
                raise unavailable(exc) from exc
            except ResponseError as exc:
                raise_mapped(exc)
            return _parse_raw_xread(reply)
        keys = list(cursors)
        batch = self.fn.batch()
        reads: list[Pending[Any]] = []
        for group in self.store.group(keys):
            names = [keys[i] for i in group]
            reads.append(
                batch.command(names[0], "XREAD", "COUNT", count, "STREAMS", *names, *(str(cursors[k]) for k in names))
            )
        await batch.run()
        out: list[InboxRead] = []
        for read in reads:
            answer = read.result()
            items = answer.items() if isinstance(answer, dict) else answer or []
            for key, entries in items:
                name = key.decode() if isinstance(key, bytes) else key
                out.append((name, [InboxEntry.parse(entry_id, fields) for entry_id, fields in entries]))
        return out

    async def trim(self, cursors: Mapping[str, EventId], window_ms: int, batch: int = 500) -> None:
        """Delete each inbox's entries up to its cursor that are older than ``window_ms`` (``presence_inbox_trim``
        checks the age on the Redis clock), one pipeline per primary per ``batch`` inboxes; an inbox left empty
        goes. A refused call is skipped (the next round tries again); UnavailableError when Redis is away."""
        items = list(cursors.items())
        for start in range(0, len(items), batch):
            calls = self.fn.batch()
            trims = [
                calls.add(inbox_trim(inbox, window_ms, str(cursor))) for inbox, cursor in items[start : start + batch]
            ]
            await calls.run()
            for trim in trims:
                if not trim.failed:
                    trim.result()  # entries left: unused, but a reply of another shape is a ReplyError

    async def can_resume(self, app_id: int, user_id: str, after: EventId) -> bool:
        """Whether the user's inbox still holds every entry after ``after`` (else the client must re-pull).

        For an inbox whose entries went only through the library (or XDEL): exact, and never True when an
        entry after ``after`` is gone. Ask only for a device whose session survived (a reconnect within the
        grace); entries are never written for a user that was offline, so a lost session always means re-pull.

        The library removes the oldest entries first and ends every removal (``inbox_maxlen``, the gateway's
        trim) with an XDEL of the newest one, which XINFO STREAM reports as ``max-deleted-entry-id``: Redis
        records XDEL there but not XTRIM or XADD MAXLEN (7.0 on; redis/redis#13473 keeps it so), and the
        count ``entries-added - length`` alone cannot say which entries went. So:

        - nothing removed (``entries-added == length``): True;
        - removals recorded (``max-deleted-entry-id`` above 0-0): True when that id is at or before ``after``
          (every removed entry is older than the newest removed one);
        - removals without a record (a library before 4.1.0, or an XTRIM by hand): True only when the first
          entry left is at or before ``after`` (everything removed is older than it);
        - an ``after`` beyond the last id the inbox generated: False (never sent);
        - no inbox: False. It was never written, or was trimmed empty (then deleted) or expired, and the
          missing key cannot tell which, so entries after ``after`` may have existed.

        Raises UnavailableError when Redis stays away for the retry window.
        """
        inbox = self.key(app_id, user_id)
        batch = self.fn.batch()
        stream = batch.command(inbox, "XINFO STREAM", inbox)
        await batch.run()
        if stream.refused:  # no such key (or not a stream): nothing to show it
            return False
        info = stream.result()
        if EventId.parse(info["last-generated-id"]) < after:
            return False
        if int(info["entries-added"]) == int(info["length"]):
            return True
        deleted = EventId.parse(info.get("max-deleted-entry-id") or "0-0")
        if deleted != NO_EVENT:
            return deleted <= after
        first = info.get("first-entry")
        return first is not None and EventId.parse(first[0]) <= after


def _parse_raw_xread(reply: Any) -> list[InboxRead]:
    """A raw XREAD reply (a map on RESP3, pairs on RESP2; each entry's fields a flat list) as typed entries."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    return [(key.decode(), [InboxEntry.parse_flat(i, flat) for i, flat in entries]) for key, entries in items]


class DoorbellSubscription:
    """This node's doorbell channel, subscribed on one connection: the gateway's only use of pub/sub.

    On a cluster a PUBLISH reaches every node, so the subscription may live on any primary; ``reopen``
    moves it off the node that failed.
    """

    def __init__(self, store: Store, channel: str) -> None:
        self.store = store
        self.channel = channel
        # redis-py's PubSub (ClusterPubSub on a cluster), partly untyped.
        self._pubsub: Any = None
        self._node: str | None = None  # the cluster node it is subscribed on (None off a cluster)

    async def open(self) -> None:
        pubsub: Any = self.store.client.pubsub()
        self._pubsub = pubsub
        await pubsub.subscribe(self.channel)
        node = getattr(pubsub, "get_pubsub_node", lambda: None)()
        self._node = node.name if node is not None else None

    async def receive(self, timeout: float) -> list[str] | None:
        """What was heard within ``timeout`` s: None for silence, the inbox keys a doorbell names, or ``[]`` for
        anything else (a PONG, a malformed doorbell: logged; the sweep delivers what it named).
        Raises what the connection raises when it fails."""
        msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        if msg is None:
            return None
        if msg.get("type") != "message":
            return []
        DOORBELLS.inc()
        try:
            return parse_doorbell(msg["data"])
        except (msgspec.DecodeError, UnicodeDecodeError):
            log.warning("ignoring a malformed doorbell on %s; the sweep delivers", msg.get("channel"))
            return []

    async def ping(self, timeout: float) -> None:
        """Send a PING (its PONG comes through ``receive``); raises TimeoutError if it cannot be sent in time."""
        await asyncio.wait_for(self._pubsub.ping(), timeout)

    async def reopen(self, timeout: float) -> None:
        """A fresh subscription: on a cluster, on a primary other than the one that failed, in a freshly read
        slot map. Doorbells rung meanwhile are lost (the caller reads every inbox again)."""
        await self.close(1.0)
        failed = self._node
        await self.store.refresh(time.monotonic() + timeout, avoid=failed)
        node = self.store.any_primary(avoid=failed)
        client: Any = self.store.client
        pubsub: Any = client.pubsub() if node is None else client.pubsub(node=node)
        self._pubsub = pubsub
        self._node = node.name if node is not None else None
        await asyncio.wait_for(pubsub.subscribe(self.channel), timeout)

    async def close(self, timeout: float) -> None:
        """Close the connection, waiting at most ``timeout`` s (then abandoning it); never raises."""
        if self._pubsub is None:
            return
        task = asyncio.ensure_future(self._pubsub.aclose())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its error is no one's
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
