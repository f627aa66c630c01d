"""The gateway nodes' records (NodeRegistry), on a real redis-server, fakeredis and a Redis Cluster."""

from __future__ import annotations

from presence.nodes import NodeMember, node_member, parse_node_member
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
