"""The library's limits: presence/limits.py and lua/presence.lua agree, and the library enforces each at its edge
(every test on a real redis-server, on fakeredis and on a Redis Cluster: the ``presence`` fixture)."""

from __future__ import annotations

import dataclasses

import pytest

from presence import functions, limits
from presence.errors import LimitError, ParamError
from presence.functions import Call, StatusChange
from presence.ids import check_imei, check_user_id
from presence.service import Presence

APP = 10000
IOS = 2


def login(p: Presence, user: str, imei: str = "i", conn: str = "c", login_model: int = 3) -> Call[StatusChange]:
    return functions.login(
        p.user(APP, user),
        None,
        p.options,
        app_id=APP,
        user_id=user,
        conn_id=conn,
        client_type=IOS,
        imei=imei,
        login_model=login_model,
    )


def custom(p: Presence, text: str, op_id: str = "") -> Call[StatusChange]:
    return functions.set_custom_status(
        p.user(APP, "u"), None, p.options, app_id=APP, user_id="u", custom_status=1, custom_text=text, op_id=op_id
    )


async def test_presence_limits_answers_the_python_constants(presence: Presence) -> None:
    assert await presence.fn.call(functions.limits()) == limits.LibraryLimits()
    assert limits.LibraryLimits() == limits.LibraryLimits(
        user_id_bytes=64,
        imei_bytes=128,
        custom_text_bytes=100,
        sub_time_ms=2_592_000_000,
        max_sessions=10,
        recent_ops=16,
    )


async def test_identifier_sizes_are_enforced_at_the_edge(presence: Presence) -> None:
    longest_user, longest_imei = "u" * limits.USER_ID_BYTES, "é" * (limits.IMEI_BYTES // 2)  # 2 bytes each
    assert check_user_id("userId", longest_user) and check_imei("imei", longest_imei)
    assert (await presence.fn.call(login(presence, longest_user, longest_imei))).changed
    with pytest.raises(ParamError, match=r"userId must be 1\.\.64 bytes"):
        await presence.fn.call(login(presence, longest_user + "u"))
    with pytest.raises(ParamError, match=r"imei must be 1\.\.128 bytes"):
        await presence.fn.call(login(presence, "v", longest_imei + "x"))


async def test_custom_text_size_is_enforced_at_the_edge(presence: Presence) -> None:
    assert (await presence.fn.call(custom(presence, "x" * limits.CUSTOM_TEXT_BYTES))).changed
    with pytest.raises(ParamError, match="customText must be at most 100 bytes"):
        await presence.fn.call(custom(presence, "x" * (limits.CUSTOM_TEXT_BYTES + 1)))


async def test_sub_time_is_enforced_at_the_edge(presence: Presence) -> None:
    index = presence.user(APP, "s").subscriptions
    reply = await presence.fn.call(functions.subscribe(index, "s", ["t"], limits.SUB_TIME_MS, 10))
    assert reply.live == 1
    with pytest.raises(ParamError, match="subTime must be between 1 and 2592000000 ms"):
        await presence.fn.call(functions.subscribe(index, "s", ["t"], limits.SUB_TIME_MS + 1, 10))


async def test_max_sessions_default_is_enforced_at_the_edge(presence: Presence) -> None:
    """Without ARGV[15] (an external caller that leaves it out) the library allows MAX_SESSIONS live sessions."""

    def without_cap(call: Call[StatusChange]) -> Call[StatusChange]:
        return dataclasses.replace(call, args=call.args[:-1])

    for i in range(limits.MAX_SESSIONS):  # model 4: nobody is kicked
        await presence.fn.call(without_cap(login(presence, "m", f"d{i}", f"c{i}", login_model=4)))
    with pytest.raises(LimitError, match="already has 10 live sessions"):
        await presence.fn.call(without_cap(login(presence, "m", "one-more", "c-more", login_model=4)))


async def test_recent_ops_are_remembered_up_to_the_limit(presence: Presence) -> None:
    """A repeat is a replay while its operation is among the user's last RECENT_OPS; after more, it applies."""
    first = await presence.fn.call(custom(presence, "first", "op-first"))
    for i in range(limits.RECENT_OPS - 1):
        await presence.fn.call(custom(presence, f"later {i}", f"op-{i}"))
    replay = await presence.fn.call(custom(presence, "first", "op-first"))
    assert replay.version == first.version + limits.RECENT_OPS - 1, "still known: nothing applied"
    assert b'"customText":"later 14"' in replay.data
    await presence.fn.call(custom(presence, "one more", "op-more"))  # op-first is now the 17th newest
    again = await presence.fn.call(custom(presence, "first", "op-first"))
    assert again.version == replay.version + 2 and b'"customText":"first"' in again.data
