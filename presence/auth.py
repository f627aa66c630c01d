"""userSign: the seed's Tencent-style signature (see shared PROTOCOL-NOTES.md)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
import zlib

from presence.errors import AuthError, Code

DEFAULT_EXPIRE_S = 86400 * 180
_TO_URL = str.maketrans({"+": "*", "/": "-", "=": "_"})
_FROM_URL = str.maketrans({"*": "+", "-": "/", "_": "="})


def _hmac(key: str, identifier: str, app_id: int, issued_at: int, expire: int) -> str:
    content = f"TLS.identifier:{identifier}\nTLS.appId:{app_id}\nTLS.expireTime:{issued_at}\nTLS.expire:{expire}\n"
    digest = hmac.new(key.encode(), content.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def generate_user_sign(
    app_id: int, key: str, identifier: str, expire: int = DEFAULT_EXPIRE_S, *, now: int | None = None
) -> str:
    """A userSign for ``identifier`` valid ``expire`` seconds from ``now`` (Unix seconds, default: the clock).

    Byte for byte what the Java ``SigAPI`` produces, because its verifier regenerates the whole sign and
    compares strings: fastjson's key order (the HashMap's iteration order), compact, non-ASCII left as
    UTF-8, zlib at its default level.
    """
    issued_at = int(time.time()) if now is None else now
    doc = {
        "TLS.expire": expire,
        "TLS.appId": app_id,
        "TLS.expireTime": issued_at,
        "TLS.identifier": identifier,
        "TLS.sig": _hmac(key, identifier, app_id, issued_at, expire),
    }
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.b64encode(zlib.compress(raw)).decode().translate(_TO_URL)


def verify_user_sign(user_sign: str, app_id: int, key: str, identifier: str, *, now: float | None = None) -> None:
    """Raise AuthError (60003 invalid, 60004 expired, 60005 mismatch) unless the sign is good."""
    if not user_sign:
        raise AuthError("userSign is missing", Code.USER_SIGN_MISSING)
    try:
        raw = zlib.decompress(base64.b64decode(user_sign.translate(_FROM_URL), validate=True))
        doc = json.loads(raw)
        sign_id = str(doc["TLS.identifier"])
        sign_app = int(doc["TLS.appId"])
        expire = int(doc["TLS.expire"])
        issued_at = int(doc["TLS.expireTime"])
        sig = str(doc.get("TLS.sig") or doc["TLS.sign"])
    except (ValueError, KeyError, TypeError, zlib.error, binascii.Error):
        raise AuthError("userSign is invalid: it does not decode", Code.USER_SIGN_INVALID) from None
    if sign_id != identifier or sign_app != app_id:
        raise AuthError("userSign does not match the identifier or appId", Code.USER_SIGN_MISMATCH)
    expected = _hmac(key, sign_id, sign_app, issued_at, expire)
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        raise AuthError("userSign is invalid: bad signature", Code.USER_SIGN_INVALID)
    if issued_at + expire < (time.time() if now is None else now):
        raise AuthError("userSign has expired", Code.USER_SIGN_EXPIRED)
