"""Schemathesis against the live REST app: no 5xx, and every response conforms to http/openapi.yaml.

The app runs on a real AppRunner on a free port, in a thread with its own event loop (schemathesis
drives it with blocking HTTP calls), with Presence on the suite's real redis-server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from redis.asyncio import Redis
from schemathesis.config import SchemathesisConfig

from presence.auth import generate_user_sign
from presence.config import AppConfig, Settings
from presence.http import create_app
from presence.library import ensure_library
from presence.resources import resource_path
from presence.service import Presence

APP = 10000
KEY = "schemathesis-key"
CALLER = "admin"  # an app admin, so valid admin-only calls are accepted too
# Dev mode: the dev endpoints are documented, so they must be served to be tested.
SETTINGS = Settings(apps={APP: AppConfig(private_key=KEY, admins=(CALLER,))}, dev_mode=True)

SIGN = generate_user_sign(APP, KEY, CALLER)
# The spec models appId, identifier and userSign as apiKey security schemes: schemathesis sends these
# values (and probes each operation without them and with wrong ones: the app must answer 401).
CONFIG = SchemathesisConfig.from_dict(
    {
        # A negative case may also be refused for its size (413, documented): that is a rejection too.
        "checks": {"negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "405", "413", "422"]}},
        "auth": {
            "openapi": {
                "appId": {"api_key": str(APP)},
                "identifier": {"api_key": CALLER},
                "userSign": {"api_key": SIGN},
            }
        },
    }
)
schema = schemathesis.openapi.from_path(resource_path("http/openapi.yaml"), config=CONFIG)


class LiveServer:
    """The REST app served by a real AppRunner on a free port, in a background thread."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.url = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="rest-live-server", daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30), "the REST app did not start within 30 s"
        if self._error is not None:
            raise RuntimeError("the REST app failed to start") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the REST app did not stop within 30 s"
        if self._error is not None:
            raise RuntimeError("the REST app failed while stopping") from self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start() or stop() in the test's thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        redis = Redis.from_url(self.redis_url)
        await redis.flushall()
        await ensure_library(redis)
        runner = web.AppRunner(create_app(Presence(redis, SETTINGS), SETTINGS))
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await redis.aclose()


@pytest.fixture(scope="module")
def live(redis_url: str) -> Iterator[LiveServer]:
    server = LiveServer(redis_url)
    server.start()
    yield server
    server.stop()


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _breaks_prose_rules(case: schemathesis.Case) -> bool:
    """Rules JSON Schema cannot state, which the spec states in prose: byte lengths and "not itself"."""
    body = case.body if isinstance(case.body, dict) else {}
    query = case.query if isinstance(case.query, dict) else {}
    items = [*_list(body.get("friendItem")), body.get("toItem")]
    friends = [item.get("toId") for item in items if isinstance(item, dict)]
    ids = [body.get(f) for f in ("userId", "fromId", "toId")] + [query.get(f) for f in ("userId", "friendId")]
    ids += _list(body.get("subUserId")) + _list(body.get("userList")) + friends
    texts = [(v, 64) for v in ids] + [(body.get("customText"), 100)]
    if any(isinstance(v, str) and len(v.encode()) > most for v, most in texts):
        return True
    from_id = body.get("fromId")
    if isinstance(from_id, str) and (from_id == body.get("toId") or from_id in friends):
        return True
    return CALLER in _list(body.get("subUserId")) or ("userId" in query and query["userId"] == query.get("friendId"))


@schema.hook
def filter_case(context: Any, case: schemathesis.Case) -> bool:
    # Valid data only: such a request is rejected with 400 (test_http_app.py covers each rule), which
    # schemathesis would report as "schema-valid request rejected". Negative cases are all kept.
    return not (case.meta is not None and case.meta.generation.mode.is_positive and _breaks_prose_rules(case))


@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,  # the same examples on every run
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_conforms_to_openapi(case: schemathesis.Case, live: LiveServer) -> None:
    case.call_and_validate(base_url=live.url)
