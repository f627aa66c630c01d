"""The service facade: validation, then the user's own function, then one fan-out per Redis node.

Transport code (gateway, REST) calls this; it never touches sockets, and only it and the key
schema know Redis key names.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from presence.config import Settings
from presence.errors import ParamError, UnavailableError
from presence.functions import (
    InboxSettings,
    PresenceFunctions,
    StatusChange,
    ensure_library,
    ensure_library_on,
    fcall,
    raise_mapped,
)
from presence.ids import check_imei, check_user_id
from presence.keys import KeySchema, UserKeys, doorbell_message, slot_tags, user_slot
from presence.metrics import FANOUT_ENTRIES, FEED_ENTRIES, REDIS_LATENCY, STATUS_CHANGES
from presence.models import (
    ChangeResult,
    FriendshipPack,
    OnlineCount,
    SubscribeResult,
    Subscription,
    SubscriptionList,
    UserOnlineStatus,
)
from presence.resolver import Resolver
from presence.store import Command, RedisUnavailable, Store

log = logging.getLogger("presence.service")
_pack_json = msgspec.json.Encoder()

NOTIFY_STATUS = 4004
NOTIFY_CUSTOM = 4006
NOTIFY_FRIENDSHIP = 4010  # ours: friends added or deleted, with their status
CLIENT_TYPES = range(0, 6)
OUTBOX_READ = 100  # unrelayed feed entries of one user taken per change
OUTBOX_MAXLEN = 1000  # a user's unrelayed feed entries kept at most (only a relay that keeps failing fills it)
FEED_CURSOR_TTL_MS = 7 * 86400 * 1000  # how long a relay remembers a user's last relayed entry


@dataclass(frozen=True, slots=True)
class Limits:
    subscribe_batch: int = 100
    live_subscriptions: int = 3000
    query_users: int = 500
    import_friends: int = 1000
    custom_text_bytes: int = 100
    sub_time_ms: int = 30 * 86400 * 1000
    imei_bytes: int = 128
    # Recipients per presence_fanout call: bounds how long one call holds Redis (calls are pipelined).
    fanout_chunk: int = 100


def check_user_list(field: str, values: Sequence[object], most: int) -> list[str]:
    if len(values) > most:
        raise ParamError(f"{field} has {len(values)} items, at most {most}")
    out = [check_user_id(f"{field}[{i}]", v) for i, v in enumerate(values)]
    return list(dict.fromkeys(out))


def new_conn_id() -> str:
    return secrets.token_hex(8)


def node_member(app_id: int, user_id: str, client_type: int, imei: str, conn_id: str) -> str:
    return f"{app_id}|{user_id}|{client_type}|{imei}|{conn_id}"


def parse_node_member(member: str) -> tuple[int, str, int, str, str]:
    head, _, conn_id = member.rpartition("|")
    app_id, user_id, client_type, imei = head.split("|", 3)
    return int(app_id), user_id, int(client_type), imei, conn_id


class Presence:
    """Presence operations for every app, on one Redis (standalone, Sentinel or Cluster).

    Every function call names keys of one slot and goes straight to the primary owning it; the calls
    of one operation go as one pipeline per primary, the primaries in parallel (``Store.run``).
    """

    def __init__(
        self, redis: Redis | RedisCluster | Store, settings: Settings | None = None, limits: Limits | None = None
    ) -> None:
        self.settings = settings or Settings()
        self.limits = limits or Limits()
        self.store = redis if isinstance(redis, Store) else Store.wrap(redis)
        self.store.on_function_missing = self._load_library_on
        # Called (no arguments) when a Redis node turned out to have lost its data (no library: an empty
        # restart); a gateway re-asserts its sessions then.
        self.on_data_lost: Callable[[], object] | None = None
        redis = self.redis = self.store.client
        self.keys = KeySchema(self.settings.prefix)
        self.fn = PresenceFunctions(
            self.store,
            InboxSettings(
                maxlen=self.settings.inbox_maxlen,
                ttl_ms=int(self.settings.inbox_ttl * 1000),
                doorbell_prefix=self.keys.doorbell_prefix,
            ),
        )
        self._cluster = self.store.cluster
        # Change calls that gave up with an unknown outcome, replayed (same op id) once Redis answers.
        self.resolver = Resolver()
        if isinstance(redis, Redis):
            self._raw_reader = Redis(connection_pool=redis.connection_pool)
            self._raw_reader.set_response_callback("XREAD", lambda response, **_: response)

    async def start(self) -> bool:
        """Make sure the library on every primary is ours; True when it had to load it somewhere."""
        return await ensure_library(self.store)

    async def _load_library_on(self, node: Any) -> None:
        if node is None and self._cluster:  # a keyless call (presence_version): whichever node answered
            await ensure_library(self.store)
        else:
            await ensure_library_on(self.store, node)
        if self.on_data_lost is not None:
            self.on_data_lost()

    def user(self, app_id: int, user_id: str) -> UserKeys:
        return self.keys.user(app_id, user_id)

    # --- status changes ---

    async def login(
        self,
        app_id: int,
        user_id: str,
        client_type: int,
        imei: str,
        *,
        conn_id: str | None = None,
        node_id: str = "",
        node_host: str = "",
        version: int = 0,
        login_model: int = 3,
        max_sessions: int = 10,
    ) -> ChangeResult:
        """Add a session; LimitError (90005) when the user already has ``max_sessions`` others."""
        check_user_id("userId", user_id)
        self._check_session(client_type, imei)
        conn_id = conn_id or new_conn_id()
        keys = self.user(app_id, user_id)
        args = self.fn.login_args(
            app_id, user_id, client_type, imei, conn_id, node_id, node_host, version, login_model, max_sessions
        )
        if node_id:
            member = node_member(app_id, user_id, client_type, imei, conn_id)
            change, pending = await self._login_on_node(keys, args, node_id, member)
        else:
            login = fcall("presence_login", self._state_keys(keys, app_id, user_id), args)
            replies = await self._run([(keys.sessions, login), (keys.outbox, self._outbox_read(keys))])
            change, pending = self.fn.parse_login(replies[0]), replies[1]
        return await self._spread(app_id, user_id, change, pending, NOTIFY_STATUS, "online")

    # --- the change feed and the online counters ---

    def counters_key(self, app_id: int, user_id: str) -> str:
        """The online counters HASH in the user's slot (one per slot on a cluster, one in all elsewhere)."""
        return self.keys.counters(slot_tags()[user_slot(app_id, user_id)] if self._cluster else "0")

    def counters_keys(self) -> list[str]:
        """Every online counters HASH there can be."""
        return [self.keys.counters(t) for t in slot_tags()] if self._cluster else [self.keys.counters("0")]

    def feed_shard_of(self, app_id: int, user_id: str) -> int:
        return binascii.crc32(user_id.encode()) % self.settings.feed_shards

    def feed_shards(self, app_id: int) -> list[str]:
        """The app's feed streams, shard 0 first."""
        return [self.keys.feed_shard(app_id, k) for k in range(self.settings.feed_shards)]

    def _state_keys(self, keys: UserKeys, app_id: int, user_id: str) -> list[str]:
        """KEYS of the user's own functions with the feed outbox and the counters (the optional 6th and 7th)."""
        return [*keys.state(), keys.outbox, self.counters_key(app_id, user_id)]

    @staticmethod
    def _outbox_read(keys: UserKeys) -> list[Any]:
        """The user's unrelayed feed entries, read right after the user's function in the same pipeline."""
        return ["XRANGE", keys.outbox, "-", "+", "COUNT", OUTBOX_READ]

    def _relay(self, app_id: int, user_id: str, pending: Any) -> tuple[Command, str] | None:
        """presence_feed_append of the user's pending outbox entries (and the last outbox id), or None."""
        if not pending or isinstance(pending, BaseException):
            return None
        shard = self.feed_shard_of(app_id, user_id)
        keys = [self.keys.feed_shard(app_id, shard), self.keys.feed_cursor(app_id, shard, user_id)]
        if not self._cluster:  # one server: the trim of the outbox rides in the same call
            keys.append(self.user(app_id, user_id).outbox)
        args: list[Any] = [self.settings.feed_maxlen, FEED_CURSOR_TTL_MS]
        last = ""
        for raw_id, fields in pending:
            last = _text(raw_id)
            flat: list[Any] = ["eventId", f"{app_id}:{user_id}:{last}"]
            for name, value in fields.items():
                flat += [name, value]
            args += [last, len(flat), *flat]
        return (keys[0], fcall("presence_feed_append", keys, args)), last

    async def relay_outboxes(self, cursors: dict[Any, int], count: int = 500) -> int:
        """One SCAN step per primary over the users' feed outboxes; relays any that still hold entries.

        The normal path relays a change's entry right after it; this catches an entry whose caller died
        between the two steps and whose user changes no more. ``cursors`` (primary -> SCAN cursor) is
        kept by the caller between rounds; a full pass visits every key once. Returns entries relayed.
        """
        pattern = f"{self.keys.prefix}:{{*}}:outbox"
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
                parsed = _outbox_user(self.keys.prefix, _text(raw))
                if parsed is not None:
                    relayed += await self.relay_user(*parsed)
        return relayed

    async def relay_user(self, app_id: int, user_id: str) -> int:
        """Relay whatever waits in one user's outbox (idempotent: the cursor skips what was appended)."""
        keys = self.user(app_id, user_id)
        pending = await self._one(keys.outbox, *self._outbox_read(keys))
        relay = self._relay(app_id, user_id, pending)
        if relay is None:
            return 0
        (reply,) = await self._run([relay[0]], raise_errors=False)
        trimmed: list[Any] = []
        if self._cluster and (trim := self._trim_after_relay(app_id, user_id, relay[1])([reply])):
            trimmed = list(await self._run(trim, raise_errors=False))
        self._relayed(app_id, user_id, reply, trimmed)
        return 0 if isinstance(reply, BaseException) else int(reply[0])

    async def online_counts(self) -> dict[int, OnlineCount]:
        """Users online and sessions by client type, per app, summed over every counters HASH (exact:
        each moves in the same function call as the session it counts). One pipeline per primary."""
        keys = self.counters_keys()
        out: dict[int, OnlineCount] = {}
        for reply in await self._run([(k, ["HGETALL", k]) for k in keys]):
            for name, value in (reply or {}).items():
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

    async def _login_on_node(
        self, keys: UserKeys, args: list[Any], node_id: str, member: str
    ) -> tuple[StatusChange, Any]:
        """The node's record of the session exists before the session does, so the reaper finds every session.

        One server: SADD and presence_login in one MULTI/EXEC (both run or neither). A cluster (other
        slots): the SADD succeeds first. Either way, a login the library refuses takes the record back (a
        leftover one is harmless: logging out a session that does not exist changes nothing).
        """
        node_set = self.keys.node_sessions(node_id)
        login = fcall("presence_login", self._state_keys(keys, int(args[0]), str(args[1])), args)
        started = time.perf_counter()
        try:
            try:
                if not self._cluster:
                    _, reply, pending = await self._atomic(["SADD", node_set, member], login, self._outbox_read(keys))
                else:
                    await self.store.one(node_set, "SADD", node_set, member)
                    reply, pending = await self.store.run(
                        [(keys.sessions, login), (keys.outbox, self._outbox_read(keys))], raise_errors=True
                    )
            except ResponseError:
                # The login was refused, so no session exists. (After a lost connection the outcome is
                # unknown: the record stays, and the node's reconciliation logs out what no socket holds.)
                await self._forget_member(node_set, member)
                raise
        except ResponseError as exc:
            raise_mapped(exc)
        except RedisUnavailable as exc:
            raise UnavailableError("redis is unavailable") from exc
        finally:
            REDIS_LATENCY.labels("presence_login").observe(time.perf_counter() - started)
        return self.fn.parse_login(reply), pending

    async def _atomic(self, *commands: list[Any]) -> list[Any]:
        """Commands in one MULTI/EXEC on the one server, retried like any call; their replies."""

        async def once() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
            return list(replies)

        return await self.store.retrying(once)

    async def _forget_member(self, node_set: str, member: str) -> None:
        try:
            await self.store.one(node_set, "SREM", node_set, member)
        except Exception:  # left for the node's reconciliation
            pass

    async def logout(
        self,
        app_id: int,
        user_id: str,
        client_type: int,
        imei: str,
        *,
        conn_id: str = "",
        node_id: str = "",
        op_id: str | None = None,
        seen_age_ms: int = 0,
        seen_at_ms: int = 0,
        reason: str = "logout",
    ) -> ChangeResult:
        """Remove a session; with ``conn_id``, only if it still belongs to that connection.

        ``op_id`` (default: a new one) identifies the operation: calling again with the same one after an
        unknown outcome (a timeout) applies nothing twice and still fans the change out. lastSeen is the
        evidence: ``seen_at_ms`` on the Redis clock if given, else ``seen_age_ms`` before now.
        ``reason`` (logout, close, timeout, reaped, kicked, shutdown, error) goes into the change feed.
        Ids are not held to the identifier rule here: a session stored before it must still end.
        """
        if not isinstance(user_id, str) or not user_id or not isinstance(imei, str) or not imei:
            raise ParamError("userId and imei must be non-empty strings")
        op = op_id or new_conn_id()

        def replay() -> Any:
            return self.logout(
                app_id,
                user_id,
                client_type,
                imei,
                conn_id=conn_id,
                node_id=node_id,
                op_id=op,
                seen_age_ms=seen_age_ms,
                seen_at_ms=seen_at_ms,
                reason=reason,
            )

        return await self._resolved(
            op,
            f"logout of {user_id}/{imei}",
            replay,
            self._logout(app_id, user_id, client_type, imei, conn_id, node_id, op, seen_age_ms, seen_at_ms, reason),
        )

    async def _resolved(self, op_id: str, what: str, replay: Callable[[], Any], call: Any) -> ChangeResult:
        """Await ``call``; if Redis stayed away (an unknown outcome), leave ``replay`` to the resolver."""
        try:
            result = await call
        except UnavailableError:
            self.resolver.add(op_id, what, replay)
            raise
        self.resolver.discard(op_id)
        return result

    async def _logout(
        self,
        app_id: int,
        user_id: str,
        client_type: int,
        imei: str,
        conn_id: str,
        node_id: str,
        op_id: str,
        seen_age_ms: int,
        seen_at_ms: int,
        reason: str,
    ) -> ChangeResult:
        keys = self.user(app_id, user_id)
        args = [
            *self.fn.logout_args(app_id, user_id, client_type, imei, conn_id, op_id, seen_age_ms, seen_at_ms),
            reason,
            *self._outbox_args(),
        ]
        commands: list[Command] = [
            (keys.sessions, fcall("presence_logout", self._state_keys(keys, app_id, user_id), args)),
            (keys.outbox, self._outbox_read(keys)),
        ]
        if node_id and conn_id:
            node_set = self.keys.node_sessions(node_id)
            commands.append((node_set, ["SREM", node_set, node_member(app_id, user_id, client_type, imei, conn_id)]))
        replies = await self._run(commands)
        return await self._spread(
            app_id, user_id, self.fn.parse_logout(replies[0]), replies[1], NOTIFY_STATUS, "offline"
        )

    async def set_custom_status(
        self,
        app_id: int,
        user_id: str,
        custom_status: int,
        custom_text: str = "",
        *,
        origin_conn_id: str = "",
        op_id: str | None = None,
    ) -> ChangeResult:
        """Set the custom status and fan it out. ``op_id`` (default: a new one) makes a repeat a replay.

        Raises UnavailableError when Redis stayed away for ``redis_retry_for``: the outcome is unknown, and
        the resolver replays the call (same op id) once Redis answers, so an applied change is pushed.
        """
        op = op_id or new_conn_id()

        def replay() -> Any:
            return self.set_custom_status(
                app_id, user_id, custom_status, custom_text, origin_conn_id=origin_conn_id, op_id=op
            )

        call = self._set_custom_status(app_id, user_id, custom_status, custom_text, origin_conn_id, op)
        return await self._resolved(op, f"custom status of {user_id}", replay, call)

    async def _set_custom_status(
        self, app_id: int, user_id: str, custom_status: int, custom_text: str, origin_conn_id: str, op_id: str
    ) -> ChangeResult:
        check_user_id("userId", user_id)
        if isinstance(custom_status, bool) or not isinstance(custom_status, int):
            raise ParamError("customStatus must be an integer")
        if not -(2**53) < custom_status < 2**53:
            raise ParamError("customStatus must fit in 53 bits")
        size = len(custom_text.encode())
        if size > self.limits.custom_text_bytes:
            raise ParamError(f"customText must be at most {self.limits.custom_text_bytes} UTF-8 bytes, got {size}")
        keys = self.user(app_id, user_id)
        i = self.fn.inbox
        # One operation id for the call, Store.run's retries and the resolver's replays: a repeat applies nothing.
        args = [
            app_id,
            user_id,
            custom_status,
            custom_text,
            origin_conn_id,
            i.maxlen,
            i.ttl_ms,
            i.doorbell_prefix,
            op_id,
        ]
        call = fcall("presence_set_custom_status", [*keys.state(), keys.outbox], [*args, *self._outbox_args()])
        replies = await self._run([(keys.sessions, call), (keys.outbox, self._outbox_read(keys))])
        reply = replies[0]
        change = StatusChange(changed=True, data=reply[1], recipients=[_text(r) for r in reply[2:]])
        return await self._spread(app_id, user_id, change, replies[1], NOTIFY_CUSTOM, "custom")

    def _outbox_args(self) -> list[Any]:
        return [OUTBOX_MAXLEN, int(self.settings.inbox_ttl * 1000)]

    async def _spread(
        self, app_id: int, user_id: str, change: StatusChange, pending: Any, command: int, kind: str
    ) -> ChangeResult:
        """The fan-out of a change and the relay of the user's feed entries, in one pipeline per primary."""
        delivered = 0
        if change.changed:
            STATUS_CHANGES.labels(kind).inc()
        relay = self._relay(app_id, user_id, pending)
        recipients = change.recipients if change.changed else []
        if recipients or relay:
            then = self._trim_after_relay(app_id, user_id, relay[1]) if relay is not None and self._cluster else None
            delivered, relayed, trimmed = await self._fanout(
                app_id, recipients, command, change.data, [relay[0]] if relay else [], user_id, change.version, then
            )
            if recipients:
                FANOUT_ENTRIES.inc(delivered)
            if relay is not None:
                self._relayed(app_id, user_id, relayed[0], trimmed)
        return ChangeResult(
            changed=change.changed,
            recipients=len(change.recipients),
            delivered=delivered,
            kicked=change.kicked,
            inbox_last_id=change.inbox_last_id,
            version=change.version,
        )

    def _trim_after_relay(self, app_id: int, user_id: str, last_id: str) -> Callable[[list[Any]], list[Command]]:
        """On a cluster the outbox is trimmed by a separate call (another slot than the feed shard), once the
        relay succeeded; it goes in one request with the change's doorbells."""
        outbox = self.user(app_id, user_id).outbox

        def then(extras: list[Any]) -> list[Command]:
            if not extras or isinstance(extras[0], BaseException):
                return []  # not relayed: nothing to trim
            return [(outbox, fcall("presence_outbox_trim", [outbox], [last_id]))]

        return then

    def _relayed(self, app_id: int, user_id: str, reply: Any, trimmed: list[Any]) -> None:
        """After the feed append: count it; log a failed relay or trim (both converge on the next change)."""
        if isinstance(reply, BaseException):  # left in the outbox: the user's next change relays it
            log.warning("feed relay of %s/%s failed (%r); it goes with the next change", app_id, user_id, reply)
            return
        FEED_ENTRIES.inc(int(reply[0]))
        for result in trimmed:  # a later relay skips what was appended (the cursor) and trims again
            if isinstance(result, BaseException):
                log.warning("feed outbox trim of %s/%s failed (%r)", app_id, user_id, result)

    async def fanout(
        self, app_id: int, recipients: Iterable[str], command: int, data: bytes, *, user_id: str = "", version: int = 0
    ) -> int:
        """presence_fanout per slot, one pipeline per primary (one call on one server); entries written.

        ``user_id`` changed to ``version`` (the one in ``data``): a recipient that already got that version or
        a newer one of this command is skipped, so fan-outs that overtake each other leave every recipient on
        the newest state, and a repeat writes nothing twice (safe to retry; Store.run retries it).
        On a cluster the calls do not publish: each gateway gets one doorbell for the whole change,
        PUBLISHed after the fan-out (one pipeline to one node; the cluster bus carries it to the gateway).
        """
        written, _, _ = await self._fanout(app_id, recipients, command, data, [], user_id, version)
        return written

    async def _fanout(
        self,
        app_id: int,
        recipients: Iterable[str],
        command: int,
        data: bytes,
        extra: Sequence[Command],
        user_id: str = "",
        version: int = 0,
        then: Callable[[list[Any]], list[Command]] | None = None,
    ) -> tuple[int, list[Any], list[Any]]:
        """``fanout`` with ``extra`` commands in the same pipelines; (entries written, the extras' replies,
        an error among them as its reply, the replies of ``then``'s commands). Without ``user_id`` (friendship
        events) no version ordering. ``then`` (given the extras' replies) makes commands that go in one request
        with the doorbells, routed by the first one's key: after the fan-out, one more request at most."""
        base = self.keys.base
        suffixes = ("sessions", "inbox", "pushed") if user_id else ("sessions", "inbox")
        groups_of_keys = [tuple(b + x for x in suffixes) for b in (base(app_id, r) for r in recipients)]
        size = self.limits.fanout_chunk
        # One call per chunk of a slot group, all in the same pipeline: no single call holds Redis for the
        # whole list (1000 friends in one call was ~20 ms). Calls ring the gateways themselves only when
        # there is one call; else, as on a cluster, they name the nodes and each gateway gets one doorbell.
        chunks = [
            group[start : start + size]
            for group in self.store.group([t[0] for t in groups_of_keys])
            for start in range(0, len(group), size)
        ]
        ring = not self._cluster and len(chunks) == 1
        commands: list[Command] = []
        for indexes in chunks:
            chunk = [groups_of_keys[i] for i in indexes]
            commands.append((chunk[0][0], self.fn.fanout_command(chunk, command, data, user_id, version, ring=ring)))
        fans = len(commands)
        replies = await self._run([*commands, *extra], raise_errors=False)
        written = 0
        bells: dict[str, list[str]] = {}
        for reply in replies[:fans]:
            if isinstance(reply, ResponseError):
                raise_mapped(reply)
            if isinstance(reply, BaseException):
                raise reply
            count, nodes = self.fn.parse_fanout(reply)
            written += count
            for node, inboxes in nodes.items():
                bells.setdefault(node, []).extend(inboxes)
        follow = then(list(replies[fans:])) if then is not None else []
        if not bells and not follow:
            return written, replies[fans:], []
        # PUBLISH may go to any node (the cluster bus carries it), so it rides with ``follow``'s commands.
        route = follow[0][0] if follow else None
        channel = self.keys.doorbell
        rings: list[Command] = [
            (route, ["PUBLISH", channel(node), doorbell_message(inboxes)]) for node, inboxes in bells.items()
        ]
        done = await self._run([*rings, *follow], raise_errors=False)
        for reply in done[: len(rings)]:
            if isinstance(reply, ResponseError):
                raise_mapped(reply)
            if isinstance(reply, BaseException):
                raise reply
        return written, replies[fans:], list(done[len(rings) :])

    # --- subscriptions and friends ---

    async def subscribe(
        self, app_id: int, subscriber: str, targets: Sequence[str], sub_time_ms: int
    ) -> SubscribeResult:
        check_user_id("identifier", subscriber)
        if not targets:
            raise ParamError("subUserId must name at least one user")
        users = check_user_list("subUserId", targets, self.limits.subscribe_batch)
        if subscriber in users:
            raise ParamError("subUserId must not contain the subscriber itself")
        if (
            isinstance(sub_time_ms, bool)
            or not isinstance(sub_time_ms, int)
            or not (1 <= sub_time_ms <= self.limits.sub_time_ms)
        ):
            raise ParamError(f"subTime must be between 1 and {self.limits.sub_time_ms} ms")
        # The subscriber's side first (it enforces the cap), then the targets' sides per slot.
        expire_at, live = await self.fn.subscribe(
            self.user(app_id, subscriber).subscriptions, subscriber, users, sub_time_ms, self.limits.live_subscriptions
        )
        # The targets' sides, then their status, in the same pipelines (per slot: the add runs first), so
        # any change after the snapshot is pushed: no gap between the pull and the subscription.
        subs = [self.user(app_id, u).subscribers for u in users]
        commands: list[Command] = []
        for group in self.store.group(subs):
            chunk = [subs[i] for i in group]
            commands.append((chunk[0], self.fn.subscribers_add_command(chunk, subscriber, expire_at)))
        base = self.keys.base
        pairs = [(b + "sessions", b + "status") for b in (base(app_id, u) for u in users)]
        adds = len(commands)
        queried: list[list[str]] = []
        for group in self.store.group([p[0] for p in pairs]):
            chunk = [pairs[i] for i in group]
            queried.append([users[i] for i in group])
            commands.append((chunk[0][0], self.fn.query_command(chunk, queried[-1])))
        snapshot: dict[str, UserOnlineStatus] = {}
        for raw, names in zip((await self._run(commands))[adds:], queried, strict=True):
            snapshot.update(self.fn.parse_query(raw, names))
        return SubscribeResult(expireAt=expire_at, liveSubscriptions=live, users=snapshot)

    async def subscriptions(self, app_id: int, subscriber: str) -> SubscriptionList:
        """The subscriber's live subscriptions with their expiry (ms, Redis clock), the soonest first."""
        check_user_id("identifier", subscriber)
        key = self.user(app_id, subscriber).subscriptions
        reply = await self._one(
            key, *fcall("presence_subscriptions", [key], [self.limits.live_subscriptions], read_only=True)
        )
        subs = [Subscription(userId=_text(reply[i]), expireAt=int(reply[i + 1])) for i in range(1, len(reply), 2)]
        return SubscriptionList(subscriptions=subs, serverTime=int(reply[0]))

    async def unsubscribe(self, app_id: int, subscriber: str, targets: Sequence[str]) -> int:
        check_user_id("identifier", subscriber)
        if not targets:
            raise ParamError("subUserId must name at least one user")
        users = check_user_list("subUserId", targets, self.limits.subscribe_batch)
        removed = await self.fn.unsubscribe(self.user(app_id, subscriber).subscriptions, subscriber, users)
        await self._per_slot(
            [self.user(app_id, u).subscribers for u in users],
            lambda keys, _: self.fn.subscribers_remove_command(keys, subscriber),
        )
        return removed

    async def add_friend(self, app_id: int, from_id: str, to_id: str) -> int:
        return await self.import_friends(app_id, from_id, [to_id], field="toId")

    async def import_friends(self, app_id: int, from_id: str, to_ids: Sequence[str], field: str = "friendItem") -> int:
        from_id, users = self._friend_args(from_id, to_ids, field)
        return await self._friends(True, app_id, from_id, users)

    async def delete_friend(self, app_id: int, from_id: str, to_id: str) -> int:
        from_id, users = self._friend_args(from_id, [to_id], "toId")
        return await self._friends(False, app_id, from_id, users)

    async def _friends(self, add: bool, app_id: int, from_id: str, users: list[str]) -> int:
        """``from_id``'s side (one call: the count returned), then each friend's side, per slot.

        Each call is atomic and idempotent; if the caller dies in between, repeating the request converges.
        4010 goes out only for the friends ``from_id``'s side actually gained or lost (none: no push).
        """
        own = self.user(app_id, from_id).friends
        mine = self.fn.friends_command(add, [own] * len(users), [(from_id, u) for u in users])
        # Which of them the owner's side has before the change (SMISMEMBER, Redis >= 6.2): the ones that move.
        before = await self._one(own, "SMISMEMBER", own, *users)
        moved = [u for u, had in zip(users, before, strict=True) if bool(int(had)) != add]
        changed = int(await self._one(own, *mine))
        await self._per_slot(
            [self.user(app_id, u).friends for u in users],
            lambda keys, idx: self.fn.friends_command(add, keys, [(users[i], from_id) for i in idx]),
        )
        if moved:
            await self._friendship_notify(add, app_id, from_id, moved)
        return changed

    async def _friendship_notify(self, add: bool, app_id: int, from_id: str, users: list[str]) -> None:
        """4010 to both sides' online sessions, with the other side's status now (read after the sets changed,
        so any later change of a new friend is pushed too): ``from_id`` gets one entry naming all ``users``,
        each of them one naming ``from_id``. Offline users pull their friends on connect."""
        status = await self._query(app_id, [from_id, *users])
        action = "add" if add else "delete"
        offline = UserOnlineStatus(session=[])
        to_owner = FriendshipPack(appId=app_id, action=action, friends={u: status.get(u, offline) for u in users})
        to_friends = FriendshipPack(appId=app_id, action=action, friends={from_id: status.get(from_id, offline)})
        await asyncio.gather(
            self.fanout(app_id, [from_id], NOTIFY_FRIENDSHIP, _pack_json.encode(to_owner)),
            self.fanout(app_id, users, NOTIFY_FRIENDSHIP, _pack_json.encode(to_friends)),
        )

    async def _per_slot(self, keys: list[str], build: Callable[[list[str], list[int]], list[Any]]) -> list[Any]:
        """One call per slot group of ``keys``: ``build(keys of the group, their indexes)`` makes it."""
        commands: list[Command] = []
        for group in self.store.group(keys):
            chunk = [keys[i] for i in group]
            commands.append((chunk[0], build(chunk, group)))
        return await self._run(commands)

    def _friend_args(self, from_id: str, to_ids: Sequence[str], field: str) -> tuple[str, list[str]]:
        check_user_id("fromId", from_id)
        if not to_ids:
            raise ParamError(f"{field} must name at least one user")
        users = check_user_list(field, to_ids, self.limits.import_friends)
        if from_id in users:
            raise ParamError(f"{field} must not contain fromId itself")
        return from_id, users

    # --- queries ---

    async def query_users(self, app_id: int, user_ids: Sequence[str]) -> dict[str, UserOnlineStatus]:
        users = check_user_list("userList", user_ids, self.limits.query_users)
        return await self._query(app_id, users)

    async def query_friends(self, app_id: int, user_id: str) -> dict[str, UserOnlineStatus]:
        """Two round trips: the friend set, then one presence_query (per node on a cluster)."""
        check_user_id("identifier", user_id)
        key = self.user(app_id, user_id).friends
        friends = sorted(m.decode() for m in await self._one(key, "SMEMBERS", key))
        return await self._query(app_id, friends)

    async def _query(self, app_id: int, users: list[str]) -> dict[str, UserOnlineStatus]:
        """presence_query per slot: one pipeline per primary, the primaries in parallel (one call on one server)."""
        if not users:
            return {}
        base = self.keys.base
        pairs = [(b + "sessions", b + "status") for b in (base(app_id, u) for u in users)]
        commands: list[Command] = []
        names: list[list[str]] = []
        for group in self.store.group([p[0] for p in pairs]):
            chunk = [pairs[i] for i in group]
            names.append([users[i] for i in group])
            commands.append((chunk[0][0], self.fn.query_command(chunk, names[-1])))
        result: dict[str, UserOnlineStatus] = {}
        for raw, group_users in zip(await self._run(commands), names, strict=True):
            result.update(self.fn.parse_query(raw, group_users))
        return result

    # --- gateway nodes ---

    async def node_heartbeat(self, node_id: str) -> bool:
        """Beat; False when the node was not registered (first beat, or reaped meanwhile)."""
        was, _ = await self.fn.node_heartbeat(self.keys.nodes, node_id)
        return was

    async def redis_time_ms(self) -> int:
        """Now on the Redis clock (the node holding ``presence:nodes``), in ms."""
        secs, micros = await self._one(self.keys.nodes, "TIME")
        return int(secs) * 1000 + int(micros) // 1000

    async def node_last_beat(self, node_id: str) -> int | None:
        """The node's last heartbeat (ms, Redis clock), or None when it is not registered."""
        beat = await self._one(self.keys.nodes, "ZSCORE", self.keys.nodes, node_id)
        return int(float(beat)) if beat is not None else None

    async def node_leave(self, node_id: str) -> None:
        await self._one(self.keys.nodes, "ZREM", self.keys.nodes, node_id)

    async def expired_nodes(self, ttl_s: float) -> list[str]:
        return await self.fn.nodes_expired(self.keys.nodes, int(ttl_s * 1000))

    async def reap_node(self, node_id: str, batch: int = 200) -> int:
        """Log out every session a node still holds, then forget the node. Safe to run twice at once.

        lastSeen of its users is the node's last heartbeat: the last moment they were known connected.
        """
        key = self.keys.node_sessions(node_id)
        beat = await self._one(self.keys.nodes, "ZSCORE", self.keys.nodes, node_id)
        seen_at = int(float(beat)) if beat is not None else 0
        reaped = 0
        while True:
            members = [m.decode() for m in await self._one(key, "SRANDMEMBER", key, batch)]
            if not members:
                break
            for member in members:
                app_id, user_id, client_type, imei, conn_id = parse_node_member(member)
                result = await self.logout(
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
        await self._one(self.keys.nodes, "ZREM", self.keys.nodes, node_id)
        return reaped

    async def sessions_held(self, sessions: Sequence[tuple[int, str, int, str, str]]) -> list[bool | None]:
        """For each ``(appId, userId, clientType, imei, connId)``: True when Redis holds that session for that
        connection, None when the device's session is another connection's, False when there is none (a
        primary that restarted empty lost it). One HGET each, one pipeline per primary."""
        commands: list[Command] = []
        for app_id, user_id, client_type, imei, _ in sessions:
            key = self.user(app_id, user_id).sessions
            commands.append((key, ["HGET", key, f"{client_type}:{imei}"]))
        held: list[bool | None] = []
        for (*_, conn_id), raw in zip(sessions, await self._run(commands), strict=True):
            match = _CONN_ID.search(raw) if raw is not None else None
            if raw is None:
                held.append(False)
            elif match is not None and match.group(1) == conn_id.encode():
                held.append(True)
            else:
                held.append(None)
        return held

    async def node_sessions(self, node_id: str) -> int:
        key = self.keys.node_sessions(node_id)
        return int(await self._one(key, "SCARD", key))

    async def node_session_members(self, node_id: str) -> set[str]:
        """``appId|userId|clientType|imei|connId`` of every session recorded for a node."""
        key = self.keys.node_sessions(node_id)
        return {m.decode() for m in await self._one(key, "SMEMBERS", key)}

    # --- helpers ---

    async def _run(self, commands: Sequence[Command], *, raise_errors: bool = True) -> list[Any]:
        """``Store.run`` with our error mapping: a library error as ParamError/PresenceError, 503 when away."""
        try:
            return await self.store.run(commands, raise_errors=raise_errors)
        except ResponseError as exc:
            raise_mapped(exc)
        except RedisUnavailable as exc:
            raise UnavailableError("redis is unavailable") from exc

    async def _one(self, key: str, *args: Any) -> Any:
        return (await self._run([(key, args)]))[0]

    def _check_session(self, client_type: int, imei: str) -> None:
        if isinstance(client_type, bool) or client_type not in CLIENT_TYPES:
            raise ParamError("clientType must be 0..5")
        check_imei("imei", imei, self.limits.imei_bytes)


_CONN_ID = re.compile(rb'"connId":"([^"]*)"')


def _outbox_user(prefix: str, key: str) -> tuple[int, str] | None:
    """(appId, userId) of ``<prefix>:{appId:userId}:outbox``, or None for another key."""
    head, tail = f"{prefix}:{{", "}:outbox"
    if not (key.startswith(head) and key.endswith(tail)):
        return None
    app, sep, user = key[len(head) : -len(tail)].partition(":")
    return (int(app), user) if sep and app.isdigit() and user else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
