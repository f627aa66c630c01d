"""The sans-I/O session: frames in, requests and replies out, one state that only moves forward. No sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from presence.config import AppConfig, Settings
from presence.errors import AuthError, Code, ParamError
from presence.gateway.codec import Command, Frame, pack_tail
from presence.gateway.session import (
    LoginOutcome,
    LoginRequest,
    LogoutRequest,
    PullRequest,
    QuerySubscriptionsRequest,
    Session,
    SessionId,
    State,
    SubscribeRequest,
)
from presence.inbox import EventId
from tests.clients import APP, KEY, sign

SETTINGS = Settings(apps={APP: AppConfig(private_key=KEY, login_model=2, max_sessions=7, heartbeat_timeout=9.0)})


def login_frame(user: str = "alice", **data: Any) -> Frame:
    return Frame(
        command=Command.LOGIN,
        version=3,
        clientType=2,
        appId=APP,
        imei="phone",
        data={"userId": user, "userSign": sign(user), **data},
    )


def replies(session: Session) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    """(command, data, whole pack) of each reply owed, as a WebSocket text client would read them."""
    out = []
    for message in session.replies():
        pack = json.loads(message.pack(session.pack_tail))
        out.append((message.command, pack["data"], pack))
    return out


def state(session: Session) -> State:
    """``session.state`` read afresh (mypy keeps an attribute narrowed by an assert across the calls that move it)."""
    return session.state


def logged_in(**data: Any) -> Session:
    session = Session(SETTINGS)
    request = session.receive(login_frame(**data))
    assert isinstance(request, LoginRequest)
    outcome = LoginOutcome(SessionId(APP, "alice", 2, "phone", "c1"), EventId(5, 1), None)
    session.logged_in(request, outcome)
    session.replies()
    return session


def test_a_valid_login_is_a_request_and_the_state_moves_to_logging_in() -> None:
    session = Session(SETTINGS)
    assert session.state is State.AWAITING_LOGIN
    request = session.receive(login_frame(lastEventId="17-2", pong=True))
    assert request == LoginRequest(
        app_id=APP,
        user_id="alice",
        client_type=2,
        imei="phone",
        version=3,
        login_model=2,
        max_sessions=7,
        resume_after=EventId(17, 2),
        report_cursor=True,
        pong=True,
    )
    assert state(session) is State.LOGGING_IN
    assert session.pack_tail == pack_tail(2, "phone")  # packs to this connection end with the LOGIN's device
    assert session.replies() == []


@pytest.mark.parametrize(
    ("frame", "error", "code", "message"),
    [
        (Frame(command=Command.LOGIN, appId=1, data={"userId": "a"}), AuthError, Code.APP_ID_MISSING, "appId 1"),
        (login_frame(userId=""), AuthError, Code.IDENTIFIER_MISSING, "data.userId is missing"),
        (login_frame(userId=5), ParamError, Code.PARAMETER_ERROR, "data.userId must be a string, got int"),
        (login_frame(userSign="forged"), AuthError, Code.USER_SIGN_INVALID, ""),
        (login_frame(lastEventId="1-1\n"), ParamError, Code.PARAMETER_ERROR, "lastEventId must be a stream id"),
        (login_frame(pong="yes"), ParamError, Code.PARAMETER_ERROR, "data.pong must be true or false"),
        (Frame(command=Command.PULL, appId=APP), ParamError, Code.PARAMETER_ERROR, "needs a LOGIN (9000) first"),
    ],
    ids=["unknown-app", "no-user", "user-not-a-string", "bad-sign", "bad-last-event-id", "bad-pong", "before-login"],
)
def test_a_frame_that_ends_the_connection_raises_and_leaves_the_state(
    frame: Frame, error: type[Exception], code: Code, message: str
) -> None:
    session = Session(SETTINGS)
    with pytest.raises(error) as info:
        session.receive(frame)
    assert isinstance(info.value, AuthError | ParamError) and info.value.code == code
    assert message in info.value.message
    assert session.state is State.AWAITING_LOGIN and session.replies() == []


def test_loginack_is_the_seeds_unless_the_login_asks_for_the_cursor() -> None:
    session = Session(SETTINGS)
    plain = session.receive(login_frame())
    assert isinstance(plain, LoginRequest) and not plain.report_cursor
    session.logged_in(plain, LoginOutcome(SessionId(APP, "alice", 2, "phone", "c1"), EventId(5, 1), None))
    assert [(c, d) for c, d, _ in replies(session)] == [(Command.LOGINACK, {"userId": "alice"})]
    assert session.state is State.LOGGED_IN and session.heartbeat_timeout == 9.0

    asking = Session(SETTINGS)
    request = asking.receive(login_frame(lastEventId="5-0"))
    assert isinstance(request, LoginRequest)
    asking.logged_in(request, LoginOutcome(SessionId(APP, "alice", 2, "phone", "c2"), EventId(5, 0), True))
    ((command, data, pack),) = replies(asking)
    assert command == Command.LOGINACK and data == {"userId": "alice", "lastEventId": "5-0", "resumed": True}
    assert (pack["clientType"], pack["imei"], "eventId" in pack) == (2, "phone", False)  # a reply, not a push


def test_ping_is_answered_in_text_mode_or_when_login_asked() -> None:
    session = Session(SETTINGS)
    assert session.receive(Frame(command=Command.PING)) is None
    assert session.replies() == []  # the seed never answered PING: its clients break on a reply
    session.text_mode = True
    assert session.receive(Frame(command=Command.PING, appId=APP, data={"userId": "bob"})) is None
    ((command, data, pack),) = replies(session)
    assert (command, data, pack["userId"]) == (Command.PING, {}, "bob")
    binary = logged_in(pong=True)
    binary.receive(Frame(command=Command.PING))
    assert [c for c, _, _ in replies(binary)] == [Command.PING]


def test_an_unserved_command_is_answered_and_the_connection_stays() -> None:
    session = logged_in()
    assert session.receive(Frame(command=1103, appId=APP)) is None
    ((command, data, _),) = replies(session)
    assert command == Command.ERROR and data["code"] == Code.PARAMETER_ERROR and data["command"] == 1103
    assert session.state is State.LOGGED_IN


def test_requests_of_a_logged_in_session() -> None:
    session = logged_in()
    subscribe = session.receive(Frame(command=Command.SUBSCRIBE, data={"subUserId": ["bob"], "subTime": 60}))
    assert isinstance(subscribe, SubscribeRequest) and subscribe.body.subUserId == ["bob"]
    assert session.receive(Frame(command=Command.PULL, data={"userList": ["bob"]})) == PullRequest(["bob"])
    assert session.receive(Frame(command=Command.PULL)) == PullRequest(None)  # the caller's friends
    assert session.receive(Frame(command=Command.QUERY_SUBSCRIPTIONS)) == QuerySubscriptionsRequest()
    assert session.receive(Frame(command=Command.LOGOUT)) == LogoutRequest()
    assert session.replies() == []


def test_a_malformed_request_is_answered_like_rest_and_the_connection_stays() -> None:
    session = logged_in()
    assert session.receive(Frame(command=Command.SUBSCRIBE, data={"subUserId": "bob"})) is None
    ((command, data, _),) = replies(session)
    assert command == Command.SUBSCRIBE and data["code"] == Code.PARAMETER_ERROR and "subUserId" in data["msg"]
    assert session.state is State.LOGGED_IN


def test_a_second_login_is_refused() -> None:
    session = logged_in()
    with pytest.raises(ParamError, match="already logged in"):
        session.receive(login_frame())


def test_the_state_only_moves_forward() -> None:
    session = logged_in()
    session.ended()  # LOGOUT: the hub ended it first; the close may still be written
    assert session.state is State.ENDED and not session.serving and session.writable
    assert session.begin_close() and state(session) is State.CLOSING and not session.writable
    assert not session.begin_close()  # only once
    session.ended()
    assert session.state is State.CLOSING

    closing = logged_in()
    assert closing.begin_close()  # a kick, a timeout: closed first, then ended
    closing.ended()
    assert closing.state is State.CLOSING


def test_errors_carry_the_request_id_and_the_command() -> None:
    session = logged_in()
    session.error(Code.SYSTEM_ERROR, "system error", request_id="r1", command=Command.PULL)
    ((command, data, _),) = replies(session)
    assert command == Command.ERROR
    assert data == {"code": 90000, "msg": "system error", "requestId": "r1", "command": 4003}
