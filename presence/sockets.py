"""Socket capacity: every accepted socket of every listener (TCP, WebSocket, REST) counted against one limit.

Shapes: ``capacity`` client sockets (the descriptor limit minus ``fd_reserve``, or ``max_connections``),
plus ``spare`` more that only the HTTP listeners may use, so a full gateway can still answer a
WebSocket upgrade with 503 and REST and ``/healthz`` with 200. Whatever happens, at most
``capacity + spare`` client sockets are open, and the rest of the reserve stays free for Redis,
listeners and logs. A refused socket is closed at once, counted in
``presence_connections_refused_total{transport}`` and reported in one log line per
``REFUSED_LOG_INTERVAL`` (a timer reports a burst's total even if no later refusal comes).

Idle HTTP sockets (no complete request within the deadline) are closed by aiohttp's
``keepalive_timeout``, which also runs from the moment a connection opens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

from presence.metrics import CONNECTIONS_REFUSED

log = logging.getLogger("presence.gateway")

REFUSED_LOG_INTERVAL = 10.0  # seconds between "at capacity" log lines
MAX_SPARE = 32  # sockets beyond the capacity that HTTP listeners may use (a quarter of the reserve at most)


class _Refused(asyncio.Protocol):
    """The protocol of a socket accepted over capacity: closed at once, its descriptor given back."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).abort()  # a listener's transport; asyncio types it as the base


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one admitted socket, handing the slot back when the socket closes.

    Counted from the accept (not from ``connection_made``, which runs a loop turn later), so a
    burst of accepts cannot overshoot the capacity.
    """

    __slots__ = ("_gate", "_inner")

    def __init__(self, gate: SocketGate, inner: asyncio.Protocol) -> None:
        self._gate, self._inner = gate, inner
        gate.http_open += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate.http_open -= 1
        self._inner.connection_lost(exc)


class SocketGate:
    """Counts open client sockets of all listeners; ``admit`` says whether one more may stay open."""

    def __init__(self, capacity: int | None = None, spare: int = 0) -> None:
        self.capacity = capacity
        self.spare = spare
        self.tcp_open = 0  # gateway TCP sockets (the TCP transport counts them)
        self.http_open = 0  # sockets of the aiohttp listeners (WebSocket and REST ports)
        self._refused_since_log = 0
        self._refused_logged_at = -REFUSED_LOG_INTERVAL
        self._flush: asyncio.TimerHandle | None = None

    def open_sockets(self) -> int:
        return self.tcp_open + self.http_open

    def admit(self, transport: str, *, held: int = 0, spare: bool = False) -> bool:
        """Whether a socket may stay open: the others (``held`` of them already counted, e.g. the
        WebSocket's own HTTP socket) stay under the capacity (plus the spare if ``spare``)."""
        if self.capacity is None:
            return True
        if self.open_sockets() - held < self.capacity + (self.spare if spare else 0):
            return True
        self.refused(transport)
        return False

    def refused(self, transport: str) -> None:
        CONNECTIONS_REFUSED.labels(transport).inc()
        self._refused_since_log += 1
        now = time.monotonic()
        wait = self._refused_logged_at + REFUSED_LOG_INTERVAL - now
        if wait <= 0:
            self._report(now)
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(wait, self._flushed)

    def _flushed(self) -> None:
        self._flush = None
        if self._refused_since_log:
            self._report(time.monotonic())

    def _report(self, now: float) -> None:
        log.warning(
            "at capacity (%d connections): refused %d new connection(s) since the last report",
            self.capacity,
            self._refused_since_log,
        )
        self._refused_logged_at, self._refused_since_log = now, 0

    def http_protocol(
        self, handler: Callable[[], asyncio.Protocol], transport: str
    ) -> Callable[[], asyncio.BaseProtocol]:
        """A protocol factory for ``loop.create_server``: ``handler()`` (aiohttp's) while there is room
        (capacity plus the spare), else a socket closed at once."""

        def make() -> asyncio.BaseProtocol:
            return _Counted(self, handler()) if self.admit(transport, spare=True) else _Refused()

        return make

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
