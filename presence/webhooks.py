"""Webhooks: POST every change feed entry of an app to its ``webhook_urls`` (run inside ``presence serve``).

Per (app, URL, feed shard) one task: it holds the shard's lease for that URL (so one worker at a time
delivers it, and each user's events arrive in order), reads the shard with the consumer group
``webhook:<url>`` and delivers entry after entry: retried with exponential backoff, dead-lettered to
``presence:webhooks:dead:{<appId>}`` after ``webhook_attempts`` failures, acknowledged only after
either. Contract: gateway/FEED.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from typing import Any

import aiohttp
import msgspec

from presence.config import AppConfig, Settings
from presence.metrics import WEBHOOK_DEAD, WEBHOOK_FAILED, WEBHOOK_LAG, WEBHOOK_SENT
from presence.service import Presence

log = logging.getLogger("presence.webhooks")

LEASE_MS = 10_000
READ_COUNT = 50
IDLE_POLL_S = 0.2
MAX_BACKOFF_S = 30.0
SIGNATURE_HEADER = "X-Presence-Signature"
PLATFORMS = {0: "WebAPI", 1: "Web", 2: "iOS", 3: "Android", 4: "Windows", 5: "Mac"}
# Our logout reasons as Tencent IM's State.StateChange Action and Reason.
_LOGOUT = {
    "logout": ("Logout", "Unregister"),
    "kicked": ("Logout", "Kicked"),
    "close": ("Disconnect", "LinkClose"),
    "error": ("Disconnect", "LinkClose"),
}
_json = msgspec.json.Encoder()


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
        action, why = "Login", "Register"
    elif event == "logout":
        action, why = _LOGOUT.get(reason, ("Disconnect", "TimeOut"))
        if reason == "kicked":
            kicked = [{"Platform": PLATFORMS.get(ct, str(ct))}]
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


def group_name(url: str) -> str:
    return f"webhook:{url}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class WebhookWorker:
    """Every app's webhook deliveries for one ``presence serve`` process (node ``node_id``)."""

    def __init__(self, presence: Presence, settings: Settings, node_id: str) -> None:
        self.presence = presence
        self.settings = settings
        self.node_id = node_id
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self.stopped = False

    @staticmethod
    def enabled(settings: Settings) -> bool:
        return any(app.webhook_urls for app in settings.apps.values())

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout)
        self._http = aiohttp.ClientSession(timeout=timeout)
        for app_id, app in sorted(self.settings.apps.items()):
            for url in app.webhook_urls:
                for shard in range(self.settings.feed_shards):
                    self._tasks.append(asyncio.create_task(self._run(app_id, app, url, shard)))
                log.info("webhooks: app %s -> %s (%d feed shards)", app_id, url, self.settings.feed_shards)

    async def stop(self) -> None:
        self.stopped = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        self._tasks.clear()
        if self._http is not None:
            await self._http.close()

    # --- one shard for one URL ---

    async def _run(self, app_id: int, app: AppConfig, url: str, shard: int) -> None:
        stream = self.presence.keys.feed_shard(app_id, shard)
        group = group_name(url)
        lease = self.presence.keys.webhook_lease(app_id, shard, hashlib.sha1(url.encode()).hexdigest()[:12])
        store = self.presence.store
        while not self.stopped:
            try:
                if not await self._hold(lease):
                    await asyncio.sleep(1.0)
                    continue
                with contextlib.suppress(Exception):  # BUSYGROUP: it exists (a new group starts at the oldest entry)
                    await store.one(stream, "XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
                # What a previous holder (maybe dead) read and did not acknowledge comes first, in id order.
                claimed = await store.one(stream, "XAUTOCLAIM", stream, group, self.node_id, 0, "0-0", "COUNT", 1000)
                entries = list(claimed[1]) if claimed else []
                if not entries:
                    reply = await store.one(
                        stream, "XREADGROUP", "GROUP", group, self.node_id, "COUNT", READ_COUNT, "STREAMS", stream, ">"
                    )
                    entries = _entries(reply)
                if not entries:
                    WEBHOOK_LAG.labels(str(app_id)).set(0)
                    await asyncio.sleep(IDLE_POLL_S)
                    continue
                for entry_id, fields in entries:
                    if fields is None:  # deleted while pending (trimmed by MAXLEN): nothing to send
                        await store.one(stream, "XACK", stream, group, entry_id)
                        continue
                    if not await self._deliver(app_id, app, url, stream, group, lease, entry_id, fields):
                        break  # lost the lease: the new holder claims what is left
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhooks: app %s shard %s for %s failed; retrying", app_id, shard, url)
                await asyncio.sleep(1.0)

    async def _hold(self, lease: str) -> bool:
        """Take or renew the lease; False when another worker holds it."""
        store = self.presence.store
        if await store.one(lease, "SET", lease, self.node_id, "NX", "PX", LEASE_MS):
            return True
        if _text(await store.one(lease, "GET", lease) or b"") == self.node_id:
            await store.one(lease, "PEXPIRE", lease, LEASE_MS)
            return True
        return False

    async def _deliver(
        self,
        app_id: int,
        app: AppConfig,
        url: str,
        stream: str,
        group: str,
        lease: str,
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
        for attempt in range(1, attempts + 1):
            event_time = _int(fields.get("time"))
            if event_time:
                WEBHOOK_LAG.labels(label).set(max(time.time() - event_time / 1000, 0))
            error = await self._post(url, body, headers)
            if not error:
                WEBHOOK_SENT.labels(label).inc()
                await store.one(stream, "XACK", stream, group, entry_id)
                return True
            WEBHOOK_FAILED.labels(label).inc()
            log.warning(
                "webhook %s attempt %d/%d for %s failed: %s", url, attempt, attempts, fields.get("eventId"), error
            )
            if attempt == attempts:
                break
            if not await self._wait(lease, delay):
                return False
            delay = min(delay * 2, MAX_BACKOFF_S)
        dead = self.presence.keys.feed_dead(app_id)
        flat: list[Any] = [x for kv in fields.items() for x in kv]
        await store.one(
            dead, "XADD", dead, "MAXLEN", "~", self.settings.feed_maxlen, "*",
            *flat, "url", url, "attempts", attempts, "error", error[:200],
        )  # fmt: skip
        await store.one(stream, "XACK", stream, group, entry_id)
        WEBHOOK_DEAD.labels(label).inc()
        return True

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> str:
        """'' on a 2xx, else what went wrong."""
        assert self._http is not None
        try:
            async with self._http.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return "" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200]

    async def _wait(self, lease: str, seconds: float) -> bool:
        """Sleep ``seconds`` keeping the lease; False if it was lost meanwhile."""
        end = time.monotonic() + seconds
        while not self.stopped:
            left = end - time.monotonic()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, 2.0))
            if not await self._hold(lease):
                return False
        return False


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """XREADGROUP's entries of the one stream read (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    out: list[tuple[Any, Any]] = []
    for _, entries in items:
        out.extend((e[0], e[1]) for e in entries)
    return out
