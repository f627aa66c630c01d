"""The gateway nodes' records (NodeRegistry), on a real redis-server, fakeredis and a Redis Cluster."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from presence.nodes import BeatRecord, NodeIdInUseError, NodeKeeper, NodeMember, node_member, parse_node_member
from presence.service import Presence

APP = 10000
IOS, WINDOWS = 2, 4


def test_a_node_member_parses_back_into_its_fields() -> None:
    member = node_member(APP, "alice", IOS, "phone:1", "c1")
    assert member == "10000|alice|2|phone:1|c1"
    assert parse_node_member(member) == NodeMember(APP, "alice", IOS, "phone:1", "c1")


async def test_sessions_held_tells_held_taken_over_and_lost(presence: Presence) -> None:
    await presence.login(APP, "alice", IOS, "phone", conn_id="c-phone", node_id="n1")
    await presence.login(APP, "alice", WINDOWS, "pc", conn_id="c-old", node_id="n1")
    await presence.login(APP, "alice", WINDOWS, "pc", conn_id="c-new", node_id="n2")  # the same device elsewhere
    held = await presence.nodes.sessions_held(
        [
            (APP, "alice", IOS, "phone", "c-phone"),  # this connection's session
            (APP, "alice", WINDOWS, "pc", "c-old"),  # the device's session is another connection's now
            (APP, "bob", IOS, "phone", "c-bob"),  # no session at all (as after an empty restart)
        ]
    )
    assert held == [True, None, False]


async def test_a_node_records_its_sessions_and_leaves(presence: Presence) -> None:
    assert await presence.nodes.last_beat("n1") is None
    assert await presence.nodes.heartbeat("n1") is False  # the first beat registers it
    beat = await presence.nodes.last_beat("n1")
    assert beat is not None and abs(beat - await presence.nodes.redis_time_ms()) < 5_000
    await presence.login(APP, "alice", IOS, "phone", conn_id="c1", node_id="n1")
    await presence.login(APP, "bob", IOS, "phone", conn_id="c2", node_id="n1")
    assert await presence.nodes.session_members("n1") == {"10000|alice|2|phone|c1", "10000|bob|2|phone|c2"}
    await presence.logout(APP, "bob", IOS, "phone", conn_id="c2", node_id="n1")
    assert await presence.nodes.session_count("n1") == 1
    await presence.nodes.leave("n1")
    assert await presence.nodes.last_beat("n1") is None
    assert await presence.nodes.heartbeat("n1") is False, "registered again, as after a reap"


async def test_a_beat_records_its_incarnation_and_replies_the_beat_it_replaced(presence: Presence) -> None:
    first = await presence.nodes.beat("n1", "inc-a")
    assert (first.was_registered, first.previous_ms, first.previous_incarnation) == (False, 0, "")
    assert (await presence.nodes.last_record("n1"))[0] == BeatRecord(first.now_ms, "inc-a")
    second = await presence.nodes.beat("n1", "inc-b")  # another process beats the same id
    assert second.was_registered and (second.previous_ms, second.previous_incarnation) == (first.now_ms, "inc-a")
    assert (await presence.nodes.last_record("n1"))[0] == BeatRecord(second.now_ms, "inc-b")
    await presence.nodes.leave("n1")
    assert (await presence.nodes.last_record("n1"))[0] is None
    assert await presence.fn.command(presence.keys.node_incarnations, "HLEN", presence.keys.node_incarnations) == 0
    again = await presence.nodes.beat("n1", "inc-c")  # registered anew: no previous beat, no incarnation
    assert (again.was_registered, again.previous_incarnation) == (False, "")


async def test_a_claim_naming_another_beat_than_the_last_writes_nothing(presence: Presence) -> None:
    live = await presence.nodes.beat("n1", "inc-live")
    late = await presence.nodes.beat("n1", "inc-late", claim=live.now_ms - 1)  # it looked before the last beat
    assert not late.written and (late.previous_ms, late.previous_incarnation) == (live.now_ms, "inc-live")
    assert (await presence.nodes.last_record("n1"))[0] == BeatRecord(live.now_ms, "inc-live")
    fresh = await presence.nodes.beat("n2", "inc-new", claim=live.now_ms)  # n2 is not registered
    assert not fresh.written and (await presence.nodes.last_record("n2"))[0] is None
    taken = await presence.nodes.beat("n1", "inc-next", claim=live.now_ms)
    assert taken.written and (await presence.nodes.last_record("n1"))[0] == BeatRecord(taken.now_ms, "inc-next")


def _keeper(presence: Presence, node_id: str = "twin") -> NodeKeeper:
    """A keeper beating every 0.1 s: a beat unchanged for 0.3 s is a dead process's."""
    return NodeKeeper(presence, node_id, node_ttl=5.0, interval=0.1)


async def test_claim_refuses_a_node_id_another_live_process_beats(presence: Presence) -> None:
    live = _keeper(presence)
    await live.claim()
    beating = asyncio.create_task(live.run())
    try:
        namesake = _keeper(presence)
        with pytest.raises(
            NodeIdInUseError, match=rf"node id 'twin' is in use: another process \(incarnation {live.incarnation}\)"
        ):
            await namesake.claim()
        record, _ = await presence.nodes.last_record("twin")
        assert record is not None and record.incarnation == live.incarnation, "the refused one never beat"
    finally:
        live.stopped = True
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)


async def test_claim_after_a_dead_incarnation_waits_out_its_last_beat_then_takes_over(presence: Presence) -> None:
    dead = _keeper(presence)
    await dead.claim()  # one beat, then silence: killed
    last, _ = await presence.nodes.last_record("twin")
    assert last is not None
    restarted = _keeper(presence)
    started = time.monotonic()
    predecessor = await restarted.claim()
    waited = time.monotonic() - started
    assert predecessor.last_beat_ms == last.at_ms and predecessor.age_s < restarted.claim_window
    assert restarted.claim_window - predecessor.age_s - 0.05 <= waited < restarted.claim_window + 2
    record, _ = await presence.nodes.last_record("twin")
    assert record is not None and record.incarnation == restarted.incarnation
    assert await restarted.claim() == predecessor, "a second claim returns the first's answer"


async def test_an_old_beat_is_taken_over_at_once(presence: Presence) -> None:
    await presence.nodes.beat("twin", "long-gone")
    await presence.redis.zadd(presence.keys.nodes, {"twin": 1})  # beat long ago
    keeper = _keeper(presence)
    started = time.monotonic()
    predecessor = await keeper.claim()
    assert predecessor.last_beat_ms == 1 and time.monotonic() - started < keeper.claim_window


async def test_of_two_processes_starting_at_once_under_one_node_id_one_runs(presence: Presence) -> None:
    keepers = [_keeper(presence), _keeper(presence)]
    runs: list[asyncio.Task[None]] = []

    async def start(keeper: NodeKeeper) -> None:
        await keeper.claim()
        runs.append(asyncio.create_task(keeper.run()))

    try:
        outcomes = await asyncio.gather(*(start(k) for k in keepers), return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, NodeIdInUseError)]
        assert len(refused) == 1 and outcomes.count(None) == 1, outcomes
        winner = keepers[outcomes.index(None)]
        record, _ = await presence.nodes.last_record("twin")
        assert record is not None and record.incarnation == winner.incarnation
    finally:
        for keeper in keepers:
            keeper.stopped = True
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)


async def test_a_running_node_logs_another_incarnation_beating_its_id(
    presence: Presence, caplog: pytest.LogCaptureFixture
) -> None:
    """A namesake that got past the claim (the first was frozen longer than the claim window): both keep
    serving, and each says so at its next beat."""
    first, second = _keeper(presence), _keeper(presence)
    await first.claim()
    with caplog.at_level(logging.ERROR, logger="presence.nodes"):
        await second.beat()
        await first.beat()
        await second.beat()  # each logs it at most every 30 s
        await first.beat()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    assert f"another process (incarnation {first.incarnation}; this one is {second.incarnation})" in errors[0]
    assert f"another process (incarnation {second.incarnation}; this one is {first.incarnation})" in errors[1]
    assert "two processes run with one node id" in errors[0]
