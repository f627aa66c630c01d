"""Webhooks against a real local aiohttp receiver, on one redis-server and on a 3-primary cluster.

The receiver verifies each body's HMAC-SHA256 signature with the app's key; one is down for a while
(its port closed: connections refused) and comes back: every event arrives, each user's in order. One
always fails: the event goes to the dead-letter stream after N attempts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from presence.config import AppConfig
from presence.metrics import REGISTRY
from presence.service import Presence
from presence.webhooks import SIGNATURE_HEADER, callback_body
from tests.clients import APP, KEY
from tests.conftest import MakeNode, free_port

IOS, ANDROID = 2, 3


class Receiver:
    """An app backend: records every signed POST; ``status`` answers it (200, or an error to make it retry)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/hook"
        self.posts: list[dict[str, Any]] = []
        self.status = 200
        self.changed = asyncio.Condition()
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request.headers[SIGNATURE_HEADER], expected), "bad signature"
        event = json.loads(body)
        assert request.headers["X-Presence-Event-Id"] == event["EventId"]
        async with self.changed:
            self.posts.append(event)
            self.changed.notify_all()
        return web.Response(status=self.status)

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def down(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()
        self.runner = None

    async def wait_for(self, check: Any, timeout: float = 15.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: check(self.posts)), timeout)

    def delivered(self) -> list[dict[str, Any]]:
        """Accepted posts (status 200 when received), first copy of each event id."""
        seen: dict[str, dict[str, Any]] = {}
        for p in self.posts:
            seen.setdefault(p["EventId"], p)
        return list(seen.values())


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(free_port())
    await r.up()
    yield r
    if r.runner is not None:
        await r.down()


def _failed() -> float:
    return REGISTRY.get_sample_value("presence_webhook_failed_total", {"app": str(APP)}) or 0.0


async def _until(check: Any, timeout: float = 15.0) -> None:
    """Poll a condition that no socket signals (a metric), with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_receiver_down_then_back_gets_every_event_in_user_order(
    make_node: MakeNode, facade: Presence, receiver: Receiver
) -> None:
    app = AppConfig(private_key=KEY, webhook_urls=(receiver.url,))
    node = await make_node(apps={APP: app}, webhook_backoff=0.05, webhook_attempts=100)
    p = node.presence
    await p.login(APP, "alice", IOS, "phone")
    await receiver.wait_for(lambda posts: len(posts) == 1)
    first = receiver.posts[0]
    assert first["CallbackCommand"] == "State.StateChange" and first["Info"] == {
        "Action": "Login",
        "To_Account": "alice",
        "Reason": "Register",
    }
    assert (first["UserId"], first["ClientType"], first["Imei"], first["Status"]) == ("alice", IOS, "phone", 1)

    await receiver.down()  # connections refused from now on
    failed = _failed()
    users = ["alice", "bob", "carol", "dave"]
    for i in range(3):
        for u in users:
            await p.set_custom_status(APP, u, i, f"{u} {i}")
    await p.logout(APP, "alice", IOS, "phone", reason="timeout")
    await _until(lambda: _failed() >= failed + 3)  # the worker is retrying against a closed port
    await receiver.up()
    expected = 1 + 3 * len(users) + 1
    await receiver.wait_for(lambda posts: len({x["EventId"] for x in posts}) >= expected)
    got = receiver.delivered()
    assert len(got) == expected  # nothing lost
    for u in users:
        texts = [x["CustomText"] for x in got if x["UserId"] == u and x["Event"] == "status"]
        assert texts == [f"{u} {i}" for i in range(3)], "per-user order"
    last = [x for x in got if x["UserId"] == "alice"][-1]
    assert last["Info"] == {"Action": "Disconnect", "To_Account": "alice", "Reason": "TimeOut"}
    assert last["PresenceReason"] == "timeout" and last["Status"] == 2
    times = [x["EventTime"] for x in got if x["UserId"] == "alice"]
    assert times == sorted(times)
    # every feed entry was acknowledged by the group
    for k in range(node.settings.feed_shards):
        shard = p.keys.feed_shard(APP, k)
        groups = await facade.redis.xinfo_groups(shard)
        assert [g["pending"] for g in groups] == [0]


async def test_an_event_that_keeps_failing_goes_to_the_dead_letter_stream(
    make_node: MakeNode, facade: Presence, receiver: Receiver
) -> None:
    receiver.status = 500
    app = AppConfig(private_key=KEY, webhook_urls=(receiver.url,))
    node = await make_node(apps={APP: app}, webhook_backoff=0.01, webhook_attempts=3)
    await node.presence.login(APP, "erin", ANDROID, "e1")
    await receiver.wait_for(lambda posts: len(posts) == 3)  # three attempts, the same event
    assert len({x["EventId"] for x in receiver.posts}) == 1
    dead = facade.keys.feed_dead(APP)
    entries: list[Any] = []
    deadline = asyncio.get_running_loop().time() + 5
    while not entries:  # written right after the last attempt's answer
        assert asyncio.get_running_loop().time() < deadline, "no dead letter"
        entries = await facade.redis.xrange(dead) or await asyncio.sleep(0.02) or []
    ((_, fields),) = entries
    assert fields[b"userId"] == b"erin" and fields[b"attempts"] == b"3" and fields[b"error"] == b"HTTP 500"
    assert fields[b"url"] == receiver.url.encode() and fields[b"eventId"].decode() == receiver.posts[0]["EventId"]
    # and the worker went on: the next event is delivered once the receiver accepts again
    receiver.status = 200
    await node.presence.logout(APP, "erin", ANDROID, "e1", reason="kicked")
    await receiver.wait_for(lambda posts: posts[-1]["Event"] == "logout")
    assert receiver.posts[-1]["KickedDevice"] == [{"Platform": "Android"}]
    shard = facade.keys.feed_shard(APP, facade.feed_shard_of(APP, "erin"))
    group = f"webhook:{receiver.url}"
    pending_ids = [e["message_id"] for e in await facade.redis.xpending_range(shard, group, "-", "+", 10)]
    pending_events = [(await facade.redis.xrange(shard, i, i))[0][1][b"eventId"] for i in pending_ids]
    assert fields[b"eventId"] not in pending_events  # acknowledged before the next entry was sent
    assert REGISTRY.get_sample_value("presence_webhook_dead_total", {"app": str(APP)}) >= 1


def test_callback_body_maps_reasons_to_tencent_actions() -> None:
    base = {"eventId": "10000:u:1-0", "appId": "10000", "userId": "u", "time": "5", "version": "0"}
    cases = {
        ("logout", "logout"): ("Logout", "Unregister"),
        ("logout", "close"): ("Disconnect", "LinkClose"),
        ("logout", "reaped"): ("Disconnect", "TimeOut"),
        ("logout", "kicked"): ("Logout", "Kicked"),
        ("login", "login"): ("Login", "Register"),
    }
    for (event, reason), (action, why) in cases.items():
        body = callback_body({**base, "event": event, "reason": reason, "clientType": "2"})
        assert (body["Info"]["Action"], body["Info"]["Reason"]) == (action, why)
    body = callback_body({**base, "event": "status", "customStatus": "4", "customText": "x"})
    assert body["CallbackCommand"] == "State.CustomStatusChange" and (body["CustomStatus"], body["CustomText"]) == (
        4,
        "x",
    )
