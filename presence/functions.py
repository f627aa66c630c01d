"""Typed async wrappers around the ``presence`` Redis Functions library (lua/presence.lua)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from presence.errors import LimitError, ParamError, PresenceError
from presence.keys import UserKeys
from presence.metrics import REDIS_LATENCY
from presence.models import UserOnlineStatus
from presence.resources import resource_path

LIBRARY_NAME = "presence"
_query_decoder = msgspec.json.Decoder(dict[str, UserOnlineStatus])


def library_source() -> str:
    return resource_path("lua/presence.lua").read_text()


async def ensure_library(redis: Redis) -> bool:
    """Load the library with FUNCTION LOAD REPLACE unless the server already has this exact code.

    Returns True when it loaded. The code itself is the version, so an edited file always reloads.
    """
    source = library_source()
    listed = await redis.execute_command("FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_NAME, "WITHCODE")
    for lib in listed or []:
        info = lib if isinstance(lib, dict) else dict(zip(lib[::2], lib[1::2], strict=False))
        info = {_text(k): v for k, v in info.items()}
        if _text(info.get("library_name")) == LIBRARY_NAME and _text(info.get("library_code")) == source:
            return False
    await redis.execute_command("FUNCTION", "LOAD", "REPLACE", source)
    return True


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


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


@dataclass(frozen=True, slots=True)
class InboxSettings:
    maxlen: int
    ttl_ms: int
    doorbell_prefix: str
    idle_ttl_ms: int = 60_000


class PresenceFunctions:
    """One method per library function; keys are passed in, never built here."""

    def __init__(self, redis: Redis, inbox: InboxSettings) -> None:
        self.redis = redis
        self.inbox = inbox

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        started = time.perf_counter()
        try:
            return await self.redis.fcall(name, len(keys), *keys, *args)
        except ResponseError as exc:
            raise_mapped(exc)
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
        ]

    def logout_args(self, app_id: int, user_id: str, client_type: int, imei: str, conn_id: str) -> list[Any]:
        i = self.inbox
        return [app_id, user_id, client_type, imei, conn_id, i.maxlen, i.ttl_ms, i.doorbell_prefix, i.idle_ttl_ms]

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
    ) -> StatusChange:
        i = self.inbox
        reply = await self.call(
            "presence_set_custom_status",
            keys.state(),
            [app_id, user_id, custom_status, custom_text, origin_conn_id, i.maxlen, i.ttl_ms, i.doorbell_prefix],
        )
        return StatusChange(changed=True, data=reply[1], recipients=self._users(reply[2:]))

    async def fanout(self, pairs: Sequence[tuple[str, str]], command: int, data: bytes) -> tuple[int, int]:
        """Entries written and doorbells rung for (sessions key, inbox key) recipient pairs."""
        keys = [k for pair in pairs for k in pair]
        i = self.inbox
        reply = await self.call("presence_fanout", keys, [command, data, i.maxlen, i.ttl_ms, i.doorbell_prefix])
        return int(reply[0]), int(reply[1])

    async def subscribe(
        self,
        subscriptions_key: str,
        subscriber_keys: Sequence[str],
        subscriber: str,
        targets: Sequence[str],
        sub_time_ms: int,
        limit: int,
    ) -> tuple[int, int]:
        reply = await self.call(
            "presence_subscribe", [subscriptions_key, *subscriber_keys], [subscriber, sub_time_ms, limit, *targets]
        )
        return int(reply[0]), int(reply[1])

    async def unsubscribe(
        self, subscriptions_key: str, subscriber_keys: Sequence[str], subscriber: str, targets: Sequence[str]
    ) -> int:
        return int(
            await self.call("presence_unsubscribe", [subscriptions_key, *subscriber_keys], [subscriber, *targets])
        )

    async def friends_add(self, from_key: str, to_keys: Sequence[str], from_id: str, to_ids: Sequence[str]) -> int:
        return int(await self.call("presence_friends_add", [from_key, *to_keys], [from_id, *to_ids]))

    async def friends_remove(self, from_key: str, to_keys: Sequence[str], from_id: str, to_ids: Sequence[str]) -> int:
        return int(await self.call("presence_friends_remove", [from_key, *to_keys], [from_id, *to_ids]))

    async def query(self, pairs: Sequence[tuple[str, str]], user_ids: Sequence[str]) -> dict[str, UserOnlineStatus]:
        if not user_ids:
            return {}
        keys = [k for pair in pairs for k in pair]
        try:
            raw = await self.redis.fcall_ro("presence_query", len(keys), *keys, *user_ids)
        except ResponseError as exc:
            raise_mapped(exc)
        return _query_decoder.decode(raw)

    async def node_heartbeat(self, nodes_key: str, node_id: str) -> tuple[bool, int]:
        reply = await self.call("presence_node_heartbeat", [nodes_key], [node_id])
        return bool(reply[0]), int(reply[1])

    async def nodes_expired(self, nodes_key: str, ttl_ms: int) -> list[str]:
        try:
            reply = await self.redis.fcall_ro("presence_nodes_expired", 1, nodes_key, ttl_ms)
        except ResponseError as exc:
            raise_mapped(exc)
        return self._users(reply)

    async def version(self) -> str:
        return (await self.redis.fcall_ro("presence_version", 0)).decode()
