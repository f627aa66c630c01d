"""Calls of the presence Redis Functions library (lua/presence.lua): one builder per function, one runner.

A builder (``login``, ``fanout``, ... one per ``redis.register_function``) makes the function's KEYS and
ARGV together, in the layout the function's header in lua/presence.lua documents, and returns a ``Call``:
the FCALL and the parser that checks the reply's shape and turns it into a typed value (a msgspec Struct
or a plain value). Keys come in built (``presence/keys.py`` spells them); builders do no I/O.

``Functions`` runs calls: ``call`` for one call on its own, ``batch`` to queue calls and plain Redis
commands into one ``Store.run`` (one pipeline per primary, the primaries in parallel) or, on one server,
one MULTI/EXEC, ``call_on`` for a keyless call on one given server (the health check asks every
primary). Only here are latencies observed (``presence_redis_call_seconds{function}``) and Redis
errors mapped to ours: ``PRESENCE_PARAM`` -> ParamError (90001), ``PRESENCE_LIMIT`` -> LimitError
(90005), any other error -> PresenceError (its message quotes Redis: transports log it, clients see
"system error"), Redis away for the whole retry window -> UnavailableError (503). A reply of another
shape than the builder's (another library version on the server) is a ReplyError.

Loading the library on the servers is ``presence/library.py``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import msgspec
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ResponseError

from presence.errors import LimitError, ParamError, PresenceError, ReplyError, UnavailableError
from presence.keys import FeedKeys, UserKeys
from presence.limits import MAX_SESSIONS, LibraryLimits
from presence.metrics import REDIS_LATENCY
from presence.models import Subscription, SubscriptionList, UserOnlineStatus
from presence.store import Command, RedisUnavailable, Store, is_function_missing

Arg = str | bytes | int
"""One ARGV item as redis-py sends it."""
R = TypeVar("R")

OFFLINE_INBOX_TTL_MS = 60_000
"""How long an inbox outlives the user's last session (undelivered kicks drain): presence_logout's ARGV[13]."""

_query_decoder = msgspec.json.Decoder(dict[str, UserOnlineStatus])
_json = msgspec.json.Encoder().encode


# --- calls and their replies ---


def fcall(name: str, keys: Sequence[str], args: Sequence[Arg], *, read_only: bool = False) -> list[Arg]:
    """The FCALL (or FCALL_RO) command of one function call, as ``Store.run`` sends it."""
    return ["FCALL_RO" if read_only else "FCALL", name, len(keys), *keys, *args]


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """One call of a library function: ``name`` with ``keys`` (all of one slot) and ``args``; ``parse``
    turns its reply into R (a ReplyError when the reply has another shape)."""

    name: str
    keys: Sequence[str]
    args: Sequence[Arg]
    parse: Callable[[object], R]
    read_only: bool = False

    def command(self) -> Command:
        """(routing key: the first key, or None for a keyless call; the FCALL) for ``Store.run``."""
        return (self.keys[0] if self.keys else None, fcall(self.name, self.keys, self.args, read_only=self.read_only))


class StatusChange(msgspec.Struct, frozen=True, kw_only=True):
    """The reply of the user's own functions (presence_login, presence_logout, presence_set_custom_status).

    ``data`` is the pack (4004 data from login/logout, 4006 from custom status; b"" when a logout changed
    nothing); ``version`` the user's version it carries (0 without a pack); ``online`` whether the user has
    a live session after the call; ``inbox_last_id`` the newest entry of the user's inbox before the login's
    own entries, "0-0" with no inbox (a login's only: where its session starts; "" from the others);
    ``kicked`` sessions a login kicked; ``recipients`` the friends and live subscribers to fan ``data`` out
    to (none when nothing changed).
    """

    changed: bool
    data: bytes
    version: int
    online: bool
    inbox_last_id: str
    kicked: int
    recipients: list[str]


class FanoutReply(msgspec.Struct, frozen=True, kw_only=True):
    """presence_fanout: entries written, doorbells it published, and (when told not to ring) the doorbells
    still to ring: node id -> the inbox keys that got entries."""

    written: int
    doorbells: int
    unrung: dict[str, list[str]]


class SubscribeReply(msgspec.Struct, frozen=True, kw_only=True):
    """presence_subscribe: the expiry it set (ms, Redis clock) and the subscriber's live subscriptions."""

    expire_at: int
    live: int


class FeedAppendReply(msgspec.Struct, frozen=True, kw_only=True):
    """presence_feed_append: entries appended to the shard and the user's relay cursor after the call."""

    appended: int
    cursor: str


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """presence_node_heartbeat: whether the node was registered before this beat, now (ms, Redis clock), the
    beat there before: its time (ms, 0 when not registered) and incarnation ('' when none), and whether this
    beat was written (False only for a claim that found another beat than the one it named)."""

    was_registered: bool
    now_ms: int
    previous_ms: int = 0
    previous_incarnation: str = ""
    written: bool = True


class WriteOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What the writing functions take first: ARGV[1..3] (inbox MAXLEN, inbox TTL ms, doorbell channel
    prefix) in presence_login, presence_logout, presence_set_custom_status and presence_fanout; ARGV[4..5]
    (outbox MAXLEN, outbox TTL ms) in the user's own three."""

    inbox_maxlen: int
    inbox_ttl_ms: int
    doorbell_prefix: str
    outbox_maxlen: int
    outbox_ttl_ms: int

    def inbox_argv(self, *, ring: bool = True) -> list[Arg]:
        """ARGV[1..3]; ``ring=False`` gives an empty prefix: the function publishes nothing."""
        return [self.inbox_maxlen, self.inbox_ttl_ms, self.doorbell_prefix if ring else ""]

    def change_argv(self, app_id: int, user_id: str, op_id: str) -> list[Arg]:
        """ARGV[1..8] of the user's own functions."""
        return [*self.inbox_argv(), self.outbox_maxlen, self.outbox_ttl_ms, app_id, user_id, op_id]


# --- reply shapes ---


def _list(name: str, reply: object, least: int = 0) -> list[Any]:
    if not isinstance(reply, list) or len(reply) < least:
        raise ReplyError(f"{name} replied {reply!r:.200}, expected a list of at least {least} items")
    return reply


def _int(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ReplyError(f"{name} replied {value!r:.200} where an integer belongs")


def _bytes(name: str, value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    raise ReplyError(f"{name} replied {value!r:.200} where a string belongs")


def _str(name: str, value: object) -> str:
    return value if isinstance(value, str) else _bytes(name, value).decode()  # str: a decoding client


def _strs(name: str, values: Sequence[object]) -> list[str]:
    try:
        return [v.decode() for v in values]  # type: ignore[attr-defined]
    except AttributeError:
        raise ReplyError(f"{name} replied {values!r:.200} where strings belong") from None


def _status_change(name: str) -> Callable[[object], StatusChange]:
    def parse(reply: object) -> StatusChange:
        items = _list(name, reply, 6)
        return StatusChange(
            changed=_int(name, items[0]) == 1,
            data=_bytes(name, items[1]),
            version=_int(name, items[2]),
            online=_int(name, items[3]) == 1,
            inbox_last_id=_str(name, items[4]),
            kicked=_int(name, items[5]),
            recipients=_strs(name, items[6:]),
        )

    return parse


def _integer(name: str) -> Callable[[object], int]:
    return lambda reply: _int(name, reply)


_login_reply = _status_change("presence_login")
_logout_reply = _status_change("presence_logout")
_custom_status_reply = _status_change("presence_set_custom_status")


# --- the builders: one per library function, in the library's order ---


def login(
    keys: UserKeys,
    feed: FeedKeys | None,
    options: WriteOptions,
    *,
    app_id: int,
    user_id: str,
    conn_id: str,
    client_type: int,
    imei: str,
    broker_id: str = "",
    broker_host: str = "",
    client_version: int = 0,
    login_model: int = 3,
    max_sessions: int = MAX_SESSIONS,
) -> Call[StatusChange]:
    """presence_login: a session of (``client_type``, ``imei``) on connection ``conn_id`` (also the login's
    operation id: a repeat is a replay) held by gateway ``broker_id``. With ``feed`` it also writes the
    change feed entries and moves the online counters."""
    state = keys.state() if feed is None else [*keys.state(), feed.outbox, feed.counters]
    args = [
        *options.change_argv(app_id, user_id, conn_id),
        client_type,
        imei,
        broker_id,
        broker_host,
        client_version,
        login_model,
        max_sessions,
    ]
    return Call("presence_login", state, args, _login_reply)


def logout(
    keys: UserKeys,
    feed: FeedKeys | None,
    options: WriteOptions,
    *,
    app_id: int,
    user_id: str,
    client_type: int,
    imei: str,
    conn_id: str = "",
    op_id: str = "",
    reason: str = "logout",
    offline_inbox_ttl_ms: int = OFFLINE_INBOX_TTL_MS,
    seen_age_ms: int = 0,
    seen_at_ms: int = 0,
) -> Call[StatusChange]:
    """presence_logout of (``client_type``, ``imei``); with ``conn_id`` only while that connection owns it.

    ``op_id`` makes a repeat after a lost reply a replay; lastSeen is ``seen_at_ms`` (Redis clock) if
    given, else now minus ``seen_age_ms``; ``reason`` goes into the feed entry (with ``feed``)."""
    state = keys.state() if feed is None else [*keys.state(), feed.outbox, feed.counters]
    args = [
        *options.change_argv(app_id, user_id, op_id),
        client_type,
        imei,
        conn_id,
        reason,
        offline_inbox_ttl_ms,
        max(int(seen_age_ms), 0),
        max(int(seen_at_ms), 0),
    ]
    return Call("presence_logout", state, args, _logout_reply)


def set_custom_status(
    keys: UserKeys,
    feed: FeedKeys | None,
    options: WriteOptions,
    *,
    app_id: int,
    user_id: str,
    custom_status: int,
    custom_text: str,
    origin_conn_id: str = "",
    op_id: str = "",
) -> Call[StatusChange]:
    """presence_set_custom_status; the 4007 sync skips ``origin_conn_id``. With ``feed`` (its outbox only)
    it also writes the change feed entry."""
    state = keys.state() if feed is None else [*keys.state(), feed.outbox]
    args = [*options.change_argv(app_id, user_id, op_id), custom_status, custom_text, origin_conn_id]
    return Call("presence_set_custom_status", state, args, _custom_status_reply)


def _fanout_reply(reply: object) -> FanoutReply:
    items = _list("presence_fanout", reply, 2)
    unrung: dict[str, list[str]] = {}
    for j in range(2, len(items) - 1, 2):
        inboxes = _list("presence_fanout", items[j + 1])
        unrung.setdefault(_str("presence_fanout", items[j]), []).extend(_strs("presence_fanout", inboxes))
    return FanoutReply(
        written=_int("presence_fanout", items[0]), doorbells=_int("presence_fanout", items[1]), unrung=unrung
    )


def fanout(
    recipients: Sequence[Sequence[str]],
    options: WriteOptions,
    command: int,
    data: bytes,
    *,
    user_id: str = "",
    version: int = 0,
    ring: bool = True,
) -> Call[FanoutReply]:
    """presence_fanout of ``data`` as ``command`` to recipients of one slot, each given by its keys
    (``KeySchema.recipient``: sessions, inbox, pushed) for ``user_id``'s change at ``version``: a
    recipient already holding that version or a newer one is skipped. Without ``user_id``: (sessions,
    inbox) pairs (``KeySchema.recipient_unordered``) and no ordering (events that are not a user's state).

    ``ring=False`` (a cluster, or one change in several calls): no PUBLISH; the reply names the doorbells.
    """
    keys = [k for group in recipients for k in group]
    args: list[Arg] = [*options.inbox_argv(ring=ring), command, data]
    if user_id:
        args += [user_id, version]
    return Call("presence_fanout", keys, args, _fanout_reply)


def subscribe(
    subscriptions_key: str, subscriber: str, targets: Sequence[str], sub_time_ms: int, most_live: int
) -> Call[SubscribeReply]:
    """presence_subscribe: the subscriber's side (it prunes and enforces ``most_live``); the targets' sides
    (``subscribers_add`` with the reply's expiry) follow per slot."""

    def parse(reply: object) -> SubscribeReply:
        items = _list("presence_subscribe", reply, 2)
        return SubscribeReply(expire_at=_int("presence_subscribe", items[0]), live=_int("presence_subscribe", items[1]))

    return Call("presence_subscribe", [subscriptions_key], [subscriber, sub_time_ms, most_live, *targets], parse)


def subscribers_add(subscribers_keys: Sequence[str], subscriber: str, expire_at: int) -> Call[int]:
    """presence_subscribers_add: the targets' side of a subscribe, for subscribers ZSETs of one slot; the
    number of sets ``subscriber`` was new in."""
    name = "presence_subscribers_add"
    return Call(name, subscribers_keys, [subscriber, expire_at], _integer(name))


def unsubscribe(subscriptions_key: str, subscriber: str, targets: Sequence[str]) -> Call[int]:
    """presence_unsubscribe: the subscriber's side; subscriptions removed. The targets' sides follow."""
    name = "presence_unsubscribe"
    return Call(name, [subscriptions_key], [subscriber, *targets], _integer(name))


def subscriptions(subscriptions_key: str, most: int) -> Call[SubscriptionList]:
    """presence_subscriptions: at most ``most`` live subscriptions, the soonest to expire first, and the
    Redis clock."""

    def parse(reply: object) -> SubscriptionList:
        name = "presence_subscriptions"
        items = _list(name, reply, 1)
        subs = [
            Subscription(userId=_str(name, items[i]), expireAt=_int(name, items[i + 1]))
            for i in range(1, len(items) - 1, 2)
        ]
        return SubscriptionList(subscriptions=subs, serverTime=_int(name, items[0]))

    return Call("presence_subscriptions", [subscriptions_key], [most], parse, read_only=True)


def subscribers_remove(subscribers_keys: Sequence[str], subscriber: str) -> Call[int]:
    """presence_subscribers_remove: the targets' side of an unsubscribe, for subscribers ZSETs of one slot."""
    name = "presence_subscribers_remove"
    return Call(name, subscribers_keys, [subscriber], _integer(name))


def friends_add(sets: Sequence[str], pairs: Sequence[tuple[str, str]]) -> Call[int]:
    """presence_friends_add: ``sets[i]`` is the friends SET of ``pairs[i][0]`` and gains ``pairs[i][1]``
    (all of one slot; a set may repeat: one user's side with many friends); friends added."""
    name = "presence_friends_add"
    return Call(name, sets, [u for pair in pairs for u in pair], _integer(name))


def friends_remove(sets: Sequence[str], pairs: Sequence[tuple[str, str]]) -> Call[int]:
    """presence_friends_remove: as ``friends_add``; friends removed."""
    name = "presence_friends_remove"
    return Call(name, sets, [u for pair in pairs for u in pair], _integer(name))


def query(pairs: Sequence[tuple[str, str]], user_ids: Sequence[str]) -> Call[dict[str, UserOnlineStatus]]:
    """presence_query (the JSON the library builds, for other services) for users of one slot, each given
    by its (sessions, status) keys (``KeySchema.presence_keys``)."""

    def parse(reply: object) -> dict[str, UserOnlineStatus]:
        try:
            return _query_decoder.decode(_bytes("presence_query", reply))
        except msgspec.ValidationError as exc:
            raise ReplyError(f"presence_query replied a document of another shape: {exc}") from None

    keys = [k for pair in pairs for k in pair]
    return Call("presence_query", keys, list(user_ids), parse, read_only=True)


def query_raw(pairs: Sequence[tuple[str, str]], user_ids: Sequence[str]) -> Call[dict[str, UserOnlineStatus]]:
    """presence_query_raw for users of one slot (``pairs``: their (sessions, status) keys, in
    ``user_ids`` order): what the service reads. Its reply (5 items per user) is spliced into one JSON
    document (the session records are stored as JSON) and decoded by one msgspec Decoder: no per-field
    Python objects in between."""

    def parse(reply: object) -> dict[str, UserOnlineStatus]:
        items = _list("presence_query_raw", reply)
        if len(items) != 5 * len(user_ids):
            raise ReplyError(f"presence_query_raw answered {len(items)} items for {len(user_ids)} users")
        parts: list[bytes] = []
        for i, user in enumerate(user_ids):
            values, custom, text, seen, version = items[5 * i : 5 * i + 5]
            parts += [
                _json(user),
                b':{"session":[',
                b",".join(values),
                b'],"customStatus":',
                custom or b"null",
                b',"customText":',
                b"null" if text is None else _json(text.decode(errors="replace")),
                b',"status":1,' if values else b',"status":2,',
                b'"lastSeen":',
                seen or b"null",
                b',"version":',
                version or b"0",
                b"},",
            ]
        if parts:
            parts[-1] = b"}"
        try:
            return _query_decoder.decode(b"{" + b"".join(parts) + b"}")
        except msgspec.DecodeError as exc:
            raise ReplyError(f"presence_query_raw replied data of another shape: {exc}") from None

    keys = [k for pair in pairs for k in pair]
    return Call("presence_query_raw", keys, [], parse, read_only=True)


def feed_append(
    shard: str,
    cursor: str,
    outbox: str | None,
    feed_maxlen: int,
    cursor_ttl_ms: int,
    entries: Sequence[tuple[str, Sequence[Arg]]],
) -> Call[FeedAppendReply]:
    """presence_feed_append of ``entries`` (outbox id, its flat field/value list), in outbox order, to the
    app's feed ``shard`` past the user's relay ``cursor`` key. ``outbox`` (only where it shares the
    call's slot: one server) is trimmed in the same call."""
    keys = [shard, cursor] if outbox is None else [shard, cursor, outbox]
    args: list[Arg] = [feed_maxlen, cursor_ttl_ms]
    for entry_id, fields in entries:
        args += [entry_id, len(fields), *fields]

    def parse(reply: object) -> FeedAppendReply:
        items = _list("presence_feed_append", reply, 2)
        return FeedAppendReply(
            appended=_int("presence_feed_append", items[0]), cursor=_str("presence_feed_append", items[1])
        )

    return Call("presence_feed_append", keys, args, parse)


def outbox_trim(outbox: str, last_id: str) -> Call[int]:
    """presence_outbox_trim: drops the outbox's entries up to ``last_id`` (relayed); entries left."""
    name = "presence_outbox_trim"
    return Call(name, [outbox], [last_id], _integer(name))


def inbox_trim(inbox: str, window_ms: int, upto: str | bytes) -> Call[int]:
    """presence_inbox_trim: drops the inbox's entries up to ``upto`` (every local session received them)
    that are older than ``window_ms``; deletes an emptied inbox; entries left."""
    name = "presence_inbox_trim"
    return Call(name, [inbox], [window_ms, upto], _integer(name))


def node_heartbeat(
    nodes_key: str,
    node_id: str,
    incarnations_key: str | None = None,
    incarnation: str = "",
    claim: int | None = None,
) -> Call[Heartbeat]:
    """presence_node_heartbeat of gateway ``node_id`` into the nodes ZSET; with ``incarnations_key`` (the
    HASH in its slot) and ``incarnation`` it records which process beat, and replies the previous one.
    ``claim``: write only if the last beat is still this one (ms; 0 = the node is not registered)."""
    name = "presence_node_heartbeat"

    def parse(reply: object) -> Heartbeat:
        items = _list(name, reply, 2)
        return Heartbeat(
            was_registered=_int(name, items[0]) == 1,
            now_ms=_int(name, items[1]),
            previous_ms=_int(name, items[2]) if len(items) > 2 else 0,
            previous_incarnation=_str(name, items[3]) if len(items) > 3 else "",
            written=_int(name, items[4]) == 1 if len(items) > 4 else True,
        )

    if incarnations_key is None:
        return Call(name, [nodes_key], [node_id], parse)
    args: list[Arg] = [node_id, incarnation] if claim is None else [node_id, incarnation, claim]
    return Call(name, [nodes_key, incarnations_key], args, parse)


def nodes_expired(nodes_key: str, ttl_ms: int) -> Call[list[str]]:
    """presence_nodes_expired: the nodes whose last heartbeat is older than ``ttl_ms``."""
    name = "presence_nodes_expired"
    return Call(name, [nodes_key], [ttl_ms], lambda reply: _strs(name, _list(name, reply)), read_only=True)


def version() -> Call[str]:
    """presence_version: the library version a server runs."""
    return Call("presence_version", [], [], lambda reply: _str("presence_version", reply), read_only=True)


def limits() -> Call[LibraryLimits]:
    """presence_limits: the limits the library enforces (``presence/limits.py`` holds the same)."""

    def parse(reply: object) -> LibraryLimits:
        items = _list("presence_limits", reply)
        named = {_str("presence_limits", items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}
        try:
            return msgspec.convert(named, LibraryLimits)
        except msgspec.ValidationError as exc:
            raise ReplyError(f"presence_limits replied {named!r}: {exc}") from None

    return Call("presence_limits", [], [], parse, read_only=True)


# --- running them ---


def map_error(exc: ResponseError) -> PresenceError:
    """A Redis error as ours: ParamError (PRESENCE_PARAM), LimitError (PRESENCE_LIMIT), else PresenceError.

    A PresenceError's message quotes Redis: transports log it and show clients only "system error".
    """
    message = str(exc)
    if message.startswith("PRESENCE_PARAM "):
        return ParamError(message.removeprefix("PRESENCE_PARAM "))
    if message.startswith("PRESENCE_LIMIT "):
        return LimitError(message.removeprefix("PRESENCE_LIMIT "))
    return PresenceError(f"redis: {message}")


def unavailable(exc: RedisUnavailable) -> UnavailableError:
    """Redis away for the whole retry window (``Store``'s RedisUnavailable) as ours: UnavailableError (503).

    Raise it ``from exc``; also for reads that bypass ``Batch`` for speed (``Inboxes.read``'s raw XREAD).
    """
    return UnavailableError("redis is unavailable")


def raise_mapped(exc: BaseException) -> NoReturn:
    """Raise ``exc`` as ours (``map_error``) when it is a Redis error reply, else as it is."""
    if not isinstance(exc, ResponseError):
        raise exc
    mapped = map_error(exc)
    if isinstance(mapped, ParamError | LimitError):
        raise mapped from None  # the library's own message says it all
    raise mapped from exc


class Pending(Generic[R]):
    """The outcome of one call or command queued in a ``Batch``, once the batch ran."""

    __slots__ = ("_parse", "_reply")

    def __init__(self, parse: Callable[[object], R]) -> None:
        self._parse = parse
        self._reply: object = _NOT_RUN

    def result(self) -> R:
        """The parsed reply; raises its error (mapped: ParamError, LimitError, PresenceError, ReplyError)."""
        reply = self._reply
        if isinstance(reply, BaseException):
            raise_mapped(reply)
        if reply is _NOT_RUN:
            raise RuntimeError("the batch has not run")
        return self._parse(reply)

    @property
    def failed(self) -> bool:
        return isinstance(self._reply, BaseException)

    @property
    def refused(self) -> bool:
        """Whether Redis answered it with an error reply (a key of another type, a bad argument, a library
        error), rather than it failing on the way."""
        return isinstance(self._reply, ResponseError)

    @property
    def error(self) -> BaseException | None:
        """The error it failed with (a Redis error reply mapped to ours), or None."""
        reply = self._reply
        if isinstance(reply, ResponseError):
            return map_error(reply)
        return reply if isinstance(reply, BaseException) else None


_NOT_RUN = object()


def _plain(reply: object) -> Any:
    return reply


class Batch:
    """Calls and plain commands sent together: one ``Store.run`` (one pipeline per primary, in parallel),
    or with ``atomic`` one MULTI/EXEC (one server only). Add, ``await run()``, then read each ``Pending``.

    ``run`` raises UnavailableError when Redis stays away for the retry window (the outcome of a change
    is then unknown); every other error is its own command's, raised by that ``Pending.result()``.
    """

    def __init__(self, store: Store, *, atomic: bool = False) -> None:
        self._store = store
        self._atomic = atomic
        self._commands: list[Command] = []
        self._pending: list[Pending[Any]] = []
        self._names: set[str] = set()

    def __len__(self) -> int:
        return len(self._commands)

    def add(self, call: Call[R]) -> Pending[R]:
        self._names.add(call.name)
        return self._queue(call.command(), Pending(call.parse))

    def command(self, key: str | None, *args: Arg) -> Pending[Any]:
        """A plain Redis command (routed by ``key``; None: any node), its reply as redis-py parses it."""
        return self._queue((key, args), Pending(_plain))

    def _queue(self, command: Command, pending: Pending[R]) -> Pending[R]:
        self._commands.append(command)
        self._pending.append(pending)
        return pending

    async def run(self) -> None:
        if not self._commands:
            return
        started = time.perf_counter()
        try:
            replies = await (self._send_atomic() if self._atomic else self._store.run(self._commands))
        except RedisUnavailable as exc:
            raise unavailable(exc) from exc
        except ResponseError as exc:  # MULTI/EXEC: the first error stands for the whole transaction
            replies = [exc] * len(self._commands)
        finally:
            elapsed = time.perf_counter() - started
            for name in self._names:
                REDIS_LATENCY.labels(name).observe(elapsed)
        for pending, reply in zip(self._pending, replies, strict=True):
            pending._reply = reply

    async def _send_atomic(self) -> list[object]:
        """The commands in one MULTI/EXEC on the one server, retried like any call (a node without the
        library gets it and the transaction runs again)."""
        client = self._store.client
        if not isinstance(client, Redis):
            raise TypeError("an atomic batch needs one server, not a cluster")
        commands = self._commands

        async def once() -> list[object]:
            async with client.pipeline(transaction=True) as pipe:
                for _, args in commands:
                    pipe.execute_command(*args)
                replies = await pipe.execute(raise_on_error=False)
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
            return list(replies)

        return await self._store.retrying(once)


class Functions:
    """Runs library calls on a ``Store``: the one place they meet Redis."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def batch(self, *, atomic: bool = False) -> Batch:
        return Batch(self.store, atomic=atomic)

    async def call(self, call: Call[R]) -> R:
        """One call, sent to the primary that owns its keys; its parsed reply."""
        batch = self.batch()
        pending = batch.add(call)
        await batch.run()
        return pending.result()

    async def call_on(
        self, node: ClusterNode | None, call: Call[R], *, load: Callable[[], Awaitable[object]] | None = None
    ) -> R:
        """One keyless call (``version``, ``limits``) on one given server: a cluster primary, or None (the
        one server). Sent once, without the retry window: its caller asks every primary (a health check)
        and reports the one that fails. A server without the library runs ``load()`` and is asked again.
        Errors mapped as ``call``'s; a failure on the way (connection, timeout) is raised as redis-py raised it.
        """
        command = fcall(call.name, call.keys, call.args, read_only=call.read_only)
        started = time.perf_counter()
        try:
            try:
                reply = await self.store.on_node(node, *command)
            except ResponseError as exc:
                if load is None or not is_function_missing(exc):
                    raise
                await load()
                reply = await self.store.on_node(node, *command)
        except ResponseError as exc:
            raise_mapped(exc)
        finally:
            REDIS_LATENCY.labels(call.name).observe(time.perf_counter() - started)
        return call.parse(reply)

    async def command(self, key: str | None, *args: Arg) -> Any:
        """One plain Redis command (SMEMBERS, TIME, ...), errors mapped as the calls' are."""
        batch = self.batch()
        pending = batch.command(key, *args)
        await batch.run()
        return pending.result()
