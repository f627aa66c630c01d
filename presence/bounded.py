"""Bounded decoding of untrusted JSON: a nesting-depth check that runs before any parser does.

msgspec (like every recursive parser) answers a deeply nested document with RecursionError, and
a document needs no more than one byte per level; so depth is checked first, in linear time and
without recursion, and every decoder of client input (socket frames, WebSocket text, REST bodies,
the userSign's JSON) refuses what is nested deeper than ``MAX_JSON_DEPTH``. Sizes are capped where
the bytes arrive (frame and body limits, the userSign's length and inflated size).
"""

from __future__ import annotations

import operator
import re
from itertools import accumulate, count

MAX_JSON_DEPTH = 32  # our deepest legal document (importFriend, a text frame's data) needs 3

_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')  # linear: with escapes gone, each quote pairs with the next one
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")  # 2 per opener, 0 per closer


def json_depth(raw: bytes | bytearray | memoryview | str) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (brackets inside strings do not count).

    Garbage gives some number, never an error: the parser that runs next reports the syntax.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    brackets = _STRING.sub(b"", _ESCAPE.sub(b"", data)).translate(_DEPTH_STEP, _NOT_BRACKET)
    if not brackets:
        return 0
    # After i brackets, depth = openers - closers = (2 * openers) - i: running sums, all in C.
    deepest: int = max(map(operator.sub, accumulate(brackets), count(1)))  # operator.sub is typed Any -> Any
    return max(0, deepest)


def too_deep(raw: bytes | bytearray | memoryview | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``raw`` nests deeper than ``limit``; the common case costs two ``count`` calls."""
    if isinstance(raw, memoryview):
        raw = bytes(raw)
    if isinstance(raw, str):
        if raw.count("[") + raw.count("{") <= limit:
            return False
    elif raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    return json_depth(raw) > limit
