"""The ``presence`` command: serve, sign, functions load|show, webhooks replay."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from presence.auth import DEFAULT_EXPIRE_S, generate_user_sign
from presence.errors import PresenceError

REDIS_URLS = """\
Redis URLs (--redis):
  (none)                        embedded in-process store (fakeredis): a demo, state is not kept
  redis://[user:pass@]host:port/db, rediss://...
                                one server; if that server is a Redis Cluster node (INFO cluster),
                                the whole cluster: any one node's address is enough
  redis+sentinel://[user:pass@]host:port[,host:port...]/<master-name>[/db]
                                Sentinel: user:pass (or PRESENCE_REDIS_USERNAME/PASSWORD) for the data
                                nodes; ?sentinel_password=... (or PRESENCE_SENTINEL_USERNAME/PASSWORD)
                                for the sentinels
The log says which mode was picked and the topology seen.
"""


def _serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", dest="redis_url", help="Redis URL (see below) [PRESENCE_REDIS_URL, REDIS_URL]")
    p.add_argument("--host", help="bind address [PRESENCE_HOST] (default 127.0.0.1)")
    p.add_argument("--tcp-port", type=int, help="TCP gateway port, 0 = disabled [PRESENCE_TCP_PORT] (9000)")
    p.add_argument("--ws-port", type=int, help="WebSocket port, 0 = disabled [PRESENCE_WS_PORT] (19000)")
    p.add_argument("--http-port", type=int, help="REST port, 0 = disabled [PRESENCE_HTTP_PORT] (8000)")
    p.add_argument("--node-id", help="gateway node id [PRESENCE_NODE_ID] (default: random)")
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        help="seconds without a frame before a connection is closed, 0 = never; an app's own "
        "[apps.N] heartbeat_timeout wins [PRESENCE_HEARTBEAT_TIMEOUT] (30)",
    )
    p.add_argument("--node-ttl", type=float, help="seconds before a silent node is reaped [PRESENCE_NODE_TTL] (10)")
    p.add_argument(
        "--offline-grace", type=float, help="seconds before a drop is announced [PRESENCE_OFFLINE_GRACE] (3)"
    )
    p.add_argument(
        "--login-timeout", type=float, help="seconds a connection may stay without LOGIN [PRESENCE_LOGIN_TIMEOUT] (10)"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        help="most client connections, 0 = file descriptor limit minus reserve [PRESENCE_MAX_CONNECTIONS] (0)",
    )
    p.add_argument(
        "--resume-window",
        type=float,
        help="seconds delivered pushes stay resumable, then inboxes are trimmed [PRESENCE_RESUME_WINDOW] (60)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="gateway processes sharing the TCP and WebSocket ports (SO_REUSEPORT), REST served once "
        "[PRESENCE_WORKERS] (1)",
    )
    p.add_argument("--config", help="TOML settings file [PRESENCE_CONFIG]")
    p.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="presence", description="Redis-native presence service")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _serve_options(
        sub.add_parser(
            "serve",
            help="run gateway (TCP + WebSocket) and REST in one process",
            description="Run gateway (TCP + WebSocket) and REST in one process.",
            epilog=REDIS_URLS,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )

    s = sub.add_parser("sign", help="print a userSign")
    s.add_argument("--app-id", type=int, required=True)
    s.add_argument("--key", required=True, help="the app's private key")
    s.add_argument("--user", required=True, help="the identifier (userId) to sign for")
    s.add_argument("--expire", type=int, default=DEFAULT_EXPIRE_S, help="validity in seconds")
    s.add_argument("--issued-at", type=int, help="issue time in Unix seconds (default: now); for test vectors")

    f = sub.add_parser(
        "functions",
        help="load or print the Redis Functions library",
        description="load: put the library on every primary that lacks it (needs --redis).\n"
        "show: without --redis, print the library's code; with --redis, say for every primary whether it runs\n"
        "this exact library (exit status 1 when one does not).",
        epilog=REDIS_URLS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("action", choices=["load", "show"])
    f.add_argument("--redis", dest="redis_url", help="Redis URL (see below) [PRESENCE_REDIS_URL, REDIS_URL]")

    w = sub.add_parser(
        "webhooks",
        help="replay an app's webhook dead letters",
        description="replay: POST the app's dead-lettered webhook events again, oldest first, each to the\n"
        "configured URL it failed for (signed as usual); each one accepted is deleted from the dead-letter\n"
        "stream. Stops at the first failure (exit 1). See gateway/FEED.md.",
        epilog=REDIS_URLS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("action", choices=["replay"])
    w.add_argument("--app-id", type=int, required=True)
    w.add_argument("--redis", dest="redis_url", help="Redis URL (see below) [PRESENCE_REDIS_URL, REDIS_URL]")
    w.add_argument("--config", help="TOML settings file with the app's webhook_urls [PRESENCE_CONFIG]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "sign":
            print(generate_user_sign(args.app_id, args.key, args.user, args.expire, now=args.issued_at))
            return 0
        if args.cmd == "functions":
            return _functions(args.action, args.redis_url)
        if args.cmd == "webhooks":
            return _replay(args.app_id, args.redis_url, args.config)
        return _serve(args)
    except PresenceError as exc:
        print(f"presence: {exc.message}", file=sys.stderr)
        return 2
    except Exception as exc:
        # A bad URL, an unreachable or refusing Redis, a port in use: one line naming it, not a traceback.
        problem = startup_problem(exc, getattr(args, "redis_url", None))
        if problem is None:
            raise
        print(f"presence: {problem}", file=sys.stderr)
        return 2


def startup_problem(exc: BaseException, url: str | None) -> str | None:
    """The one-line reason a start failed, or None for an unexpected error (shown with its traceback)."""
    from redis import exceptions as rex

    where = _redacted(url) if url else "the configured URL"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, rex.AuthenticationError) or (
        isinstance(exc, rex.ResponseError) and text.startswith(("WRONGPASS", "NOAUTH", "invalid password"))
    ):
        return f"redis at {where} refused the credentials (wrong user or password): {text}"
    if type(exc).__name__ in ("MasterNotFoundError", "SlaveNotFoundError"):
        return f"the sentinels at {where} know no such master (or cannot be reached): {text}"
    if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
        return f"cannot reach redis at {where}: {text}"
    if isinstance(exc, rex.RedisClusterException):
        return f"redis cluster at {where}: {text}"
    if isinstance(exc, rex.ResponseError):
        return f"redis at {where} answered an error (is it a Redis 7 server, not a sentinel?): {text}"
    if isinstance(exc, ValueError):
        return f"bad redis URL {where}: {text}"
    if isinstance(exc, OSError):
        return f"cannot listen: {text}"
    return None


def _redacted(url: str) -> str:
    """The URL without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _functions(action: str, redis_url: str | None) -> int:
    from presence.config import load_settings
    from presence.library import ensure_library, library_source, library_status
    from presence.store import open_store

    if action == "show" and not redis_url:
        sys.stdout.write(library_source())
        return 0
    url = load_settings(redis_url=redis_url).redis_url
    if not url:
        print("presence: functions load needs --redis URL (or PRESENCE_REDIS_URL / REDIS_URL)", file=sys.stderr)
        return 2

    async def run() -> int:
        store = await open_store(url, max_connections=4, retry_for=5)
        try:
            if action == "show":
                status = await library_status(store)
                for node, ok in status:
                    print(f"{node}: {'library presence is up to date' if ok else 'missing or outdated'}")
                return 0 if all(ok for _, ok in status) else 1
            loaded = await ensure_library(store)
            print("loaded library presence" if loaded else "library presence is already up to date")
            return 0
        finally:
            await store.aclose()

    return asyncio.run(run())


def _replay(app_id: int, redis_url: str | None, config: str | None) -> int:
    from presence.config import load_settings
    from presence.service import Presence
    from presence.store import open_store
    from presence.webhooks import replay_dead_letters

    settings = load_settings(config, redis_url=redis_url)
    app = settings.apps.get(app_id)
    if not settings.redis_url or app is None or not app.webhook_urls:
        print(f"presence: webhooks replay needs --redis URL and app {app_id} with webhook_urls", file=sys.stderr)
        return 2

    async def run() -> int:
        store = await open_store(settings.redis_url, max_connections=4, retry_for=5)
        try:
            sent, error = await replay_dead_letters(Presence(store, settings), app_id, app, settings.webhook_timeout)
        finally:
            await store.aclose()
        print(f"replayed {sent} dead-lettered events of app {app_id}")
        if error:
            print(f"presence: stopped at {error}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(run())


def _serve(args: argparse.Namespace) -> int:
    from presence.config import load_settings
    from presence.server import run

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(
        args.config,
        redis_url=args.redis_url,
        host=args.host,
        tcp_port=args.tcp_port,
        ws_port=args.ws_port,
        http_port=args.http_port,
        node_id=args.node_id,
        heartbeat_timeout=args.heartbeat_timeout,
        node_ttl=args.node_ttl,
        offline_grace=args.offline_grace,
        login_timeout=args.login_timeout,
        max_connections=args.max_connections,
        resume_window=args.resume_window,
        workers=args.workers,
    )
    run(settings)
    return 0
