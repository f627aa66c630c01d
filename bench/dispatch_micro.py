"""Micro-benchmark of the gateway's per-delivery encode cost: ``Hub.dispatch`` alone, no Redis, no sockets.

``python bench/dispatch_micro.py [--inboxes 1000] [--devices 1] [--rounds 30]``. One push fans out to N
friends, each its own inbox with D connections (the friend's devices; D = 1 in the fan-out benchmark), on
each transport: WebSocket text, WebSocket binary, TCP. The connections' transports only count bytes.
Prints deliveries per second (best of three runs) per transport. Run as a file, so that
``PYTHONPATH=<another checkout>`` measures that checkout's code instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

from presence.config import Settings
from presence.gateway.hub import Hub
from presence.gateway.tcp import TcpConnection
from presence.gateway.ws import WsConnection

DATA = json.dumps(
    {
        "appId": 10000,
        "userId": "alice",
        "status": 1,
        "client": [
            {
                "appId": 10000,
                "userId": "alice",
                "clientType": 2,
                "imei": "alice-phone-0001",
                "connectState": 1,
                "brokerId": "node-1",
                "brokerHost": "10.0.0.1",
                "version": 1,
                "loginTime": 1700000000000,
                "connId": "c0ffee00c0ffee00",
            }
        ],
    },
    separators=(",", ":"),
).encode()


class CountingTransport:
    """Stands in for an asyncio transport: keeps the byte count, never blocks."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def make_connections(kind: str, n: int, devices: int) -> tuple[Any, dict[str, dict[str, Any]]]:
    hub = SimpleNamespace(settings=Settings(), by_inbox={}, _spawn=lambda coro: coro.close())
    for j in range(n * devices):
        i = j // devices
        if kind == "tcp":
            conn: Any = TcpConnection(hub)  # type: ignore[arg-type]
        else:
            conn = WsConnection(hub, SimpleNamespace(closed=False), None)  # type: ignore[arg-type]
            conn.text_mode = kind == "ws-text"
        conn.transport = CountingTransport()
        conn.conn_id, conn.app_id, conn.user_id = f"c{j}", 10000, f"friend-{i:05d}"
        conn.client_type, conn.imei, conn.logged_in = 2, f"phone-{j:05d}", True
        if hasattr(conn, "pack_tail"):  # the per-recipient tail, where the code has one
            from presence.gateway.codec import pack_tail

            conn.pack_tail = pack_tail(conn.client_type, conn.imei)
        hub.by_inbox.setdefault(f"inbox:{i}", {})[conn.conn_id] = conn
    return hub, hub.by_inbox


def run(kind: str, inboxes: int, devices: int, rounds: int) -> float:
    hub, by_inbox = make_connections(kind, inboxes, devices)
    names = list(by_inbox)
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        entry = [(f"1700000000000-{r}".encode(), [b"c", b"4004", b"d", DATA])]
        for inbox in names:
            Hub.dispatch(hub, inbox, entry)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    return inboxes * devices * rounds / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inboxes", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=1, help="connections per inbox")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    asyncio.set_event_loop(asyncio.new_event_loop())  # the connections' constructors may look one up
    import presence

    print(f"code: {presence.__file__}")
    for kind in ("ws-text", "ws-binary", "tcp"):
        best = max(run(kind, args.inboxes, args.devices, args.rounds) for _ in range(3))
        print(f"{kind:10s} {best:12,.0f} deliveries/s  ({1e6 / best:.2f} us per delivery)")


if __name__ == "__main__":
    main()
