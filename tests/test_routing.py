"""Client round trips, counted on the wire (every request a connection sends), on one server and a cluster.

A status change is the user's own function, then the fan-out: one pipeline per primary, the primaries in
parallel (on a cluster also one PUBLISH pipeline for the doorbells, one per gateway, and the trim of the
user's feed outbox, which lives in another slot than the feed shard). A query of 500
users is one pipeline per primary. None of it grows with the number of friends, and no request asks the
server for a command's keys (COMMAND GETKEYS): the client knows every key's slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio.connection import AbstractConnection

from presence.config import Settings
from presence.errors import ParamError
from presence.service import Presence
from presence.store import Store, parse_sentinel_url
from tests.clients import APP

IOS = 2


HANDSHAKE = (b"HELLO", b"CLIENT", b"AUTH", b"SELECT")  # a new connection's setup, not a request of ours


def _first_command(data: bytes) -> bytes:
    """The first command name of a RESP request: ``*N\r\n$len\r\nNAME\r\n...``."""
    parts = data.split(b"\r\n", 3)
    return parts[2].upper() if len(parts) > 2 else b""


class Wire:
    """Every request sent by any redis-py asyncio connection: (port, the bytes sent)."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, bytes]] = []

    def reset(self) -> None:
        self.requests.clear()

    def with_(self, word: bytes) -> list[tuple[int, bytes]]:
        return [r for r in self.requests if word in r[1]]


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Iterator[Wire]:
    counter = Wire()
    send = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        data = command if isinstance(command, bytes | str) else b"".join(bytes(c) for c in command)
        data = data if isinstance(data, bytes) else data.encode()
        if _first_command(data) not in HANDSHAKE:
            counter.requests.append((int(getattr(self, "port", 0)), data))
        await send(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    yield counter


async def _bells(pubsub: Any, expected: int) -> int:
    """Doorbell messages received: ``expected`` of them, then none more for a moment."""
    got = 0
    for _ in range(expected):
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        got += msg is not None
    extra = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3)
    return got + (extra is not None)


@pytest.mark.parametrize("friends", [10, 1000])
async def test_round_trips_per_status_change_and_query_do_not_grow(store_redis: Any, wire: Wire, friends: int) -> None:
    presence = Presence(store_redis, Settings())
    names = [f"f{i}" for i in range(friends)]
    await presence.import_friends(APP, "alice", names)
    online = names[:6]
    for i, name in enumerate(online):
        await presence.login(APP, name, IOS, "d", node_id=f"n{i % 2}")
    pubsub = presence.redis.pubsub()
    await pubsub.subscribe(presence.keys.doorbell("n0"), presence.keys.doorbell("n1"))
    for _ in range(2):
        await pubsub.get_message(timeout=2)  # subscribe confirmations
    await presence.set_custom_status(APP, "alice", 0, "warm up")  # every primary's connection exists now
    assert await _bells(pubsub, 2) == 2
    primaries = len(presence.store.primaries())

    wire.reset()
    result = await presence.set_custom_status(APP, "alice", 1, "counted")
    assert result.recipients == friends and result.delivered == len(online)
    function_requests = wire.with_(b"FCALL")
    if presence.store.cluster:
        assert primaries == 3
        # the own call, at most one pipeline per primary (fan-out and feed relay), then one request: the
        # doorbells (one per gateway, published after the fan-out) with the feed outbox trim
        assert len(function_requests) <= 2 + primaries
        assert len(wire.with_(b"presence_outbox_trim")) == 1
        assert len(wire.with_(b"PUBLISH")) == 1
        assert wire.with_(b"PUBLISH") == wire.with_(b"presence_outbox_trim")  # the same request
        assert len(wire.requests) <= 2 + primaries
    else:
        # own call, then one pipeline: the fan-out calls (one per chunk of recipients) and the feed relay
        # (which trims the outbox in the same call); past one chunk the doorbells follow in one request.
        chunked = friends > presence.limits.fanout_chunk
        assert len(function_requests) == 2
        assert len(wire.requests) == 2 + chunked
        assert len(wire.with_(b"PUBLISH")) == chunked
        assert len(wire.with_(b"presence_feed_append")) == 1
    assert not wire.with_(b"GETKEYS")
    assert await _bells(pubsub, 2) == 2, "one doorbell per gateway node per change"
    await pubsub.aclose()

    users = [f"q{i}" for i in range(500)]
    await presence.query_users(APP, users)  # warm up: connections in the pool again after the pubsub closed
    wire.reset()
    assert len(await presence.query_users(APP, users)) == 500
    assert len(wire.requests) <= primaries  # one pipeline per primary, in parallel (1 on one server)
    assert not wire.with_(b"GETKEYS")


async def test_cluster_primaries_never_see_command_getkeys(cluster: Any, cluster_redis: Any) -> None:
    for node in cluster.alive():
        with node.client() as c:
            c.config_resetstat()  # earlier tests call redis-py's own fcall, which does ask for the keys
    presence = Presence(cluster_redis)
    await presence.import_friends(APP, "alice", [f"f{i}" for i in range(200)])
    await presence.subscribe(APP, "alice", [f"s{i}" for i in range(50)], 60_000)
    await presence.login(APP, "alice", IOS, "d", node_id="n1")
    await presence.query_friends(APP, "alice")
    for node in cluster.alive():
        with node.client() as c:
            assert not [k for k in c.info("commandstats") if "getkeys" in k]


async def test_a_primary_without_the_library_gets_it_and_the_call_succeeds(store_redis: Any) -> None:
    """A primary that restarted empty, a promoted replica that missed the load: "Function not found"."""
    presence = Presence(store_redis)
    key = presence.user(APP, "alice").sessions
    node = store_redis.get_node_from_key(key) if presence.store.cluster else None
    await presence.store.on_node(node, "FUNCTION", "FLUSH")
    result = await presence.login(APP, "alice", IOS, "d", node_id="n1")
    assert result.changed
    assert (await presence.query_users(APP, ["alice"]))["alice"].status == 1


async def test_a_failed_login_leaves_no_node_record(store_redis: Any) -> None:
    presence = Presence(store_redis)
    # A library error (the node record goes first on a cluster, so it must be taken back): loginModel 9 is
    # refused by the library itself (Python does not check it).
    with pytest.raises(ParamError, match="loginModel"):
        await presence.login(APP, "alice", IOS, "d", conn_id="conn1", node_id="n1", login_model=9)
    assert await presence.nodes.session_count("n1") == 0
    assert (await presence.query_users(APP, ["alice"]))["alice"].status == 2


async def test_friends_and_subscriptions_converge_when_repeated(store_redis: Any) -> None:
    """Each per-slot step is idempotent: repeating an operation (a retry after a failure) changes nothing."""
    presence = Presence(store_redis)
    friends = [f"f{i}" for i in range(40)]
    assert await presence.import_friends(APP, "alice", friends) == 40
    assert await presence.import_friends(APP, "alice", friends) == 0
    for f in friends:
        assert await presence.redis.smembers(presence.user(APP, f).friends) == {b"alice"}
    first = await presence.subscribe(APP, "carol", friends[:10], 60_000)
    again = await presence.subscribe(APP, "carol", friends[:10], 60_000)
    assert again.liveSubscriptions == first.liveSubscriptions == 10
    for f in friends[:10]:
        score = await presence.redis.zscore(presence.user(APP, f).subscribers, "carol")
        assert score is not None and int(score) == again.expireAt
    assert await presence.unsubscribe(APP, "carol", friends[:10]) == 10
    assert await presence.unsubscribe(APP, "carol", friends[:10]) == 0
    assert all([await presence.redis.zcard(presence.user(APP, f).subscribers) == 0 for f in friends[:10]])


def test_sentinel_urls_name_sentinels_master_db_and_passwords() -> None:
    conf = parse_sentinel_url(
        "redis+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26380/mymaster/2?sentinel_password=sp", env={}
    )
    assert conf.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    assert (conf.master, conf.db, conf.username, conf.password, conf.sentinel_password) == (
        "mymaster",
        2,
        "app",
        "s3cret",
        "sp",
    )
    env = {"PRESENCE_REDIS_PASSWORD": "data", "PRESENCE_SENTINEL_PASSWORD": "watch"}
    conf = parse_sentinel_url("redis+sentinel://h:1/m", env=env)
    assert (conf.db, conf.password, conf.sentinel_password) == (0, "data", "watch")
    for bad in ("redis+sentinel://h:1", "redis+sentinel:///m", "redis+sentinel://h:x/m", "redis+sentinel://h:1/m/x"):
        with pytest.raises(ParamError, match="redis URL"):
            parse_sentinel_url(bad, env={})


async def test_store_mode_is_picked_from_the_server(store_url: str, redis_url: str) -> None:
    from presence.store import open_store

    store: Store = await open_store(store_url)
    try:
        assert store.mode == ("standalone" if store_url == redis_url else "cluster")
        assert len(store.primaries()) == (1 if store_url == redis_url else 3)
    finally:
        await store.aclose()
    await asyncio.sleep(0)
