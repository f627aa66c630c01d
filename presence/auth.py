"""userSign: the seed's Tencent-style signature (see shared PROTOCOL-NOTES.md)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import zlib
from typing import Annotated

import msgspec

from presence.bounded import MAX_JSON_DEPTH, too_deep
from presence.errors import AuthError, Code

DEFAULT_EXPIRE_S = 86400 * 180
_TO_URL = str.maketrans({"+": "*", "/": "-", "=": "_"})
_FROM_URL = str.maketrans({"*": "+", "-": "/", "_": "="})

# A real sign is a few hundred characters; these caps leave room for a 64-byte identifier escaped as \uXXXX.
MAX_USER_SIGN_CHARS = 2048
MAX_SIGN_JSON_BYTES = 2048
_DIGITS = re.compile(r"[0-9]{1,15}")
_Number = Annotated[int, msgspec.Meta(ge=0, le=2**53)] | str


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


class _SignDoc(msgspec.Struct):
    """The sign's JSON; the seed's numbers may also come as decimal strings (some forks write them so)."""

    identifier: str = msgspec.field(name="TLS.identifier")
    app_id: _Number = msgspec.field(name="TLS.appId")
    expire: _Number = msgspec.field(name="TLS.expire")
    issued_at: _Number = msgspec.field(name="TLS.expireTime")
    sig: str | None = msgspec.field(name="TLS.sig", default=None)
    sign: str | None = msgspec.field(name="TLS.sign", default=None)


_SIGN_DECODER = msgspec.json.Decoder(_SignDoc)


def _number(value: int | str) -> int:
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise ValueError("not a decimal number")
        return int(value)
    return value


def _invalid(why: str) -> AuthError:
    return AuthError(f"userSign is invalid: {why}", Code.USER_SIGN_INVALID)


def decode_user_sign(user_sign: str) -> tuple[str, int, int, int, str]:
    """(identifier, appId, expire s, issued-at s, sig) of a userSign; AuthError 60003 if it does not decode.

    Bounded before anything is inflated or parsed: at most ``MAX_USER_SIGN_CHARS`` characters,
    inflating to at most ``MAX_SIGN_JSON_BYTES`` bytes (a zlib bomb stops there), JSON nested at most
    ``MAX_JSON_DEPTH`` levels. Any failure is this one error, never another exception.
    """
    if len(user_sign) > MAX_USER_SIGN_CHARS:
        raise _invalid(f"longer than {MAX_USER_SIGN_CHARS} characters")
    if not user_sign.isascii():
        raise _invalid("it does not decode")
    try:
        packed = base64.b64decode(user_sign.translate(_FROM_URL), validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_SIGN_JSON_BYTES + 1)
    except (ValueError, zlib.error):  # binascii.Error is a ValueError
        raise _invalid("it does not decode") from None
    if len(raw) > MAX_SIGN_JSON_BYTES or inflater.unconsumed_tail:
        raise _invalid(f"it inflates to more than {MAX_SIGN_JSON_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:  # a truncated stream, or bytes after its end
        raise _invalid("it does not decode")
    if too_deep(raw):
        raise _invalid(f"its JSON is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    try:
        doc = _SIGN_DECODER.decode(raw)
        sig = doc.sig or doc.sign
        if sig is None or not sig.isascii():
            raise ValueError("no ASCII TLS.sig")
        return doc.identifier, _number(doc.app_id), _number(doc.expire), _number(doc.issued_at), sig
    except (msgspec.DecodeError, ValueError):  # msgspec.ValidationError is a DecodeError
        raise _invalid("it does not decode") from None


def verify_user_sign(user_sign: str, app_id: int, key: str, identifier: str, *, now: float | None = None) -> None:
    """Raise AuthError (60003 invalid, 60004 expired, 60005 mismatch) unless the sign is good."""
    if not user_sign:
        raise AuthError("userSign is missing", Code.USER_SIGN_MISSING)
    sign_id, sign_app, expire, issued_at, sig = decode_user_sign(user_sign)
    if sign_id != identifier or sign_app != app_id:
        raise AuthError("userSign does not match the identifier or appId", Code.USER_SIGN_MISMATCH)
    expected = _hmac(key, sign_id, sign_app, issued_at, expire)
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        raise AuthError("userSign is invalid: bad signature", Code.USER_SIGN_INVALID)
    if issued_at + expire < (time.time() if now is None else now):
        raise AuthError("userSign has expired", Code.USER_SIGN_EXPIRED)
