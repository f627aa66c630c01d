"""userSign: the seed's algorithm, generated and verified; every failure has its own code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import zlib

import pytest

from presence.auth import generate_user_sign, verify_user_sign
from presence.errors import AuthError, Code

KEY = "123456"


def java_style_sign(identifier: str, app_id: int, key: str, issued: int, expire: int, field: str = "TLS.sig") -> str:
    """Built step by step from PROTOCOL-NOTES.md, as the lld-im Java SigAPI does (fastjson key order)."""
    content = f"TLS.identifier:{identifier}\nTLS.appId:{app_id}\nTLS.expireTime:{issued}\nTLS.expire:{expire}\n"
    sig = base64.b64encode(hmac.new(key.encode(), content.encode(), hashlib.sha256).digest()).decode()
    doc = {
        "TLS.appId": app_id,
        "TLS.expire": expire,
        "TLS.expireTime": issued,
        "TLS.identifier": identifier,
        field: sig,
    }
    raw = zlib.compress(json.dumps(doc).encode(), 9)
    return base64.b64encode(raw).decode().replace("+", "*").replace("/", "-").replace("=", "_")


def test_round_trip() -> None:
    sign = generate_user_sign(10000, KEY, "alice", 3600, now=1_700_000_000)
    verify_user_sign(sign, 10000, KEY, "alice", now=1_700_000_100)
    assert not set(sign) & set("+/=")


@pytest.mark.parametrize("field", ["TLS.sig", "TLS.sign"])
def test_java_client_sign_verifies(field: str) -> None:
    sign = java_style_sign("alice", 10000, KEY, 1_700_000_000, 86400, field)
    verify_user_sign(sign, 10000, KEY, "alice", now=1_700_000_000 + 86000)


@pytest.mark.parametrize(
    ("sign", "app", "user", "key", "now", "code"),
    [
        ("", 10000, "alice", KEY, 0, Code.USER_SIGN_MISSING),
        ("not-a-sign", 10000, "alice", KEY, 0, Code.USER_SIGN_INVALID),
        (
            java_style_sign("alice", 10000, KEY, 1_700_000_000, 10),
            10000,
            "alice",
            KEY,
            1_700_000_011,
            Code.USER_SIGN_EXPIRED,
        ),
        (
            java_style_sign("alice", 10000, KEY, 1_700_000_000, 10),
            10000,
            "bob",
            KEY,
            1_700_000_001,
            Code.USER_SIGN_MISMATCH,
        ),
        (
            java_style_sign("alice", 10000, KEY, 1_700_000_000, 10),
            10001,
            "alice",
            KEY,
            1_700_000_001,
            Code.USER_SIGN_MISMATCH,
        ),
        (
            java_style_sign("alice", 10000, "other", 1_700_000_000, 10),
            10000,
            "alice",
            KEY,
            1_700_000_001,
            Code.USER_SIGN_INVALID,
        ),
    ],
    ids=["missing", "garbage", "expired", "other-user", "other-app", "wrong-key"],
)
def test_failures_have_their_codes(sign: str, app: int, user: str, key: str, now: int, code: Code) -> None:
    with pytest.raises(AuthError) as info:
        verify_user_sign(sign, app, key, user, now=now)
    assert info.value.code == code and info.value.http_status == 401


def test_tampered_expiry_is_invalid() -> None:
    sign = java_style_sign("alice", 10000, KEY, 1_700_000_000, 10)
    raw = json.loads(zlib.decompress(base64.b64decode(sign.replace("*", "+").replace("-", "/").replace("_", "="))))
    raw["TLS.expire"] = 10**9
    forged = base64.b64encode(zlib.compress(json.dumps(raw).encode())).decode()
    forged = forged.replace("+", "*").replace("/", "-").replace("=", "_")
    with pytest.raises(AuthError) as info:
        verify_user_sign(forged, 10000, KEY, "alice", now=1_700_000_100)
    assert info.value.code == Code.USER_SIGN_INVALID
