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
    """Built step by step from PROTOCOL-NOTES.md, but as another client library might: keys sorted, spaced
    JSON, zlib level 9 (not the Java SigAPI's bytes; those are JAVA_VECTORS)."""
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


# Computed with the lld-im Java SigAPI (fastjson): app 10000, key "compat-test-key-1", expire 3600 s,
# issued at 1700000000. Their server regenerates the sign and compares strings, so ours must be identical.
JAVA_KEY = "compat-test-key-1"
JAVA_VECTORS = {
    "lld": (
        "eJyrVgrxCdZLrSjILEpVsjI2MzDQAYskFhR4pihZGRoYwEQgakIyc4HqDM0NoAAil5mSmleSmZaZWqRkpZSTk6IE"
        "ES7OTAfyc01S3DxzfUO93bKNC4tdPSy1q8oyckMjjcqS-ZMMjPK8wg1KU3ILg4OyTWyVagEfpSvW"
    ),
    "a/b": (
        "eJyrVgrxCdZLrSjILEpVsjI2MzDQAYskFhR4pihZGRoYwEQgakIyc4HqDM0NoAAil5mSmleSmZaZWqRkpZSon6QE"
        "ES7OTAfynfJTggLck4yNsrL1TU3zTH2zyoNKQ3MsfUpcLFNL3ZxKnD0N9Y1SfAKyQm2VagH-4irP"
    ),
}


def _document(sign: str) -> bytes:
    return zlib.decompress(base64.b64decode(sign.replace("*", "+").replace("-", "/").replace("_", "=")))


@pytest.mark.parametrize("user", sorted(JAVA_VECTORS))
def test_generated_sign_is_byte_identical_to_the_java_sigapi(user: str) -> None:
    sign = generate_user_sign(10000, JAVA_KEY, user, 3600, now=1_700_000_000)
    assert sign == JAVA_VECTORS[user]
    verify_user_sign(sign, 10000, JAVA_KEY, user, now=1_700_000_000 + 3600)


def test_generated_document_is_fastjson_shaped_with_utf8_left_as_is() -> None:
    doc = _document(generate_user_sign(10000, JAVA_KEY, "李雷", 3600, now=1_700_000_000)).decode()
    keys = ["TLS.expire", "TLS.appId", "TLS.expireTime", "TLS.identifier", "TLS.sig"]
    assert list(json.loads(doc)) == keys
    assert doc.startswith('{"TLS.expire":3600,"TLS.appId":10000,"TLS.expireTime":1700000000,"TLS.identifier":"李雷",')
    assert "\\u" not in doc


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
