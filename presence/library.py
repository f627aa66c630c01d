"""The presence Redis Functions library (lua/presence.lua) on the servers: its source, its version, and
loading it on every primary that lacks this exact code. Calling it is ``presence/functions.py``."""

from __future__ import annotations

import asyncio
import re

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from presence import functions
from presence.resources import resource_path
from presence.store import Store

LIBRARY_NAME = "presence"
Node = ClusterNode | None  # a cluster primary, or None: the one server


def library_source() -> str:
    return resource_path("lua/presence.lua").read_text()


def library_version() -> str:
    """The VERSION the library file declares (what ``presence_version`` answers once it is loaded)."""
    match = re.search(r"^local VERSION = '([^']+)'", library_source(), re.MULTILINE)
    return match.group(1) if match else ""


async def ensure_library(redis: Redis | RedisCluster | Store) -> bool:
    """Load the library with FUNCTION LOAD REPLACE on every primary that lacks this exact code.

    Returns True when it loaded anywhere. The code itself is the version, so an edited file always reloads.
    """
    store = redis if isinstance(redis, Store) else Store.wrap(redis)
    if isinstance(store.client, RedisCluster):
        await store.client.initialize()
    loaded = False
    for node in store.primaries():
        loaded |= await ensure_library_on(store, node)
    return loaded


async def ensure_library_on(store: Store, node: Node) -> bool:
    """``ensure_library`` for one node (a cluster primary, or None: the one server)."""
    if await _has_library(store, node):
        return False
    await store.on_node(node, "FUNCTION", "LOAD", "REPLACE", library_source())
    return True


async def library_health(store: Store, timeout: float) -> list[tuple[str, str | BaseException]]:
    """(node, the library version it runs, or the error) for every primary, asked in parallel; a primary
    that does not answer within ``timeout`` seconds gets a TimeoutError.

    A primary without the library gets it loaded (an empty restart, FUNCTION FLUSH) and is asked again.
    """
    fn = functions.Functions(store)

    async def ask(node: Node) -> str | BaseException:
        try:
            return await fn.call_on(node, functions.version(), load=lambda: ensure_library_on(store, node))
        except Exception as exc:
            return exc

    nodes = store.primaries()
    tasks = [asyncio.ensure_future(ask(node)) for node in nodes]
    await asyncio.wait(tasks, timeout=timeout)
    out: list[tuple[str, str | BaseException]] = []
    for node, task in zip(nodes, tasks, strict=True):
        if not task.done():
            task.cancel()  # not awaited: a hung socket may hold the cancel until it times out
        answer = task.result() if task.done() else TimeoutError(f"no answer within {timeout:g} s")
        out.append((node.name if node is not None else "server", answer))
    return out


async def library_status(store: Store) -> list[tuple[str, bool]]:
    """(node, has this exact library) for every primary: what ``presence functions show --redis`` prints."""
    return [
        (node.name if node is not None else "server", await _has_library(store, node)) for node in store.primaries()
    ]


async def _has_library(store: Store, node: Node) -> bool:
    source = library_source()
    listed = await store.on_node(node, "FUNCTION", "LIST", "LIBRARYNAME", LIBRARY_NAME, "WITHCODE")
    for lib in listed or []:
        info = lib if isinstance(lib, dict) else dict(zip(lib[::2], lib[1::2], strict=False))
        info = {_text(k): v for k, v in info.items()}
        if _text(info.get("library_name")) == LIBRARY_NAME and _text(info.get("library_code")) == source:
            return True
    return False


def _text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value
