"""``presence serve``: gateway (TCP + WebSocket) and REST in one process and event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import resource
import secrets
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from presence.auth import generate_user_sign
from presence.config import DEV_APP_ID, Settings, describe_apps, with_dev_app
from presence.errors import ParamError
from presence.gateway.hub import Hub
from presence.gateway.tcp import start_tcp_server
from presence.gateway.ws import create_ws_app
from presence.service import Presence
from presence.sockets import MAX_SPARE, SocketGate
from presence.store import open_store
from presence.webhooks import WebhookWorker, pin_feed_shards

log = logging.getLogger("presence.server")


def default_node_id() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (before, after).

    Each client connection holds a descriptor, and the usual soft limit (1024) would cap a node at
    about 900 of them while the hard limit is much higher.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel still caps it (fs.nr_open)
        target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file descriptor limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


def connection_capacity(settings: Settings) -> int:
    """Raise the descriptor limit and size the gateway from it, keeping ``fd_reserve`` descriptors free."""
    before, limit = raise_fd_limit()
    capacity = max(limit - settings.fd_reserve, 1)
    if settings.max_connections:
        capacity = min(capacity, settings.max_connections)
    log.info(
        "file descriptors: soft limit %d (was %d); up to %d client connections, %d descriptors kept for "
        "Redis, REST and /healthz",
        limit,
        before,
        capacity,
        limit - capacity,
    )
    return capacity


@dataclass
class Running:
    """What a started server exposes: its ports (real ones when 0 was asked) and the hub."""

    settings: Settings
    presence: Presence
    hub: Hub
    tcp_port: int = 0
    ws_port: int = 0
    http_port: int = 0
    _servers: list[asyncio.Server] = field(default_factory=list)
    _runners: list[web.AppRunner] = field(default_factory=list)
    embedded: bool = False
    webhooks: WebhookWorker | None = None
    node_id: str = ""

    async def stop(self, *, handover: float = 0.0) -> None:
        """Stop; ``handover`` seconds > 0 keeps sessions that long for their devices to reconnect elsewhere."""
        for server in self._servers:
            server.close()  # stop accepting first
        await self.hub.stop(handover=handover)
        if self.webhooks is not None:  # after the hub: the sessions' last logouts are in the feed by now
            await self.webhooks.stop()
        for runner in self._runners:  # closes the HTTP and WebSocket connections
            await runner.cleanup()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        await self.presence.resolver.close()
        await self.presence.store.aclose()


HTTP_IDLE_DEFAULT = 75.0  # s an HTTP connection may wait for a complete request when login_timeout is 0


async def _site(
    app: web.Application,
    host: str,
    port: int,
    gate: SocketGate,
    transport: str,
    idle: float,
    reuse_port: bool = False,
) -> tuple[web.AppRunner, asyncio.Server]:
    """An aiohttp app on its own listener, every accepted socket counted by ``gate``.

    ``keepalive_timeout`` closes a connection that has no complete request ``idle`` s after it opened
    (or after its last answer): idle or trickling sockets cannot hold descriptors for ever.
    """
    from presence.http.app import EnvelopeRequestHandler

    options: dict[str, Any] = {"access_log": None, "keepalive_timeout": idle}
    runner = web.AppRunner(app, handle_signals=False, **options)
    await runner.setup()
    manager, loop = runner.server, asyncio.get_running_loop()
    assert manager is not None

    def handler() -> EnvelopeRequestHandler:  # what ``manager()`` makes, answering malformed HTTP our way
        return EnvelopeRequestHandler(manager, loop=loop, **options)

    server = await loop.create_server(
        gate.http_protocol(handler, transport), host, port, reuse_address=True, reuse_port=reuse_port or None
    )
    return runner, server


async def start(settings: Settings, *, reuse_port: bool = False, ready_line: bool = True) -> Running:
    """Start one node. ``reuse_port``: the TCP and WebSocket listeners share their ports with other worker
    processes (SO_REUSEPORT); ``ready_line``: print it (a ``--workers`` supervisor prints its own)."""
    settings = with_dev_app(settings)
    for line in describe_apps(settings):
        log.info("%s", line)
    capacity = connection_capacity(settings)
    store = await open_store(
        settings.redis_url, retry_for=settings.redis_retry_for, socket_timeout=settings.redis_timeout
    )
    embedded = store.mode == "embedded"
    presence = Presence(store, settings)
    if await presence.start():
        log.info("loaded the presence function library into Redis")
    try:
        await pin_feed_shards(presence, settings)
    except ParamError:
        await store.aclose()
        raise
    node_id = settings.node_id or default_node_id()
    hub = Hub(presence, settings, node_id, node_host=settings.host)
    hub.capacity = capacity
    hub.gate.spare = min(MAX_SPARE, settings.fd_reserve // 4)
    await hub.start()
    running = Running(settings, presence, hub, embedded=embedded)
    if WebhookWorker.enabled(settings):
        running.webhooks = WebhookWorker(presence, settings, node_id)
        await running.webhooks.start()
    idle = settings.login_timeout or HTTP_IDLE_DEFAULT
    if _enabled(settings.tcp_port):
        server = await start_tcp_server(hub, settings.host, settings.tcp_port, reuse_port=reuse_port)
        running._servers.append(server)
        running.tcp_port = server.sockets[0].getsockname()[1]
    if _enabled(settings.ws_port):
        runner, server = await _site(
            create_ws_app(hub), settings.host, settings.ws_port, hub.gate, "ws", idle, reuse_port
        )
        running._runners.append(runner)
        running._servers.append(server)
        running.ws_port = server.sockets[0].getsockname()[1]
    if _enabled(settings.http_port):
        from presence.http.app import create_app

        app = create_app(presence, settings)
        runner, server = await _site(app, settings.host, settings.http_port, hub.gate, "http", idle)
        running._runners.append(runner)
        running._servers.append(server)
        running.http_port = server.sockets[0].getsockname()[1]
    running.node_id = node_id
    if ready_line:
        announce(running, node_id)
    return running


def _enabled(port: int) -> bool:
    return port != 0  # as on the command line: 0 disables that listener


def announce(running: Running, node_id: str) -> None:
    s = running.settings
    host = "127.0.0.1" if s.host in ("0.0.0.0", "") else s.host
    mode = running.presence.store.mode
    store = "embedded in-process store (fakeredis)" if running.embedded else f"Redis ({mode})"
    log.info(
        "presence node %s on %s: tcp=%s ws=%s http=%s",
        node_id,
        store,
        running.tcp_port,
        running.ws_port,
        running.http_port,
    )
    if s.dev_mode:
        key = s.apps[DEV_APP_ID].private_key
        if not running.embedded and not s.dev_key:
            log.warning(
                "dev mode on a real Redis: the key is new at each start, so userSigns from an earlier start "
                "fail (60003); set PRESENCE_DEV_KEY to keep one across restarts"
            )
        sample = generate_user_sign(DEV_APP_ID, key, "alice")
        print(
            f"dev mode: app {DEV_APP_ID}, private key {key}\n"
            f"  sample userSign for alice: {sample}\n"
            f"  demo page:  http://{host}:{running.http_port}/\n"
            f"  REST:       http://{host}:{running.http_port}/v1/...  (GET /v1/dev/userSign?userId=bob for more)\n"
            f"  WebSocket:  ws://{host}:{running.ws_port}/ws    TCP: {host}:{running.tcp_port}",
            flush=True,
        )
    # Last, one machine-readable line: tests and scripts read the real ports from it.
    print(f"presence listening tcp={running.tcp_port} ws={running.ws_port} http={running.http_port}", flush=True)


async def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    if settings.workers > 1:
        from presence.workers import supervise

        await supervise(settings)
        return
    running = await start(settings, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    grace = settings.offline_grace
    log.info("shutting down: closing listeners, telling clients to reconnect, keeping sessions %.1f s", grace)
    await running.stop(handover=grace)


def run(settings: Settings) -> None:
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.run(serve(settings))
    except ImportError:
        asyncio.run(serve(settings))
