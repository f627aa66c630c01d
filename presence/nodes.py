"""Gateway node liveness: heartbeats into ``presence:nodes`` and the reaper of silent nodes.

The reaper is what makes a crashed gateway's users go offline: any node (or the REST app) logs out
every session still recorded for a node whose last heartbeat is older than ``node_ttl``.
"""

from __future__ import annotations

import asyncio
import logging
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
    ) -> None:
        self.presence = presence
        self.node_id = node_id
        self.node_ttl = node_ttl
        self.on_reaped = on_reaped
        self.interval = min(interval, max(node_ttl / 3, 0.05))
        self._beaten = False
        self.stopped = False  # loops also check a flag: redis-py may swallow a cancel mid-command

    async def beat(self) -> None:
        if self.node_id is None:
            return
        was_registered = await self.presence.node_heartbeat(self.node_id)
        if self._beaten and not was_registered and self.on_reaped is not None:
            await self.on_reaped()
        self._beaten = True

    async def reap(self) -> int:
        total = 0
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
                await self.reap()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node heartbeat/reaper round failed; retrying")
