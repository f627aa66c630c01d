"""The key schema: one hash tag per user, so a user's keys share a cluster slot."""

from __future__ import annotations

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
