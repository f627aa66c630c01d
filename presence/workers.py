"""``presence serve --workers N``: N gateway processes sharing the TCP and WebSocket ports, REST served once.

The supervisor (the process started by ``presence serve``) is itself a node without gateway listeners: it
serves REST, runs the webhooks worker and reaps dead nodes like any node. Each worker is
``python -m presence.workers`` with the settings on its stdin (keys never on a command line), its own node
id ``<base>-w<i>`` (``<base>-w<i>.<n>`` for its n-th start), SO_REUSEPORT on the TCP and WebSocket ports
(the kernel spreads new connections over the workers) and no REST.

- SIGTERM or SIGINT: every worker gets SIGTERM and, like a single node, tells its clients and logs their
  sessions out; then the supervisor stops. A worker also gets SIGTERM if the supervisor dies.
- A worker that exits otherwise (a crash, kill -9) is started again under a new node id, and the supervisor
  reaps the dead node's sessions at once (friends see them go offline) instead of after ``node_ttl``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
import time
from dataclasses import dataclass

import msgspec

from presence.config import Settings, with_dev_app
from presence.server import Running, announce, default_node_id, run_event_loop, serve, start

log = logging.getLogger("presence.workers")

READY = "presence listening"
START_TIMEOUT = 30.0
RESTART_BACKOFF = 1.0  # s before restarting a worker that died within its first seconds
STOP_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the worker before exec: SIGTERM when the supervisor dies (Linux), so no worker outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Worker:
    index: int
    starts: int = 0
    node_id: str = ""
    started_at: float = 0.0
    proc: asyncio.subprocess.Process | None = None
    drain: asyncio.Task[None] | None = None


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = with_dev_app(settings)  # one dev key for every worker
        self.base = settings.node_id or default_node_id()
        self.workers = [Worker(i) for i in range(settings.workers)]
        self.stopping = False
        self.running: Running | None = None

    async def spawn(self, worker: Worker) -> None:
        worker.starts += 1
        worker.node_id = f"{self.base}-w{worker.index}" + (f".{worker.starts}" if worker.starts > 1 else "")
        settings = msgspec.structs.replace(self.settings, node_id=worker.node_id, http_port=0, workers=1)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "presence.workers",
            "--log-level",
            str(level),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(msgspec.json.encode(settings))
        proc.stdin.close()
        worker.proc, worker.started_at = proc, time.monotonic()
        try:
            while True:
                line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)).decode()
                if not line:
                    raise RuntimeError(f"worker {worker.node_id} exited at start (code {await proc.wait()})")
                if line.startswith(READY):
                    break
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        worker.drain = asyncio.create_task(self._drain(proc))
        log.info("worker %d started: node %s, pid %d", worker.index, worker.node_id, proc.pid)

    @staticmethod
    async def _drain(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while await proc.stdout.readline():  # a worker's dev-mode banner: the supervisor prints its own
            pass

    async def watch(self, worker: Worker) -> None:
        """Restart a worker that exits while we are not stopping, and reap its node's sessions at once."""
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self.stopping:
                return
            dead = worker.node_id
            log.error(
                "worker %d (node %s) exited with code %s; reaping its sessions, starting it again",
                worker.index,
                dead,
                code,
            )
            assert self.running is not None
            try:
                reaped = await self.running.presence.nodes.reap(dead)
                log.info("reaped %d sessions of node %s", reaped, dead)
            except Exception as exc:  # the node's heartbeat stopped: any node's reaper gets it after node_ttl
                log.warning("reaping node %s failed (%r); the reaper will", dead, exc)
            if time.monotonic() - worker.started_at < 5:
                await asyncio.sleep(RESTART_BACKOFF)
            while not self.stopping:
                try:
                    await self.spawn(worker)
                    break
                except Exception as exc:
                    log.error("starting worker %d failed (%r); trying again", worker.index, exc)
                    await asyncio.sleep(RESTART_BACKOFF)
            if self.stopping:
                return

    async def stop_workers(self) -> None:
        async def one(worker: Worker) -> None:
            proc = worker.proc
            if proc is None or proc.returncode is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.error("worker %s did not stop within %.0f s; killing it", worker.node_id, STOP_TIMEOUT)
                proc.kill()
                await proc.wait()

        await asyncio.gather(*(one(w) for w in self.workers))
        await _cancel([w.drain for w in self.workers if w.drain is not None])

    async def run(self) -> None:
        s = self.settings
        own = msgspec.structs.replace(s, tcp_port=0, ws_port=0, node_id=f"{self.base}-rest", workers=1)
        self.running = await start(own, ready_line=False)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watchers: list[asyncio.Task[None]] = []
        try:
            await asyncio.gather(*(self.spawn(w) for w in self.workers))
            watchers = [asyncio.create_task(self.watch(w)) for w in self.workers]
            self.running.tcp_port, self.running.ws_port = s.tcp_port, s.ws_port
            log.info(
                "%d gateway workers share tcp=%s ws=%s; REST on %s",
                len(self.workers),
                s.tcp_port,
                s.ws_port,
                self.running.http_port,
            )
            announce(self.running, self.base)
            await stop.wait()
            log.info("shutting down: stopping the workers (each logs its sessions out), then REST")
        finally:
            self.stopping = True
            await self.stop_workers()
            await _cancel(watchers)
            await self.running.stop()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they are done (their errors were logged or do not matter now)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def supervise(settings: Settings) -> None:
    await Supervisor(settings).run()


def main() -> None:
    """A worker: the settings as JSON on stdin, then ``serve`` with SO_REUSEPORT listeners."""
    parser = argparse.ArgumentParser(description="one gateway worker of `presence serve --workers N`")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = msgspec.json.decode(sys.stdin.buffer.read(), type=Settings)
    run_event_loop(serve(settings, reuse_port=True))


if __name__ == "__main__":
    main()
