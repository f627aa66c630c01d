"""The Redis key schema: the only place that spells a key or a channel name."""

from __future__ import annotations

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

    def state(self) -> list[str]:
        """KEYS of presence_login / presence_logout / presence_set_custom_status."""
        return [self.sessions, self.status, self.subscribers, self.inbox, self.friends]


@dataclass(frozen=True, slots=True)
class KeySchema:
    prefix: str = "presence"

    def base(self, app_id: int, user_id: str) -> str:
        """The common start of a user's keys; hot paths append only the suffixes they need."""
        return f"{self.prefix}:{{{app_id}:{user_id}}}:"

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
        )

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    def node_sessions(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}:sessions"

    @property
    def doorbell_prefix(self) -> str:
        return f"{self.prefix}:node:"

    def doorbell(self, node_id: str) -> str:
        return self.doorbell_prefix + node_id


def doorbell_message(inboxes: list[str]) -> bytes:
    """A doorbell's payload: the inbox keys as a JSON array, as the library's ``ring`` sends it."""
    return msgspec.json.encode(inboxes)
