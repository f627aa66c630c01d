"""The limits the presence library enforces: their one definition on the Python side.

``lua/presence.lua`` declares the same values in its ``LIMITS`` table and answers them with
``presence_limits``; tests/test_limits.py compares the two and probes each limit at its edge on
every store, so Python refuses exactly what the library would refuse (with a clearer message, before
a round trip). They are constants, not settings: the library refuses more whatever Python allows.

Why constants checked by a test rather than read from ``presence_limits`` at start: validation must
not wait for (or fail with) Redis, the library is loaded from this same checkout (``library.py``), and
another version on a server is what ``/healthz`` reports already.
"""

from __future__ import annotations

from typing import Final

import msgspec

USER_ID_BYTES: Final = 64
"""A userId is 1..64 UTF-8 bytes (``presence/ids.py`` has the rest of the rule)."""
IMEI_BYTES: Final = 128
"""An imei (device id) is 1..128 UTF-8 bytes."""
CUSTOM_TEXT_BYTES: Final = 100
"""``customText`` is at most 100 UTF-8 bytes."""
SUB_TIME_MS: Final = 30 * 86_400_000
"""A subscription lasts 1 ms .. 30 days."""
MAX_SESSIONS: Final = 10
"""Live sessions per user when the app sets no ``max_sessions`` (``presence_login``'s default)."""
RECENT_OPS: Final = 16
"""Operation ids remembered per user: a retry behind fewer changes than this is still a replay."""


class LibraryLimits(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What ``presence_limits`` answers (field names as the library spells them: ``userIdBytes`` ...)."""

    user_id_bytes: int = USER_ID_BYTES
    imei_bytes: int = IMEI_BYTES
    custom_text_bytes: int = CUSTOM_TEXT_BYTES
    sub_time_ms: int = SUB_TIME_MS
    max_sessions: int = MAX_SESSIONS
    recent_ops: int = RECENT_OPS
