"""The input side: bytes in, complete lines out, with a bound on a partial line.

Lines are split once per ``feed`` (one ``bytes.split``), so a packet of ten
thousand pipelined commands costs one pass, not ten thousand searches.  A
line ends at LF; a CR before it is removed by the reader, not here.
"""

from __future__ import annotations

__all__ = ["ReceiveBuffer"]


class ReceiveBuffer:
    """Complete lines waiting to be read, plus one partial line and an EOF flag."""

    __slots__ = ("_lines", "_partial", "_pos", "_queued", "eof")

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._pos = 0
        self._partial = bytearray()
        self._queued = 0  # octets held in _lines[_pos:], LFs included
        self.eof = False

    def feed(self, data: bytes) -> None:
        """Add received bytes (not b""; EOF is ``eof = True``)."""
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
        if self._pos:
            del self._lines[: self._pos]
            self._pos = 0
        self._lines.extend(parts)
        self._queued += added - len(partial)

    def next_line(self) -> bytes | None:
        """The next complete line without its LF, or None if there is none yet."""
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

    @property
    def partial_length(self) -> int:
        """Octets of the unterminated line at the end of the input."""
        return len(self._partial)

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
