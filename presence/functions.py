"""Typed async wrappers around the ``presence`` Redis Functions library (lua/presence.lua)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import msgspec
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from presence.errors import LimitError, ParamError, PresenceError, UnavailableError
from presence.keys import UserKeys
from presence.metrics import REDIS_LATENCY
from presence.models import UserOnlineStatus
from presence.resources import resource_path
from presence.store import RedisUnavailable, Store

LIBRARY_NAME = "presence"
_query_decoder = msgspec.json.Decoder(dict[str, UserOnlineStatus])
_json = msgspec.json.Encoder().encode


class _Versioned(msgspec.Struct):
    version: int = 0


_version_decoder = msgspec.json.Decoder(_Versioned)


def pack_version(data: bytes) -> int:
    """The user's version a 4004/4006 pack carries (0 from a library older than versions)."""
    return _version_decoder.decode(data).version


def library_source() -> str:
    return resource_path("lua/presence.lua").read_text()


def library_version() -> str:
    """The VERSION the library file declares (what ``presence_version`` answers once it is loaded)."""
    match = re.search(r"^local VERSION = '([^']+)'", library_source(), re.MULTILINE)
    return match.group(1) if match else ""


async def ensure_library(redis: Redis | RedisCluster | Store) -> bool:
    """Load the library with FUNCTION LOAD REPLACE on every primary that lacks this exact code.

    Returns True when it loaded anywhere. The code itself is the version, so an edited file always reloads.
    """
    store = redis if isinstance(redis, Store) else Store.wrap(redis)
    if isinstance(store.client, RedisCluster):
        await store.client.initialize()
    loaded = False
    for node in store.primaries():
        loaded |= await ensure_library_on(store, node)
    return loaded


async def ensure_library_on(store: Store, node: Any) -> bool:
    """``ensure_library`` for one node (a cluster primary, or None: the one server)."""
    if await _has_library(store, node):
        return False
    await store.on_node(node, "FUNCTION", "LOAD", "REPLACE", library_source())
    return True


async def library_health(store: Store, timeout: float) -> list[tuple[str, str | BaseException]]:
    """(node, the library version it runs, or the error) for every primary, asked in parallel; a primary
    that does not answer within ``timeout`` seconds gets a TimeoutError.

    A primary without the library gets it loaded (an empty restart, FUNCTION FLUSH) and is asked again.
    """

    async def ask(node: Any) -> str | BaseException:
        try:
            try:
                reply = await store.on_node(node, "FCALL_RO", "presence_version", 0)
            except ResponseError as exc:
                if "Function not found" not in str(exc):
                    raise
                await ensure_library_on(store, node)
                reply = await store.on_node(node, "FCALL_RO", "presence_version", 0)
            return _text(reply)
        except Exception as exc:
            return exc

    nodes = store.primaries()
    tasks = [asyncio.ensure_future(ask(node)) for node in nodes]
    await asyncio.wait(tasks, timeout=timeout)
    out: list[tuple[str, str | BaseException]] = []
    for node, task in zip(nodes, tasks, strict=True):
        if not task.done():
            task.cancel()  # not awaited: a hung socket may hold the cancel until it times out
        answer = task.result() if task.done() else TimeoutError(f"no answer within {timeout:g} s")
        out.append((node.name if node is not None else "server", answer))
    return out


async def library_status(store: Store) -> list[tuple[str, bool]]:
    """(node, has this exact library) for every primary: what ``presence functions show --redis`` prints."""
    return [
        (node.name if node is not None else "server", await _has_library(store, node)) for node in store.primaries()
    ]


async def _has_library(store: Store, node: Any) -> bool:
    source = library_source()
    listed = await store.on_node(node, "FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_NAME, "WITHCODE")
    for lib in listed or []:
        info = lib if isinstance(lib, dict) else dict(zip(lib[::2], lib[1::2], strict=False))
        info = {_text(k): v for k, v in info.items()}
        if _text(info.get("library_name")) == LIBRARY_NAME and _text(info.get("library_code")) == source:
            return True
    return False


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def fcall(name: str, keys: Sequence[str], args: Sequence[Any], *, read_only: bool = False) -> list[Any]:
    """The command of one function call, for ``Store.run`` batches."""
    return ["FCALL_RO" if read_only else "FCALL", name, len(keys), *keys, *args]


def raise_mapped(exc: ResponseError) -> NoReturn:
    """A library error as ParamError (PRESENCE_PARAM), LimitError (PRESENCE_LIMIT) or PresenceError (anything else).

    A PresenceError's message quotes Redis: transports log it and show clients only "system error".
    """
    message = str(exc)
    if message.startswith("PRESENCE_PARAM "):
        raise ParamError(message.removeprefix("PRESENCE_PARAM ")) from None
    if message.startswith("PRESENCE_LIMIT "):
        raise LimitError(message.removeprefix("PRESENCE_LIMIT ")) from None
    raise PresenceError(f"redis: {message}") from exc


@dataclass(frozen=True, slots=True)
class StatusChange:
    """Reply of the user's own function: did anything change, the pack, who to tell."""

    changed: bool
    data: bytes
    recipients: list[str]
    inbox_last_id: str = "0-0"
    kicked: int = 0
    online: bool = True

    @property
    def version(self) -> int:
        """The user's version after the change (carried in ``data``)."""
        return pack_version(self.data) if self.data else 0


@dataclass(frozen=True, slots=True)
class InboxSettings:
    maxlen: int
    ttl_ms: int
    doorbell_prefix: str
    idle_ttl_ms: int = 60_000


class PresenceFunctions:
    """One method per library function; keys are passed in, never built here."""

    def __init__(self, store: Store, inbox: InboxSettings) -> None:
        self.store = store
        self.redis = store.client
        self.inbox = inbox

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any], *, read_only: bool = False) -> Any:
        """One FCALL, sent to the primary that owns ``keys`` (all of one slot)."""
        started = time.perf_counter()
        try:
            return await self.store.one(keys[0] if keys else None, *fcall(name, keys, args, read_only=read_only))
        except ResponseError as exc:
            raise_mapped(exc)
        except RedisUnavailable as exc:
            raise UnavailableError("redis is unavailable") from exc
        finally:
            REDIS_LATENCY.labels(name).observe(time.perf_counter() - started)

    @staticmethod
    def _users(raw: Sequence[bytes]) -> list[str]:
        return [r.decode() for r in raw]

    async def login(self, keys: UserKeys, args: Sequence[Any]) -> StatusChange:
        """``args`` from ``login_args`` (the service pipelines the same call with its node bookkeeping)."""
        return self.parse_login(await self.call("presence_login", keys.state(), args))

    def parse_login(self, reply: Sequence[Any]) -> StatusChange:
        return StatusChange(
            changed=bool(reply[0]),
            data=reply[1],
            inbox_last_id=reply[2].decode(),
            kicked=int(reply[3]),
            recipients=self._users(reply[4:]),
        )

    def login_args(
        self,
        app_id: int,
        user_id: str,
        client_type: int,
        imei: str,
        conn_id: str,
        broker_id: str,
        broker_host: str,
        version: int,
        login_model: int,
        max_sessions: int = 10,
    ) -> list[Any]:
        i = self.inbox
        return [
            app_id,
            user_id,
            client_type,
            imei,
            conn_id,
            broker_id,
            broker_host,
            version,
            login_model,
            i.maxlen,
            i.ttl_ms,
            i.doorbell_prefix,
            max_sessions,
            1000,  # the feed outbox's MAXLEN and TTL ms (used when the feed keys are passed)
            i.ttl_ms,
        ]

    def logout_args(
        self,
        app_id: int,
        user_id: str,
        client_type: int,
        imei: str,
        conn_id: str,
        op_id: str = "",
        seen_age_ms: int = 0,
        seen_at_ms: int = 0,
    ) -> list[Any]:
        """``op_id`` makes a repeat after a lost reply a no-op; lastSeen is ``seen_at_ms`` (server clock) if
        given, else now minus ``seen_age_ms``."""
        i = self.inbox
        return [
            app_id,
            user_id,
            client_type,
            imei,
            conn_id,
            i.maxlen,
            i.ttl_ms,
            i.doorbell_prefix,
            i.idle_ttl_ms,
            op_id,
            max(int(seen_age_ms), 0),
            max(int(seen_at_ms), 0),
        ]

    @staticmethod
    def parse_logout(reply: Sequence[Any]) -> StatusChange:
        if not reply[0]:
            return StatusChange(changed=False, data=b"", recipients=[])
        return StatusChange(
            changed=True,
            data=reply[1],
            online=int(reply[2]) == 1,
            recipients=[r.decode() for r in reply[3:]],
        )

    async def logout(
        self, keys: UserKeys, app_id: int, user_id: str, client_type: int, imei: str, conn_id: str = ""
    ) -> StatusChange:
        reply = await self.call(
            "presence_logout", keys.state(), self.logout_args(app_id, user_id, client_type, imei, conn_id)
        )
        return self.parse_logout(reply)

    async def set_custom_status(
        self,
        keys: UserKeys,
        app_id: int,
        user_id: str,
        custom_status: int,
        custom_text: str,
        origin_conn_id: str = "",
        op_id: str = "",
    ) -> StatusChange:
        """``op_id``: a repeat of this call after a lost reply applies nothing and replies the stored state."""
        i = self.inbox
        reply = await self.call(
            "presence_set_custom_status",
            keys.state(),
            [app_id, user_id, custom_status, custom_text, origin_conn_id, i.maxlen, i.ttl_ms, i.doorbell_prefix, op_id],
        )
        return StatusChange(changed=True, data=reply[1], recipients=self._users(reply[2:]))

    def fanout_command(
        self,
        groups: Sequence[tuple[str, ...]],
        command: int,
        data: bytes,
        user_id: str = "",
        version: int = 0,
        *,
        ring: bool = True,
    ) -> list[Any]:
        """presence_fanout for (sessions, inbox, pushed) keys of recipients of one slot, for ``user_id``'s
        change at ``version`` (a recipient already holding that version or a newer one is skipped).
        Without ``user_id``: (sessions, inbox) pairs and no ordering (events that are not a user's state).

        ``ring=False`` (a cluster): no PUBLISH; the reply names the nodes to ring instead.
        """
        keys = [k for group in groups for k in group]
        i = self.inbox
        prefix = i.doorbell_prefix if ring else ""
        args: list[Any] = [command, data, i.maxlen, i.ttl_ms, prefix]
        if user_id:
            args += [user_id, version]
        return fcall("presence_fanout", keys, args)

    @staticmethod
    def parse_fanout(reply: Sequence[Any]) -> tuple[int, dict[str, list[str]]]:
        """(entries written, {node id: [inbox keys]} still to ring)."""
        bells: dict[str, list[str]] = {}
        for j in range(2, len(reply), 2):
            bells.setdefault(_text(reply[j]), []).extend(_text(key) for key in reply[j + 1])
        return int(reply[0]), bells

    async def subscribe(
        self, subscriptions_key: str, subscriber: str, targets: Sequence[str], sub_time_ms: int, limit: int
    ) -> tuple[int, int]:
        """The subscriber's side: (expireAt ms, live subscriptions); the targets' sides follow."""
        reply = await self.call("presence_subscribe", [subscriptions_key], [subscriber, sub_time_ms, limit, *targets])
        return int(reply[0]), int(reply[1])

    @staticmethod
    def subscribers_add_command(subscriber_keys: Sequence[str], subscriber: str, expire_at: int) -> list[Any]:
        """The targets' side of a subscribe, for subscribers keys of one slot."""
        return fcall("presence_subscribers_add", subscriber_keys, [subscriber, expire_at])

    async def unsubscribe(self, subscriptions_key: str, subscriber: str, targets: Sequence[str]) -> int:
        """The subscriber's side: subscriptions removed; the targets' sides follow."""
        return int(await self.call("presence_unsubscribe", [subscriptions_key], [subscriber, *targets]))

    @staticmethod
    def subscribers_remove_command(subscriber_keys: Sequence[str], subscriber: str) -> list[Any]:
        return fcall("presence_subscribers_remove", subscriber_keys, [subscriber])

    @staticmethod
    def friends_command(add: bool, sets: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[Any]:
        """presence_friends_add/remove: ``sets[i]`` is the friends SET of ``pairs[i][0]``, gaining ``pairs[i][1]``.

        All ``sets`` of one slot (a key may repeat: one user's side with many friends).
        """
        name = "presence_friends_add" if add else "presence_friends_remove"
        return fcall(name, sets, [u for pair in pairs for u in pair])

    async def friends_add(self, friends_key: str, user_id: str, friend_ids: Sequence[str]) -> int:
        """One side only (``user_id``'s set gains ``friend_ids``); the facade writes the other sides per slot."""
        keys = [friends_key] * len(friend_ids)
        return int(await self.call("presence_friends_add", keys, [u for f in friend_ids for u in (user_id, f)]))

    async def query(self, pairs: Sequence[tuple[str, str]], user_ids: Sequence[str]) -> dict[str, UserOnlineStatus]:
        """presence_query_raw for users of one slot."""
        if not user_ids:
            return {}
        keys = [k for pair in pairs for k in pair]
        return self.parse_query(await self.call("presence_query_raw", keys, [], read_only=True), user_ids)

    @staticmethod
    def query_command(pairs: Sequence[tuple[str, str]], user_ids: Sequence[str]) -> list[Any]:
        """presence_query_raw (``user_ids`` name the pairs' users, in order; ``parse_query`` needs them too)."""
        return fcall("presence_query_raw", [k for pair in pairs for k in pair], [], read_only=True)

    @staticmethod
    def parse_query(raw: Any, user_ids: Sequence[str]) -> dict[str, UserOnlineStatus]:
        """The reply of presence_query_raw (5 items per user) or presence_query (its JSON object) as models.

        The raw reply is spliced into one JSON document (the session records are stored as JSON) and
        decoded by one msgspec Decoder: no per-field Python objects in between.
        """
        if isinstance(raw, bytes | str):
            return _query_decoder.decode(raw)
        if len(raw) != 5 * len(user_ids):
            raise PresenceError(f"presence_query_raw answered {len(raw)} items for {len(user_ids)} users")
        parts: list[bytes] = []
        for i, user in enumerate(user_ids):
            values, custom, text, seen, version = raw[5 * i : 5 * i + 5]
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
        return _query_decoder.decode(b"{" + b"".join(parts) + b"}")

    async def node_heartbeat(self, nodes_key: str, node_id: str) -> tuple[bool, int]:
        reply = await self.call("presence_node_heartbeat", [nodes_key], [node_id])
        return bool(reply[0]), int(reply[1])

    async def nodes_expired(self, nodes_key: str, ttl_ms: int) -> list[str]:
        return self._users(await self.call("presence_nodes_expired", [nodes_key], [ttl_ms], read_only=True))

    async def version(self) -> str:
        return (await self.call("presence_version", [], [], read_only=True)).decode()
