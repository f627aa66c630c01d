"""The key schema: one hash tag per user, so a user's keys share a cluster slot."""

from __future__ import annotations

import fnmatch

from redis.crc import key_slot

from presence.keys import KeySchema


def test_user_keys_share_one_slot() -> None:
    keys = KeySchema("presence").user(10000, "alice")
    slots = {
        key_slot(k.encode())
        for k in (keys.sessions, keys.status, keys.friends, keys.subscribers, keys.subscriptions, keys.inbox)
    }
    assert len(slots) == 1
    assert keys.sessions == "presence:{10000:alice}:sessions"


def test_prefix_and_node_keys() -> None:
    schema = KeySchema("p")
    assert schema.nodes == "p:nodes"
    assert schema.node_sessions("n1") == "p:node:n1:sessions"
    assert schema.doorbell("n1") == "p:node:n1"


def test_node_incarnations_share_the_slot_of_the_nodes_zset() -> None:
    """presence_node_heartbeat writes both in one call: on a cluster they must be in one slot."""
    for prefix in ("presence", "p", "{tenant-7}:presence"):
        schema = KeySchema(prefix)
        assert key_slot(schema.node_incarnations.encode()) == key_slot(schema.nodes.encode()), prefix
    assert KeySchema().node_incarnations == "{presence:nodes}:incarnations"


def test_outbox_keys_match_the_sweep_pattern_and_parse_back_to_their_user() -> None:
    keys = KeySchema("p")
    outbox = keys.user(10001, "al:ice").outbox
    assert fnmatch.fnmatchcase(outbox, keys.outbox_pattern)  # SCAN MATCH globs as fnmatch does here
    assert keys.outbox_user(outbox) == (10001, "al:ice")
    for other in (keys.user(10001, "alice").inbox, KeySchema("q").user(10001, "alice").outbox, "p:{x:alice}:outbox"):
        assert keys.outbox_user(other) is None
