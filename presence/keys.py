"""The Redis key schema: the only place that spells a key or a channel name."""

from __future__ import annotations

import binascii
from dataclasses import dataclass

import msgspec


@dataclass(frozen=True, slots=True)
class UserKeys:
    """Every key of one user; all share the hash tag ``{appId:userId}`` (one cluster slot)."""

    sessions: str
    status: str
    friends: str
    subscribers: str
    subscriptions: str
    inbox: str
    pushed: str
    outbox: str

    def state(self) -> list[str]:
        """KEYS[1..5] of presence_login / presence_logout / presence_set_custom_status."""
        return [self.sessions, self.status, self.subscribers, self.inbox, self.friends]


@dataclass(frozen=True, slots=True)
class FeedKeys:
    """The optional KEYS[6..7] of the user's own functions: the user's feed outbox and the online counters
    HASH of the user's slot (presence_set_custom_status takes the outbox only)."""

    outbox: str
    counters: str


@dataclass(frozen=True, slots=True)
class KeySchema:
    prefix: str = "presence"

    def base(self, app_id: int, user_id: str) -> str:
        """The common start of a user's keys; hot paths append only the suffixes they need."""
        return f"{self.prefix}:{{{app_id}:{user_id}}}:"

    def recipient(self, app_id: int, user_id: str) -> tuple[str, str, str]:
        """A presence_fanout recipient's KEYS: sessions, inbox, pushed."""
        base = self.base(app_id, user_id)
        return (base + "sessions", base + "inbox", base + "pushed")

    def recipient_unordered(self, app_id: int, user_id: str) -> tuple[str, str]:
        """A presence_fanout recipient's KEYS for events without version ordering: sessions, inbox."""
        base = self.base(app_id, user_id)
        return (base + "sessions", base + "inbox")

    def presence_keys(self, app_id: int, user_id: str) -> tuple[str, str]:
        """What presence_query(_raw) reads of a user: sessions, status."""
        base = self.base(app_id, user_id)
        return (base + "sessions", base + "status")

    def user(self, app_id: int, user_id: str) -> UserKeys:
        base = self.base(app_id, user_id)
        return UserKeys(
            sessions=base + "sessions",
            status=base + "status",
            friends=base + "friends",
            subscribers=base + "subscribers",
            subscriptions=base + "subscriptions",
            inbox=base + "inbox",
            pushed=base + "pushed",
            outbox=base + "outbox",
        )

    @property
    def outbox_pattern(self) -> str:
        """A SCAN MATCH pattern of every user's feed outbox (``user(...).outbox``): the sweep's."""
        return f"{self.prefix}:{{*}}:outbox"

    def outbox_user(self, key: str) -> tuple[int, str] | None:
        """(appId, userId) of a user's feed outbox key (``user(...).outbox``), or None for another key."""
        head, tail = f"{self.prefix}:{{", "}:outbox"
        if not (key.startswith(head) and key.endswith(tail)):
            return None
        app, sep, user = key[len(head) : -len(tail)].partition(":")
        return (int(app), user) if sep and app.isdigit() and user else None

    def feed_shard(self, app_id: int, shard: int) -> str:
        """The app's change feed, partition ``shard`` (a STREAM; consumers read it with XREADGROUP)."""
        return f"{self.prefix}:feed:{{{app_id}:{shard}}}"

    def feed_cursor(self, app_id: int, shard: int, user_id: str) -> str:
        """The last outbox id of ``user_id`` relayed into that shard (same slot as the shard)."""
        return f"{self.prefix}:feed:{{{app_id}:{shard}}}:cursor:{user_id}"

    def feed_shard_count(self, app_id: int) -> str:
        """The app's ``feed_shards``, pinned by the first node that started (a STRING; FEED.md section 2)."""
        return f"{self.prefix}:feed:{{{app_id}}}:shards"

    def feed_dead(self, app_id: int) -> str:
        """Webhook events that failed every attempt (a STREAM)."""
        return f"{self.prefix}:webhooks:dead:{{{app_id}}}"

    def webhook_lease(self, app_id: int, shard: int, group: str) -> str:
        """Which webhook worker delivers this shard to this group (one at a time keeps per-user order)."""
        return f"{self.prefix}:feed:{{{app_id}:{shard}}}:lease:{group}"

    def counters(self, tag: str) -> str:
        """The online counters HASH whose hash tag ``tag`` lands on one cluster slot (``slot_tag``)."""
        return f"{self.prefix}:online:{{{tag}}}"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    @property
    def node_incarnations(self) -> str:
        """HASH node id -> the incarnation (a random id of the process) of its last heartbeat. Written in one
        call with ``nodes``, so in its cluster slot: the hash tag is ``nodes`` itself, or, when the prefix
        carries a hash tag of its own, that one (appended text leaves the first tag first)."""
        nodes = self.nodes
        if "{" in nodes or "}" in nodes:
            return f"{nodes}:incarnations"
        return f"{{{nodes}}}:incarnations"

    def node_sessions(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}:sessions"

    @property
    def doorbell_prefix(self) -> str:
        return f"{self.prefix}:node:"

    def doorbell(self, node_id: str) -> str:
        return self.doorbell_prefix + node_id


_SLOT_TAGS: list[str] = []


def slot_tags() -> list[str]:
    """For each cluster slot 0..16383, a short hash tag whose key slot it is (the first found, so stable).

    Lets a per-slot key (the online counters) share the slot of any user's keys: written in the same call.
    """
    if not _SLOT_TAGS:
        tags: list[str | None] = [None] * 16384
        left, i = 16384, 0
        while left:
            tag = format(i, "x")
            slot = binascii.crc_hqx(tag.encode(), 0) % 16384
            if tags[slot] is None:
                tags[slot] = tag
                left -= 1
            i += 1
        _SLOT_TAGS.extend(t for t in tags if t is not None)
    return _SLOT_TAGS


def user_slot(app_id: int, user_id: str) -> int:
    return binascii.crc_hqx(f"{app_id}:{user_id}".encode(), 0) % 16384


def doorbell_message(inboxes: list[str]) -> bytes:
    """A doorbell's payload: the inbox keys as a JSON array, as the library's ``ring`` sends it."""
    return msgspec.json.encode(inboxes)
