"""Independent reference implementations (oracles) and strategies for the fuzz suite.

Nothing here imports the code under test: each oracle is the slow, obvious,
line-at-a-time reading of RFC 1939 that the streaming encoders in
``pop3proto._writers`` must agree with.

* ``normalise``: what a message looks like on the wire before byte-stuffing
  (CR LF line ends, a final line end added when missing).  A bare CR inside a
  line is content; a bare CR as the very last byte is completed to CR LF,
  which is what ``DotStuffer.end`` documents.  An empty message is one
  empty line (CR LF): a terminator alone would be read as data by some
  clients.
* ``unstuff``: what a client does with a multi-line response body.
* ``top_wire`` / ``top_raw``: TOP's header + blank line + n body lines, on the
  normalised text and on the stored bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

__all__ = [
    "draw_chunks",
    "messages",
    "normalise",
    "split_at",
    "top_raw",
    "top_wire",
    "unstuff",
]

_LINE_END = re.compile(rb"\r?\n")


def normalise(message: bytes) -> bytes:
    """The message as RETR sends it, before byte-stuffing (its POP3 size is the length)."""
    if not message:
        return b"\r\n"
    out = _LINE_END.sub(b"\r\n", message)
    if not out.endswith(b"\n"):
        out += b"\n" if out.endswith(b"\r") else b"\r\n"
    return out


def unstuff(body: bytes) -> bytes:
    """Undo byte-stuffing of a multi-line body (everything after the status line).

    *body* must end with the ``.`` CRLF terminator line.  Asserts what a
    client relies on: CRLF line ends only, no bare LF, and every line that
    starts with ``.`` is either the terminator or stuffed (``..``).
    """
    lines = body.split(b"\r\n")
    assert lines[-2:] == [b".", b""], f"no terminator line: {body[-20:]!r}"
    out = []
    for line in lines[:-2]:
        assert b"\n" not in line, f"bare LF on the wire: {line!r}"
        if line.startswith(b"."):
            assert line.startswith(b".."), f"unstuffed dot line: {line!r}"
            line = line[1:]
        out.append(line + b"\r\n")
    return b"".join(out)


def top_wire(message: bytes, lines: int) -> bytes:
    """TOP n *lines* on the normalised message: header, blank line, *lines* body lines."""
    out = []
    in_header = True
    left = lines
    for line in normalise(message).split(b"\r\n")[:-1]:
        if in_header:
            out.append(line)
            if line == b"":
                in_header = False
        elif left:
            out.append(line)
            left -= 1
        else:
            break
    return b"".join(line + b"\r\n" for line in out)


def top_raw(message: bytes, lines: int) -> tuple[bytes, bool]:
    """TOP on the stored bytes (LF or CRLF): the bytes kept, and whether it cut short.

    "Cut short" means the limit was reached at a line end, so nothing after
    that point can ever be sent (``TopLimiter.done``).
    """
    parts = message.split(b"\n")
    raw_lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        raw_lines.append(parts[-1])  # the last line has no line end
    kept = []
    in_header = True
    left = lines
    for line in raw_lines:
        kept.append(line)
        if in_header:
            if line in (b"\n", b"\r\n"):
                in_header = False
                if left == 0:
                    return b"".join(kept), True
        elif line.endswith(b"\n"):
            left -= 1
            if left == 0:
                return b"".join(kept), True
    return b"".join(kept), False
    return b"".join(kept), False


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """*data* cut at the given offsets (any order, duplicates give empty pieces)."""
    pieces = []
    start = 0
    for cut in sorted(cuts):
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


def draw_chunks(draw: Callable[[st.SearchStrategy[Any]], Any], data: bytes) -> list[bytes]:
    """*data* split whole, byte by byte, or at random points (empty pieces included).

    *draw* is ``DataObject.draw`` or a composite's ``draw``.  (Not a strategy
    taking *data*: hypothesis caches strategies by argument, and under
    ``python -bb`` the cache's ``b"" == 0`` comparison raises BytesWarning.)
    """
    mode = draw(st.sampled_from(["whole", "bytes", "cuts", "cuts"]))
    if mode == "whole" or not data:
        return [data]
    if mode == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=min(12, len(data) + 1)))
    return split_at(data, cuts)


_LINE_TEXT = st.one_of(
    st.sampled_from(
        [b"", b".", b"..", b"...", b". ", b".x", b"x.", b"From: a@b", b"Subject: .hi",
         b"body text", b"\r", b".\r", b"a\rb", b"\r.", b" ."]
    ),
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")),
)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """Message bytes: dot lines, blank lines, bare LF / CRLF / bare CR, maybe no final line end."""
    if draw(st.integers(0, 9)) == 0:
        message = draw(st.binary(max_size=60))
    else:
        lines = draw(st.lists(_LINE_TEXT, max_size=10))
        ends = draw(st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=len(lines),
                             max_size=len(lines)))
        message = b"".join(line + end for line, end in zip(lines, ends, strict=True))
        if draw(st.booleans()):
            message += draw(_LINE_TEXT)  # no final line end
    return message
