"""The machine's own ceiling: a bare aiohttp WebSocket server that does nothing but push and answer logins.

Run as ``python -m bench.ceiling_server --ws-port P --control-port C`` (prints ``ceiling listening ws=P``):

- ``/ws``: accepts the upgrade, waits for one message (the client's LOGIN) and answers one text frame that
  says ``"command":9001`` (what a client counts as a LOGINACK). No sign check, no Redis: what a login costs
  the two sides' aiohttp and kernel on this machine.
- the control port (plain TCP, one line per change: ``<seq> <ns>``): builds the same 4006 pack the real
  gateway would send a friend (``pack_head`` + ``pack_tail`` of the same fields, so the same size), frames
  it once and writes those bytes to every logged-in connection's transport. No Redis, no per-recipient
  encoding: what pushing a delivery costs the server side and the client processes on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from aiohttp import WSMsgType, web

from presence.gateway.codec import pack_head, pack_tail
from presence.gateway.outbound import websocket_header

APP = 10000
LOGINACK = '{"command":9001,"appId":10000,"data":{"userId":"ceiling"}}'
EVENT_ID = "1764000000000-0"  # an inbox entry id of the usual length


def change_frame(seq: int, ns: int, friends: int) -> bytes:
    """The WebSocket text frame of a 4006 push to a friend, as the gateway sends it (same fields, same size)."""
    data = f'{{"userId":"c{friends}","customStatus":{seq % 1000},"customText":"b{seq}:{ns}"}}'.encode()
    pack = pack_head(4006, data, app_id=APP, user_id=f"f{friends}-0", event_id=EVENT_ID) + pack_tail(1, "bench")
    return websocket_header(len(pack), text=True) + pack


class Ceiling:
    def __init__(self) -> None:
        self.conns: list[asyncio.Transport] = []

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=65536)
        await ws.prepare(request)
        transport = request.transport
        logged_in = False
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                if not logged_in:
                    await ws.send_str(LOGINACK)
                    logged_in = True
                    if transport is not None:
                        self.conns.append(transport)
        finally:
            if transport is not None and transport in self.conns:
                self.conns.remove(transport)
        return ws

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            seq, ns, friends = (int(x) for x in line.split())
            frame = change_frame(seq, ns, friends)
            for transport in self.conns:
                if not transport.is_closing():
                    transport.write(frame)
        writer.close()


async def serve(ws_port: int, control_port: int) -> None:
    ceiling = Ceiling()
    app = web.Application()
    app.router.add_get("/ws", ceiling.ws)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", ws_port, reuse_address=True).start()
    control = await asyncio.start_server(ceiling.control, "127.0.0.1", control_port)
    print(f"ceiling listening ws={ws_port} control={control_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    control.close()
    with contextlib.suppress(Exception):
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="the push and login ceiling of this machine")
    parser.add_argument("--ws-port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.ws_port, args.control_port))
    else:
        uvloop.run(serve(args.ws_port, args.control_port))


if __name__ == "__main__":
    main()
