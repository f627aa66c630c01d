"""``presence serve``: gateway (TCP + WebSocket) and REST in one process and event loop.

A node is an aiohttp application (``create_node_app``) whose ``cleanup_ctx`` owns its resources; ``start``
sets it up and returns ``Running``, whose ``stop`` releases them in the reverse order.
"""

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
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from presence.appkeys import HUB, PRESENCE, SETTINGS
from presence.auth import generate_user_sign
from presence.config import DEV_APP_ID, Settings, describe_apps, with_dev_app
from presence.gateway.hub import Hub
from presence.gateway.tcp import start_tcp_server
from presence.gateway.ws import create_ws_app
from presence.service import Presence
from presence.sockets import MAX_SPARE, SocketGate
from presence.store import Store, open_store
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


HTTP_IDLE_DEFAULT = 75.0  # s an HTTP connection may wait for a complete request when login_timeout is 0


@dataclass
class NodeOptions:
    """What a node is started with besides its Settings."""

    node_id: str
    # SO_REUSEPORT on the TCP and WebSocket listeners (``--workers``: other processes share the ports).
    reuse_port: bool = False
    # Seconds the hub keeps sessions at shutdown for their devices to reconnect elsewhere (set by ``stop``).
    handover: float = 0.0


@dataclass
class Listeners:
    """The node's listening sockets, their real ports (0 = that listener is off), and the aiohttp runners of
    the WebSocket and REST apps behind two of them."""

    tcp_port: int = 0
    ws_port: int = 0
    http_port: int = 0
    ws_runner: web.AppRunner | None = None
    http_runner: web.AppRunner | None = None
    servers: list[asyncio.Server] = field(default_factory=list)


NODE = web.AppKey("node", NodeOptions)
STORE = web.AppKey("store", Store)
WEBHOOKS = web.AppKey("webhooks", WebhookWorker)  # only when an app has webhook_urls
LISTENERS = web.AppKey("listeners", Listeners)


def create_node_app(settings: Settings, options: NodeOptions) -> web.Application:
    """One node as an aiohttp application that serves nothing itself: its ``cleanup_ctx`` owns every
    resource, started in this order by ``AppRunner.setup()`` and released in the reverse one by
    ``AppRunner.cleanup()``:

    1. ``_store_ctx``: the Redis store (closed last);
    2. ``_presence_ctx``: the Presence facade, the library loaded and the feed shards pinned;
    3. ``_gateway_ctx``: the hub (not started) sized from the descriptor limit, the WebSocket and REST apps'
       runners; at the end it closes their connections, after everything below has stopped;
    4. ``_webhooks_ctx``: the webhook worker and its delivery tasks;
    5. ``_hub_ctx``: the hub's background tasks (doorbells, delivery, node heartbeat and reaper, ...);
       stopping it hands sessions over or logs them out, before the webhook worker stops, so their
       last logouts are delivered;
    6. ``_listeners_ctx``: the TCP, WebSocket and REST listeners; the first to stop accepting.
    """
    app = web.Application()
    app[SETTINGS] = settings
    app[NODE] = options
    app.cleanup_ctx.extend((_store_ctx, _presence_ctx, _gateway_ctx, _webhooks_ctx, _hub_ctx, _listeners_ctx))
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[STORE] = await open_store(
        settings.redis_url, retry_for=settings.redis_retry_for, socket_timeout=settings.redis_timeout
    )
    yield
    await app[STORE].aclose()


async def _presence_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    presence = Presence(app[STORE], settings)
    try:
        if await presence.start():
            log.info("loaded the presence function library into Redis")
        await pin_feed_shards(presence, settings)
        app[PRESENCE] = presence
        yield
    finally:
        await presence.resolver.close()


async def _gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, presence = app[SETTINGS], app[PRESENCE]
    hub = Hub(presence, settings, app[NODE].node_id, node_host=settings.host)
    # The node id is this process's before the webhook worker leases under it: NodeIdInUseError (a start-up
    # error, one line) while another live process beats it.
    await hub.keeper.claim()
    hub.capacity = connection_capacity(settings)
    hub.gate.spare = min(MAX_SPARE, settings.fd_reserve // 4)
    app[HUB] = hub
    listeners = app[LISTENERS] = Listeners()
    try:
        if _enabled(settings.ws_port):
            listeners.ws_runner = await _runner(create_ws_app(hub), settings)
        if _enabled(settings.http_port):
            from presence.http.app import create_app

            listeners.http_runner = await _runner(create_app(presence, settings), settings)
        yield
    finally:
        for runner in (listeners.ws_runner, listeners.http_runner):
            if runner is not None:  # closes the HTTP and WebSocket connections still open
                await runner.cleanup()
        for server in listeners.servers:  # closed by _listeners_ctx; their connections are gone by now
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)


async def _webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if not WebhookWorker.enabled(settings):
        yield
        return
    worker = app[WEBHOOKS] = WebhookWorker(app[PRESENCE], settings, app[NODE].node_id)
    await worker.start()
    try:
        yield
    finally:
        await worker.stop()


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[HUB].start()
    yield
    await app[HUB].stop(handover=app[NODE].handover)


async def _listeners_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, hub, listeners = app[SETTINGS], app[HUB], app[LISTENERS]
    host, reuse_port = settings.host, app[NODE].reuse_port
    try:
        if _enabled(settings.tcp_port):
            server = await start_tcp_server(hub, host, settings.tcp_port, reuse_port=reuse_port)
            listeners.tcp_port = _listen(listeners, server)
        if listeners.ws_runner is not None:
            server = await _serve_runner(listeners.ws_runner, settings, settings.ws_port, hub.gate, "ws", reuse_port)
            listeners.ws_port = _listen(listeners, server)
        if listeners.http_runner is not None:
            server = await _serve_runner(listeners.http_runner, settings, settings.http_port, hub.gate, "http")
            listeners.http_port = _listen(listeners, server)
        yield
    finally:
        for server in listeners.servers:
            server.close()  # stop accepting first


def _listen(listeners: Listeners, server: asyncio.Server) -> int:
    """Record ``server``; its port as bound (the real one when 0 was asked)."""
    listeners.servers.append(server)
    port: int = server.sockets[0].getsockname()[1]
    return port


def _handler_options(settings: Settings) -> dict[str, Any]:
    """Options of the aiohttp connection handler. ``keepalive_timeout`` closes a connection that has no
    complete request that many seconds after it opened (or after its last answer): idle or trickling
    sockets cannot hold descriptors for ever."""
    return {"access_log": None, "keepalive_timeout": settings.login_timeout or HTTP_IDLE_DEFAULT}


async def _runner(app: web.Application, settings: Settings) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False, **_handler_options(settings))
    await runner.setup()
    return runner


async def _serve_runner(
    runner: web.AppRunner, settings: Settings, port: int, gate: SocketGate, transport: str, reuse_port: bool = False
) -> asyncio.Server:
    """``runner``'s app on its own listener, every accepted socket counted by ``gate`` (hence not a
    ``web.TCPSite``, whose protocol factory cannot be wrapped)."""
    from presence.http.app import EnvelopeRequestHandler

    manager, loop, options = runner.server, asyncio.get_running_loop(), _handler_options(settings)
    assert manager is not None, "the runner is set up"

    def handler() -> EnvelopeRequestHandler:  # what ``manager()`` makes, answering malformed HTTP our way
        return EnvelopeRequestHandler(manager, loop=loop, **options)

    return await loop.create_server(
        gate.http_protocol(handler, transport),
        settings.host,
        port,
        reuse_address=True,
        reuse_port=reuse_port or None,
    )


@dataclass
class Running:
    """A started node: its settings (dev mode applied), resources and ports (real ones when 0 was asked)."""

    settings: Settings
    presence: Presence
    hub: Hub
    node_id: str
    runner: web.AppRunner  # of the node app: ``cleanup()`` releases every resource
    tcp_port: int = 0
    ws_port: int = 0
    http_port: int = 0
    embedded: bool = False
    webhooks: WebhookWorker | None = None

    async def stop(self, *, handover: float = 0.0) -> None:
        """Stop; ``handover`` seconds > 0 keeps sessions that long for their devices to reconnect elsewhere."""
        self.runner.app[NODE].handover = handover  # the options object, not the (frozen) app, changes
        await self.runner.cleanup()


async def start(settings: Settings, *, reuse_port: bool = False, ready_line: bool = True) -> Running:
    """Start one node. ``reuse_port``: the TCP and WebSocket listeners share their ports with other worker
    processes (SO_REUSEPORT); ``ready_line``: print it (a ``--workers`` supervisor prints its own)."""
    settings = with_dev_app(settings)
    for line in describe_apps(settings):
        log.info("%s", line)
    node_id = settings.node_id or default_node_id()
    app = create_node_app(settings, NodeOptions(node_id, reuse_port=reuse_port))
    runner = web.AppRunner(app, handle_signals=False)
    try:
        await runner.setup()
    except BaseException:
        try:
            await runner.cleanup()  # what did start, in reverse
        except Exception:  # the reason the start failed is what the caller must see
            log.warning("releasing a node that failed to start failed too", exc_info=True)
        raise
    listeners = app[LISTENERS]
    running = Running(
        settings,
        app[PRESENCE],
        app[HUB],
        node_id,
        runner,
        tcp_port=listeners.tcp_port,
        ws_port=listeners.ws_port,
        http_port=listeners.http_port,
        embedded=app[STORE].mode == "embedded",
        webhooks=app.get(WEBHOOKS),
    )
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
    run_event_loop(serve(settings))


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed (the ``speed`` extra), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
