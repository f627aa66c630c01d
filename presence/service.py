"""The service facade: validation, then the user's own function, then one fan-out per Redis node.

Transport code (gateway, REST) calls this; it never touches sockets, and only it and the key
schema know Redis key names.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError

from presence.config import Settings
from presence.errors import ParamError
from presence.functions import InboxSettings, PresenceFunctions, StatusChange, ensure_library, raise_mapped
from presence.ids import check_imei, check_user_id
from presence.keys import KeySchema, UserKeys
from presence.metrics import FANOUT_ENTRIES, REDIS_LATENCY, STATUS_CHANGES
from presence.models import ChangeResult, SubscribeResult, UserOnlineStatus

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
    """Presence operations for every app, on one Redis (standalone, Sentinel or Cluster)."""

    def __init__(self, redis: Redis, settings: Settings | None = None, limits: Limits | None = None) -> None:
        self.settings = settings or Settings()
        self.limits = limits or Limits()
        self.redis = redis
        self.keys = KeySchema(self.settings.prefix)
        self.fn = PresenceFunctions(
            redis,
            InboxSettings(
                maxlen=self.settings.inbox_maxlen,
                ttl_ms=int(self.settings.inbox_ttl * 1000),
                doorbell_prefix=self.keys.doorbell_prefix,
            ),
        )
        self._cluster = isinstance(redis, RedisCluster)
        if not self._cluster:
            self._raw_reader = Redis(connection_pool=redis.connection_pool)
            self._raw_reader.set_response_callback("XREAD", lambda response, **_: response)

    async def start(self) -> bool:
        """Make sure the library on the server is ours; True when it had to load it."""
        return await ensure_library(self.redis)

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
            # Registered before the login: a crash in between leaves the reaper a harmless no-op.
            started = time.perf_counter()
            member = node_member(app_id, user_id, client_type, imei, conn_id)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.sadd(self.keys.node_sessions(node_id), member)
                pipe.fcall("presence_login", len(keys.state()), *keys.state(), *args)
                # Unraised, so an error keeps its own message (redis-py rewrites a raised one).
                added, reply = await pipe.execute(raise_on_error=False)
            for error in (added, reply):
                if isinstance(error, ResponseError):
                    if not isinstance(added, ResponseError):
                        await self.redis.srem(self.keys.node_sessions(node_id), member)  # no login, no member
                    raise_mapped(error)
            REDIS_LATENCY.labels("presence_login").observe(time.perf_counter() - started)
            change = self.fn.parse_login(reply)
        else:
            change = await self.fn.login(keys, args)
        return await self._spread(app_id, change, NOTIFY_STATUS, "online")

    async def logout(
        self, app_id: int, user_id: str, client_type: int, imei: str, *, conn_id: str = "", node_id: str = ""
    ) -> ChangeResult:
        """Remove a session; with ``conn_id``, only if it still belongs to that connection.

        Ids are not held to the identifier rule here: a session stored before it must still end.
        """
        if not isinstance(user_id, str) or not user_id or not isinstance(imei, str) or not imei:
            raise ParamError("userId and imei must be non-empty strings")
        keys = self.user(app_id, user_id)
        args = self.fn.logout_args(app_id, user_id, client_type, imei, conn_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.fcall("presence_logout", len(keys.state()), *keys.state(), *args)
            if node_id and conn_id:
                pipe.srem(self.keys.node_sessions(node_id), node_member(app_id, user_id, client_type, imei, conn_id))
            replies = await self._run(pipe)
        return await self._spread(app_id, self.fn.parse_logout(replies[0]), NOTIFY_STATUS, "offline")

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
        change = await self.fn.set_custom_status(
            self.user(app_id, user_id), app_id, user_id, custom_status, custom_text, origin_conn_id
        )
        return await self._spread(app_id, change, NOTIFY_CUSTOM, "custom")

    async def _spread(self, app_id: int, change: StatusChange, command: int, kind: str) -> ChangeResult:
        delivered = 0
        if change.changed:
            STATUS_CHANGES.labels(kind).inc()
            if change.recipients:
                delivered = await self.fanout(app_id, change.recipients, command, change.data)
                FANOUT_ENTRIES.inc(delivered)
        return ChangeResult(
            changed=change.changed,
            recipients=len(change.recipients),
            delivered=delivered,
            kicked=change.kicked,
            inbox_last_id=change.inbox_last_id,
        )

    async def fanout(self, app_id: int, recipients: Iterable[str], command: int, data: bytes) -> int:
        """One presence_fanout per Redis node (one call on standalone); returns entries written."""
        base = self.keys.base
        pairs = [(b + "sessions", b + "inbox") for b in (base(app_id, r) for r in recipients)]
        if not self._cluster:
            return (await self.fn.fanout(pairs, command, data))[0]
        by_slot: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for pair in pairs:
            by_slot[key_slot(pair[0].encode())].append(pair)
        i = self.fn.inbox
        async with self.redis.pipeline(transaction=False) as pipe:
            for group in by_slot.values():
                keys = [k for pair in group for k in pair]
                pipe.fcall("presence_fanout", len(keys), *keys, command, data, i.maxlen, i.ttl_ms, i.doorbell_prefix)
            replies = await self._run(pipe)
        return sum(int(r[0]) for r in replies)

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
        expire_at, live = await self.fn.subscribe(
            self.user(app_id, subscriber).subscriptions,
            [self.user(app_id, u).subscribers for u in users],
            subscriber,
            users,
            sub_time_ms,
            self.limits.live_subscriptions,
        )
        return SubscribeResult(expireAt=expire_at, liveSubscriptions=live)

    async def unsubscribe(self, app_id: int, subscriber: str, targets: Sequence[str]) -> int:
        check_user_id("identifier", subscriber)
        if not targets:
            raise ParamError("subUserId must name at least one user")
        users = check_user_list("subUserId", targets, self.limits.subscribe_batch)
        return await self.fn.unsubscribe(
            self.user(app_id, subscriber).subscriptions,
            [self.user(app_id, u).subscribers for u in users],
            subscriber,
            users,
        )

    async def add_friend(self, app_id: int, from_id: str, to_id: str) -> int:
        return await self.import_friends(app_id, from_id, [to_id], field="toId")

    async def import_friends(self, app_id: int, from_id: str, to_ids: Sequence[str], field: str = "friendItem") -> int:
        from_id, users = self._friend_args(from_id, to_ids, field)
        return await self.fn.friends_add(
            self.user(app_id, from_id).friends, [self.user(app_id, u).friends for u in users], from_id, users
        )

    async def delete_friend(self, app_id: int, from_id: str, to_id: str) -> int:
        from_id, users = self._friend_args(from_id, [to_id], "toId")
        return await self.fn.friends_remove(
            self.user(app_id, from_id).friends, [self.user(app_id, u).friends for u in users], from_id, users
        )

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
        friends = sorted(m.decode() for m in await self.redis.smembers(self.user(app_id, user_id).friends))
        return await self._query(app_id, friends)

    async def _query(self, app_id: int, users: list[str]) -> dict[str, UserOnlineStatus]:
        base = self.keys.base
        pairs = [(b + "sessions", b + "status") for b in (base(app_id, u) for u in users)]
        if not self._cluster or not users:
            return await self.fn.query(pairs, users)
        by_slot: dict[int, list[int]] = defaultdict(list)
        for i, pair in enumerate(pairs):
            by_slot[key_slot(pair[0].encode())].append(i)
        result: dict[str, UserOnlineStatus] = {}
        for idx in by_slot.values():
            result.update(await self.fn.query([pairs[i] for i in idx], [users[i] for i in idx]))
        return result

    # --- gateway nodes ---

    async def node_heartbeat(self, node_id: str) -> bool:
        """Beat; False when the node was not registered (first beat, or reaped meanwhile)."""
        was, _ = await self.fn.node_heartbeat(self.keys.nodes, node_id)
        return was

    async def node_leave(self, node_id: str) -> None:
        await self.redis.zrem(self.keys.nodes, node_id)

    async def expired_nodes(self, ttl_s: float) -> list[str]:
        return await self.fn.nodes_expired(self.keys.nodes, int(ttl_s * 1000))

    async def reap_node(self, node_id: str, batch: int = 200) -> int:
        """Log out every session a node still holds, then forget the node. Safe to run twice at once."""
        key = self.keys.node_sessions(node_id)
        reaped = 0
        while True:
            members = [m.decode() for m in await self.redis.srandmember(key, batch)]
            if not members:
                break
            for member in members:
                app_id, user_id, client_type, imei, conn_id = parse_node_member(member)
                result = await self.logout(app_id, user_id, client_type, imei, conn_id=conn_id, node_id=node_id)
                reaped += int(result.changed)
        await self.redis.zrem(self.keys.nodes, node_id)
        return reaped

    async def node_sessions(self, node_id: str) -> int:
        return int(await self.redis.scard(self.keys.node_sessions(node_id)))

    async def node_session_members(self, node_id: str) -> set[str]:
        """``appId|userId|clientType|imei|connId`` of every session recorded for a node."""
        return {m.decode() for m in await self.redis.smembers(self.keys.node_sessions(node_id))}

    # --- inboxes (read by the gateway) ---

    def inbox_key(self, app_id: int, user_id: str) -> str:
        return self.user(app_id, user_id).inbox

    def doorbell_channel(self, node_id: str) -> str:
        return self.keys.doorbell(node_id)

    async def read_inboxes(self, cursors: dict[str, str], count: int = 100) -> list[tuple[str, list[RawEntry]]]:
        """Entries after each cursor, fields as a flat list: one XREAD for all inboxes (per inbox on a cluster).

        Read through a client that shares the pool but skips redis-py's reply parsing: the gateway
        reads every push through here, and turning each entry into a dict cost more than the read.
        """
        if not cursors:
            return []
        if not self._cluster:
            return _flat_streams(await self._raw_reader.xread(cursors, count=count))
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, cursor in cursors.items():
                pipe.xread({key: cursor}, count=count)
            replies = await self._run(pipe)
        return [
            (k.decode(), [(i, [x for kv in fields.items() for x in kv]) for i, fields in entries])
            for reply in replies
            for k, entries in reply or []
        ]

    async def inbox_resume(self, inbox: str, last_id: str) -> bool:
        """Whether an inbox still holds every entry after ``last_id`` (else the client must re-pull).

        Call it only for a device whose session survived (a reconnect within the grace); entries
        are never written for a user that was offline, so a lost session always means re-pull.
        """
        after = _id_tuple(last_id)
        try:
            info = await self.redis.xinfo_stream(inbox)
        except ResponseError:  # no such key: nothing was written since
            return True
        trimmed = int(info["entries-added"]) - int(info["length"])
        first = info.get("first-entry")
        return trimmed == 0 or (first is not None and _id_tuple(first[0].decode()) <= after)

    # --- helpers ---

    @staticmethod
    async def _run(pipe: Pipeline) -> list[Any]:
        try:
            return await pipe.execute()
        except ResponseError as exc:
            raise_mapped(exc)

    def _check_session(self, client_type: int, imei: str) -> None:
        if isinstance(client_type, bool) or client_type not in CLIENT_TYPES:
            raise ParamError("clientType must be 0..5")
        check_imei("imei", imei, self.limits.imei_bytes)


RawEntry = tuple[bytes, list[bytes]]


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
