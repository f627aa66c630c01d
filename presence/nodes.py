"""Gateway node liveness: heartbeats into ``presence:nodes`` and the reaper of silent nodes.

The reaper is what makes a crashed gateway's users go offline: any node (or the REST app) logs out
every session still recorded for a node whose last heartbeat is older than ``node_ttl``.

Liveness lives in Redis, so a node that could not reach Redis cannot tell a dead peer from a dead
backplane: after a failover every peer's last beat is old. A node therefore judges peers only once its
own rounds have succeeded for a full ``node_ttl`` in a row (plus the socket timeout a peer's beat may have
hung on a frozen node); by then every live peer has beaten again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from presence.metrics import REAPED_SESSIONS
from presence.service import Presence

log = logging.getLogger("presence.nodes")


class NodeKeeper:
    """Beats for ``node_id`` (None: a reaper only) and reaps expired peers, every ``interval`` seconds."""

    def __init__(
        self,
        presence: Presence,
        node_id: str | None,
        node_ttl: float,
        on_reaped: Callable[[], Awaitable[None]] | None = None,
        interval: float = 1.0,
        stall: float = 0.0,
    ) -> None:
        self.presence = presence
        self.node_id = node_id
        self.node_ttl = node_ttl
        # A live peer's beat may hang up to the socket timeout on a node that froze before it failed over:
        # judging waits that much longer, so such a peer has beaten again too.
        self.stall = stall
        self.on_reaped = on_reaped
        self.interval = min(interval, max(node_ttl / 3, 0.05))
        self._beaten = False
        self._healthy_since: float | None = None  # monotonic start of the current run of good beats
        self._last_ok: float | None = None
        self._after_gap = False  # the current run of good beats follows a failure (not the start)
        self._failed = False  # a beat failed since the last good one
        self.stopped = False  # loops also check a flag: redis-py may swallow a cancel mid-command

    def may_judge(self) -> bool:
        """Whether this node's own beats have succeeded for a full ``node_ttl`` (plus ``stall`` after a
        failure), the last one just now."""
        if self._healthy_since is None or self._last_ok is None:
            return False
        now = time.monotonic()
        need = self.node_ttl + (self.stall if self._after_gap else 0.0)
        return now - self._healthy_since >= need and now - self._last_ok <= self.node_ttl / 2

    async def beat(self) -> None:
        if self.node_id is not None:
            await self._beat(self.node_id)
        else:  # a reaper only: a round trip still proves Redis answers (no judging right after an outage)
            await self.presence.redis_time_ms()
        now = time.monotonic()
        # The first beat, or the first after a gap (a failure, or a beat that waited out a failover):
        # a new run of good beats starts.
        if self._last_ok is None or self._healthy_since is None or now - self._last_ok > self.node_ttl / 2:
            # A failed beat, or one that waited a full node_ttl (a frozen node): peers' beats may have hung
            # as long. Not a beat merely late under load.
            self._after_gap = self._failed or (self._last_ok is not None and now - self._last_ok >= self.node_ttl)
            self._failed = False
            self._healthy_since = now
        self._last_ok = now

    async def _beat(self, node_id: str) -> None:
        was_registered = await self.presence.node_heartbeat(node_id)
        if self._beaten and not was_registered and self.on_reaped is not None:
            await self.on_reaped()
        self._beaten = True

    async def reap(self) -> int:
        total = 0
        if not self.may_judge():
            return 0
        for node in await self.presence.expired_nodes(self.node_ttl):
            if node == self.node_id:
                continue
            count = await self.presence.reap_node(node)
            log.warning("reaped node %s: %d sessions logged out", node, count)
            REAPED_SESSIONS.inc(count)
            total += count
        return total

    async def run(self) -> None:
        while not self.stopped:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._healthy_since = None
                self._failed = True
                log.exception("node heartbeat failed; retrying (peers are not judged until Redis is back)")
                continue
            try:
                await self.reap()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reaper round failed; retrying")
