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
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from presence import webhooks
from presence.config import AppConfig
from presence.errors import ParamError
from presence.metrics import REGISTRY
from presence.service import Presence
from presence.webhooks import SIGNATURE_HEADER, callback_body
from tests.clients import APP, KEY, stream_entries
from tests.conftest import MakeNode, free_port

IOS, ANDROID = 2, 3


class Receiver:
    """An app backend: records every signed POST; ``status`` answers it (200, or an error to make it retry)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/hook"
        self.posts: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0  # seconds before answering
        self.inflight = 0
        self.max_inflight = 0  # most requests being answered at once
        self.gets = 0  # GETs of /hook (what a followed redirect would send)
        self.changed = asyncio.Condition()
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(request.headers[SIGNATURE_HEADER], expected), "bad signature"
        event = json.loads(body)
        assert request.headers["X-Presence-Event-Id"] == event["EventId"]
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)  # a slow backend
        finally:
            self.inflight -= 1
        async with self.changed:
            self.posts.append(event)
            self.changed.notify_all()
        return web.Response(status=self.status)

    async def get(self, request: web.Request) -> web.Response:
        self.gets += 1
        return web.Response(status=200)

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/hook")

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        app.router.add_get("/hook", self.get)
        app.router.add_post("/moved", self.moved)
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
    # every feed entry is acknowledged by the group (the ack follows the receiver's answer, so it may lag it)
    for k in range(node.settings.feed_shards):
        shard = p.keys.feed_shard(APP, k)
        deadline = asyncio.get_running_loop().time() + 5
        while [g["pending"] for g in await facade.redis.xinfo_groups(shard)] != [0]:
            assert asyncio.get_running_loop().time() < deadline, f"entries of {shard} left unacknowledged"
            await asyncio.sleep(0.05)


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
    deadline = asyncio.get_running_loop().time() + 5
    while not (entries := stream_entries(await facade.redis.xrange(dead))):  # written right after the last answer
        assert asyncio.get_running_loop().time() < deadline, "no dead letter"
        await asyncio.sleep(0.02)
    ((_, fields),) = entries
    assert fields[b"userId"] == b"erin" and fields[b"attempts"] == b"3" and fields[b"error"] == b"HTTP 500"
    assert fields[b"url"] == receiver.url.encode() and fields[b"eventId"].decode() == receiver.posts[0]["EventId"]
    # and the worker went on: the next event is delivered once the receiver accepts again
    receiver.status = 200
    await node.presence.logout(APP, "erin", ANDROID, "e1", reason="kicked")
    await receiver.wait_for(lambda posts: posts[-1]["Event"] == "logout")
    assert receiver.posts[-1]["Info"]["Reason"] == "Kicked" and receiver.posts[-1]["KickedDevice"] == []
    shard = facade.keys.feed_shard(APP, facade.feed.shard_of(APP, "erin"))
    group = f"webhook:{receiver.url}"
    pending_ids = [e["message_id"] for e in await facade.redis.xpending_range(shard, group, "-", "+", 10)]
    pending_events = [stream_entries(await facade.redis.xrange(shard, i, i))[0][1][b"eventId"] for i in pending_ids]
    assert fields[b"eventId"] not in pending_events  # acknowledged before the next entry was sent
    dead_total = REGISTRY.get_sample_value("presence_webhook_dead_total", {"app": str(APP)})
    assert dead_total is not None and dead_total >= 1


def test_callback_body_maps_reasons_to_tencent_actions() -> None:
    base = {"eventId": "10000:u:1-0", "appId": "10000", "userId": "u", "time": "5", "version": "0"}
    cases = {
        ("logout", "logout"): ("Logout", "Unregister"),
        ("logout", "close"): ("Disconnect", "LinkClose"),
        ("logout", "reaped"): ("Disconnect", "TimeOut"),
        ("logout", "kicked"): ("Logout", "Kicked"),
        ("logout", "handover"): ("Disconnect", "LinkClose"),
        ("logout", "restarted"): ("Disconnect", "LinkClose"),
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


def _dead_entries(facade: Presence) -> Any:
    return facade.redis.xrange(facade.keys.feed_dead(APP))


async def _until_dead(facade: Presence, n: int) -> list[Any]:
    deadline = asyncio.get_running_loop().time() + 10
    while len(entries := await _dead_entries(facade)) < n:
        assert asyncio.get_running_loop().time() < deadline, "no dead letter"
        await asyncio.sleep(0.02)
    return list(entries)


async def test_two_workers_deliver_each_event_once_while_posts_outlast_the_lease(
    make_node: MakeNode, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is renewed while a slow batch is delivered: the other node never takes the shard over."""
    monkeypatch.setattr(webhooks, "LEASE_MS", 1000)  # a batch of 0.15 s answers outlasts it many times
    receiver.delay = 0.15
    app = AppConfig(private_key=KEY, webhook_urls=(receiver.url,))
    first = await make_node(apps={APP: app}, feed_shards=1, node_id="hooks-a")
    await make_node(apps={APP: app}, feed_shards=1, node_id="hooks-b")
    users = ["alice", "bob", "carol"]
    for i in range(8):
        for u in users:
            await first.presence.set_custom_status(APP, u, i, f"{u} {i}")
    await receiver.wait_for(lambda posts: len({x["EventId"] for x in posts}) >= 24, timeout=30)
    ids = [x["EventId"] for x in receiver.posts]
    assert len(ids) == len(set(ids)) == 24, "an event was posted twice"
    assert receiver.max_inflight == 1, "two workers posted the shard at once"
    for u in users:
        assert [x["CustomText"] for x in receiver.posts if x["UserId"] == u] == [f"{u} {i}" for i in range(8)]


async def test_a_redirect_is_not_followed_and_counts_as_a_failure(
    make_node: MakeNode, facade: Presence, receiver: Receiver
) -> None:
    moved = receiver.url.replace("/hook", "/moved")
    app = AppConfig(private_key=KEY, webhook_urls=(moved,))
    await make_node(apps={APP: app}, webhook_backoff=0.01, webhook_attempts=2)
    await facade.set_custom_status(APP, "gina", 1, "x")
    ((_, fields),) = await _until_dead(facade, 1)
    assert fields[b"userId"] == b"gina" and fields[b"attempts"] == b"2"
    assert fields[b"error"].startswith(b"HTTP 302")
    assert receiver.gets == 0 and receiver.posts == []  # never re-sent as a GET to the redirect's target


async def test_lag_gauge_keeps_the_age_of_a_stuck_event_while_other_shards_idle(
    make_node: MakeNode, facade: Presence, receiver: Receiver
) -> None:
    receiver.status = 500
    app = AppConfig(private_key=KEY, webhook_urls=(receiver.url,))
    await make_node(apps={APP: app}, webhook_backoff=0.05, webhook_attempts=1000)  # 4 shards, 3 idle
    await facade.set_custom_status(APP, "hana", 1, "stuck")

    def lag() -> float:
        return REGISTRY.get_sample_value("presence_webhook_lag_seconds", {"app": str(APP)}) or 0.0

    await _until(lambda: lag() >= 0.5)
    samples = []
    for _ in range(10):  # idle shards poll every 0.2 s: none of them resets it
        samples.append(lag())
        await asyncio.sleep(0.05)
    assert min(samples) >= 0.5, samples


async def test_a_login_that_kicks_lists_the_kicked_device_like_tencent(make_node: MakeNode, receiver: Receiver) -> None:
    app = AppConfig(private_key=KEY, login_model=1, webhook_urls=(receiver.url,))  # one device at a time
    node = await make_node(apps={APP: app})
    await node.presence.login(APP, "ivan", ANDROID, "old-phone")
    await node.presence.login(APP, "ivan", IOS, "new-phone")
    await receiver.wait_for(lambda posts: len(posts) == 3)
    first, kicked, login = receiver.posts
    assert (first["Event"], first["KickedDevice"]) == ("login", [])
    assert kicked["Info"]["Reason"] == "Kicked" and kicked["Imei"] == "old-phone" and kicked["KickedDevice"] == []
    assert login["Info"] == {"Action": "Login", "To_Account": "ivan", "Reason": "Register"}
    assert login["KickedDevice"] == [{"Platform": "Android"}] and login["ClientType"] == IOS
    assert login["Version"] == kicked["Version"]  # one change: the login and the kick it caused


async def test_the_feed_shard_count_is_pinned_per_app(make_node: MakeNode, facade: Presence) -> None:
    await make_node(feed_shards=4)
    with pytest.raises(ParamError, match=r"feed_shards is 8 but app 10000's feed is pinned to 4 shards"):
        await make_node(feed_shards=8)
    assert await facade.redis.get(facade.keys.feed_shard_count(APP)) == b"4"
    await make_node(feed_shards=4)  # the same count starts


async def test_replay_posts_the_dead_letters_in_order_and_removes_them(
    make_node: MakeNode, facade: Presence, receiver: Receiver, store_url: str, tmp_path: Any
) -> None:
    receiver.status = 500
    app = AppConfig(private_key=KEY, webhook_urls=(receiver.url,))
    await make_node(apps={APP: app}, webhook_backoff=0.01, webhook_attempts=1)
    await facade.set_custom_status(APP, "jo", 1, "one")
    await facade.set_custom_status(APP, "jo", 2, "two")
    dead = await _until_dead(facade, 2)
    receiver.status = 200
    posted = len(receiver.posts)
    config = tmp_path / "presence.toml"
    config.write_text(f'[apps.{APP}]\nprivate_key = "{KEY}"\nwebhook_urls = ["{receiver.url}"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "presence", "webhooks", "replay", "--app-id", str(APP),
        "--redis", store_url, "--config", str(config), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out
    replayed = receiver.posts[posted:]
    assert [x["CustomText"] for x in replayed] == ["one", "two"]
    assert [x["EventId"] for x in replayed] == [f[b"eventId"].decode() for _, f in dead]
    assert await _dead_entries(facade) == []
