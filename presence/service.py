"""The service facade: the presence operations. Validation, then the user's own function, then one
fan-out per Redis node.

Status changes (login, logout, custom status) with their fan-out, subscriptions, friends and queries.
Transport code (gateway, REST) calls this; it never touches sockets. Library calls are built and run by
``presence/functions.py``, keys spelled by ``presence/keys.py``; gateway node bookkeeping is
``presence/nodes.py`` (``Presence.nodes``), the change feed relay and the online counters
``presence/feed.py`` (``Presence.feed``, ``Presence.counters``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from presence import functions
from presence.config import Settings
from presence.errors import ParamError, PresenceError, UnavailableError
from presence.feed import OUTBOX_MAXLEN, FeedRelay, OnlineCounters, Relay
from presence.functions import (
    Batch,
    Call,
    FanoutReply,
    Functions,
    Pending,
    StatusChange,
    WriteOptions,
)
from presence.ids import check_imei, check_user_id
from presence.keys import KeySchema, UserKeys, doorbell_message
from presence.library import ensure_library, ensure_library_on
from presence.limits import CUSTOM_TEXT_BYTES, MAX_SESSIONS, SUB_TIME_MS
from presence.metrics import FANOUT_ENTRIES, STATUS_CHANGES
from presence.models import (
    ChangeResult,
    FriendshipPack,
    SubscribeResult,
    SubscriptionList,
    UserOnlineStatus,
)
from presence.nodes import NodeRegistry, node_member
from presence.resolver import Resolver
from presence.store import Store

log = logging.getLogger("presence.service")
_pack_json = msgspec.json.Encoder()

NOTIFY_STATUS = 4004
NOTIFY_CUSTOM = 4006
NOTIFY_FRIENDSHIP = 4010  # ours: friends added or deleted, with their status
CLIENT_TYPES = range(0, 6)


@dataclass(frozen=True, slots=True)
class Limits:
    """The service's own caps (the library's fixed limits are ``presence/limits.py``)."""

    subscribe_batch: int = 100
    live_subscriptions: int = 3000  # passed to presence_subscribe, which enforces it
    query_users: int = 500
    import_friends: int = 1000
    # Recipients per presence_fanout call: bounds how long one call holds Redis (calls are pipelined).
    fanout_chunk: int = 100


def check_user_list(field: str, values: Sequence[object], most: int) -> list[str]:
    if len(values) > most:
        raise ParamError(f"{field} has {len(values)} items, at most {most}")
    out = [check_user_id(f"{field}[{i}]", v) for i, v in enumerate(values)]
    return list(dict.fromkeys(out))


def new_conn_id() -> str:
    return secrets.token_hex(8)


class Presence:
    """Presence operations for every app, on one Redis (standalone, Sentinel or Cluster).

    Every function call names keys of one slot and goes straight to the primary owning it; the calls
    of one operation go as one pipeline per primary, the primaries in parallel (``Functions.batch``).
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
        # The raw client, for tests that look at keys directly (tests/test_functions.py and others); the
        # service itself goes through ``self.fn`` (presence/functions.py).
        self.redis = self.store.client
        self.keys = KeySchema(self.settings.prefix)
        self.fn = Functions(self.store)
        inbox_ttl_ms = int(self.settings.inbox_ttl * 1000)
        self.options = WriteOptions(
            inbox_maxlen=self.settings.inbox_maxlen,
            inbox_ttl_ms=inbox_ttl_ms,
            doorbell_prefix=self.keys.doorbell_prefix,
            outbox_maxlen=OUTBOX_MAXLEN,
            outbox_ttl_ms=inbox_ttl_ms,
        )
        self._cluster = self.store.cluster
        self.counters = OnlineCounters(self.fn, self.keys, self._cluster)
        self.feed = FeedRelay(self.fn, self.keys, self.settings, self.store, self.counters)
        self.nodes = NodeRegistry(self.fn, self.keys, self.logout)
        # Change calls that gave up with an unknown outcome, replayed (same op id) once Redis answers.
        self.resolver = Resolver()

    async def start(self) -> bool:
        """Make sure the library on every primary is ours; True when it had to load it somewhere."""
        return await ensure_library(self.store)

    async def _load_library_on(self, node: ClusterNode | None) -> None:
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
        max_sessions: int = MAX_SESSIONS,
    ) -> ChangeResult:
        """Add a session; LimitError (90005) when the user already has ``max_sessions`` others."""
        check_user_id("userId", user_id)
        self._check_session(client_type, imei)
        conn_id = conn_id or new_conn_id()
        call = functions.login(
            self.user(app_id, user_id),
            self.feed.feed_keys(app_id, user_id),
            self.options,
            app_id=app_id,
            user_id=user_id,
            conn_id=conn_id,
            client_type=client_type,
            imei=imei,
            broker_id=node_id,
            broker_host=node_host,
            client_version=version,
            login_model=login_model,
            max_sessions=max_sessions,
        )
        if node_id:
            member = node_member(app_id, user_id, client_type, imei, conn_id)
            change, pending = await self._login_on_node(app_id, user_id, call, node_id, member)
        else:
            batch = self.fn.batch()
            login = batch.add(call)
            pending = self.feed.read_outbox(batch, app_id, user_id)
            await batch.run()
            change = login.result()
            pending.result()
        return await self._spread(app_id, user_id, change, pending, NOTIFY_STATUS, "online")

    async def _login_on_node(
        self, app_id: int, user_id: str, call: Call[StatusChange], node_id: str, member: str
    ) -> tuple[StatusChange, Pending[Any]]:
        """The node's record of the session exists before the session does, so the reaper finds every session.

        One server: SADD and presence_login in one MULTI/EXEC (both run or neither). A cluster (other
        slots): the SADD succeeds first. Either way, a login the library refuses takes the record back (a
        leftover one is harmless: logging out a session that does not exist changes nothing).
        """
        node_set = self.keys.node_sessions(node_id)
        if self._cluster:
            await self.fn.command(node_set, "SADD", node_set, member)
            batch = self.fn.batch()
        else:
            batch = self.fn.batch(atomic=True)
            batch.command(node_set, "SADD", node_set, member)
        login = batch.add(call)
        pending = self.feed.read_outbox(batch, app_id, user_id)
        # Redis away for the whole retry window raises here: the outcome is unknown, so the record stays
        # (the node's reconciliation logs out what no socket holds).
        await batch.run()
        if isinstance(login.error, PresenceError):  # refused by the library: no session exists
            await self._forget_member(node_set, member)
        change = login.result()
        pending.result()
        return change, pending

    async def _forget_member(self, node_set: str, member: str) -> None:
        try:
            await self.fn.command(node_set, "SREM", node_set, member)
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
            result: ChangeResult = await call
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
        call = functions.logout(
            self.user(app_id, user_id),
            self.feed.feed_keys(app_id, user_id),
            self.options,
            app_id=app_id,
            user_id=user_id,
            client_type=client_type,
            imei=imei,
            conn_id=conn_id,
            op_id=op_id,
            reason=reason,
            seen_age_ms=seen_age_ms,
            seen_at_ms=seen_at_ms,
        )
        batch = self.fn.batch()
        logout = batch.add(call)
        pending = self.feed.read_outbox(batch, app_id, user_id)
        forget = None
        if node_id and conn_id:
            node_set = self.keys.node_sessions(node_id)
            member = node_member(app_id, user_id, client_type, imei, conn_id)
            forget = batch.command(node_set, "SREM", node_set, member)
        await batch.run()
        change = logout.result()
        pending.result()
        if forget is not None:
            forget.result()
        return await self._spread(app_id, user_id, change, pending, NOTIFY_STATUS, "offline")

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
        if size > CUSTOM_TEXT_BYTES:
            raise ParamError(f"customText must be at most {CUSTOM_TEXT_BYTES} UTF-8 bytes, got {size}")
        # One operation id for the call, Store.run's retries and the resolver's replays: a repeat applies nothing.
        call = functions.set_custom_status(
            self.user(app_id, user_id),
            self.feed.feed_keys(app_id, user_id),
            self.options,
            app_id=app_id,
            user_id=user_id,
            custom_status=custom_status,
            custom_text=custom_text,
            origin_conn_id=origin_conn_id,
            op_id=op_id,
        )
        batch = self.fn.batch()
        status = batch.add(call)
        pending = self.feed.read_outbox(batch, app_id, user_id)
        await batch.run()
        change = status.result()
        pending.result()
        return await self._spread(app_id, user_id, change, pending, NOTIFY_CUSTOM, "custom")

    async def _spread(
        self, app_id: int, user_id: str, change: StatusChange, pending: Pending[Any], command: int, kind: str
    ) -> ChangeResult:
        """The fan-out of a change and the relay of the user's feed entries, in one pipeline per primary."""
        delivered = 0
        if change.changed:
            STATUS_CHANGES.labels(kind).inc()
        relay = self.feed.relay(app_id, user_id, pending)
        recipients = change.recipients if change.changed else []
        if recipients or relay is not None:
            delivered = await self._fanout(app_id, recipients, command, change.data, user_id, change.version, relay)
            if recipients:
                FANOUT_ENTRIES.inc(delivered)
        return ChangeResult(
            changed=change.changed,
            recipients=len(change.recipients),
            delivered=delivered,
            kicked=change.kicked,
            inbox_last_id=change.inbox_last_id or "0-0",
            version=change.version,
        )

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
        return await self._fanout(app_id, recipients, command, data, user_id, version, None)

    async def _fanout(
        self,
        app_id: int,
        recipients: Iterable[str],
        command: int,
        data: bytes,
        user_id: str,
        version: int,
        relay: Relay | None,
    ) -> int:
        """``fanout`` with the feed ``relay`` of the change in the same pipelines; entries written. Without
        ``user_id`` (friendship events) no version ordering. On a cluster the outbox trim after the relay
        goes in one request with the doorbells: after the fan-out, one more request at most."""
        recipient = self.keys.recipient if user_id else self.keys.recipient_unordered
        groups: list[Sequence[str]] = [recipient(app_id, r) for r in recipients]
        size = self.limits.fanout_chunk
        # One call per chunk of a slot group, all in the same pipeline: no single call holds Redis for the
        # whole list (1000 friends in one call was ~20 ms). Calls ring the gateways themselves only when
        # there is one call; else, as on a cluster, they name the nodes and each gateway gets one doorbell.
        chunks = [
            group[start : start + size]
            for group in self.store.group([g[0] for g in groups])
            for start in range(0, len(group), size)
        ]
        ring = not self._cluster and len(chunks) == 1
        batch = self.fn.batch()
        fans: list[Pending[FanoutReply]] = [
            batch.add(
                functions.fanout(
                    [groups[i] for i in indexes],
                    self.options,
                    command,
                    data,
                    user_id=user_id,
                    version=version,
                    ring=ring,
                )
            )
            for indexes in chunks
        ]
        appended = batch.add(relay.call) if relay is not None else None
        await batch.run()
        written = 0
        bells: dict[str, list[str]] = {}
        for fan in fans:
            reply = fan.result()
            written += reply.written
            for node, inboxes in reply.unrung.items():
                bells.setdefault(node, []).extend(inboxes)
        trim = self.feed.trim_after(relay, appended) if relay is not None and appended is not None else None
        trimmed: Pending[int] | None = None
        if bells or trim is not None:
            then = self.fn.batch()
            # PUBLISH may go to any node (the cluster bus carries it), so it rides with the trim's request.
            route = trim.keys[0] if trim is not None else None
            rings = [
                then.command(route, "PUBLISH", self.keys.doorbell(node), doorbell_message(inboxes))
                for node, inboxes in bells.items()
            ]
            trimmed = then.add(trim) if trim is not None else None
            await then.run()
            for rung in rings:
                rung.result()
        if relay is not None and appended is not None:
            self.feed.relayed(relay, appended, trimmed)
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
        if isinstance(sub_time_ms, bool) or not isinstance(sub_time_ms, int) or not (1 <= sub_time_ms <= SUB_TIME_MS):
            raise ParamError(f"subTime must be between 1 and {SUB_TIME_MS} ms")
        # The subscriber's side first (it enforces the cap), then the targets' sides per slot.
        own = await self.fn.call(
            functions.subscribe(
                self.user(app_id, subscriber).subscriptions,
                subscriber,
                users,
                sub_time_ms,
                self.limits.live_subscriptions,
            )
        )
        # The targets' sides, then their status, in the same pipelines (per slot: the add runs first), so
        # any change after the snapshot is pushed: no gap between the pull and the subscription.
        subs = [self.user(app_id, u).subscribers for u in users]
        batch = self.fn.batch()
        adds = [
            batch.add(functions.subscribers_add([subs[i] for i in group], subscriber, own.expire_at))
            for group in self.store.group(subs)
        ]
        queries = self._queue_query(batch, app_id, users)
        await batch.run()
        for add in adds:
            add.result()
        snapshot: dict[str, UserOnlineStatus] = {}
        for query in queries:
            snapshot.update(query.result())
        return SubscribeResult(expireAt=own.expire_at, liveSubscriptions=own.live, users=snapshot)

    async def subscriptions(self, app_id: int, subscriber: str) -> SubscriptionList:
        """The subscriber's live subscriptions with their expiry (ms, Redis clock), the soonest first."""
        check_user_id("identifier", subscriber)
        key = self.user(app_id, subscriber).subscriptions
        return await self.fn.call(functions.subscriptions(key, self.limits.live_subscriptions))

    async def unsubscribe(self, app_id: int, subscriber: str, targets: Sequence[str]) -> int:
        check_user_id("identifier", subscriber)
        if not targets:
            raise ParamError("subUserId must name at least one user")
        users = check_user_list("subUserId", targets, self.limits.subscribe_batch)
        removed = await self.fn.call(
            functions.unsubscribe(self.user(app_id, subscriber).subscriptions, subscriber, users)
        )
        subs = [self.user(app_id, u).subscribers for u in users]
        batch = self.fn.batch()
        sides = [
            batch.add(functions.subscribers_remove([subs[i] for i in group], subscriber))
            for group in self.store.group(subs)
        ]
        await batch.run()
        for side in sides:
            side.result()
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
        build = functions.friends_add if add else functions.friends_remove
        own = self.user(app_id, from_id).friends
        # Which of them the owner's side has before the change (SMISMEMBER, Redis >= 6.2): the ones that move.
        before = await self.fn.command(own, "SMISMEMBER", own, *users)
        moved = [u for u, had in zip(users, before, strict=True) if bool(int(had)) != add]
        changed = await self.fn.call(build([own] * len(users), [(from_id, u) for u in users]))
        sets = [self.user(app_id, u).friends for u in users]
        batch = self.fn.batch()
        sides = [
            batch.add(build([sets[i] for i in group], [(users[i], from_id) for i in group]))
            for group in self.store.group(sets)
        ]
        await batch.run()
        for side in sides:
            side.result()
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
        friends = sorted(m.decode() for m in await self.fn.command(key, "SMEMBERS", key))
        return await self._query(app_id, friends)

    async def _query(self, app_id: int, users: list[str]) -> dict[str, UserOnlineStatus]:
        """presence_query per slot: one pipeline per primary, the primaries in parallel (one call on one server)."""
        if not users:
            return {}
        batch = self.fn.batch()
        queries = self._queue_query(batch, app_id, users)
        await batch.run()
        result: dict[str, UserOnlineStatus] = {}
        for query in queries:
            result.update(query.result())
        return result

    def _queue_query(self, batch: Batch, app_id: int, users: list[str]) -> list[Pending[dict[str, UserOnlineStatus]]]:
        """One presence_query_raw per slot group of ``users``, queued in ``batch``."""
        pairs = [self.keys.presence_keys(app_id, u) for u in users]
        return [
            batch.add(functions.query_raw([pairs[i] for i in group], [users[i] for i in group]))
            for group in self.store.group([p[0] for p in pairs])
        ]

    # --- helpers ---

    def _check_session(self, client_type: int, imei: str) -> None:
        if isinstance(client_type, bool) or client_type not in CLIENT_TYPES:
            raise ParamError("clientType must be 0..5")
        check_imei("imei", imei)
