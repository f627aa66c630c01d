"""Micro-benchmark of the gateway's per-delivery encode cost: ``Delivery.dispatch`` alone, no Redis, no sockets.

``python bench/dispatch_micro.py [--inboxes 1000] [--devices 1] [--rounds 30]``. One push fans out to N
friends, each its own inbox with D connections (the friend's devices; D = 1 in the fan-out benchmark), on
each transport: WebSocket text, WebSocket binary, TCP. The connections' transports only count bytes.
Prints deliveries per second (best of three runs) per transport. Run as a file, so that
``PYTHONPATH=<another checkout>`` measures that checkout's code instead (this one's API: issue 11 on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import fakeredis

from presence.config import Settings
from presence.gateway.codec import pack_tail
from presence.gateway.delivery import Delivery
from presence.gateway.session import SessionId
from presence.gateway.tcp import TcpConnection
from presence.gateway.ws import WsConnection
from presence.inbox import EventId, InboxEntry, Inboxes
from presence.keys import KeySchema
from presence.store import Store

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

    def get_extra_info(self, name: str) -> None:
        return None

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def make_delivery(kind: str, n: int, devices: int) -> tuple[Delivery[Any], list[str]]:
    settings = Settings()
    # The connections' hub: only what a transport asks of it before its LOGIN.
    hub: Any = SimpleNamespace(settings=settings, closing=False, gate=SimpleNamespace(tcp_open=0))
    hub.has_room, hub.opened = (lambda transport: True), (lambda conn: None)
    inboxes = Inboxes(Store.wrap(fakeredis.FakeAsyncRedis()), KeySchema())  # never called: dispatch reads nothing
    delivery: Delivery[Any] = Delivery(inboxes, "bench", settings, spawn=lambda coro: coro.close(), end_kicked=None)  # type: ignore[arg-type]
    names: list[str] = []
    for j in range(n * devices):
        i = j // devices
        session = SessionId(10000, f"friend-{i:05d}", 2, f"phone-{j:05d}", f"c{j}")
        conn: Any
        if kind == "tcp":
            conn = TcpConnection(hub)
            conn.connection_made(CountingTransport())
        else:
            conn = WsConnection(hub, SimpleNamespace(closed=False), CountingTransport())  # type: ignore[arg-type]
            conn.receive_mode(text=kind == "ws-text")
        conn.session.pack_tail = pack_tail(session.client_type, session.imei)
        delivery.attach(conn, session, EventId(0, 0))
        if j % devices == 0:
            names.append(inboxes.key(session.app_id, session.user_id))
    return delivery, names


def run(kind: str, inboxes: int, devices: int, rounds: int) -> float:
    delivery, names = make_delivery(kind, inboxes, devices)
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        entry_id, flat = f"1700000000000-{r}".encode(), [b"c", b"4004", b"d", DATA]
        for inbox in names:
            # Each inbox's read parses its own entries (Inboxes.read): counted here, as dispatch once did it.
            entry = InboxEntry.parse_flat(entry_id, flat)
            delivery.dispatch(inbox, [entry])
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
