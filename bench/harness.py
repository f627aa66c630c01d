"""The coordinator's side of a run: client worker pools, change tracking, paced and windowed drivers, CPU meters."""

from __future__ import annotations

import asyncio
import resource
import statistics
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from bench.procs import APP, CLK_TCK, Worker, cpu_seconds, log

Change = Callable[[int, int], Coroutine[Any, Any, Any]]  # a coroutine: run as a task
STALL_S = 20.0


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else None


class Tracker:
    """Changes in flight: a change is complete when every worker with recipients reported it.

    Our fan-out never pushes a user's older version after a newer one (issue 10): when concurrent changes
    overtake each other in Redis, the older is skipped for every friend that already has the newer. So a
    change still pending when a later one completes is *superseded*: its friends are on a newer state. It
    counts as no delivery (nor latency) and frees its window slot. ``users``: changes go to that many users
    in turn (seq % users), so only a pending change of the same user can be superseded.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.users = 1
        self.superseded = 0
        self.pending: dict[int, list[int]] = {}  # seq -> [call ns, workers left, last delivery ns]
        self.latency_ns: dict[int, int] = {}
        self.last_done_ns = 0
        self.on_complete: Callable[[], None] | None = None
        self.idle = asyncio.Event()
        self.idle.set()
        self.seq = 0

    def next(self) -> tuple[int, int]:
        self.seq += 1
        now = time.monotonic_ns()
        self.pending[self.seq] = [now, self.workers, 0]
        self.idle.clear()
        return self.seq, now

    def done(self, seq: int, at_ns: int) -> None:
        entry = self.pending.get(seq)
        if entry is None:
            return
        entry[1] -= 1
        entry[2] = max(entry[2], at_ns)
        if entry[1] == 0:
            del self.pending[seq]
            self.latency_ns[seq] = entry[2] - entry[0]
            self.last_done_ns = max(self.last_done_ns, entry[2])
            older = [s for s in self.pending if s < seq and (seq - s) % self.users == 0]
            for s in older:
                del self.pending[s]
            self.superseded += len(older)
            if self.on_complete is not None:
                for _ in range(1 + len(older)):
                    self.on_complete()
            if not self.pending:
                self.idle.set()

    def forget(self) -> None:
        self.pending.clear()
        self.idle.set()


class Pool:
    """Client worker processes holding the WebSocket connections of one scenario."""

    def __init__(self, n: int) -> None:
        self.workers = [Worker(i, self._event) for i in range(n)]
        self.tracker: Tracker | None = None
        self._progress: dict[int, tuple[int, int]] = {}

    @property
    def active(self) -> list[Worker]:
        return [w for w in self.workers if w.conns]

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    async def start(self) -> None:
        await asyncio.gather(*(w.start() for w in self.workers))

    def _event(self, worker: Worker, event: dict[str, Any]) -> None:
        if event["ev"] == "done":
            if self.tracker is not None:
                for seq, at in event["s"]:
                    self.tracker.done(seq, at)
        else:
            self._progress[worker.index] = (event["ok"], event["fail"])

    async def connect(
        self,
        url: str,
        users: Sequence[str],
        sign_key: str | None,
        label: str,
        concurrency: int = 32,
        ping_s: float = 15.0,
    ) -> dict[str, Any]:
        """Open and log in one connection per user, spread evenly over the workers.

        Logins that fail are retried once, one second later (``retried`` says how many); ``fail`` counts
        those that failed twice. Timing (``t_first``, ``t_last``) is the first pass only.
        """
        first = await self._connect(url, users, sign_key, label, concurrency, ping_s)
        first["retried"] = 0
        if first["failed_users"]:
            log(f"{label}: {len(first['failed_users'])} logins failed ({first['errors'][:1]}); retrying them once")
            await asyncio.sleep(1.0)
            again = await self._connect(url, first["failed_users"], sign_key, label, concurrency, ping_s)
            first.update(retried=len(first["failed_users"]), fail=again["fail"], ok=first["ok"] + again["ok"])
            first["errors"] += again["errors"]
        return first

    async def _connect(
        self, url: str, users: Sequence[str], sign_key: str | None, label: str, concurrency: int, ping_s: float
    ) -> dict[str, Any]:
        n = len(self.workers)
        chunks = [list(users[i::n]) for i in range(n)]
        self._progress = {}
        busy = [(w, c) for w, c in zip(self.workers, chunks, strict=True) if c]
        for w, chunk in busy:
            w.send(
                {
                    "op": "connect",
                    "url": url,
                    "users": chunk,
                    "concurrency": concurrency,
                    "sign_key": sign_key,
                    "app": APP,
                    "ping_s": ping_s,
                }
            )

        async def report() -> None:
            while True:
                await asyncio.sleep(2.0)
                ok = sum(p[0] for p in self._progress.values())
                fail = sum(p[1] for p in self._progress.values())
                log(f"{label}: {ok}/{len(users)} connections logged in" + (f", {fail} failed" if fail else ""))

        ticker = asyncio.create_task(report())
        try:
            replies = await asyncio.gather(*(w.reply(600) for w, _ in busy))
        finally:
            ticker.cancel()
        for (w, _), r in zip(busy, replies, strict=True):
            w.conns += r["ok"]
        errors = [e for r in replies for e in r["errors"]]
        return {
            "ok": sum(r["ok"] for r in replies),
            "fail": sum(r["fail"] for r in replies),
            "failed_users": [u for r in replies for u in r["failed"]],
            "t_first": min(r["t_first"] for r in replies),
            "t_last": max(r["t_last"] for r in replies),
            "errors": errors[:5],
        }

    def expect(self) -> Tracker:
        for w in self.workers:
            w.send({"op": "expect", "per_seq": w.conns})
        self.tracker = Tracker(len(self.active))
        return self.tracker

    async def stats(self) -> dict[str, Any]:
        for w in self.active:
            w.send({"op": "stats"})
        replies = await asyncio.gather(*(w.reply() for w in self.active))
        return {
            "lat_us": [x for r in replies for x in r["lat_us"]],
            "received": sum(r["received"] for r in replies),
        }

    async def pull(self, users: list[str], n: int) -> list[float]:
        w = self.active[0]
        w.send({"op": "pull", "users": users, "n": n, "app": APP})
        return (await w.reply())["ms"]

    async def close(self) -> None:
        busy = self.active
        for w in busy:
            w.send({"op": "close"})
        await asyncio.gather(*(w.reply(300) for w in busy))
        for w in self.workers:
            w.conns = 0
        self.tracker = None

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers))


def machine_cpu_seconds() -> float:
    """Busy CPU time of the whole machine, all cores (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class CpuMeter:
    """CPU use of named processes (and this one) over a window, as % of one core.

    ``other`` is what the rest of the machine used meanwhile (other programs): a loaded machine shows there.
    """

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _read(self) -> dict[str, float]:
        out = {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids.items()}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["driver"] = usage.ru_utime + usage.ru_stime
        out["machine"] = machine_cpu_seconds()
        return out

    def start(self) -> None:
        self._start = self._read()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        end = self._read()
        wall = time.monotonic() - self._t0
        used = {name: 100 * (end[name] - self._start[name]) / wall for name in end}
        total = used.pop("machine")
        used["other"] = max(0.0, total - sum(used.values()))
        return {name: round(v, 1) for name, v in used.items()}


async def windowed(change: Change, tracker: Tracker, window: int, duration: float) -> dict[str, Any]:
    """As many changes as the system completes, at most ``window`` undelivered at once, for ``duration`` s."""
    sem = asyncio.Semaphore(window)
    tracker.on_complete = sem.release
    errors: list[BaseException] = []
    tasks: set[asyncio.Task[Any]] = set()
    first = tracker.seq + 1
    superseded = tracker.superseded
    t0 = time.monotonic_ns()
    end = t0 + int(duration * 1e9)

    def finished(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())  # type: ignore[arg-type]

    try:
        while tracker.seq < first or time.monotonic_ns() < end:  # at least one change
            await asyncio.wait_for(sem.acquire(), STALL_S)
            if errors:
                raise errors[0]
            seq, at = tracker.next()
            task = asyncio.create_task(change(seq, at))
            tasks.add(task)
            task.add_done_callback(finished)
        await asyncio.wait_for(tracker.idle.wait(), STALL_S)
    except TimeoutError:
        raise RuntimeError(f"stalled: {len(tracker.pending)} changes not delivered within {STALL_S:.0f} s") from None
    finally:
        tracker.on_complete = None
    if errors:
        raise errors[0]
    last = tracker.seq
    skipped = tracker.superseded - superseded
    changes = last - first + 1 - skipped  # delivered to every friend
    elapsed = (tracker.last_done_ns - t0) / 1e9
    return {
        "changes": changes,
        "superseded": skipped,
        "elapsed_s": elapsed,
        "changes_per_s": changes / elapsed,
        "latency_ms": [tracker.latency_ns[s] / 1e6 for s in range(first, last + 1) if s in tracker.latency_ns],
    }


async def paced(
    change: Change, tracker: Tracker, rate: float, duration: float, least: int, cap_s: float
) -> dict[str, Any]:
    """Open loop: changes at ``rate`` per second (whatever the replies do).

    For ``duration`` s, or ``least`` changes when that is more, but never longer than ``cap_s`` (and 4 changes).
    """
    count = min(max(least, int(rate * duration)), max(4, int(rate * cap_s)))
    interval = 1.0 / rate
    errors: list[BaseException] = []
    tasks: set[asyncio.Task[Any]] = set()
    first = tracker.seq + 1
    superseded = tracker.superseded
    late = 0.0

    def finished(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())  # type: ignore[arg-type]

    t0 = time.monotonic()
    for i in range(count):
        delay = t0 + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late = max(late, -delay)
        if errors:
            raise errors[0]
        seq, at = tracker.next()
        task = asyncio.create_task(change(seq, at))
        tasks.add(task)
        task.add_done_callback(finished)
    sent_s = time.monotonic() - t0
    try:
        await asyncio.wait_for(tracker.idle.wait(), STALL_S)
    except TimeoutError:
        raise RuntimeError(f"stalled: {len(tracker.pending)} changes not delivered within {STALL_S:.0f} s") from None
    if errors:
        raise errors[0]
    last = tracker.seq
    return {
        "changes": count,
        "superseded": tracker.superseded - superseded,
        "rate_per_s": rate,
        "achieved_rate_per_s": count / sent_s if sent_s else rate,
        "max_driver_lag_ms": late * 1000,
        "latency_ms": [tracker.latency_ns[s] / 1e6 for s in range(first, last + 1) if s in tracker.latency_ns],
    }
