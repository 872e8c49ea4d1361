"""Serialisers: status lines, dot-stuffing of message data, TOP's line limit.

The multi-line rules of RFC 1939 section 3 are applied to a *stream*: the
application hands message bytes in chunks of any size with LF or CRLF line
ends, and the encoder carries two bits between chunks (at the start of a
line; the previous byte was CR), so a line split across chunks, including a
lone CR at a chunk's end, is handled exactly like an unsplit one.

The size rule is shared with storages through ``wire_size``/``WireSizer``: a
bare LF counts as CRLF, and a message that does not end with a line end gets
the CRLF the encoder adds before the terminator (just the LF after a final
bare CR, which the encoder completes to CRLF).  An empty message is sent as
one empty line (``+OK 2 octets``, CRLF, ``.`` CRLF): a bare terminator
right after the status line is read as data by some clients (Tcllib's
``pop3``), and Dovecot sends the empty line too; its size is 2.
Dot-stuffing is not counted (RFC 1939 section 11: sizes are before
byte-stuffing).
"""

from __future__ import annotations

import re

__all__ = ["DotStuffer", "TopLimiter", "WireSizer", "status_line", "wire_size"]

_DOT_LINE = re.compile(rb"\n\.")


def status_line(ok: bool, text: str, code: str | None = None) -> bytes:
    """``+OK text`` / ``-ERR [CODE] text`` with CRLF; text must be one line."""
    head = "+OK" if ok else "-ERR"
    if code:
        head = f"{head} [{code}]"
    if text:
        head = f"{head} {text}"
    return head.encode("utf-8") + b"\r\n"


class WireSizer:
    """Counts a message's POP3 size (CRLF line ends, final line end added) chunk by chunk."""

    __slots__ = ("_last", "_total")

    def __init__(self) -> None:
        self._total = 0
        self._last = -1  # last byte seen, -1 before any

    def feed(self, chunk: bytes) -> None:
        """Account for the next *chunk* of stored bytes."""
        if not chunk:
            return
        n = len(chunk) + chunk.count(b"\n") - chunk.count(b"\r\n")
        if self._last == 13 and chunk[0] == 10:
            n -= 1  # CR|LF split across chunks: that LF needs no CR
        self._total += n
        self._last = chunk[-1]

    def total(self) -> int:
        """The size so far, as if the message ended here."""
        if self._last == 10:
            return self._total
        if self._last == -1:
            return 2  # an empty message is sent as one empty line
        if self._last == 13:
            return self._total + 1  # DotStuffer.end completes a final bare CR to CRLF
        return self._total + 2


def wire_size(data: bytes) -> int:
    """The POP3 size of a whole message held in memory (see the module docstring)."""
    sizer = WireSizer()
    sizer.feed(data)
    return sizer.total()


class DotStuffer:
    """Turns message bytes into the body of a multi-line response, chunk by chunk.

    ``feed`` returns the wire bytes for a chunk; ``end`` returns the
    terminator (``.CRLF``, preceded by CRLF when the data did not end a line
    or when there was no data at all: an empty message is one empty line).
    """

    __slots__ = ("_at_line_start", "_empty", "_prev_cr")

    def __init__(self) -> None:
        self._at_line_start = True
        self._prev_cr = False
        self._empty = True

    def feed(self, chunk: bytes) -> bytes:
        """Encode one chunk: bare LF becomes CRLF, a leading '.' on a line is doubled."""
        if not chunk:
            return b""
        self._empty = False
        head = b""
        if self._prev_cr and chunk[0] == 10:
            # The CR of this CRLF ended the previous chunk.
            head = b"\n"
            chunk = chunk[1:]
            self._at_line_start = True
            if not chunk:
                self._prev_cr = False
                return head
        if b"\r" in chunk:
            out = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        else:
            out = chunk.replace(b"\n", b"\r\n")
        out = _DOT_LINE.sub(b"\n..", out)  # one pass; bytes.replace searches twice
        if self._at_line_start and out[0] == 46:  # "."
            out = b"." + out
        last = out[-1]
        self._prev_cr = last == 13
        self._at_line_start = last == 10
        return head + out if head else out

    def end(self) -> bytes:
        """The bytes that close the block."""
        if self._empty:
            tail = b"\r\n.\r\n"  # the empty message as one empty line
        elif self._at_line_start:
            tail = b".\r\n"
        elif self._prev_cr:
            tail = b"\n.\r\n"  # data ended on a bare CR: complete it to CRLF
        else:
            tail = b"\r\n.\r\n"
        self._at_line_start = True
        self._prev_cr = False
        self._empty = True
        return tail


class TopLimiter:
    """Keeps the header, the blank line and at most *lines* body lines (TOP n m).

    Sits in front of a DotStuffer and sees the stored bytes (LF or CRLF).
    ``done`` turns true once nothing more will pass, so the application may
    stop reading the message.
    """

    __slots__ = ("_in_header", "_left", "_line", "done")

    def __init__(self, lines: int) -> None:
        self._left = lines
        self._in_header = True
        self._line = 0  # current line so far: 0 empty, 1 just a CR, 2 has content
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """The part of *chunk* that TOP sends."""
        if self.done or not chunk:
            return b""
        i = 0
        find = chunk.find
        while True:
            j = find(b"\n", i)
            if j < 0:
                seg = chunk[i:]
                if seg:
                    self._line = 1 if (self._line == 0 and seg == b"\r") else 2
                return chunk
            if self._in_header:
                seg = chunk[i:j]
                line = self._line
                blank = (line == 0 and seg in (b"", b"\r")) or (line == 1 and not seg)
                if blank:
                    self._in_header = False
                    if self._left == 0:
                        self.done = True
                        return chunk[: j + 1]
            else:
                self._left -= 1
                if self._left == 0:
                    self.done = True
                    return chunk[: j + 1]
            self._line = 0
            i = j + 1
