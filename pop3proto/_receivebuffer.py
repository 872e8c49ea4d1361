"""The input side: bytes in, complete lines out, with a bound on a partial line.

Lines are split once per ``feed`` (one ``bytes.split``), so a packet of ten
thousand pipelined commands costs one pass, not ten thousand searches.  A
line ends at LF; a CR before it is removed by the reader, not here.

A partial line that grows too long is not kept: ``skip_partial`` drops it
and every byte up to the next LF, and that line then comes out of
``next_line`` as ``OVERLONG`` (so the connection answers it in its place
among pipelined commands).  ``skipped`` counts the dropped octets of a line
still being skipped, for the bound on input that never ends a line.
"""

from __future__ import annotations

from typing import Final

__all__ = ["OVERLONG", "ReceiveBuffer"]

class _Overlong(bytes):
    """The type of OVERLONG: empty, but never the same object as a real line."""

    __slots__ = ()


#: Stands for a line too long to keep (its bytes were dropped; only its LF
#: is counted in ``buffered``).  Tell it by identity: ``line is OVERLONG``.
OVERLONG: Final = _Overlong()


class ReceiveBuffer:
    """Complete lines waiting to be read, plus one partial line and an EOF flag."""

    __slots__ = ("_lines", "_partial", "_pos", "_queued", "_skipping", "eof", "skipped")

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._pos = 0
        self._partial = bytearray()
        self._queued = 0  # octets held in _lines[_pos:], LFs included
        self._skipping = False
        #: Octets dropped so far of the line being skipped.
        self.skipped = 0
        self.eof = False

    def feed(self, data: bytes) -> None:
        """Add received bytes (not b""; EOF is ``eof = True``)."""
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                self.skipped += len(data)
                return
            self._skipping = False
            self.skipped = 0
            data = data[end + 1 :]
            self._append([OVERLONG], 1)
            if not data:
                return
        if b"\n" not in data:
            self._partial += data
            return
        parts = data.split(b"\n")
        partial = self._partial
        added = len(partial) + len(data)
        if partial:
            parts[0] = bytes(partial) + parts[0]
            partial.clear()
        partial += parts.pop()
        self._append(parts, added - len(partial))

    def _append(self, lines: list[bytes], octets: int) -> None:
        if self._pos:
            del self._lines[: self._pos]
            self._pos = 0
        self._lines.extend(lines)
        self._queued += octets

    def next_line(self) -> bytes | None:
        """The next complete line without its LF (or OVERLONG), or None if there is none yet."""
        pos = self._pos
        if pos < len(self._lines):
            self._pos = pos + 1
            line = self._lines[pos]
            self._queued -= len(line) + 1
            return line
        if pos:
            self._lines.clear()
            self._pos = 0
        return None

    def skip_partial(self) -> None:
        """Drop the partial line and every byte up to the next LF (see the module docstring)."""
        self.skipped = len(self._partial)
        self._partial.clear()
        self._skipping = True

    @property
    def skipping(self) -> bool:
        """Whether the end of an over-long line is being skipped."""
        return self._skipping

    @property
    def partial_length(self) -> int:
        """Octets of the unterminated line at the end of the input."""
        return len(self._partial)

    @property
    def partial_line(self) -> bool:
        """Whether the input ends inside a line (buffered or being skipped)."""
        return self._skipping or bool(self._partial)

    @property
    def buffered(self) -> int:
        """Unread octets held: the complete lines (LFs included) and the partial line."""
        return self._queued + len(self._partial)

    def clear(self) -> None:
        """Throw away everything buffered (after STLS)."""
        self._lines.clear()
        self._pos = 0
        self._queued = 0
        self._partial.clear()
        self._skipping = False
        self.skipped = 0
