"""Processes a benchmark run starts: a private redis-server, `presence serve`, the seed gateway, client workers.

Everything listens on 127.0.0.1 and free ports; every process is ended by the run that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import redis

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
APP = 10000
KEY = "bench-private-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout)\b.*")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (10,000 sockets need it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (from /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def log(msg: str) -> None:
    """Progress line on stderr (make shows it as the run goes)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class RedisServer:
    """A private redis-server: free port, no persistence, its own temporary directory."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise SystemExit("redis-server is not on PATH (make bench installs it through the redis-server target)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="presence-bench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--maxclients",
            "20000",
        ]
        with open(Path(self.dir) / "redis.log", "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=raise_nofile)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Server:
    """A gateway subprocess (`presence serve` or the seed gateway) that prints its port on one line."""

    def __init__(self, name: str, cmd: Sequence[str], ready: str, env: dict[str, str], log_path: Path) -> None:
        self.name, self.cmd, self.ready, self.env, self.log_path = name, list(cmd), ready, env, log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.ws_port = 0
        self.control_port = 0  # the ceiling server's change trigger
        self._drain: asyncio.Task[None] | None = None
        self._log: TextIO | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ws_port}/ws"

    async def start(self) -> None:
        self._log = open(self.log_path, "a")  # closed in stop()
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
            env=self.env,
            cwd=ROOT,
            preexec_fn=raise_nofile,
        )
        assert self.proc.stdout is not None
        try:
            while True:
                line = (await asyncio.wait_for(self.proc.stdout.readline(), 30)).decode()
                if not line:
                    raise RuntimeError(f"{self.name} exited at start; see {self.log_path}")
                if line.startswith(self.ready):
                    parts = dict(p.split("=", 1) for p in line.split()[2:] if "=" in p)
                    self.ws_port = int(parts["ws"])
                    break
        except BaseException:
            await self.stop()
            raise
        self._drain = asyncio.create_task(self._read_rest())

    def log_errors(self) -> dict[str, Any]:
        """ERROR lines in this server's log, and the exceptions they name (a benchmark must not hide failures)."""
        count = 0
        kinds: Counter[str] = Counter()
        with contextlib.suppress(OSError), open(self.log_path) as f:
            for line in f:
                if " ERROR " in line:
                    count += 1
                elif _EXCEPTION.match(line):
                    kinds[line.strip()[:160]] += 1
        return {"error_lines": count, "exceptions": dict(kinds.most_common(5))}

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(BaseException):
                await self._drain
        if self._log is not None:
            self._log.close()
            self._log = None


def presence_command(redis_url: str, ws_port: int, node_id: str) -> list[str]:
    return [
        PY,
        "-m",
        "presence",
        "serve",
        "--redis",
        redis_url,
        "--tcp-port",
        "0",
        "--ws-port",
        str(ws_port),
        "--http-port",
        "0",
        "--offline-grace",
        "0",
        "--node-id",
        node_id,
    ]


def presence_server(redis_url: str, node_id: str, log_path: Path, extra: Sequence[str] = ()) -> Server:
    env = {**os.environ, "PRESENCE_APPS": f"{APP}:{KEY}"}
    cmd = [*presence_command(redis_url, free_port(), node_id), *extra]
    return Server("presence serve", cmd, "presence listening", env, log_path)


def seed_gateway(redis_url: str, broker_id: int, log_path: Path) -> Server:
    cmd = [
        PY,
        "-m",
        "bench.seed_gateway",
        "--redis",
        redis_url,
        "--ws-port",
        str(free_port()),
        "--broker-id",
        str(broker_id),
    ]
    return Server("seed gateway", cmd, "seed-gateway listening", dict(os.environ), log_path)


class Worker:
    """One client process (bench.wsclients), spoken to in JSON lines over its stdin and stdout."""

    def __init__(self, index: int, on_event: Callable[[Worker, dict[str, Any]], None]) -> None:
        self.index = index
        self.on_event = on_event
        self.proc: asyncio.subprocess.Process | None = None
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.conns = 0
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            PY,
            "-m",
            "bench.wsclients",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            preexec_fn=raise_nofile,
            limit=64 * 1024 * 1024,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            event = json.loads(line)
            if event.get("ev") in ("done", "progress"):
                self.on_event(self, event)
            else:
                self.replies.put_nowait(event)
        self.replies.put_nowait({"ev": "exited"})

    def send(self, op: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(op).encode() + b"\n")

    async def reply(self, timeout: float = 300) -> dict[str, Any]:
        event = await asyncio.wait_for(self.replies.get(), timeout)
        if event["ev"] == "exited":
            raise RuntimeError(f"client worker {self.index} exited")
        if event["ev"] == "error":
            raise RuntimeError(f"client worker {self.index}: {event['msg']}")
        return event

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.send({"op": "exit"})
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader


def ceiling_server(log_path: Path) -> Server:
    """The bare aiohttp push/login server (bench.ceiling_server): the machine's ceiling in the same run."""
    control = free_port()
    cmd = [PY, "-m", "bench.ceiling_server", "--ws-port", str(free_port()), "--control-port", str(control)]
    server = Server("ceiling server", cmd, "ceiling listening", dict(os.environ), log_path)
    server.control_port = control
    return server
