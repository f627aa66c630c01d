"""Identifiers: the one definition of what a userId and an imei may contain.

Used by the REST app, the socket gateway and (mirrored byte for byte in ``valid_id`` of
lua/presence.lua, checked by tests/test_hostile.py) the Redis functions. The sizes are the library's
limits (``presence/limits.py``).

- userId: 1..64 UTF-8 bytes; imei: 1..128 UTF-8 bytes.
- Both: valid UTF-8 (no lone surrogates), no control characters (C0 ``\\x00-\\x1f``, DEL, C1
  ``\\x80-\\x9f``), no line or paragraph separator (U+2028, U+2029), no ``|``.
- userId also: no ``{`` or ``}`` (a userId sits inside the key's hash tag ``{appId:userId}``).

Why: ids travel inside things with delimiters: ``|`` separates the fields of a node's session
members, newlines separate log lines, braces end a hash tag. With these rules no id byte can
break any of them, and internal messages (the doorbell) are JSON-framed on top of that.
"""

from __future__ import annotations

import re

from presence.errors import ParamError
from presence.limits import IMEI_BYTES, USER_ID_BYTES

MAX_USER_ID_BYTES = USER_ID_BYTES
MAX_IMEI_BYTES = IMEI_BYTES

# Characters no identifier may contain (surrogates included: they cannot be encoded as UTF-8).
_FORBIDDEN = "\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff|"
_BAD_IMEI = re.compile(f"[{_FORBIDDEN}]")
_BAD_USER_ID = re.compile(f"[{_FORBIDDEN}{{}}]")

USER_ID_RULE = f"1..{MAX_USER_ID_BYTES} UTF-8 bytes without control characters, | {{ or }}"
IMEI_RULE = f"1..{MAX_IMEI_BYTES} UTF-8 bytes without control characters or |"


def _check(field: str, value: object, most: int, bad: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str) or not value:
        raise ParamError(f"{field} must be a non-empty string ({rule})")
    found = bad.search(value)
    if found:
        raise ParamError(f"{field} must not contain {found.group()!a} (character {found.start()}): {rule}")
    size = len(value.encode())
    if size > most:
        raise ParamError(f"{field} must be at most {most} bytes of UTF-8, got {size}")
    return value


def check_user_id(field: str, value: object) -> str:
    """``value`` if it is a valid userId, else ParamError naming ``field`` and the rule."""
    return _check(field, value, MAX_USER_ID_BYTES, _BAD_USER_ID, USER_ID_RULE)


def check_imei(field: str, value: object, most: int = MAX_IMEI_BYTES) -> str:
    """``value`` if it is a valid imei (device id), else ParamError naming ``field`` and the rule."""
    return _check(field, value, most, _BAD_IMEI, IMEI_RULE)


def is_user_id(value: object) -> bool:
    try:
        check_user_id("userId", value)
    except ParamError:
        return False
    return True
