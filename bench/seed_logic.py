"""The baseline: the seed's status logic (ImUserStatusServiceImpl, MessageProducer, UserSessionUtils) ported literally.

One Redis round trip per call, as the Java code made them through StringRedisTemplate: a custom-status change
writes the status, reads the user's own sessions (sync to its other devices), reads the friend list, reads each
friend's sessions, publishes one message per recipient session to that session's gateway channel (RabbitMQ's
routing key brokerId in the seed; a Redis channel here), then scans the subscription hash. Keys are the seed's
(`{appId}:userSession:{userId}`, ...). The friend list lived in MySQL in the seed; here it is a Redis set (one
SMEMBERS), which only flatters the baseline. The seed's bugs (subscription key typo) are not copied.
"""

from __future__ import annotations

import time
from typing import Any, cast

import msgspec
from redis.asyncio import Redis

ONLINE = 1
NOTIFY_CUSTOM = 4006  # the fork's code; the base code reused 4004
NOTIFY_CUSTOM_SYNC = 4007

_encode = msgspec.json.encode
_decode = msgspec.json.decode


def session_key(app_id: int, user_id: str) -> str:
    return f"{app_id}:userSession:{user_id}"


def custom_status_key(app_id: int, user_id: str) -> str:
    return f"{app_id}:userCustomerStatus:{user_id}"


def friends_key(app_id: int, user_id: str) -> str:
    return f"{app_id}:friend:{user_id}"


def subscribe_key(app_id: int, user_id: str) -> str:
    return f"{app_id}:subscribe:{user_id}"


def broker_channel(broker_id: Any) -> str:
    return f"seed:broker:{broker_id}"


class SeedLogic:
    """The logic layer of the seed (im-service), with Redis as its only store."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    # UserSessionUtils.getUserSession
    async def get_user_session(self, app_id: int, user_id: str) -> list[dict[str, Any]]:
        entries = await self.redis.hgetall(session_key(app_id, user_id))
        sessions = []
        for value in entries.values():
            session = _decode(value)
            if session.get("connectState") == ONLINE:
                sessions.append(session)
        return sessions

    # MessageProducer.sendPack / sendMessage: one MQ message per session, routed by brokerId
    async def send_pack(self, to_id: str, command: int, data: dict[str, Any], session: dict[str, Any]) -> None:
        pack = {
            "userId": to_id,
            "appId": session["appId"],
            "toId": to_id,
            "clientType": session["clientType"],
            "imei": session["imei"],
            "command": command,
            "data": data,
        }
        await self.redis.publish(broker_channel(session["brokerId"]), _encode(pack))

    # MessageProducer.sendToUser
    async def send_to_user(self, to_id: str, command: int, data: dict[str, Any], app_id: int) -> int:
        sent = 0
        for session in await self.get_user_session(app_id, to_id):
            await self.send_pack(to_id, command, data, session)
            sent += 1
        return sent

    # MessageProducer.sendToUserExceptClient
    async def send_to_user_except_client(
        self, to_id: str, command: int, data: dict[str, Any], app_id: int, client_type: int, imei: str
    ) -> int:
        sent = 0
        for session in await self.get_user_session(app_id, to_id):
            if session["clientType"] == client_type and session["imei"] == imei:
                continue
            await self.send_pack(to_id, command, data, session)
            sent += 1
        return sent

    # ImUserStatusServiceImpl.dispatcher
    async def dispatcher(self, pack: dict[str, Any], user_id: str, app_id: int, command: int) -> int:
        sent = 0
        # A bytes client (decode_responses=False): redis-py types replies for either setting (bytes | str).
        for fid in cast("set[bytes]", await self.redis.smembers(friends_key(app_id, user_id))):
            sent += await self.send_to_user(fid.decode(), command, pack, app_id)
        key = subscribe_key(app_id, user_id)
        for field in cast("list[bytes]", await self.redis.hkeys(key)):
            expire = int(await self.redis.hget(key, field) or 0)
            if expire > 0 and expire > int(time.time() * 1000):
                sent += await self.send_to_user(field.decode(), command, pack, app_id)
            else:
                await self.redis.hdel(key, field)
        return sent

    # ImUserStatusServiceImpl.setUserCustomerStatus
    async def set_user_customer_status(
        self, app_id: int, user_id: str, custom_status: int, custom_text: str, client_type: int = 0, imei: str = ""
    ) -> int:
        pack = {"customStatus": custom_status, "customText": custom_text, "userId": user_id}
        await self.redis.set(custom_status_key(app_id, user_id), _encode(pack))
        await self.send_to_user_except_client(user_id, NOTIFY_CUSTOM_SYNC, pack, app_id, client_type, imei)
        return await self.dispatcher(pack, user_id, app_id, NOTIFY_CUSTOM)

    # ImUserStatusServiceImpl.getUserOnlineStatus (queryUserOnlineStatus)
    async def query_user_online_status(self, app_id: int, user_ids: list[str]) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = {}
        for uid in user_ids:
            resp: dict[str, Any] = {"session": await self.get_user_session(app_id, uid)}
            raw = await self.redis.get(custom_status_key(app_id, uid))
            if raw:
                parsed = _decode(raw)
                resp["customText"] = parsed.get("customText")
                resp["customStatus"] = parsed.get("customStatus")
            result[uid] = resp
        return result

    # setup helpers (not timed): friendships as the seed's friend service would hold them
    async def import_friends(self, app_id: int, from_id: str, to_ids: list[str]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(friends_key(app_id, from_id), *to_ids)
            for to in to_ids:
                pipe.sadd(friends_key(app_id, to), from_id)
            await pipe.execute()
