"""A benchmark client process: many real aiohttp WebSocket connections, driven over stdin/stdout.

Run as ``python -m bench.wsclients``; the coordinator (bench.run) writes one JSON op per line and reads
one JSON event per line. Each connection logs in with the JSON text LOGIN of the gateway protocol and then
reads every push. A status change carries ``customText = "b<seq>:<monotonic ns at the call>"``;
CLOCK_MONOTONIC is one clock for every process on the machine, so ``now - ns`` is the latency of that
delivery. When every local connection has a change, the process reports ``done`` with the time the last
one arrived.

ops:   connect {url, users, concurrency, sign_key|null, app, ping_s}  -> connected {ok, fail, t_first, t_last}
       expect {per_seq}       start counting changes (each should reach per_seq local connections)
       stats {}               -> stats {lat_us: [...per delivery...], received}
       pull {users, n, app}   -> pulled {ms: [...]}  (PULL 4003 over the first connection, n times)
       close {}               -> closed {}
       exit {}
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from typing import Any

import aiohttp

from bench.procs import raise_nofile
from presence.auth import generate_user_sign

MARK = re.compile(r'"customText":"b(\d+):(\d+)"')
PULL_REPLY = '"command":4003'


def emit(event: dict[str, Any]) -> None:
    sys.stdout.buffer.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
    sys.stdout.buffer.flush()


def frame(command: int, app: int, data: dict[str, Any], imei: str = "bench") -> str:
    return json.dumps({"command": command, "appId": app, "clientType": 1, "imei": imei, "version": 1, "data": data})


class Clients:
    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.conns: list[aiohttp.ClientWebSocketResponse] = []
        self.readers: list[asyncio.Task[None]] = []
        self.per_seq = 0
        self.counts: dict[int, int] = {}
        self.lat_us: list[int] = []
        self.received = 0
        self.done: list[list[int]] = []
        self.flush_scheduled = False
        self.pull_waiter: asyncio.Future[None] | None = None
        self.pinger: asyncio.Task[None] | None = None
        self.ping_frame = ""

    # --- incoming pushes ---

    def on_text(self, data: str) -> None:
        now = time.monotonic_ns()
        m = MARK.search(data)
        if m is None:
            if self.pull_waiter is not None and PULL_REPLY in data and not self.pull_waiter.done():
                self.pull_waiter.set_result(None)
            return
        if not self.per_seq:
            return
        seq = int(m.group(1))
        self.received += 1
        self.lat_us.append((now - int(m.group(2))) // 1000)
        n = self.counts.get(seq, 0) + 1
        if n >= self.per_seq:
            self.counts.pop(seq, None)
            self.done.append([seq, now])
            if not self.flush_scheduled:
                self.flush_scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)
        else:
            self.counts[seq] = n

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.done:
            emit({"ev": "done", "s": self.done})
            self.done = []

    async def read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.on_text(msg.data)
            elif msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.ERROR,
            ):
                return

    # --- ops ---

    async def connect(self, op: dict[str, Any]) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))
        url, app, key = op["url"], op["app"], op.get("sign_key")
        users: list[str] = op["users"]
        sem = asyncio.Semaphore(op.get("concurrency", 50))
        ok = fail = 0
        errors: list[str] = []
        failed: list[str] = []

        # Signs are made before the clock starts: they are the client's work, not the server's.
        logins = {
            u: frame(9000, app, {"userId": u, "userSign": generate_user_sign(app, key, u)} if key else {"userId": u})
            for u in users
        }
        session = self.session
        t_first = t_last = time.monotonic_ns()

        async def one(user: str) -> None:
            nonlocal ok, fail, t_last
            async with sem:
                try:
                    ws = await session.ws_connect(url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5))
                    await ws.send_str(logins[user])
                    while True:
                        msg = await ws.receive(timeout=60)
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            raise ConnectionError(f"login of {user}: {msg.type.name} {ws.close_code}")
                        if '"command":9001' in msg.data:
                            break
                        if '"command":9100' in msg.data:
                            raise ConnectionError(f"login of {user} refused: {msg.data[:200]}")
                except Exception as exc:
                    fail += 1
                    failed.append(user)
                    if len(errors) < 5:
                        errors.append(repr(exc)[:300])
                    return
                t_last = max(t_last, time.monotonic_ns())
                ok += 1
                self.conns.append(ws)
                self.readers.append(asyncio.create_task(self.read(ws)))

        async def progress() -> None:
            while True:
                await asyncio.sleep(0.5)
                emit({"ev": "progress", "ok": ok, "fail": fail})

        ticker = asyncio.create_task(progress())
        await asyncio.gather(*(one(u) for u in users))
        ticker.cancel()
        self.ping_frame = frame(9999, app, {})
        if op.get("ping_s") and self.pinger is None:
            self.pinger = asyncio.create_task(self.ping(op["ping_s"]))
        emit(
            {
                "ev": "connected",
                "ok": ok,
                "fail": fail,
                "t_first": t_first,
                "t_last": t_last,
                "errors": errors,
                "failed": failed,
            }
        )

    async def ping(self, every: float) -> None:
        """PING each connection once per ``every`` seconds, spread over the interval (as idle clients do)."""
        while True:
            started = time.monotonic()
            conns = list(self.conns)
            step = every / max(1, len(conns)) * 50
            for i, ws in enumerate(conns):
                if not ws.closed:
                    try:
                        await ws.send_str(self.ping_frame)
                    except Exception:  # a closing socket: its reader sees the close
                        pass
                if i % 50 == 49:
                    await asyncio.sleep(step)
            await asyncio.sleep(max(0.1, every - (time.monotonic() - started)))

    async def pull(self, op: dict[str, Any]) -> None:
        ws = self.conns[0]
        body = frame(4003, op["app"], {"userList": op["users"]})
        out: list[float] = []
        loop = asyncio.get_running_loop()
        for _ in range(op["n"]):
            self.pull_waiter = loop.create_future()
            started = time.perf_counter_ns()
            await ws.send_str(body)
            await asyncio.wait_for(self.pull_waiter, 30)
            out.append((time.perf_counter_ns() - started) / 1e6)
        self.pull_waiter = None
        emit({"ev": "pulled", "ms": out})

    async def close(self) -> None:
        if self.pinger is not None:
            self.pinger.cancel()
            self.pinger = None
        sem = asyncio.Semaphore(200)

        async def one(ws: aiohttp.ClientWebSocketResponse) -> None:
            async with sem:
                try:
                    await asyncio.wait_for(ws.close(), 10)
                except Exception:  # already gone
                    pass

        await asyncio.gather(*(one(ws) for ws in self.conns))
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        self.conns.clear()
        self.readers.clear()
        emit({"ev": "closed"})


async def main() -> None:
    raise_nofile()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    clients = Clients()
    while line := await reader.readline():
        op = json.loads(line)
        name = op["op"]
        try:
            if name == "connect":
                await clients.connect(op)
            elif name == "expect":
                clients.per_seq = op["per_seq"]
                clients.counts.clear()
                clients.lat_us = []
                clients.received = 0
            elif name == "stats":
                clients.flush()
                emit(
                    {
                        "ev": "stats",
                        "lat_us": clients.lat_us,
                        "received": clients.received,
                        "incomplete": len(clients.counts),
                    }
                )
                clients.lat_us = []
                clients.received = 0
            elif name == "pull":
                await clients.pull(op)
            elif name == "close":
                await clients.close()
            elif name == "exit":
                break
        except Exception as exc:
            emit({"ev": "error", "msg": repr(exc)[:500]})
    if clients.conns:
        await clients.close()
    if clients.session is not None:
        await clients.session.close()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
