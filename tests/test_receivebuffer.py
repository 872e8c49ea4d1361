"""The receive buffer: lines out at LF, CR kept for the reader, exact accounting, EOF, clear."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3proto._receivebuffer import OVERLONG, ReceiveBuffer


def drain(buf: ReceiveBuffer) -> list[bytes]:
    lines = []
    while (line := buf.next_line()) is not None:
        lines.append(line)
    return lines


def test_empty() -> None:
    buf = ReceiveBuffer()
    assert buf.next_line() is None
    assert buf.partial_length == 0
    assert buf.buffered == 0
    assert not buf.eof


def test_lines_keep_their_cr() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"STAT\r\nLIST\nNOOP\r\r\n\r\n\n")
    assert drain(buf) == [b"STAT\r", b"LIST", b"NOOP\r\r", b"\r", b""]
    assert buf.buffered == 0


def test_partial_line_waits() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"US")
    assert buf.next_line() is None
    assert buf.partial_length == 2
    buf.feed(b"ER a\r")
    assert buf.next_line() is None
    assert buf.partial_length == 7
    buf.feed(b"\nPA")
    assert buf.next_line() == b"USER a\r"
    assert buf.next_line() is None
    assert buf.partial_length == 2
    assert buf.buffered == 2


DATA = b"USER a\r\nPASS b c\r\n\r\nLIST\nRETR 1\r\nQUI"


@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_every_split_gives_the_same_lines(pieces: int) -> None:
    expected = DATA.split(b"\n")
    for cuts in itertools.combinations_with_replacement(range(len(DATA) + 1), pieces - 1):
        bounds = [0, *cuts, len(DATA)]
        buf = ReceiveBuffer()
        lines = []
        for a, b in itertools.pairwise(bounds):
            if a < b:
                buf.feed(DATA[a:b])
            lines += drain(buf)
        assert lines == expected[:-1]
        assert buf.partial_length == len(expected[-1])


# Chunks are drawn as text and encoded: hypothesis's internal caches compare
# drawn bytes with ints, which ``python -bb`` turns into an error.
CHUNKS = st.text(alphabet="ab\r\n", max_size=12).map(str.encode)


@given(st.lists(CHUNKS, max_size=12), st.lists(st.integers(0, 3), max_size=12))
def test_buffered_counts_exactly_what_is_unread(chunks: list[bytes], reads: list[int]) -> None:
    """After any mix of feeds and reads, ``buffered`` is what was fed minus what was read."""
    buf = ReceiveBuffer()
    fed = read = 0
    for chunk, n in itertools.zip_longest(chunks, reads, fillvalue=None):
        if chunk:
            buf.feed(chunk)
            fed += len(chunk)
        for _ in range(n or 0):
            line = buf.next_line()
            if line is not None:
                read += len(line) + 1
        assert buf.buffered == fed - read
    all_data = b"".join(chunks)
    partial = len(all_data) - (all_data.rfind(b"\n") + 1)
    assert buf.partial_length == partial
    assert sum(len(line) + 1 for line in drain(buf)) == fed - read - partial
    assert buf.buffered == partial


def test_interleaved_feeds_and_reads_keep_order() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"1\n2\n3\n")
    assert buf.next_line() == b"1"
    assert buf.buffered == 4
    buf.feed(b"4\n5")
    assert buf.buffered == 7
    assert drain(buf) == [b"2", b"3", b"4"]
    assert buf.buffered == 1
    buf.feed(b"\n")
    assert drain(buf) == [b"5"]
    assert buf.buffered == 0


def test_eof_flag_is_set_by_the_owner() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"QUIT\r\n")
    buf.eof = True
    assert buf.next_line() == b"QUIT\r"
    assert buf.next_line() is None
    assert buf.eof


def test_clear_discards_everything() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"STLS\r\nCAPA\r\nUSER x")
    assert buf.next_line() == b"STLS\r"
    buf.clear()
    assert buf.next_line() is None
    assert buf.partial_length == 0
    assert buf.buffered == 0
    buf.feed(b"CAPA\r\n")
    assert drain(buf) == [b"CAPA\r"]


def test_skipping_an_overlong_line() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"NOOP\nabc")
    assert buf.next_line() == b"NOOP"
    assert buf.partial_line
    buf.skip_partial()
    assert buf.skipping
    assert buf.partial_line
    assert (buf.skipped, buf.partial_length, buf.buffered) == (3, 0, 0)
    buf.feed(b"defg")
    assert buf.skipped == 7
    assert buf.next_line() is None
    buf.feed(b"\r\n")  # the line ends exactly at the end of a feed
    assert not buf.skipping
    assert not buf.partial_line
    assert buf.skipped == 0
    assert buf.next_line() is OVERLONG
    assert buf.next_line() is None
    assert buf.buffered == 0


def test_skipping_ends_inside_a_feed() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"x" * 10)
    buf.skip_partial()
    buf.feed(b"yy\nSTAT\nLI")
    assert [buf.next_line(), buf.next_line(), buf.next_line()] == [OVERLONG, b"STAT", None]
    assert buf.partial_length == 2
    assert buf.buffered == 2
    assert buf.partial_line


def test_clear_stops_skipping() -> None:
    buf = ReceiveBuffer()
    buf.feed(b"x")
    buf.skip_partial()
    buf.clear()
    assert not buf.skipping
    assert buf.skipped == 0
    buf.feed(b"CAPA\n")
    assert buf.next_line() == b"CAPA"
