"""Errors with the seed's codes, shared by the REST app and the gateway."""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    SUCCESS = 200
    SYSTEM_ERROR = 90000
    PARAMETER_ERROR = 90001
    USER_SIGN_MISSING = 60000
    APP_ID_MISSING = 60001
    IDENTIFIER_MISSING = 60002
    USER_SIGN_INVALID = 60003
    USER_SIGN_EXPIRED = 60004
    USER_SIGN_MISMATCH = 60005
    FORBIDDEN = 60006
    NOT_FOUND = 90004
    SESSION_LIMIT = 90005  # ours: the user already has the app's max_sessions live sessions


class PresenceError(Exception):
    """Base error: a seed code, an HTTP status and a message fit to show a client."""

    code: Code = Code.SYSTEM_ERROR
    http_status: int = 500

    def __init__(self, message: str, code: Code | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ParamError(PresenceError):
    """A request field breaks a rule; the message names the field and the rule."""

    code = Code.PARAMETER_ERROR
    http_status = 400


class ReplyError(PresenceError):
    """Redis answered a library call in a shape this code does not know (another library version loaded?)."""


class AuthError(PresenceError):
    """Missing, invalid or expired credentials (60000-60005)."""

    code = Code.USER_SIGN_INVALID
    http_status = 401


class ForbiddenError(PresenceError):
    code = Code.FORBIDDEN
    http_status = 403


class UnavailableError(PresenceError):
    """Redis cannot serve the request now (down, or failing over for longer than the retry window)."""

    http_status = 503


class LimitError(PresenceError):
    """A per-user limit is reached (live sessions); the request is refused and nothing changed."""

    code = Code.SESSION_LIMIT
    http_status = 429
