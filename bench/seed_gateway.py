"""The seed's gateway for the baseline, ported to Python: aiohttp WebSocket (as ours), one channel per broker.

The seed's Netty gateway consumed RabbitMQ queue ``MessageService2Im<brokerId>``, parsed each MessagePack,
looked the channel up in SessionSocketHolder by (appId, toId, clientType, imei) and wrote the pack to it.
Here the queue is the Redis channel ``seed:broker:<brokerId>``: one message per recipient session, each
written as a WebSocket text message. Login stores the session in ``{appId}:userSession:{userId}`` as the
seed's LoginHandler did (userSign is not checked, as in the seed's gateway; the MQ online event is not
sent: logins are only set-up here). Prints ``seed-gateway listening ws=PORT`` when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from typing import Any

import msgspec
from aiohttp import WSMsgType, web
from redis.asyncio import Redis

from bench.seed_logic import ONLINE, broker_channel, session_key

log = logging.getLogger("bench.seed_gateway")
_encode = msgspec.json.encode


class Route(msgspec.Struct):
    """The routing fields of a published MessagePack (the rest is passed through as is)."""

    appId: int
    toId: str
    clientType: int
    imei: str


class ClientFrame(msgspec.Struct):
    command: int
    appId: int = 0
    clientType: int = 0
    imei: str = ""
    version: int = 0
    data: dict[str, Any] = msgspec.field(default_factory=dict)


_route = msgspec.json.Decoder(Route)
_frame = msgspec.json.Decoder(ClientFrame)
Key = tuple[int, str, int, str]


def server_pack(command: int, app_id: int, user_id: str, data: dict[str, Any]) -> str:
    pack = {
        "userId": user_id,
        "appId": app_id,
        "toId": user_id,
        "clientType": 0,
        "imei": "",
        "command": command,
        "data": data,
    }
    return _encode(pack).decode()


class SeedGateway:
    def __init__(self, redis: Redis, broker_id: int) -> None:
        self.redis = redis
        self.broker_id = broker_id
        self.holder: dict[Key, web.WebSocketResponse] = {}  # SessionSocketHolder
        self.delivered = 0

    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        key: Key | None = None
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                frame = _frame.decode(msg.data)
                if frame.command == 9000 and key is None:
                    user = str(frame.data["userId"])
                    session = {
                        "appId": frame.appId,
                        "userId": user,
                        "clientType": frame.clientType,
                        "imei": frame.imei,
                        "connectState": ONLINE,
                        "brokerId": self.broker_id,
                        "brokerHost": "127.0.0.1",
                        "version": frame.version,
                        "loginTime": int(time.time() * 1000),
                    }
                    await self.redis.hset(
                        session_key(frame.appId, user), f"{frame.clientType}:{frame.imei}", _encode(session)
                    )
                    key = (frame.appId, user, frame.clientType, frame.imei)
                    self.holder[key] = ws
                    await ws.send_str(server_pack(9001, frame.appId, user, {"userId": user}))
                elif frame.command == 9999:
                    await ws.send_str(server_pack(9999, frame.appId, key[1] if key else "", {}))
                elif frame.command == 9003:
                    break
        finally:
            if key is not None:
                if self.holder.get(key) is ws:
                    del self.holder[key]
                with contextlib.suppress(Exception):
                    await self.redis.hdel(session_key(key[0], key[1]), f"{key[2]}:{key[3]}")
        return ws

    async def consume(self) -> None:
        """MessageReciver: one published pack per recipient session."""
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(broker_channel(self.broker_id))
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None or msg["type"] != "message":
                continue
            body: bytes = msg["data"]
            route = _route.decode(body)
            ws = self.holder.get((route.appId, route.toId, route.clientType, route.imei))
            if ws is not None and not ws.closed:
                try:
                    await ws.send_str(body.decode())
                    self.delivered += 1
                except (ConnectionError, RuntimeError):
                    pass


async def serve(redis_url: str, port: int, broker_id: int) -> None:
    redis = Redis.from_url(redis_url)
    gateway = SeedGateway(redis, broker_id)
    app = web.Application()
    app.router.add_get("/ws", gateway.ws_handler)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    consumer = asyncio.create_task(gateway.consume())
    print(f"seed-gateway listening ws={port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    consumer.cancel()
    with contextlib.suppress(BaseException):
        await consumer
    await runner.cleanup()
    await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description="the seed's gateway, for the baseline benchmark")
    parser.add_argument("--redis", required=True)
    parser.add_argument("--ws-port", type=int, required=True)
    parser.add_argument("--broker-id", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.redis, args.ws_port, args.broker_id))
    else:
        uvloop.run(serve(args.redis, args.ws_port, args.broker_id))


if __name__ == "__main__":
    main()
