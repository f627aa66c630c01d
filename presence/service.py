"""The service facade: validation, then the user's own function, then one fan-out per Redis node.

Transport code (gateway, REST) calls this; it never touches sockets, and only it and the key
schema know Redis key names.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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
from presence.keys import KeySchema, UserKeys, doorbell_message
from presence.metrics import FANOUT_ENTRIES, REDIS_LATENCY, STATUS_CHANGES
from presence.models import ChangeResult, SubscribeResult, UserOnlineStatus
from presence.store import Command, RedisUnavailable, Store

NOTIFY_STATUS = 4004
NOTIFY_CUSTOM = 4006
CLIENT_TYPES = range(0, 6)


@dataclass(frozen=True, slots=True)
class Limits:
    subscribe_batch: int = 100
    live_subscriptions: int = 3000
    query_users: int = 500
    import_friends: int = 1000
    custom_text_bytes: int = 100
    sub_time_ms: int = 30 * 86400 * 1000
    imei_bytes: int = 128


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
            change = await self._login_on_node(keys, args, node_id, member)
        else:
            change = await self.fn.login(keys, args)
        return await self._spread(app_id, user_id, change, NOTIFY_STATUS, "online")

    async def _login_on_node(self, keys: UserKeys, args: list[Any], node_id: str, member: str) -> StatusChange:
        """The node's record of the session exists before the session does, so the reaper finds every session.

        One server: SADD and presence_login in one MULTI/EXEC (both run or neither). A cluster (other
        slots): the SADD succeeds first. Either way, a login the library refuses takes the record back (a
        leftover one is harmless: logging out a session that does not exist changes nothing).
        """
        node_set = self.keys.node_sessions(node_id)
        login = fcall("presence_login", keys.state(), args)
        started = time.perf_counter()
        try:
            try:
                if not self._cluster:
                    reply = await self._atomic(["SADD", node_set, member], login)
                else:
                    await self.store.one(node_set, "SADD", node_set, member)
                    reply = await self.store.one(keys.sessions, *login)
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
        return self.fn.parse_login(reply)

    async def _atomic(self, first: list[Any], second: list[Any]) -> Any:
        """Two commands in one MULTI/EXEC on the one server, retried like any call; the second's reply."""

        async def once() -> Any:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.execute_command(*first)
                pipe.execute_command(*second)
                replies = await pipe.execute(raise_on_error=False)
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
            return replies[1]

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
    ) -> ChangeResult:
        """Remove a session; with ``conn_id``, only if it still belongs to that connection.

        ``op_id`` (default: a new one) identifies the operation: calling again with the same one after an
        unknown outcome (a timeout) applies nothing twice and still fans the change out. lastSeen is the
        evidence: ``seen_at_ms`` on the Redis clock if given, else ``seen_age_ms`` before now.
        Ids are not held to the identifier rule here: a session stored before it must still end.
        """
        if not isinstance(user_id, str) or not user_id or not isinstance(imei, str) or not imei:
            raise ParamError("userId and imei must be non-empty strings")
        keys = self.user(app_id, user_id)
        args = self.fn.logout_args(
            app_id, user_id, client_type, imei, conn_id, op_id or new_conn_id(), seen_age_ms, seen_at_ms
        )
        commands: list[Command] = [(keys.sessions, fcall("presence_logout", keys.state(), args))]
        if node_id and conn_id:
            node_set = self.keys.node_sessions(node_id)
            commands.append((node_set, ["SREM", node_set, node_member(app_id, user_id, client_type, imei, conn_id)]))
        replies = await self._run(commands)
        return await self._spread(app_id, user_id, self.fn.parse_logout(replies[0]), NOTIFY_STATUS, "offline")

    async def set_custom_status(
        self, app_id: int, user_id: str, custom_status: int, custom_text: str = "", *, origin_conn_id: str = ""
    ) -> ChangeResult:
        check_user_id("userId", user_id)
        if isinstance(custom_status, bool) or not isinstance(custom_status, int):
            raise ParamError("customStatus must be an integer")
        if not -(2**53) < custom_status < 2**53:
            raise ParamError("customStatus must fit in 53 bits")
        size = len(custom_text.encode())
        if size > self.limits.custom_text_bytes:
            raise ParamError(f"customText must be at most {self.limits.custom_text_bytes} UTF-8 bytes, got {size}")
        # One operation id for the call and Store.run's retries of it: a repeat after a timeout applies nothing.
        change = await self.fn.set_custom_status(
            self.user(app_id, user_id), app_id, user_id, custom_status, custom_text, origin_conn_id, new_conn_id()
        )
        return await self._spread(app_id, user_id, change, NOTIFY_CUSTOM, "custom")

    async def _spread(self, app_id: int, user_id: str, change: StatusChange, command: int, kind: str) -> ChangeResult:
        delivered = 0
        if change.changed:
            STATUS_CHANGES.labels(kind).inc()
            if change.recipients:
                delivered = await self.fanout(
                    app_id, change.recipients, command, change.data, user_id=user_id, version=change.version
                )
                FANOUT_ENTRIES.inc(delivered)
        return ChangeResult(
            changed=change.changed,
            recipients=len(change.recipients),
            delivered=delivered,
            kicked=change.kicked,
            inbox_last_id=change.inbox_last_id,
            version=change.version,
        )

    async def fanout(
        self, app_id: int, recipients: Iterable[str], command: int, data: bytes, *, user_id: str, version: int
    ) -> int:
        """presence_fanout per slot, one pipeline per primary (one call on one server); entries written.

        ``user_id`` changed to ``version`` (the one in ``data``): a recipient that already got that version or
        a newer one of this command is skipped, so fan-outs that overtake each other leave every recipient on
        the newest state, and a repeat writes nothing twice (safe to retry; Store.run retries it).
        On a cluster the calls do not publish: each gateway gets one doorbell for the whole change,
        PUBLISHed after the fan-out (one pipeline to one node; the cluster bus carries it to the gateway).
        """
        base = self.keys.base
        triples = [(b + "sessions", b + "inbox", b + "pushed") for b in (base(app_id, r) for r in recipients)]
        ring = not self._cluster
        groups = self.store.group([t[0] for t in triples])
        commands: list[Command] = []
        for group in groups:
            chunk = [triples[i] for i in group]
            commands.append((chunk[0][0], self.fn.fanout_command(chunk, command, data, user_id, version, ring=ring)))
        written = 0
        bells: dict[str, list[str]] = {}
        for reply in await self._run(commands):
            count, nodes = self.fn.parse_fanout(reply)
            written += count
            for node, inboxes in nodes.items():
                bells.setdefault(node, []).extend(inboxes)
        if bells:
            channel = self.keys.doorbell
            await self._run(
                [(None, ["PUBLISH", channel(node), doorbell_message(inboxes)]) for node, inboxes in bells.items()]
            )
        return written

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
        await self._per_slot(
            [self.user(app_id, u).subscribers for u in users],
            lambda keys, _: self.fn.subscribers_add_command(keys, subscriber, expire_at),
        )
        return SubscribeResult(expireAt=expire_at, liveSubscriptions=live)

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
        """
        own = self.user(app_id, from_id).friends
        mine = self.fn.friends_command(add, [own] * len(users), [(from_id, u) for u in users])
        changed = int(await self._one(own, *mine))
        await self._per_slot(
            [self.user(app_id, u).friends for u in users],
            lambda keys, idx: self.fn.friends_command(add, keys, [(users[i], from_id) for i in idx]),
        )
        return changed

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
        for group in self.store.group([p[0] for p in pairs]):
            chunk = [pairs[i] for i in group]
            commands.append((chunk[0][0], self.fn.query_command(chunk, [users[i] for i in group])))
        result: dict[str, UserOnlineStatus] = {}
        for raw in await self._run(commands):
            result.update(self.fn.parse_query(raw))
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
                    app_id, user_id, client_type, imei, conn_id=conn_id, node_id=node_id, seen_at_ms=seen_at
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

    # --- inboxes (read by the gateway) ---

    def inbox_key(self, app_id: int, user_id: str) -> str:
        return self.user(app_id, user_id).inbox

    def doorbell_channel(self, node_id: str) -> str:
        return self.keys.doorbell(node_id)

    async def read_inboxes(self, cursors: dict[str, str], count: int = 100) -> list[tuple[str, list[RawEntry]]]:
        """Entries after each cursor, fields as a flat list: one XREAD for all inboxes on one server; on a
        cluster one XREAD per slot (XREAD may name one slot only), pipelined per primary, primaries in parallel.

        Read (off a cluster) through a client that shares the pool but skips redis-py's reply parsing: the
        gateway reads every push through here, and turning each entry into a dict cost more than the read.
        """
        if not cursors:
            return []
        if not self._cluster:
            try:
                reply = await self.store.retrying(lambda: self._raw_reader.xread(cursors, count=count))
            except RedisUnavailable as exc:
                raise UnavailableError("redis is unavailable") from exc
            return _flat_streams(reply)
        keys = list(cursors)
        commands: list[Command] = []
        for group in self.store.group(keys):
            names = [keys[i] for i in group]
            commands.append((names[0], ["XREAD", "COUNT", count, "STREAMS", *names, *(cursors[k] for k in names)]))
        out: list[tuple[str, list[RawEntry]]] = []
        for reply in await self._run(commands):
            items = reply.items() if isinstance(reply, dict) else reply or []
            for k, entries in items:
                name = k.decode() if isinstance(k, bytes) else k
                out.append((name, [(i, [x for kv in fields.items() for x in kv]) for i, fields in entries]))
        return out

    async def inbox_resume(self, inbox: str, last_id: str) -> bool:
        """Whether an inbox still holds every entry after ``last_id`` (else the client must re-pull).

        Call it only for a device whose session survived (a reconnect within the grace); entries
        are never written for a user that was offline, so a lost session always means re-pull.
        """
        after = _id_tuple(last_id)
        try:
            (info,) = await self.store.run([(inbox, ["XINFO STREAM", inbox])])
        except RedisUnavailable as exc:
            raise UnavailableError("redis is unavailable") from exc
        if isinstance(info, ResponseError):  # no such key: nothing was written since
            return True
        if isinstance(info, BaseException):
            raise info
        trimmed = int(info["entries-added"]) - int(info["length"])
        first = info.get("first-entry")
        return trimmed == 0 or (first is not None and _id_tuple(first[0].decode()) <= after)

    # --- helpers ---

    async def _run(self, commands: Sequence[Command]) -> list[Any]:
        """``Store.run`` with our error mapping: a library error as ParamError/PresenceError, 503 when away."""
        try:
            return await self.store.run(commands, raise_errors=True)
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


RawEntry = tuple[bytes, list[bytes]]
_CONN_ID = re.compile(rb'"connId":"([^"]*)"')


def _flat_streams(reply: Any) -> list[tuple[str, list[RawEntry]]]:
    """A raw XREAD reply (a map on RESP3, pairs on RESP2) as [(inbox, [(id, [field, value, ...])])]."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    return [(key.decode(), [(entry[0], entry[1]) for entry in entries]) for key, entries in items]


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        raise ParamError(f"lastEventId {entry_id!r} is not a stream id like 1700000000000-0") from None
