"""Webhooks: POST every change feed entry of an app to its ``webhook_urls`` (run inside ``presence serve``).

Per (app, URL, feed shard) one task: it holds the shard's lease for that URL (so one worker at a time
delivers it, and each user's events arrive in order; a refresher renews it every LEASE_MS / 4 while a
POST is in flight, and delivery stops at once when it is lost), reads the shard with the consumer group
``group_name(url)`` and delivers entry after entry: retried with exponential backoff, dead-lettered to
``presence:webhooks:dead:{<appId>}`` after ``webhook_attempts`` failures, acknowledged only after
either. Redirects are not followed (a 3xx is a failure). Contract: gateway/FEED.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import time
from typing import Any

import aiohttp
import msgspec

from presence.config import AppConfig, Settings, redact_url
from presence.errors import ParamError
from presence.metrics import WEBHOOK_DEAD, WEBHOOK_FAILED, WEBHOOK_LAG, WEBHOOK_SENT
from presence.service import Presence

log = logging.getLogger("presence.webhooks")

LEASE_MS = 10_000
READ_COUNT = 50
IDLE_POLL_S = 0.2
MAX_BACKOFF_S = 5.0  # a receiver that comes back is probed again within 5 s
SIGNATURE_HEADER = "X-Presence-Signature"
PLATFORMS = {0: "WebAPI", 1: "Web", 2: "iOS", 3: "Android", 4: "Windows", 5: "Mac"}
# Our logout reasons as Tencent IM's State.StateChange Action and Reason.
_LOGOUT = {
    "logout": ("Logout", "Unregister"),
    "kicked": ("Logout", "Kicked"),
    "close": ("Disconnect", "LinkClose"),
    "error": ("Disconnect", "LinkClose"),
    # The server closed the link and the client reconnects (SIGTERM hand-over; a gateway restarted
    # under the same node id): to Tencent that is a closed link, not a timeout.
    "handover": ("Disconnect", "LinkClose"),
    "restarted": ("Disconnect", "LinkClose"),
}
_json = msgspec.json.Encoder()
_kicked_decoder = msgspec.json.Decoder()


def sign_body(key: str, body: bytes) -> str:
    """The ``X-Presence-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except ValueError:
        return None


def callback_body(entry: dict[str, str]) -> dict[str, Any]:
    """A feed entry as Tencent IM's ``State.StateChange`` callback body plus our fields (FEED.md section 4)."""
    event, reason = entry.get("event", ""), entry.get("reason", "")
    ct = _int(entry.get("clientType")) or 0
    command = "State.StateChange"
    kicked: list[dict[str, str]] = []
    if event == "login":
        # Tencent reports a multi-device kick on the login (Register) callback that caused it.
        action, why = "Login", "Register"
        kicked = [{"Platform": _platform(d.get("clientType"))} for d in _kicked(entry.get("kicked"))]
    elif event == "logout":
        action, why = _LOGOUT.get(reason, ("Disconnect", "TimeOut"))
    else:
        command, action, why = "State.CustomStatusChange", "CustomStatus", ""
    return {
        "CallbackCommand": command,
        "EventTime": _int(entry.get("time")),
        "Info": {"Action": action, "To_Account": entry.get("userId", ""), "Reason": why},
        "KickedDevice": kicked,
        "EventId": entry.get("eventId", ""),
        "AppId": _int(entry.get("appId")),
        "UserId": entry.get("userId", ""),
        "Event": event,
        "PresenceReason": reason,
        "ClientType": ct,
        "Imei": entry.get("imei", ""),
        "Status": _int(entry.get("status")),
        "Sessions": _int(entry.get("sessions")),
        "Version": _int(entry.get("version")) or 0,
        "CustomStatus": _int(entry.get("customStatus")),
        "CustomText": entry.get("customText"),
    }


def _kicked(text: str | None) -> list[dict[str, Any]]:
    """A login entry's ``kicked`` field: a JSON list of {clientType, imei} (absent before library 3.3.0)."""
    if not text:
        return []
    try:
        value = _kicked_decoder.decode(text)
    except msgspec.DecodeError:
        return []
    return [d for d in value if isinstance(d, dict)] if isinstance(value, list) else []


def _platform(ct: Any) -> str:
    return PLATFORMS.get(ct, str(ct)) if isinstance(ct, int) else str(ct)


def group_name(url: str) -> str:
    """The URL's consumer group: ``webhook:<url>``; a URL with ``user:password@`` is named by a hash instead
    (credentials are never stored in Redis)."""
    redacted = redact_url(url)
    if redacted == url:
        return f"webhook:{url}"
    return f"webhook:{redacted}#{hashlib.sha256(url.encode()).hexdigest()[:16]}"


async def pin_feed_shards(presence: Presence, settings: Settings) -> None:
    """Pin each app's ``feed_shards`` in Redis at its first start; refuse another value later.

    A user's entries go to shard crc32(userId) mod feed_shards: two counts at once would split one
    user's changes between shards and break their order. Raises ParamError naming the setting, the
    pinned value and the key (how to change it: gateway/FEED.md section 2)."""
    store = presence.store
    for app_id in sorted(settings.apps):
        key = presence.keys.feed_shard_count(app_id)
        await store.one(key, "SET", key, settings.feed_shards, "NX")
        pinned = _int(_text(await store.one(key, "GET", key) or b""))
        if pinned != settings.feed_shards:
            raise ParamError(
                f"feed_shards is {settings.feed_shards} but app {app_id}'s feed is pinned to {pinned} shards "
                f"(Redis key {key}): every node must use the same count (to change it see gateway/FEED.md)"
            )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Lease:
    """A shard's lease for one URL, as one holder sees it: taken with SET NX PX, renewed by ``keep``."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.renewed = 0.0  # time.monotonic() of the last successful take or renewal

    def live(self) -> bool:
        """Still ours for certain: renewed within half the lease (the refresher renews every quarter)."""
        return time.monotonic() - self.renewed < LEASE_MS / 2000


class WebhookWorker:
    """Every app's webhook deliveries for one ``presence serve`` process (node ``node_id``)."""

    def __init__(self, presence: Presence, settings: Settings, node_id: str) -> None:
        self.presence = presence
        self.settings = settings
        self.node_id = node_id
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self.stopped = False
        # app id -> (url, shard) -> EventTime (s) of the entry being delivered: the lag gauge is the oldest.
        self._inflight: dict[int, dict[tuple[str, int], float]] = {}

    @staticmethod
    def enabled(settings: Settings) -> bool:
        return any(app.webhook_urls for app in settings.apps.values())

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout)
        self._http = aiohttp.ClientSession(timeout=timeout)
        for app_id, app in sorted(self.settings.apps.items()):
            if not app.webhook_urls:
                continue
            inflight = self._inflight.setdefault(app_id, {})
            WEBHOOK_LAG.labels(str(app_id)).set_function(functools.partial(_lag, inflight))
            for url in app.webhook_urls:
                for shard in range(self.settings.feed_shards):
                    self._tasks.append(asyncio.create_task(self._run(app_id, app, url, shard)))
                log.info("webhooks: app %s -> %s (%d feed shards)", app_id, redact_url(url), self.settings.feed_shards)

    async def stop(self) -> None:
        self.stopped = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        self._tasks.clear()
        for app_id in self._inflight:
            WEBHOOK_LAG.labels(str(app_id)).set_function(lambda: 0.0)
        if self._http is not None:
            await self._http.close()

    # --- one shard for one URL ---

    async def _run(self, app_id: int, app: AppConfig, url: str, shard: int) -> None:
        """Wait for the shard's lease; while it is held, deliver (and keep renewing it); when lost, stop at once."""
        lease = _Lease(self.presence.keys.webhook_lease(app_id, shard, hashlib.sha1(url.encode()).hexdigest()[:12]))
        while not self.stopped:
            try:
                if not await self._hold(lease):
                    await asyncio.sleep(1.0)
                    continue
                work = asyncio.create_task(self._drain(app_id, app, url, shard, lease))
                keeper = asyncio.create_task(self._keep(lease))
                try:
                    done, _ = await asyncio.wait({work, keeper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (work, keeper):
                        task.cancel()
                    await asyncio.gather(work, keeper, return_exceptions=True)
                    self._inflight.get(app_id, {}).pop((url, shard), None)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                if keeper in done:
                    log.warning("webhooks: app %s shard %s for %s: lease lost, stopped", app_id, shard, redact_url(url))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhooks: app %s shard %s for %s failed; retrying", app_id, shard, redact_url(url))
                await asyncio.sleep(1.0)

    async def _keep(self, lease: _Lease) -> None:
        """Renew the lease every quarter of it; return when it is lost (or Redis cannot tell us it is ours)."""
        while True:
            await asyncio.sleep(LEASE_MS / 4000)
            try:
                if not await self._hold(lease):
                    return
            except Exception:
                log.warning("webhooks: could not renew lease %s", lease.key, exc_info=True)
                if not lease.live():
                    return

    async def _drain(self, app_id: int, app: AppConfig, url: str, shard: int, lease: _Lease) -> None:
        """Deliver the shard's entries one after another while the lease is ours (cancelled when it is lost)."""
        stream = self.presence.keys.feed_shard(app_id, shard)
        group = group_name(url)
        store = self.presence.store
        inflight = self._inflight.setdefault(app_id, {})
        with contextlib.suppress(Exception):  # BUSYGROUP: it exists (a new group starts at the oldest entry)
            await store.one(stream, "XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
        while lease.live():
            # What a previous holder read and did not acknowledge comes first, in id order. Its lease has
            # expired (we hold it now), and a holder never POSTs without a live lease.
            claimed = await store.one(stream, "XAUTOCLAIM", stream, group, self.node_id, 0, "0-0", "COUNT", 1000)
            entries = list(claimed[1]) if claimed else []
            if not entries:
                reply = await store.one(
                    stream, "XREADGROUP", "GROUP", group, self.node_id, "COUNT", READ_COUNT, "STREAMS", stream, ">"
                )
                entries = _entries(reply)
            if not entries:
                inflight.pop((url, shard), None)
                await asyncio.sleep(IDLE_POLL_S)
                continue
            for entry_id, fields in entries:
                if fields is None:  # deleted while pending (trimmed by MAXLEN): nothing to send
                    await store.one(stream, "XACK", stream, group, entry_id)
                    continue
                if not await self._deliver(app_id, app, url, shard, stream, group, lease, entry_id, fields):
                    return  # lost the lease: the new holder claims what is left

    async def _hold(self, lease: _Lease) -> bool:
        """Take or renew the lease; False when another worker holds it."""
        store = self.presence.store
        started = time.monotonic()
        key = lease.key
        if await store.one(key, "SET", key, self.node_id, "NX", "PX", LEASE_MS):
            lease.renewed = started
            return True
        if _text(await store.one(key, "GET", key) or b"") == self.node_id:
            await store.one(key, "PEXPIRE", key, LEASE_MS)
            lease.renewed = started
            return True
        return False

    async def _deliver(
        self,
        app_id: int,
        app: AppConfig,
        url: str,
        shard: int,
        stream: str,
        group: str,
        lease: _Lease,
        entry_id: Any,
        raw: dict[Any, Any],
    ) -> bool:
        """POST one entry until it succeeds or is dead-lettered, then XACK it; False if the lease was lost."""
        store = self.presence.store
        fields = {_text(k): _text(v) for k, v in raw.items()}
        body = _json.encode(callback_body(fields))
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_body(app.private_key, body),
            "X-Presence-Event-Id": fields.get("eventId", ""),
            "X-Presence-App-Id": str(app_id),
        }
        label = str(app_id)
        delay = self.settings.webhook_backoff
        error = ""
        attempts = self.settings.webhook_attempts
        event_time = _int(fields.get("time"))
        self._inflight.setdefault(app_id, {})[(url, shard)] = event_time / 1000 if event_time else time.time()
        for attempt in range(1, attempts + 1):
            if not lease.live():
                return False
            error = await self._post(url, body, headers)
            if not error:
                WEBHOOK_SENT.labels(label).inc()
                await store.one(stream, "XACK", stream, group, entry_id)
                return True
            WEBHOOK_FAILED.labels(label).inc()
            log.warning(
                "webhook %s attempt %d/%d for %s failed: %s",
                redact_url(url), attempt, attempts, fields.get("eventId"), error,
            )  # fmt: skip
            if attempt == attempts:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
        if not lease.live():
            return False
        dead = self.presence.keys.feed_dead(app_id)
        flat: list[Any] = [x for kv in fields.items() for x in kv]
        await store.one(
            dead, "XADD", dead, "MAXLEN", "~", self.settings.feed_maxlen, "*",
            *flat, "url", redact_url(url), "attempts", attempts, "error", error[:200],
        )  # fmt: skip
        await store.one(stream, "XACK", stream, group, entry_id)
        WEBHOOK_DEAD.labels(label).inc()
        return True

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> str:
        """'' on a 2xx, else what went wrong. A redirect is not followed: aiohttp would re-send it as a GET
        without the body, and that GET's 200 would acknowledge an event nobody received."""
        assert self._http is not None
        return await post_event(self._http, url, body, headers)


async def post_event(http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> str:
    """POST ``body`` to ``url``: '' on a 2xx, else what went wrong (a 3xx included: redirects are not followed)."""
    try:
        async with http.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            await resp.read()
            if 200 <= resp.status < 300:
                return ""
            if 300 <= resp.status < 400:
                return f"HTTP {resp.status} (redirects are not followed)"
            return f"HTTP {resp.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return f"{type(exc).__name__}: {redact_url(str(exc))}"[:200]


async def replay_dead_letters(presence: Presence, app_id: int, app: AppConfig, timeout: float) -> tuple[int, str]:
    """POST the app's dead letters again, oldest first, each to the configured URL it failed for, deleting
    each one that is accepted (2xx). Stops at the first failure (the rest keep their order).

    Returns (events delivered, '' or what stopped it). Entries for a URL no longer configured are left."""
    store = presence.store
    dead = presence.keys.feed_dead(app_id)
    urls = {redact_url(u): u for u in app.webhook_urls}
    sent, start = 0, "-"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        while True:
            batch = await store.one(dead, "XRANGE", dead, start, "+", "COUNT", 100)
            if not batch:
                return sent, ""
            for entry_id, raw in batch:
                start = "(" + _text(entry_id)
                fields = {_text(k): _text(v) for k, v in raw.items()}
                url = urls.get(fields.pop("url", ""))
                fields.pop("attempts", None)
                fields.pop("error", None)
                if url is None:
                    continue
                body = _json.encode(callback_body(fields))
                headers = {
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign_body(app.private_key, body),
                    "X-Presence-Event-Id": fields.get("eventId", ""),
                    "X-Presence-App-Id": str(app_id),
                }
                error = await post_event(http, url, body, headers)
                if error:
                    return sent, f"{fields.get('eventId')} to {redact_url(url)}: {error}"
                await store.one(dead, "XDEL", dead, entry_id)
                sent += 1


def _lag(inflight: dict[tuple[str, int], float]) -> float:
    """Seconds since the oldest entry being delivered (over all URLs and shards) happened; 0 when none."""
    return max((max(time.time() - t, 0.0) for t in list(inflight.values())), default=0.0)


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """XREADGROUP's entries of the one stream read (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    out: list[tuple[Any, Any]] = []
    for _, entries in items:
        out.extend((e[0], e[1]) for e in entries)
    return out
