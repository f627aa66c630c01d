"""The browser client and the demo page in real headless Chromium, against a real ``presence serve``.

Chromium is Debian's package (``/usr/bin/chromium``, or ``PRESENCE_CHROMIUM``) driven by Playwright's
Python package; Playwright's own browsers are never downloaded. The server is a subprocess in dev mode
(no PRESENCE_APPS) on free ports against the suite's redis-server, with a 0.5 s offline grace.
No sleeps: every wait is Playwright's expect / wait_for_function with a timeout.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from playwright.async_api import Browser, ConsoleMessage, Page, ViewportSize, async_playwright, expect

from presence.gateway.codec import Command
from tests.clients import WsClient
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "test-output"
CHROMIUM = os.environ.get("PRESENCE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GRACE_S = 0.5
PUSH_MS = 2000  # a push must show within this
PHONE: ViewportSize = {"width": 390, "height": 844}
CLOSED_BY_LOGOUT = {"code": 1000, "reason": "logged out", "reconnect": False, "delay": None}


@dataclass
class Server:
    base: str  # http://127.0.0.1:port
    ws_url: str
    ws_port: int
    app_id: int
    key: str
    log: Path


def _reader(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[Server]:
    """``python -m presence serve`` in dev mode; its ports and dev key come from its stdout."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    OUT.mkdir(exist_ok=True)
    log = OUT / "presence-serve.log"
    tcp, ws, http = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESENCE_") and k != "REDIS_URL"}
    flags = {"--redis": redis_url, "--host": "127.0.0.1", "--tcp-port": tcp, "--ws-port": ws, "--http-port": http}
    flags["--offline-grace"] = GRACE_S
    cmd = [sys.executable, "-m", "presence", "serve", *(str(part) for flag in flags.items() for part in flag)]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    ports: dict[str, int] = {}
    key = ""
    deadline = time.monotonic() + 30
    try:
        while not (ports and key):
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, f"presence serve did not start:\n{log.read_text()[-3000:]}"
            try:
                line = lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if m := re.search(r"presence listening tcp=(\d+) ws=(\d+) http=(\d+)", line):
                ports = {"tcp": int(m[1]), "ws": int(m[2]), "http": int(m[3])}
            elif m := re.search(r"dev mode: app (\d+), private key (\S+)", line):
                app_id, key = int(m[1]), m[2]
        assert ports == {"tcp": tcp, "ws": ws, "http": http}
        _check_demo_is_served(f"http://127.0.0.1:{http}/")
        yield Server(f"http://127.0.0.1:{http}", f"ws://127.0.0.1:{ws}/ws", ws, app_id, key, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _check_demo_is_served(url: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            content_type = resp.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        pytest.fail(f"GET {url} answered {exc.code}: in dev mode create_app must call add_demo_routes")
    assert content_type == "text/html", f"GET {url} is {content_type}, not the demo page"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert os.path.exists(CHROMIUM), (
        f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; `make test` does it)"
    )
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        await b.close()


class PageErrors:
    """Console errors and uncaught exceptions of pages: a working page has none."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page: Page, name: str) -> Page:
        def on_console(msg: ConsoleMessage) -> None:
            if msg.type == "error":
                self.errors.append(f"{name} console: {msg.text}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"{name} exception: {exc}"))
        return page

    def check(self) -> None:
        assert not self.errors, "\n".join(self.errors)


async def open_demo(
    browser: Browser, server: Server, user: str, errors: PageErrors, *, imei: str | None = None, phone: bool = False
) -> Page:
    context = await browser.new_context(
        viewport=PHONE if phone else {"width": 1100, "height": 800}, device_scale_factor=2 if phone else 1
    )
    page = errors.watch(await context.new_page(), user)
    query = f"?user={user}" + (f"&imei={imei}" if imei else "")
    await page.goto(f"{server.base}/{query}")
    await expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", "open")
    return page


# --- the demo page ---


async def test_demo_friend_sees_online_custom_status_and_offline(server: Server, browser: Browser) -> None:
    errors = PageErrors()
    bob = await open_demo(browser, server, "bob", errors, phone=True)
    # Make alice a friend from bob's page (POST /v1/dev/friends); she has never been online.
    await bob.get_by_test_id("add-friend-input").fill("alice")
    await bob.get_by_test_id("add-friend").click()
    friend = bob.get_by_test_id("friend-alice")
    await expect(friend).to_have_attribute("data-status", "offline")
    await expect(bob.get_by_test_id("lastseen-alice")).to_have_text("never seen")

    alice = await open_demo(browser, server, "alice", errors)
    await expect(friend).to_have_attribute("data-status", "online", timeout=PUSH_MS)
    await expect(bob.get_by_test_id("devices-alice")).to_have_text("Web")
    await expect(bob.get_by_test_id("friends-count")).to_have_text("1/1 online")
    # alice pulled her friends at login: bob is online for her.
    await expect(alice.get_by_test_id("friend-bob")).to_have_attribute("data-status", "online")

    await alice.get_by_test_id("custom-status-input").select_option("2")
    await alice.get_by_test_id("custom-text-input").fill("at lunch")
    await alice.get_by_test_id("custom-save").click()
    await expect(bob.get_by_test_id("custom-alice")).to_have_text("at lunch", timeout=PUSH_MS)
    await expect(bob.get_by_test_id("mood-alice")).to_have_text("Away")
    await expect(alice.get_by_test_id("me-custom")).to_have_text("at lunch")

    OUT.mkdir(exist_ok=True)
    await bob.screenshot(path=OUT / "demo-bob.png", full_page=True)

    closed_at = time.monotonic()
    await alice.context.close()
    await expect(friend).to_have_attribute("data-status", "offline", timeout=GRACE_S * 1000 + PUSH_MS)
    assert time.monotonic() - closed_at >= GRACE_S * 0.9, "offline was announced before the grace ran out"
    await expect(bob.get_by_test_id("lastseen-alice")).to_have_text(re.compile(r"^last seen \d+ s ago$"))
    await expect(bob.get_by_test_id("custom-alice")).to_have_text("at lunch")  # custom status outlives the session
    await expect(bob.get_by_test_id("friends-count")).to_have_text("0/1 online")
    errors.check()


async def test_demo_second_tab_of_same_user_shows_sync_events(server: Server, browser: Browser) -> None:
    errors = PageErrors()
    tab1 = await open_demo(browser, server, "carol", errors, imei="tab-1")
    await expect(tab1.get_by_test_id("device-tab-1")).to_contain_text("this tab")
    tab2 = await open_demo(browser, server, "carol", errors, imei="tab-2")
    log = tab1.get_by_test_id("sync-event")
    await expect(log.first).to_contain_text("Web tab-2 came online", timeout=PUSH_MS)
    await expect(tab1.get_by_test_id("device-tab-2")).to_be_visible()
    await expect(tab2.get_by_test_id("my-devices").locator("li")).to_have_count(2)

    await tab2.get_by_test_id("custom-text-input").fill("coding")
    await tab2.get_by_test_id("custom-save").click()
    await expect(log.first).to_contain_text('Custom status "coding" set on another device', timeout=PUSH_MS)
    await expect(tab1.get_by_test_id("me-custom")).to_have_text("coding")
    await expect(tab2.get_by_test_id("sync-event").first).to_contain_text("set in this tab")

    await tab2.context.close()
    await expect(log.first).to_contain_text("Web tab-2 went offline", timeout=GRACE_S * 1000 + PUSH_MS)
    await expect(tab1.get_by_test_id("device-tab-2")).to_have_count(0)
    errors.check()


async def test_demo_watch_a_non_friend_with_countdown(server: Server, browser: Browser) -> None:
    errors = PageErrors()
    dave = await open_demo(browser, server, "dave", errors, phone=True)
    await dave.get_by_test_id("subscribe-input").fill("erin")
    await dave.get_by_test_id("subscribe-seconds").fill("3")
    await dave.get_by_test_id("subscribe").click()
    watched = dave.get_by_test_id("sub-erin")
    await expect(watched).to_have_attribute("data-status", "offline")
    await expect(dave.get_by_test_id("countdown-erin")).to_have_text(re.compile(r"^[1-3] s left$"))
    await expect(dave.get_by_test_id("friend-erin")).to_have_count(0)  # not a friend

    erin = await WsClient.connect(server.ws_port, imei="erin-phone", client_type=2)
    try:
        ack = await erin.login("erin", app=server.app_id, key=server.key)
        assert ack.command == Command.LOGINACK
        await expect(watched).to_have_attribute("data-status", "online", timeout=PUSH_MS)
        await expect(dave.get_by_test_id("sub-devices-erin")).to_have_text("iOS")
        await expect(dave.get_by_test_id("countdown-erin")).to_have_text("expired", timeout=5000)
        await expect(watched).to_have_attribute("data-expired", "true")
    finally:
        await erin.close()
    errors.check()


# --- presence-client.js on its own, in a page of the same origin ---

HARNESS = """async () => {
  window.pc = await import('/presence-client.js');
  window.blackhole = false;
  window.swallowed = [];
  // A socket that can go silent both ways without closing: what a dead mobile link looks like.
  window.FlakyWS = class extends WebSocket {
    constructor(url) {
      super(url);
      this.addEventListener('message', (e) => {
        if (window.blackhole) { window.swallowed.push(JSON.parse(e.data).command); e.stopImmediatePropagation(); }
      });
    }
    send(data) { if (!window.blackhole) super.send(data); }
  };
  window.make = (name, options) => {
    const client = new pc.PresenceClient({ WebSocket: FlakyWS, ...options });
    client.log = [];
    for (const type of ['open', 'resync', 'close', 'status', 'online', 'offline', 'sync', 'custom', 'kicked',
                        'error', 'state']) {
      client.on(type, (detail) => client.log.push({ type, detail }));
    }
    window[name] = client;
  };
}"""


async def client_page(browser: Browser, server: Server, errors: PageErrors) -> Page:
    page = errors.watch(await (await browser.new_context()).new_page(), "harness")
    await page.goto(f"{server.base}/")  # the demo, not signed in: an origin whose CSP allows the gateway
    await page.evaluate(HARNESS)
    return page


async def user_sign(server: Server, user: str) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.base}/v1/dev/userSign", params={"userId": user}) as resp,
    ):
        body = await resp.json()
    assert body["code"] == 200, body
    return body["data"]["userSign"]


async def make_friends(server: Server, a: str, b: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.base}/v1/dev/friends", params={"userId": a, "friendId": b}) as resp,
    ):
        assert (await resp.json())["code"] == 200


async def events(page: Page, name: str) -> list[dict[str, Any]]:
    return await page.evaluate(f"() => {name}.log.filter((e) => e.type !== 'state')")


async def wait_js(page: Page, expression: str, timeout: float = 5000) -> None:
    await page.wait_for_function(expression, timeout=timeout)


async def test_client_replaces_a_silent_socket_and_resumes_what_it_missed(server: Server, browser: Browser) -> None:
    errors = PageErrors()
    page = await client_page(browser, server, errors)
    await make_friends(server, "frank", "gina")
    options = {
        "url": server.ws_url,
        "appId": server.app_id,
        "userId": "frank",
        "userSign": await user_sign(server, "frank"),
        "imei": "frank-tab",
        "pingInterval": 200,
        "timeout": 2500,
        "reconnectMinDelay": 20,
        "reconnectMaxDelay": 100,
    }
    await page.evaluate("(o) => make('c', o)", options)
    await wait_js(page, "() => c.state === 'open'")
    first = await events(page, "c")
    assert [e["type"] for e in first] == ["open", "resync"]
    assert first[0]["detail"]["resumed"] is None and first[1]["detail"]["reason"] == "login"

    # The link goes silent (until the client drops it); gina comes online meanwhile, and her 4004 is
    # lost on the dead socket.
    await page.evaluate("() => { c.on('close', () => { window.blackhole = false; }); window.blackhole = true; }")
    gina = await WsClient.connect(server.ws_port, imei="gina-phone", client_type=3)
    try:
        await gina.login("gina", app=server.app_id, key=server.key)
        # The watchdog drops the socket, the client reconnects and resumes: the missed push is replayed.
        await wait_js(page, "() => c.log.some((e) => e.type === 'online' && e.detail.userId === 'gina')")
    finally:
        await gina.close()
    assert int(Command.NOTIFY) in await page.evaluate("() => swallowed"), "the push was not lost first"
    later = (await events(page, "c"))[len(first) :]
    assert [e["type"] for e in later[:4]] == ["close", "open", "status", "online"], later
    assert later[0]["detail"]["code"] == 4000 and later[0]["detail"]["reconnect"] is True
    assert later[1]["detail"] == {**later[1]["detail"], "resumed": True, "reconnected": True}
    assert not any(e["type"] == "resync" for e in later)
    # Still usable: a pull over the new socket sees gina online.
    status = await page.evaluate("() => c.pull(['gina'])")
    assert status["gina"]["status"] == 1
    await page.evaluate("() => c.close()")
    errors.check()


async def test_client_drops_a_push_older_than_the_version_it_has(server: Server, browser: Browser) -> None:
    """Pushes of concurrent changes may overtake each other: the client keeps the newest version per user."""
    errors = PageErrors()
    page = await client_page(browser, server, errors)
    await make_friends(server, "hana", "ivan")
    options = {
        "url": server.ws_url,
        "appId": server.app_id,
        "userId": "hana",
        "userSign": await user_sign(server, "hana"),
        "imei": "hana-tab",
    }
    await page.evaluate("(o) => make('h', o)", options)
    await wait_js(page, "() => h.state === 'open'")
    ivan = await WsClient.connect(server.ws_port, imei="ivan-phone", client_type=3)
    try:
        await ivan.login("ivan", app=server.app_id, key=server.key)
        await wait_js(page, "() => h.log.some((e) => e.type === 'online' && e.detail.userId === 'ivan')")
        version = await page.evaluate(
            "() => h.log.find((e) => e.type === 'online' && e.detail.userId === 'ivan').detail.version"
        )
        assert isinstance(version, int) and version >= 1
        # What an overtaken push looks like on the wire: a later entry id, an older version (ivan offline).
        deliver = """([version, status]) => h._ws.dispatchEvent(new MessageEvent('message', {data: JSON.stringify({
            command: 4004, eventId: '99999999999999-' + version + status, appId: 1,
            data: {appId: 1, userId: 'ivan', status, client: [], version}})}))"""
        await page.evaluate(deliver, [version - 1, 2])
        await page.evaluate(deliver, [version, 2])
        assert not await page.evaluate("() => h.log.some((e) => e.type === 'offline')"), "older pushes dropped"
        await page.evaluate(deliver, [version + 1, 2])
        await wait_js(page, "() => h.log.some((e) => e.type === 'offline' && e.detail.userId === 'ivan')")
        # Versions restart after Redis lost its data: a LOGINACK with resumed:false (a resync) forgets them.
        await page.evaluate("""() => h._ws.dispatchEvent(new MessageEvent('message', {data: JSON.stringify({
            command: 9001, appId: 1, data: {resumed: false, lastEventId: '1-0'}})}))""")
        await page.evaluate(deliver, [1, 1])
        await wait_js(page, "() => h.log.filter((e) => e.type === 'online' && e.detail.userId === 'ivan').length === 2")
    finally:
        await ivan.close()
    await page.evaluate("() => h.close()")
    errors.check()


async def test_client_treats_an_unasked_loginack_as_a_lost_server_state(server: Server, browser: Browser) -> None:
    """The gateway sends an unasked LOGINACK resumed:false on a live socket after Redis lost the session's state
    (it logged it in again): the client forgets its versions and its cursor, emits open + resync and accepts the
    restarted (lower) versions, on the same socket."""
    errors = PageErrors()
    page = await client_page(browser, server, errors)
    await make_friends(server, "lara", "moss")
    options = {
        "url": server.ws_url,
        "appId": server.app_id,
        "userId": "lara",
        "userSign": await user_sign(server, "lara"),
        "imei": "lara-tab",
    }
    await page.evaluate("(o) => make('l', o)", options)
    await wait_js(page, "() => l.state === 'open'")
    moss = await WsClient.connect(server.ws_port, imei="moss-phone", client_type=3)
    try:
        await moss.login("moss", app=server.app_id, key=server.key)
        await wait_js(page, "() => l.log.some((e) => e.type === 'online' && e.detail.userId === 'moss')")
        await page.evaluate("() => { window.sock = l._ws; }")
        cursor = await page.evaluate("() => l.lastEventId")
        assert cursor and cursor != "1-0"
        before = len(await events(page, "l"))
        await page.evaluate("""() => l._ws.dispatchEvent(new MessageEvent('message', {data: JSON.stringify({
            command: 9001, appId: 1, data: {userId: 'lara', lastEventId: '1-0', resumed: false}})}))""")
        after = (await events(page, "l"))[before:]
        assert [e["type"] for e in after] == ["open", "resync"], after
        assert after[0]["detail"] == {"userId": "lara", "lastEventId": "1-0", "resumed": False, "reconnected": True}
        assert after[1]["detail"] == {"reason": "not-resumed"}
        assert await page.evaluate("() => l.lastEventId") == "1-0"  # the new cursor, though lower
        # A version 1 push after the new cursor is shown (the versions held before are forgotten).
        await page.evaluate("""() => l._ws.dispatchEvent(new MessageEvent('message', {data: JSON.stringify({
            command: 4004, eventId: '2-0', appId: 1,
            data: {appId: 1, userId: 'moss', status: 2, client: [], version: 1}})}))""")
        await wait_js(page, "() => l.log.some((e) => e.type === 'offline' && e.detail.version === 1)")
        assert await page.evaluate("() => l._ws === window.sock && l.state === 'open'"), "the same socket, open"
    finally:
        await moss.close()
    await page.evaluate("() => l.close()")
    errors.check()


async def test_client_requests_kick_and_refused_login(server: Server, browser: Browser) -> None:
    errors = PageErrors()
    page = await client_page(browser, server, errors)
    base = {
        "url": server.ws_url,
        "appId": server.app_id,
        "userId": "hank",
        "clientType": 2,
        "pingInterval": 1000,
        "userSign": await user_sign(server, "hank"),
    }
    await page.evaluate("(o) => make('phone1', o)", {**base, "imei": "phone-1"})
    await wait_js(page, "() => phone1.state === 'open'")

    # Requests over the socket: resolved with the envelope's data or rejected with {code, msg}.
    result = await page.evaluate("() => phone1.subscribe(['ivy'], 60000)")
    assert result["liveSubscriptions"] == 1 and result["expireAt"] > 0
    assert result["users"]["ivy"]["status"] == 2  # the snapshot of the target
    listed = await page.evaluate("() => phone1.querySubscriptions()")
    assert listed["subscriptions"] == [{"userId": "ivy", "expireAt": result["expireAt"]}]
    assert await page.evaluate("() => phone1.pull()") == {}
    pulled = await page.evaluate("() => phone1.pull(['ivy', 'hank'])")
    assert pulled["ivy"]["status"] == 2 and pulled["hank"]["status"] == 1
    refused = await page.evaluate("() => phone1.subscribe(['hank'], 1000).catch((e) => ({code: e.code, msg: e.msg}))")
    assert refused["code"] == 90001 and "itself" in refused["msg"]
    local = await page.evaluate("() => phone1.subscribe([], 1000).catch((e) => e.code)")
    assert local == -4

    # Another iOS login of hank (login model 3: one mobile session) kicks this one: no reconnect.
    await page.evaluate("(o) => make('phone2', o)", {**base, "imei": "phone-2"})
    await wait_js(page, "() => phone1.log.some((e) => e.type === 'close')")
    kicked = await events(page, "phone1")
    assert [e["type"] for e in kicked][-2:] == ["kicked", "close"]
    assert kicked[-2]["detail"]["imei"] == "phone-2"
    assert kicked[-1]["detail"]["reconnect"] is False
    assert await page.evaluate("() => phone1.state") == "closed"
    assert await page.evaluate("() => phone1.pull().catch((e) => e.code)") == -3
    await wait_js(page, "() => phone2.state === 'open'")

    # A refused userSign: 'error' with the server's code, then closed for good (a retry cannot succeed).
    await page.evaluate("(o) => make('bad', o)", {**base, "userId": "ivy", "imei": "x", "userSign": "garbage"})
    await wait_js(page, "() => bad.state === 'closed'")
    bad = await events(page, "bad")
    assert [e["type"] for e in bad] == ["error", "close"], bad
    assert 60000 <= bad[0]["detail"]["code"] <= 60005
    await page.evaluate("() => phone2.logout()")
    assert await page.evaluate("() => phone2.state") == "closed"
    errors.check()


async def test_client_signs_with_a_function_and_logout_is_immediate(server: Server, browser: Browser) -> None:
    errors = PageErrors()
    page = await client_page(browser, server, errors)
    await make_friends(server, "judy", "kim")
    await page.evaluate(
        """(o) => make('judy', {...o, userSign: async () => {
             const r = await fetch('/v1/dev/userSign?userId=judy');
             return (await r.json()).data.userSign;
           }})""",
        {"url": server.ws_url, "appId": server.app_id, "userId": "judy", "imei": "judy-tab"},
    )
    await wait_js(page, "() => judy.state === 'open'")
    kim = await WsClient.connect(server.ws_port, imei="kim-pc", client_type=4)
    try:
        await kim.login("kim", app=server.app_id, key=server.key)
        await wait_js(page, "() => judy.log.some((e) => e.type === 'online' && e.detail.userId === 'kim')")
        # LOGOUT skips the grace: kim hears "offline" right away, and judy's client stays closed.
        started = time.monotonic()
        await page.evaluate("() => judy.logout()")
        msg = await kim.recv()
        assert msg.command == Command.NOTIFY and msg.data["userId"] == "judy" and msg.data["status"] == 2
        assert time.monotonic() - started < GRACE_S + 1
    finally:
        await kim.close()
    assert await page.evaluate("() => judy.state") == "closed"
    assert (await events(page, "judy"))[-1] == {"type": "close", "detail": {**CLOSED_BY_LOGOUT}}
    errors.check()


def test_client_module_has_no_dependencies() -> None:
    source = (ROOT / "gateway" / "presence-client.js").read_text()
    imports = re.findall(r"^\s*import\s.*?from\s+['\"]([^'\"]+)['\"]", source, re.MULTILINE)
    assert imports == [], f"presence-client.js must stay dependency-free, imports {imports}"
    assert "export class PresenceClient" in source


# --- friendship events, and what a new user of the demo ran into ---


async def rest_as_admin(server: Server, path: str, body: dict[str, Any]) -> Any:
    params = {"appId": str(server.app_id), "identifier": "admin", "userSign": await user_sign(server, "admin")}
    async with aiohttp.ClientSession() as http, http.post(f"{server.base}{path}", params=params, json=body) as resp:
        envelope = await resp.json()
    assert envelope["code"] == 200, envelope
    return envelope["data"]


async def test_demo_new_friend_appears_on_the_other_page_without_reload(server: Server, browser: Browser) -> None:
    errors = PageErrors()
    lena = await open_demo(browser, server, "lena", errors)
    mike = await open_demo(browser, server, "mike", errors, phone=True)
    await expect(mike.get_by_test_id("friends-empty")).to_be_visible()
    await lena.get_by_test_id("add-friend-input").fill("mike")
    await lena.get_by_test_id("add-friend").click()
    # mike's page hears 4010 (FRIENDSHIP_NOTIFY) and shows lena, online, with her device: no reload, no pull
    await expect(mike.get_by_test_id("friend-lena")).to_have_attribute("data-status", "online", timeout=PUSH_MS)
    await expect(mike.get_by_test_id("devices-lena")).to_have_text("Web")
    await expect(mike.get_by_test_id("friends-empty")).to_be_hidden()
    await expect(lena.get_by_test_id("friend-mike")).to_have_attribute("data-status", "online")
    # an admin adds one over REST: both pages show it; deletes one: both pages drop it
    await rest_as_admin(server, "/v1/friendship/addFriend", {"fromId": "nina", "toItem": {"toId": "mike"}})
    await expect(mike.get_by_test_id("friend-nina")).to_have_attribute("data-status", "offline", timeout=PUSH_MS)
    await rest_as_admin(server, "/v1/friendship/deleteFriend", {"fromId": "lena", "toId": "mike"})
    await expect(mike.get_by_test_id("friend-lena")).to_have_count(0, timeout=PUSH_MS)
    await expect(lena.get_by_test_id("friend-mike")).to_have_count(0, timeout=PUSH_MS)
    await expect(lena.get_by_test_id("friends-empty")).to_be_visible()
    errors.check()


async def test_demo_friend_whose_custom_status_arrives_first_shows_online(
    server: Server, browser: Browser, redis_url: str
) -> None:
    errors = PageErrors()
    olga = await open_demo(browser, server, "olga", errors)
    # Friends made behind the page's back (no 4010): the first push olga gets from pete is his 4006.
    client = redis.Redis.from_url(redis_url)
    client.sadd(f"presence:{{{server.app_id}:olga}}:friends", "pete")
    client.sadd(f"presence:{{{server.app_id}:pete}}:friends", "olga")
    client.close()
    pete = await WsClient.connect(server.ws_port, imei="pete-phone", client_type=3)
    try:
        await pete.login("pete", app=server.app_id, key=server.key)  # pete's 4004 reached nobody: not friends yet?
        await rest_as_admin(server, "/v1/user/setUserCustomerStatus", {"userId": "pete", "customStatus": 1})
        await expect(olga.get_by_test_id("friend-pete")).to_have_attribute("data-status", "online", timeout=PUSH_MS)
        await expect(olga.get_by_test_id("lastseen-pete")).to_have_text("online now")
        await expect(olga.get_by_test_id("mood-pete")).to_have_text("Busy")
    finally:
        await pete.close()
    errors.check()


async def test_demo_status_form_shows_and_keeps_the_mood(server: Server, browser: Browser) -> None:
    errors = PageErrors()
    page = await open_demo(browser, server, "quinn", errors)
    select = page.get_by_test_id("custom-status-input")
    await select.select_option("4")
    await page.get_by_test_id("custom-text-input").fill("standup")
    await page.get_by_test_id("custom-save").click()
    await expect(page.get_by_test_id("me-mood")).to_have_text("In a meeting")
    await expect(select).to_have_value("4")  # kept after saving
    await page.reload()
    await expect(page.get_by_test_id("conn-state")).to_have_attribute("data-state", "open")
    await expect(page.get_by_test_id("me-custom")).to_have_text("standup")
    await expect(select).to_have_value("4")  # shown from the stored status after a reload
    await expect(page.get_by_test_id("custom-text-input")).to_have_value("standup")
    errors.check()


async def test_demo_reconnecting_greys_own_dot_and_counts_down(server: Server, browser: Browser) -> None:
    errors = PageErrors()
    page = await open_demo(browser, server, "rosa", errors)
    await expect(page.get_by_test_id("me-dot")).to_have_attribute("data-status", "online")
    # A slow, exact retry (no jitter) so the countdown can be read; then the socket drops.
    await page.evaluate(
        "() => { const c = presenceDemo.client; c._minDelay = 3000; c._maxDelay = 3000; c._jitter = 0;"
        " c._ws.close(4000, 'test drop'); }"
    )
    conn = page.get_by_test_id("conn-state")
    await expect(conn).to_have_text("reconnecting in 3 s")
    await expect(page.get_by_test_id("me-dot")).to_have_attribute("data-status", "offline")
    await expect(conn).to_have_text("reconnecting in 2 s", timeout=2000)
    await expect(conn).to_have_text("reconnecting in 1 s", timeout=2000)
    await expect(conn).to_have_attribute("data-state", "open", timeout=4000)
    await expect(page.get_by_test_id("me-dot")).to_have_attribute("data-status", "online")
    errors.check()


async def test_demo_blank_user_id_gets_a_message(server: Server, browser: Browser) -> None:
    errors = PageErrors()
    page = errors.watch(await (await browser.new_context()).new_page(), "blank")
    await page.goto(f"{server.base}/")
    await page.get_by_test_id("user-input").fill("   ")
    await page.get_by_test_id("connect").click()
    await expect(page.get_by_test_id("banner")).to_contain_text("Enter a user id")
    await expect(page.get_by_test_id("app")).to_be_hidden()
    errors.check()


@pytest.mark.parametrize("phone", [True, False], ids=["phone", "desktop"])
async def test_demo_long_ids_and_texts_do_not_overflow(server: Server, browser: Browser, phone: bool) -> None:
    errors = PageErrors()
    long_me = ("s" * 63) + ("p" if phone else "d")
    long_friend = "f" * 64
    page = await open_demo(browser, server, long_me, errors, phone=phone, imei="i" * 100)
    await page.get_by_test_id("add-friend-input").fill(long_friend)
    await page.get_by_test_id("add-friend").click()
    await expect(page.get_by_test_id(f"friend-{long_friend}")).to_be_visible()
    text = "W" * 100  # 100 bytes, no break opportunity
    await page.get_by_test_id("custom-text-input").fill(text)
    await page.get_by_test_id("custom-save").click()
    await expect(page.get_by_test_id("me-custom")).to_have_text(text)
    await rest_as_admin(
        server, "/v1/user/setUserCustomerStatus", {"userId": long_friend, "customStatus": 9, "customText": text}
    )
    await expect(page.get_by_test_id(f"custom-{long_friend}")).to_have_text(text, timeout=PUSH_MS)
    await page.get_by_test_id("subscribe-input").fill("w" * 64)
    await page.get_by_test_id("subscribe").click()
    await expect(page.get_by_test_id("sub-" + "w" * 64)).to_be_visible()
    OUT.mkdir(exist_ok=True)
    await page.screenshot(path=OUT / f"demo-long-{'phone' if phone else 'desktop'}.png", full_page=True)
    overflow = await page.evaluate(
        """() => {
          const root = document.documentElement;
          const out = [];
          if (root.scrollWidth > root.clientWidth) out.push(`page ${root.scrollWidth} > ${root.clientWidth}`);
          for (const node of document.querySelectorAll('.card, .card *')) {
            const r = node.getBoundingClientRect();
            const card = node.closest('.card').getBoundingClientRect();
            if (r.width && (r.right > card.right + 1 || r.left < card.left - 1)) {
              out.push(`${node.tagName}.${node.className} [${node.dataset.testid ?? ''}] sticks out`);
            }
          }
          return out;
        }"""
    )
    assert overflow == [], overflow
    errors.check()
