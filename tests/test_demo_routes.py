"""presence.http.demo on its own aiohttp app: files, content types, headers, /v1/dev/config (no browser)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from presence.appkeys import SETTINGS
from presence.config import AppConfig, Settings
from presence.http.demo import DEMO_FILES, add_demo_routes, ws_url_on_port
from presence.resources import resource_path


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application()
    app[SETTINGS] = Settings(apps={10000: AppConfig(private_key="k")}, dev_mode=True)
    add_demo_routes(app, ws_url_for=ws_url_on_port(19999))
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


@pytest.mark.parametrize(
    ("path", "content_type", "marker"),
    [
        ("/", "text/html", 'data-testid="friends"'),
        ("/demo.html", "text/html", 'data-testid="friends"'),
        ("/presence-client.js", "text/javascript", "export class PresenceClient"),
        ("/demo.js", "text/javascript", "./presence-client.js"),
        ("/demo.css", "text/css", "@media (min-width"),
    ],
)
async def test_serves_gateway_files_with_their_content_type(
    client: TestClient[web.Request, web.Application], path: str, content_type: str, marker: str
) -> None:
    resp = await client.get(path)
    assert resp.status == 200
    assert resp.content_type == content_type and resp.charset == "utf-8"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "no-cache" and resp.headers.get("ETag")
    assert marker in await resp.text()


async def test_page_policy_allows_only_this_origin_and_the_gateway(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/")
    policy = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "connect-src 'self' ws://127.0.0.1:19999" in policy
    assert "Content-Security-Policy" not in (await client.get("/demo.js")).headers


async def test_revalidation_answers_304(client: TestClient[web.Request, web.Application]) -> None:
    etag = (await client.get("/presence-client.js")).headers["ETag"]
    resp = await client.get("/presence-client.js", headers={"If-None-Match": etag})
    assert resp.status == 304


@pytest.mark.parametrize(
    "path", ["/nope.js", "/../pyproject.toml", "/%2e%2e/pyproject.toml", "/gateway/demo.html", "/.hidden.js"]
)
async def test_nothing_outside_the_listed_files(client: TestClient[web.Request, web.Application], path: str) -> None:
    assert (await client.get(path)).status == 404


async def test_dev_config(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/v1/dev/config")
    assert resp.status == 200 and resp.content_type == "application/json"
    body = await resp.json()
    assert body["code"] == 200 and body["msg"] == "success"
    data = body["data"]
    assert data["appId"] == 10000 and data["wsUrl"] == "ws://127.0.0.1:19999/ws"
    assert abs(data["serverTime"] - time.time() * 1000) < 60_000


@pytest.mark.parametrize(
    ("host", "secure", "expected"),
    [
        ("example.com", False, "ws://example.com:19000/ws"),
        ("example.com:8000", True, "wss://example.com:19000/ws"),
        ("[::1]:8000", False, "ws://[::1]:19000/ws"),
        ("192.168.1.20:8000", False, "ws://192.168.1.20:19000/ws"),
    ],
)
def test_ws_url_uses_the_host_the_browser_used(host: str, secure: bool, expected: str) -> None:
    request = make_mocked_request("GET", "/", headers={"Host": host})
    if secure:
        request = request.clone(scheme="https")
    assert ws_url_on_port(19000)(request) == expected


async def test_static_paths_are_recorded(client: TestClient[web.Request, web.Application]) -> None:
    files = client.app[DEMO_FILES]
    assert {"/", "/demo.html", "/demo.js", "/demo.css", "/presence-client.js"} <= set(files)
    assert "/v1/dev/config" not in files


def test_the_page_and_the_client_are_resources() -> None:
    for name in ("demo.html", "demo.js", "demo.css", "presence-client.js"):
        assert resource_path(f"gateway/{name}").is_file()
