"""msgspec models: stored sessions, notify packs, query results and requests.

The library (lua/presence.lua) writes the JSON of sessions and packs with one writer; ``Session`` and the
pack Structs here are that JSON's contract, byte for byte (tests/test_functions.py).
"""

from __future__ import annotations

import msgspec

ONLINE = 1
OFFLINE = 2


class Session(msgspec.Struct, kw_only=True):
    """One online device of a user (the seed's UserSession plus loginTime and connId): a value of the
    user's sessions HASH as the library stores it (``session_json`` in lua/presence.lua)."""

    appId: int
    userId: str
    clientType: int
    imei: str
    connectState: int = ONLINE
    brokerId: str = ""
    brokerHost: str = ""
    version: int = 0
    loginTime: int = 0
    connId: str = ""


class UserStatusChangeNotifyPack(msgspec.Struct, kw_only=True):
    """Data of 4004 (to friends and subscribers) and 4005 (to the user's other sessions), as the library
    writes it (``status_pack`` in lua/presence.lua; tests/test_functions.py checks its bytes against this)."""

    appId: int
    userId: str
    status: int
    client: list[Session]
    version: int  # the user's version after the change


class UserCustomStatusChangeNotifyPack(msgspec.Struct, kw_only=True):
    """Data of 4006 (to friends and subscribers) and 4007 (to the user's other sessions), as the library
    writes it (``custom_pack``)."""

    userId: str
    customStatus: int
    customText: str
    version: int  # the user's version after the change


class FriendshipPack(msgspec.Struct, kw_only=True):
    """Data of 4010 (ours): friendships added or deleted; ``friends`` maps each friend to their status now."""

    appId: int
    action: str  # "add" | "delete"
    friends: dict[str, UserOnlineStatus]


class KickPack(msgspec.Struct, kw_only=True):
    """Data of 9002 MUTUALLOGIN: the login that displaced this connection, as the library writes it
    (``kick_pack``)."""

    appId: int
    userId: str
    clientType: int
    imei: str


class UserOnlineStatus(msgspec.Struct, kw_only=True):
    """Query result for one user (the seed's UserOnlineStatusResp plus status and lastSeen)."""

    session: list[Session]
    customStatus: int | None = None
    customText: str | None = None
    status: int = OFFLINE
    lastSeen: int | None = None
    # The user's version: moves with every change; pushes carry it too (0 before the first change).
    version: int = 0


# --- requests (REST bodies; 4002/4003 socket data) ---


class SubscribeUserOnlineStatusReq(msgspec.Struct, kw_only=True):
    subUserId: list[str]
    subTime: int


class UnsubscribeUserOnlineStatusReq(msgspec.Struct, kw_only=True):
    subUserId: list[str]


class SetUserCustomerStatusReq(msgspec.Struct, kw_only=True):
    customStatus: int
    customText: str = ""
    userId: str | None = None


class PullUserOnlineStatusReq(msgspec.Struct, kw_only=True):
    userList: list[str]


class PullFriendOnlineStatusReq(msgspec.Struct, kw_only=True):
    pass


class FriendItem(msgspec.Struct, kw_only=True):
    toId: str


class AddFriendReq(msgspec.Struct, kw_only=True):
    fromId: str
    toItem: FriendItem


class DeleteFriendReq(msgspec.Struct, kw_only=True):
    fromId: str
    toId: str


class ImportFriendReq(msgspec.Struct, kw_only=True):
    fromId: str
    friendItem: list[FriendItem]


class ResponseVO(msgspec.Struct):
    """The seed's envelope."""

    code: int = 200
    msg: str = "success"
    data: object = None


class ErrorVO(msgspec.Struct):
    """The seed's envelope for an error, plus ``requestId``: the id of the log line with the details."""

    code: int
    msg: str
    data: None = None
    requestId: str = ""


# --- results of the service facade ---


class ChangeResult(msgspec.Struct, kw_only=True):
    """What one status change did."""

    changed: bool
    recipients: int = 0
    delivered: int = 0
    kicked: int = 0
    inbox_last_id: str = "0-0"
    version: int = 0  # the user's version after the change


class SubscribeResult(msgspec.Struct, kw_only=True):
    """subscribe: the expiry, the caller's live subscriptions, and every target's status now (query shape)."""

    expireAt: int
    liveSubscriptions: int
    users: dict[str, UserOnlineStatus] = msgspec.field(default_factory=dict)


class Subscription(msgspec.Struct, kw_only=True):
    userId: str
    expireAt: int


class SubscriptionList(msgspec.Struct, kw_only=True):
    """querySubscriptions: the caller's live subscriptions, the soonest to expire first."""

    subscriptions: list[Subscription]
    serverTime: int


class OnlineCount(msgspec.Struct, kw_only=True):
    """queryOnlineCount: users with a live session, live sessions, and sessions per clientType ("0".."5")."""

    onlineUsers: int = 0
    onlineSessions: int = 0
    sessionsByClientType: dict[str, int] = msgspec.field(default_factory=dict)
