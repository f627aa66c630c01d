"""Fuzz target (atheris / libFuzzer) for what parses untrusted bytes: the frame codec and the userSign verifier.

Run:  make fuzz              (60 s)
      python fuzz/fuzz_presence.py -max_total_time=5 [corpus dir]

A finding is any exception other than the documented ones (FrameError from the codec, AuthError
from the verifier) or an error with another code than the documented ones.
"""

from __future__ import annotations

import base64
import sys
import zlib
from typing import Any

import atheris

with atheris.instrument_imports():
    from presence.auth import decode_user_sign, generate_user_sign, verify_user_sign
    from presence.errors import AuthError, Code
    from presence.gateway.codec import HEADER, FrameDecoder, FrameError, decode_binary_message, decode_text_message

KEY = "fuzz-key"
SIGN_CODES = {Code.USER_SIGN_MISSING, Code.USER_SIGN_INVALID, Code.USER_SIGN_EXPIRED, Code.USER_SIGN_MISMATCH}
_TO_URL = str.maketrans({"+": "*", "/": "-", "=": "_"})


def _wrap_sign(doc: bytes) -> str:
    """Fuzzed JSON packed as a real userSign is, so the fuzzer reaches the JSON and field checks."""
    return base64.b64encode(zlib.compress(doc)).decode().translate(_TO_URL)


def _codec(fdp: atheris.FuzzedDataProvider) -> None:
    mode = fdp.ConsumeIntInRange(0, 4)
    if mode == 0:  # a TCP stream cut into random chunks
        _feed(FrameDecoder(), fdp)
    elif mode == 1:
        _expect_frame_error(decode_binary_message, fdp.ConsumeBytes(fdp.remaining_bytes()))
    elif mode == 2:
        text = fdp.ConsumeBytes(fdp.remaining_bytes())
        _expect_frame_error(decode_text_message, text)
        if _utf8(text):
            _expect_frame_error(decode_text_message, text.decode("utf-8", "surrogatepass"))
    elif mode == 3:  # well-framed headers with fuzzed imei and body bytes: reaches the body decoding
        command = fdp.PickValueInList([9000, 9003, 9999, 4002, 4003, 9001, fdp.ConsumeInt(4)])
        imei = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 140))
        body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048))
        header = HEADER.pack(command, 1, fdp.ConsumeIntInRange(0, 5), 0, 10000, len(imei), len(body))
        frame = header + imei + body
        _expect_frame_error(decode_binary_message, frame)
        decoder = FrameDecoder()
        _expect_frame_error(decoder.feed, frame + frame[: fdp.ConsumeIntInRange(0, len(frame))])
    else:  # a text frame whose data is fuzzed JSON
        data = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
        _expect_frame_error(decode_text_message, '{"command":9000,"appId":10000,"imei":"i","data":' + data + "}")


def _feed(decoder: FrameDecoder, fdp: atheris.FuzzedDataProvider) -> None:
    while fdp.remaining_bytes():
        try:
            decoder.feed(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4096)))
        except FrameError as exc:
            assert exc.code == Code.PARAMETER_ERROR
            return


def _expect_frame_error(decode: Any, message: Any) -> None:
    try:
        decode(message)
    except FrameError as exc:
        assert exc.code == Code.PARAMETER_ERROR


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True


def _sign(fdp: atheris.FuzzedDataProvider) -> None:
    mode = fdp.ConsumeIntInRange(0, 2)
    identifier = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 70))
    if mode == 0:  # any text as a userSign
        sign = fdp.ConsumeUnicode(fdp.remaining_bytes())
    elif mode == 1:  # any bytes as the sign's JSON
        sign = _wrap_sign(fdp.ConsumeBytes(fdp.remaining_bytes()))
    else:  # a real sign, then some of its characters replaced
        sign = list(generate_user_sign(10000, KEY, identifier or "alice", 3600))
        while fdp.remaining_bytes() >= 2 and sign:
            sign[fdp.ConsumeIntInRange(0, len(sign) - 1)] = chr(fdp.ConsumeIntInRange(0, 0x7F))
        sign = "".join(sign)
    try:
        verify_user_sign(sign, 10000, KEY, identifier or "alice")
    except AuthError as exc:
        assert exc.code in SIGN_CODES, exc.code
    try:
        decode_user_sign(sign)
    except AuthError as exc:
        assert exc.code == Code.USER_SIGN_INVALID, exc.code


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        _codec(fdp)
    else:
        _sign(fdp)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
