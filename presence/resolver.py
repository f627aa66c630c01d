"""Calls whose outcome is unknown when the caller gave up, resolved once Redis answers again.

A change call (logout, custom status) that ran out of ``redis_retry_for`` may still have been applied:
its bytes can sit in a stalled server and run at wake. Each such call carries an operation id; the
resolver keeps a replay of it (the same function, keys and args, op id included) and runs it in the
background until Redis answers. The library treats a recent op id as a repeat (it applies nothing and
replies the current state), so the replay fans out the newest state either way: an applied change is
pushed. A call that never reached Redis is applied by its replay (once).

Bounded: at most ``max_pending`` calls (the oldest is dropped, logged) and ``max_age`` s each.
One per process, owned by ``Presence``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from presence.errors import UnavailableError

log = logging.getLogger(__name__)

Replay = Callable[[], Awaitable[Any]]

MAX_PENDING = 10_000
MAX_AGE_S = 600.0  # s: longer than any retry window; the library remembers a user's last 16 op ids
RETRY_PAUSE_S = 0.5


class Resolver:
    """``add(op_id, what, replay)`` keeps a call to replay; ``close()`` stops the background task."""

    def __init__(self, max_pending: int = MAX_PENDING, max_age: float = MAX_AGE_S) -> None:
        self.max_pending = max_pending
        self.max_age = max_age
        self._pending: OrderedDict[str, tuple[float, str, Replay]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self.resolved = 0  # replays that completed
        self.dropped = 0  # calls given up (too many, too old, or failing for another reason)

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, op_id: str, what: str, replay: Replay) -> None:
        """Keep ``replay`` (idempotent by ``op_id``: a second add of the same id keeps the first time)."""
        if op_id in self._pending:
            return
        while len(self._pending) >= self.max_pending:
            _, (_, old, _) = self._pending.popitem(last=False)
            self.dropped += 1
            log.error("unknown outcome of %s dropped: more than %d calls pending", old, self.max_pending)
        self._pending[op_id] = (time.monotonic(), what, replay)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def discard(self, op_id: str) -> None:
        """The call's outcome is known (a later attempt answered): nothing to replay."""
        self._pending.pop(op_id, None)

    async def _run(self) -> None:
        while self._pending:
            op_id, (since, what, replay) = next(iter(self._pending.items()))
            if time.monotonic() - since > self.max_age:
                self._pending.pop(op_id, None)
                self.dropped += 1
                log.error("unknown outcome of %s dropped after %.0f s", what, self.max_age)
                continue
            try:
                await replay()
            except UnavailableError:
                await asyncio.sleep(RETRY_PAUSE_S)  # Redis still away: the same call again
                continue
            except Exception as exc:  # not an outage: replaying cannot help
                self._pending.pop(op_id, None)
                self.dropped += 1
                log.error("unknown outcome of %s not resolved: %r", what, exc)
                continue
            self._pending.pop(op_id, None)
            self.resolved += 1
            log.info("resolved the unknown outcome of %s", what)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for nothing to be pending; whether that happened."""
        task = self._task
        if task is None or task.done():
            return not self._pending
        done, _ = await asyncio.wait({task}, timeout=timeout)
        return bool(done) and not self._pending

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._pending:
            log.error("%d calls with an unknown outcome left unresolved at shutdown", len(self._pending))
