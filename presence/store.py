"""Open the Redis the service runs on, and send each command straight to the node that owns its keys.

Modes (logged at start with the topology seen):

- ``embedded``: no URL; fakeredis in this process (state dies with it, fine for a demo);
- ``standalone``: ``redis://host:port/db`` or ``rediss://...`` of a server that is not a cluster node;
- ``cluster``: the same URL of *any* node of a Redis Cluster (``INFO cluster`` says ``cluster_enabled:1``);
  redis-py's asyncio ``RedisCluster``, commands routed by the client (CRC16 slot of the first key);
- ``sentinel``: ``redis+sentinel://[user:pass@]host:port[,host:port...]/<master-name>[/db]``; redis-py's
  asyncio ``Sentinel``. ``user:pass`` in the URL (or ``PRESENCE_REDIS_USERNAME`` / ``PRESENCE_REDIS_PASSWORD``)
  authenticate to the data nodes; ``?sentinel_password=...`` (or ``PRESENCE_SENTINEL_PASSWORD``, with
  ``PRESENCE_SENTINEL_USERNAME``) to the sentinels.

``Store.run`` sends a batch of commands, each routed by its key: one pipeline per node, the nodes in
parallel (one pipeline in all on standalone and Sentinel). On a cluster each node's pipeline goes on that
node's own client (from the slot map the cluster client keeps), so no path, retries included, ever asks a
server which keys a command names (``COMMAND GETKEYS``). Commands that fail because a node is away
(connection lost or reset, a hung socket, failover, ``MOVED``, ``CLUSTERDOWN``, ``READONLY``, ``LOADING``)
are retried with backoff, the slot map re-read, for at most ``retry_for`` seconds in all: a hard bound,
a hung attempt included. A node that answers "Function not found" gets the library loaded once and the
call retried.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot

from presence.errors import ParamError
from presence.wire import HiredisPackingConnection

log = logging.getLogger("presence.store")

MAX_CONNECTIONS = 64
RETRY_FOR_S = 30.0
Mode = Literal["embedded", "standalone", "sentinel", "cluster"]
Client = Redis | RedisCluster
# (routing key or None for any node, command and arguments)
Command = tuple[str | None, Sequence[Any]]
T = TypeVar("T")

# A node is away or moving: the same command will work once the failover is over.
RETRYABLE = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MovedError,
    rex.AskError,
    rex.BusyLoadingError,
    rex.ReadOnlyError,
    rex.MasterDownError,
    rex.SlotNotCoveredError,
    rex.ClusterError,
    rex.RedisClusterException,  # e.g. no startup node reachable while the cluster is re-read
    OSError,  # a reset or refused socket that redis-py did not wrap
    asyncio.TimeoutError,  # an attempt cut short by the retry window
)
HUNG_AFTER_S = 0.5  # a cluster node silent this long has its slot map re-read while the attempt waits
MAX_BACKOFF_S = 0.5  # a failover is over within a retry or two of its end
WARN_INTERVAL_S = 5.0  # at most one "retrying" warning per interval (a failover repeats it for every call)


class RedisUnavailable(rex.RedisError):
    """Redis stayed unreachable (or mid-failover) for the whole retry window."""


async def _captured(work: Awaitable[T]) -> tuple[bool, Any]:
    """(True, result) or (False, the exception): an attempt given up never leaves an unretrieved error."""
    try:
        return True, await work
    except BaseException as exc:  # a cancel included: whoever awaits the outcome re-raises it
        return False, exc


def _outcome(task: asyncio.Future[tuple[bool, Any]]) -> Any:
    ok, value = task.result()
    if not ok:
        raise value
    return value


class _Warnings:
    """The "retrying" warning, at most once per ``WARN_INTERVAL_S`` with the count of those held back."""

    def __init__(self) -> None:
        self.at = -WARN_INTERVAL_S
        self.held = 0

    def retrying(self, exc: BaseException, count: int, delay: float) -> None:
        now = time.monotonic()
        if now - self.at < WARN_INTERVAL_S:
            self.held += 1
            return
        log.warning(
            "redis call failed (%r); retrying %d commands in %.2f s (%d more such failures since the last report)",
            exc,
            count,
            delay,
            self.held,
        )
        self.at, self.held = now, 0


def is_function_missing(exc: BaseException) -> bool:
    return isinstance(exc, rex.ResponseError) and "Function not found" in str(exc)


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RETRYABLE) or (isinstance(exc, rex.ResponseError) and str(exc).startswith("NOREPLICAS"))


class Store:
    """A Redis client of one mode and the routing that goes with it."""

    def __init__(
        self,
        client: Client,
        mode: Mode,
        topology: str = "",
        retry_for: float = RETRY_FOR_S,
        max_in_flight: int | None = None,
    ) -> None:
        self.client = client
        self.mode = mode
        self.topology = topology
        self.retry_for = retry_for
        # Cluster and Sentinel pools fail when full ("Too many connections"); a burst waits here instead.
        self._gate = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self.sentinels: list[Redis] = []  # Sentinel mode: the clients of the sentinels, closed with the store
        # Called with a node's target (None off a cluster) when it says "Function not found".
        self.on_function_missing: Callable[[Any], Awaitable[object]] | None = None
        self._node_clients: dict[str, Redis] = {}  # cluster: node name -> a client of that node alone
        self._warnings = _Warnings()
        self._abandoned: set[asyncio.Future[Any]] = set()
        self._suspect: str | None = None  # cluster: the node that failed or hung last

    @classmethod
    def wrap(cls, client: Client, retry_for: float = RETRY_FOR_S) -> Store:
        """A Store around a client built elsewhere (tests, other services)."""
        if isinstance(client, RedisCluster):
            return cls(client, "cluster", retry_for=retry_for)
        mode: Mode = "embedded" if type(client).__module__.startswith("fakeredis") else "standalone"
        return cls(client, mode, retry_for=retry_for)

    @property
    def cluster(self) -> bool:
        return self.mode == "cluster"

    @staticmethod
    def slot(key: str) -> int:
        return key_slot(key.encode())

    def group(self, keys: Sequence[str]) -> list[list[int]]:
        """Indexes of ``keys`` grouped so each group may go in one call: by slot on a cluster, else one group."""
        if not keys:
            return []
        if not self.cluster:
            return [list(range(len(keys)))]
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key_slot(key.encode()), []).append(i)
        return list(groups.values())

    def primaries(self) -> list[Any]:
        """Cluster primaries (``ClusterNode``), or ``[None]`` (the one server) elsewhere."""
        if isinstance(self.client, RedisCluster):
            return list(self.client.get_primaries())
        return [None]

    async def on_node(self, node: Any, *args: Any) -> Any:
        """One command on one node (a ``ClusterNode`` from ``primaries()``, or None off a cluster)."""
        if node is None:
            return await self.client.execute_command(*args)
        # redis-py leaves Redis.execute_command unannotated (its cluster client's is typed).
        return await self.node_client(node).execute_command(*args)  # type: ignore[no-untyped-call]

    def any_primary(self, avoid: str | None = None) -> ClusterNode | None:
        """A cluster primary other than ``avoid`` (None off a cluster, or when there is no other)."""
        if not isinstance(self.client, RedisCluster):
            return None
        others = [n for n in self.client.get_primaries() if n.name != avoid]
        return random.choice(others) if others else None

    def node_client(self, node: ClusterNode) -> Redis:
        """A client of one cluster node (its own pool, the cluster's connection settings)."""
        client = self._node_clients.get(node.name)
        if client is None:
            pool = BlockingConnectionPool(
                connection_class=node.connection_class,
                max_connections=node.max_connections,
                timeout=None,  # bounded by Store.run's retry window
                **node.connection_kwargs,
            )
            client = self._node_clients[node.name] = Redis(connection_pool=pool)
        return client

    async def _attempt(self, deadline: float, send: Callable[[], Awaitable[T]]) -> T:
        """One attempt, cut off at the deadline (a hung node must not stretch the retry window)."""

        async def gated() -> T:
            if self._gate is None:
                return await send()
            async with self._gate:
                return await send()

        task = asyncio.ensure_future(_captured(gated()))
        try:
            done, _ = await asyncio.wait({task}, timeout=max(deadline - time.monotonic(), 0.01))
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if not done:
            self._abandon(task)
            raise TimeoutError("the retry window ended during an attempt")
        result: T = _outcome(task)  # the outcome of send(): a T (typed here, no check on the hot path)
        return result

    def _abandon(self, task: asyncio.Future[Any]) -> None:
        """Cancel an attempt without waiting for it: redis-py may hold a cancel until the socket times out."""
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.discard(task)

    async def one(self, key: str | None, *args: Any) -> Any:
        (reply,) = await self.run([(key, args)], raise_errors=True)
        return reply

    async def run(self, commands: Sequence[Command], *, raise_errors: bool = False) -> list[Any]:
        """Replies in order; a command's error is its reply (or raised with ``raise_errors``).

        Raises RedisUnavailable when the nodes stay away for the whole retry window.
        """
        if not commands:
            return []
        results: list[Any] = [None] * len(commands)
        pending = list(range(len(commands)))
        reloaded: set[str | None] = set()  # nodes given the library in this call: once per node, not per command
        again: set[int] = set()  # commands retried after their node's reload (once each)
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        last: BaseException | None = None
        while True:
            batch = [commands[i] for i in pending]
            try:
                replies = await self._attempt(deadline, functools.partial(self._send, batch))
            except RETRYABLE as exc:
                replies = [exc] * len(pending)
            retry: list[int] = []
            failed = False
            for i, reply in zip(pending, replies, strict=True):
                results[i] = reply
                if not isinstance(reply, BaseException):
                    continue
                if is_function_missing(reply) and i not in again and self.on_function_missing is not None:
                    node = self._node_name(commands[i][0])
                    if node not in reloaded:
                        reloaded.add(node)
                        await self._reload(commands[i][0])
                    again.add(i)
                    retry.append(i)
                elif is_retryable(reply):
                    last = reply
                    failed = True
                    retry.append(i)
            if not retry:
                break
            if time.monotonic() + delay > deadline:
                raise RedisUnavailable(f"redis unavailable for {self.retry_for:.0f} s: {last!r}") from last
            if failed:
                assert last is not None
                self._warnings.retrying(last, len(retry), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                await self.refresh(deadline)
            pending = retry
        if raise_errors:
            for reply in results:
                if isinstance(reply, BaseException):
                    raise reply
        return results

    async def retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` under the same policy as ``run`` (for commands sent another way: MULTI, raw XREAD)."""
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        reloaded = False
        while True:
            try:
                return await self._attempt(deadline, attempt)
            except Exception as exc:
                if is_function_missing(exc) and not reloaded and self.on_function_missing is not None:
                    reloaded = True
                    await self._reload(None)
                    continue
                if not is_retryable(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise RedisUnavailable(f"redis unavailable for {self.retry_for:.0f} s: {exc!r}") from exc
                self._warnings.retrying(exc, 1, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                await self.refresh(deadline)

    async def _reload(self, key: str | None) -> None:
        assert self.on_function_missing is not None
        node = None
        if isinstance(self.client, RedisCluster) and key is not None:
            node = self.client.get_node_from_key(key)
        log.warning("a Redis node had no presence library (restarted empty or promoted): loading it")
        await self.on_function_missing(node)

    def _node_name(self, key: str | None) -> str | None:
        if isinstance(self.client, RedisCluster) and key is not None:
            # redis-py types the node Optional for replica=True; a primary is always returned (or it raises).
            return self.client.get_node_from_key(key).name  # type: ignore[union-attr]
        return None

    async def refresh(self, deadline: float | None = None, avoid: str | None = None) -> None:
        """After a failover: learn the new slot owners before retrying (a cluster only); the node ``avoid``
        (one that failed or hangs) is asked last."""
        if isinstance(self.client, RedisCluster):
            try:
                # Short: it runs under redis-py's lock, which every other refresh waits for.
                cap = 2 * HUNG_AFTER_S
                timeout = cap if deadline is None else max(min(deadline - time.monotonic(), cap), 0.01)
                async with asyncio.timeout(timeout):
                    # The node that failed or hung last is asked last (the others are asked in random order).
                    await self.client.nodes_manager.initialize(last_failed_node_name=avoid or self._suspect)
            except Exception as exc:  # the next attempt tries again
                log.debug("cluster topology refresh failed: %r", exc)

    async def _send(self, commands: Sequence[Command]) -> list[Any]:
        client = self.client
        if isinstance(client, RedisCluster):
            return await self._send_cluster(client, commands)
        if len(commands) == 1:
            _, args = commands[0]
            try:
                return [await client.execute_command(*args)]  # type: ignore[no-untyped-call]  # as in on_node
            except rex.ResponseError as exc:
                return [exc]
        async with client.pipeline(transaction=False) as pipe:
            for _, args in commands:
                pipe.execute_command(*args)
            return await pipe.execute(raise_on_error=False)

    async def _send_cluster(self, cluster: RedisCluster, commands: Sequence[Command]) -> list[Any]:
        """One pipeline per primary on that node's own client, the primaries in parallel.

        The node of each key comes from the client's slot map (no server round trip); an error of one
        node (a dead or hung primary) is the reply of its commands only, the other nodes' replies stand.
        """
        await cluster.initialize()
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, (key, _) in enumerate(commands):
            # Optional in redis-py's annotation for replica=True only (see _node_name).
            node: ClusterNode = (
                cluster.get_node_from_key(key) if key is not None else cluster.get_default_node()  # type: ignore[assignment]
            )
            by_node.setdefault(node.name, (node, []))[1].append(i)
        results: list[Any] = [None] * len(commands)

        async def pipeline(client: Redis, idx: list[int]) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for i in idx:
                    pipe.execute_command(*commands[i][1])
                return await pipe.execute(raise_on_error=False)

        async def on(node: ClusterNode, idx: list[int]) -> None:
            client = self.node_client(node)
            try:
                task = asyncio.ensure_future(_captured(pipeline(client, idx)))
                try:
                    while not (await asyncio.wait({task}, timeout=HUNG_AFTER_S))[0]:
                        # A node that does not answer may be frozen and failed over already: re-read the
                        # slot map (asking it last); if its slots moved, give up the attempt (the retry
                        # goes to the new owner; a repeated change call is a replay: nothing twice).
                        self._suspect = node.name
                        await self.refresh(time.monotonic() + HUNG_AFTER_S, avoid=node.name)
                        if any(self._node_name(commands[i][0]) != node.name for i in idx if commands[i][0]):
                            raise rex.ConnectionError(f"node {node.name} hangs and its slots moved")
                        if any(commands[i][0] is None for i in idx) and self._move_default(cluster, node):
                            raise rex.ConnectionError(f"node {node.name} hangs; keyless commands go elsewhere")
                finally:
                    if not task.done():
                        self._abandon(task)
                replies = _outcome(task)
            except rex.RedisError as exc:
                replies = [exc] * len(idx)
            except (OSError, RuntimeError, AttributeError) as exc:
                # A connection torn down mid-write (redis-py raises these from a closed transport).
                await client.connection_pool.disconnect(inuse_connections=False)
                replies = [rex.ConnectionError(f"node {node.name}: {exc!r}")] * len(idx)
            if any(isinstance(r, RETRYABLE) for r in replies):
                self._suspect = node.name
                if any(commands[i][0] is None for i in idx):
                    self._move_default(cluster, node)
            for i, reply in zip(idx, replies, strict=True):
                results[i] = reply

        await asyncio.gather(*(on(node, idx) for node, idx in by_node.values()))
        return results

    def _move_default(self, cluster: RedisCluster, node: ClusterNode) -> bool:
        """Keyless commands (PUBLISH, TIME) leave a node that failed or hangs: True if another took over."""
        other = self.any_primary(avoid=node.name)
        if other is None or cluster.get_default_node().name != node.name:
            return False
        cluster.set_default_node(other)
        return True

    async def aclose(self) -> None:
        for node in self._node_clients.values():
            await node.aclose()
        self._node_clients.clear()
        for sentinel in self.sentinels:
            await sentinel.aclose()


@dataclass(frozen=True, slots=True)
class SentinelURL:
    sentinels: list[tuple[str, int]]
    master: str
    db: int
    username: str | None
    password: str | None
    sentinel_username: str | None
    sentinel_password: str | None
    ssl: bool


def parse_sentinel_url(url: str, env: Mapping[str, str] | None = None) -> SentinelURL:
    """``redis+sentinel://[user:pass@]h:p[,h:p...]/<master-name>[/db][?sentinel_password=...]``."""
    env = os.environ if env is None else env
    parts = urlsplit(url)
    creds, _, hosts = parts.netloc.rpartition("@")
    user, _, password = creds.partition(":")
    sentinels = []
    for item in filter(None, hosts.split(",")):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "26379")
        if not host or not port.isdigit():
            raise ParamError(f"redis URL: sentinel address {item!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not sentinels or not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ParamError("redis URL: expected redis+sentinel://[user:pass@]host:port[,host:port...]/<master-name>[/db]")
    query = parse_qs(parts.query)
    return SentinelURL(
        sentinels=sentinels,
        master=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(user) if user else env.get("PRESENCE_REDIS_USERNAME") or None,
        password=unquote(password) if password else env.get("PRESENCE_REDIS_PASSWORD") or None,
        # parse_qs drops blank values: a name in the query has a non-empty first value.
        sentinel_username=query.get("sentinel_username", [""])[0] or env.get("PRESENCE_SENTINEL_USERNAME") or None,
        sentinel_password=query.get("sentinel_password", [""])[0] or env.get("PRESENCE_SENTINEL_PASSWORD") or None,
        ssl=parts.scheme == "rediss+sentinel",
    )


SOCKET_TIMEOUT_S = 5.0


def open_redis(
    url: str | None, max_connections: int = MAX_CONNECTIONS, socket_timeout: float = SOCKET_TIMEOUT_S
) -> tuple[Redis, bool]:
    """(client, embedded) for a standalone URL or the embedded store; ``open_store`` for every mode.

    The pool blocks when all connections are busy instead of failing: a burst of 10,000 logins or
    logouts waits its turn rather than losing sessions to "Too many connections".
    """
    if url:
        options: dict[str, Any] = {}
        if url.startswith("redis://"):  # TLS and Unix sockets keep redis-py's own classes
            options["connection_class"] = HiredisPackingConnection
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=30,
            health_check_interval=10,
            socket_timeout=socket_timeout,
            # Store.run and Store.retrying retry (bounded by retry_for, resolving unknown outcomes with the
            # library's operation ids); redis-py's own retries would stretch a stall far past retry_for.
            retry=Retry(NoBackoff(), 0),
            **options,
        )
        return Redis(connection_pool=pool), False
    import fakeredis

    log.warning("no Redis URL given: using the embedded in-process store (fakeredis); state is not persisted")
    server = fakeredis.FakeServer()
    return fakeredis.FakeAsyncRedis(server=server, decode_responses=False), True


async def open_store(
    url: str | None,
    max_connections: int = MAX_CONNECTIONS,
    retry_for: float = RETRY_FOR_S,
    socket_timeout: float = SOCKET_TIMEOUT_S,
) -> Store:
    """Pick the mode from the URL (and, for redis://, from the server's ``INFO cluster``); log it.

    ``socket_timeout``: seconds a reply may take before the call fails and is retried (a stalled Redis).
    """
    if url and url.split("://", 1)[0] in ("redis+sentinel", "rediss+sentinel"):
        store = await _open_sentinel(parse_sentinel_url(url), max_connections, retry_for, socket_timeout)
    elif not url:
        client, _ = open_redis(None)
        store = Store(client, "embedded", "one in-process server", retry_for)
    else:
        client, _ = open_redis(url, max_connections, socket_timeout)
        try:
            info = await client.info("cluster")
        except Exception:
            await client.aclose()
            raise
        if int(info.get("cluster_enabled", 0)) != 1:
            store = Store(client, "standalone", f"one server at {_where(url)}", retry_for)
        else:
            await client.aclose()
            # Headroom over max_in_flight for what bypasses the Store (the gateway's pub/sub, health checks).
            cluster = RedisCluster.from_url(
                url, max_connections=max_connections + 16, socket_timeout=socket_timeout, retry=Retry(NoBackoff(), 0)
            )
            await cluster.initialize()
            primaries = sorted(n.name for n in cluster.get_primaries())
            replicas = len(cluster.get_replicas())
            topology = f"{len(primaries)} primaries ({', '.join(primaries)}), {replicas} replicas"
            store = Store(cluster, "cluster", topology, retry_for, max_in_flight=max_connections)
    log.info("redis store: %s, %s", store.mode, store.topology)
    return store


async def _open_sentinel(
    conf: SentinelURL, max_connections: int, retry_for: float, socket_timeout: float = SOCKET_TIMEOUT_S
) -> Store:
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": 2.0}
    if conf.sentinel_password:
        sentinel_kwargs["password"] = conf.sentinel_password
    if conf.sentinel_username:
        sentinel_kwargs["username"] = conf.sentinel_username
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves Sentinel.__init__ unannotated
        conf.sentinels, sentinel_kwargs=sentinel_kwargs, socket_timeout=socket_timeout
    )
    client = sentinel.master_for(
        conf.master,
        db=conf.db,
        username=conf.username,
        password=conf.password,
        ssl=conf.ssl,
        max_connections=max_connections + 16,
        health_check_interval=10,
    )
    host, port = await sentinel.discover_master(conf.master)
    replicas = await sentinel.discover_slaves(conf.master)
    topology = (
        f"master {conf.master!r} at {host}:{port}, {len(replicas)} replicas, {len(conf.sentinels)} sentinels given"
    )
    store = Store(client, "sentinel", topology, retry_for, max_in_flight=max_connections)
    store.sentinels = list(sentinel.sentinels)
    return store


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}{parts.path or ''}"
