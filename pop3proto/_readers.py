"""Pure parsers for command arguments: message numbers, base64, user names.

They return None (or raise ValueError) for malformed input; the connection
turns that into an ordinary ``-ERR``.  RFC 1939's grammar has plain decimal
numbers only: no sign, no spaces, no Unicode digits, no "0x".
"""

from __future__ import annotations

import base64
import binascii
import unicodedata

__all__ = ["decode_base64", "parse_number", "parse_username"]

_DIGITS = frozenset(b"0123456789")
#: More digits than any maildrop can need; longer numbers name no message.
_MAX_DIGITS = 12
_TOO_BIG = 1_000_000_000_000


def parse_number(arg: bytes) -> int | None:
    """A decimal message number or line count (leading zeros allowed), else None.

    A number too long to be real returns a huge value, which names no message.
    """
    if not arg or not _DIGITS.issuperset(arg):
        return None
    digits = arg.lstrip(b"0")
    if len(digits) > _MAX_DIGITS:
        return _TOO_BIG
    return int(digits or b"0")


def decode_base64(arg: bytes) -> bytes | None:
    """Strict RFC 4648 base64 (no whitespace, padding required), or None."""
    if len(arg) % 4:
        return None
    try:
        return base64.b64decode(arg, validate=True)
    except (binascii.Error, ValueError):
        return None


def parse_username(arg: bytes, utf8: bool) -> str | None:
    """A user name: printable ASCII, or after UTF8 any UTF-8 without controls (NFKC).

    None for anything else (controls, NUL, invalid UTF-8, non-ASCII before UTF8).
    """
    if not arg:
        return None
    if arg.isascii():
        text = arg.decode("ascii")
    elif not utf8:
        return None
    else:
        try:
            text = unicodedata.normalize("NFKC", arg.decode("utf-8"))
        except UnicodeDecodeError:
            return None
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        return None
    return text
