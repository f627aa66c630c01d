"""Dev mode's demo: the browser client, the demo page and the one endpoint it needs to find the gateway.

``add_demo_routes`` adds to the REST app:

- ``GET /``: ``gateway/demo.html``;
- ``GET /<name>``: every other servable file of ``gateway/`` (``presence-client.js``, ``demo.js``,
  ``demo.css``, the protocol notes ...), with an explicit content type, revalidated on every load;
- ``GET /v1/dev/config``: ``{"code":200,"msg":"success","data":{"appId","wsUrl","serverTime"}}``.

The static paths are recorded in ``app[DEMO_FILES]`` (they are pages, not API: openapi.yaml leaves them out).

Files are found with ``resource_path`` (inside the wheel or in the repository) and read per request, so
an edited page shows on reload. Only files present at start are routed: no path is ever built from a URL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from yarl import URL

from presence.appkeys import PRESENCE, SETTINGS
from presence.config import DEV_APP_ID
from presence.models import ResponseVO
from presence.resources import resource_path

log = logging.getLogger("presence.http.demo")

# By suffix; anything else in gateway/ is not served.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
INDEX = "demo.html"

_COMMON_HEADERS = {
    "Cache-Control": "no-cache",  # revalidate (ETag / Last-Modified): an edited file shows on reload
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_ENCODER = msgspec.json.Encoder()

WsUrlFor = Callable[[web.Request], str]
# The static paths add_demo_routes served ("/" and one per file): pages, not API, so not in openapi.yaml.
DEMO_FILES = web.AppKey("demo_files", tuple[str, ...])


class DevConfig(msgspec.Struct):
    appId: int
    wsUrl: str
    serverTime: int  # ms, Redis's clock (the clock of lastSeen and eventIds): lets the page show "N s ago" right


def ws_url_on_port(port: int, path: str = "/ws") -> WsUrlFor:
    """``ws_url_for`` for a gateway on ``port`` of the host the browser used for the page (wss under https)."""

    def ws_url_for(request: web.Request) -> str:
        host = request.url.host or "127.0.0.1"
        return str(URL.build(scheme="wss" if request.secure else "ws", host=host, port=port, path=path))

    return ws_url_for


def add_demo_routes(app: web.Application, *, ws_url_for: WsUrlFor) -> None:
    """Serve the demo page, the JS client and the other files of ``gateway/``, and ``GET /v1/dev/config``."""
    root = resource_path("gateway")
    names = sorted(
        p.name for p in root.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES and not p.name.startswith(".")
    )
    if INDEX not in names:
        raise FileNotFoundError(f"{root / INDEX} is missing: the demo page cannot be served")
    app.router.add_get("/", _file_handler(INDEX, ws_url_for))
    for name in names:
        app.router.add_get(f"/{name}", _file_handler(name, ws_url_for))
    app[DEMO_FILES] = ("/", *(f"/{name}" for name in names))
    app.router.add_get("/v1/dev/config", _config_handler(ws_url_for))
    log.info("demo page at / (files of %s: %s)", root, ", ".join(names))


def _file_handler(name: str, ws_url_for: WsUrlFor) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    content_type = CONTENT_TYPES[name[name.rfind(".") :]]
    is_html = content_type.startswith("text/html")

    async def serve_file(request: web.Request) -> web.StreamResponse:
        try:
            path = resource_path(f"gateway/{name}")
        except FileNotFoundError:
            raise web.HTTPNotFound() from None
        headers = {"Content-Type": content_type, **_COMMON_HEADERS}
        if is_html:
            headers["Content-Security-Policy"] = _page_policy(ws_url_for(request))
        return web.FileResponse(path, headers=headers)

    return serve_file


def _page_policy(ws_url: str) -> str:
    """Scripts and styles from this origin only; sockets to this origin and the gateway; no framing."""
    ws = URL(ws_url)
    ws_origin = str(ws.origin()) if ws.absolute else ""
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src 'self' {ws_origin}".rstrip(),
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


def _config_handler(ws_url_for: WsUrlFor) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def dev_config(request: web.Request) -> web.Response:
        settings = request.app.get(SETTINGS)
        apps = settings.apps if settings is not None else {}
        app_id = DEV_APP_ID if DEV_APP_ID in apps or not apps else min(apps)
        body = _ENCODER.encode(ResponseVO(data=DevConfig(app_id, ws_url_for(request), await _server_time_ms(request))))
        return web.Response(body=body, content_type="application/json", charset="utf-8", headers=_COMMON_HEADERS)

    return dev_config


async def _server_time_ms(request: web.Request) -> int:
    presence = request.app.get(PRESENCE)
    if presence is not None:
        try:
            return await presence.nodes.redis_time_ms()
        except Exception as exc:  # the page only needs an estimate; Redis trouble shows up elsewhere
            log.debug("TIME failed, using this host's clock: %r", exc)
    return int(time.time() * 1000)
