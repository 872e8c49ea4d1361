"""Status lines, the streaming dot-stuffer, the wire-size rule and TOP's line limit.

Every encoder is checked against obviously-correct whole-message oracles
(``helpers.crlf``/``unstuff``/``top_oracle``) at every chunk split.
"""

from __future__ import annotations

import itertools

import pytest
from helpers import MSG1, MSG2, crlf, top_oracle, unstuff
from hypothesis import given
from hypothesis import strategies as st

from pop3proto import wire_size
from pop3proto._writers import DotStuffer, TopLimiter, WireSizer, status_line

# ------------------------------------------------------------ status lines


@pytest.mark.parametrize(
    ("ok", "text", "code", "line"),
    [
        (True, "", None, b"+OK\r\n"),
        (True, "2 320", None, b"+OK 2 320\r\n"),
        (False, "", None, b"-ERR\r\n"),
        (False, "no such message", None, b"-ERR no such message\r\n"),
        (False, "maildrop locked", "IN-USE", b"-ERR [IN-USE] maildrop locked\r\n"),
        (False, "", "SYS/TEMP", b"-ERR [SYS/TEMP]\r\n"),
        (True, "bienvenue, élève", None, "+OK bienvenue, élève\r\n".encode()),
    ],
)
def test_status_line(ok: bool, text: str, code: str | None, line: bytes) -> None:
    assert status_line(ok, text, code) == line


# ------------------------------------------------------------ oracles and samples


def reference_block(message: bytes) -> bytes:
    """The multi-line block for *message*, built line by line (RFC 1939 section 3)."""
    text = crlf(message)
    lines = text.split(b"\r\n")[:-1] if text else []
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


SAMPLES = [
    b"",
    b"a",
    b".",
    b"..",
    b"...",
    b".\r",
    b".\n",
    b".\r\n",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\r",
    b"\n\r",
    b"\r\r\n",
    b"\n\n",
    b"\r\n\r\n",
    b".\n.\n",
    b"\n.",
    b"\r\n.",
    b"\r\n.\r\n",
    b"a\rb",
    b"a\r.b\n",
    b"a\r\n.b",
    b"x\r\n..\r\n.\r\n.y",
    b"no final newline",
    b"mixed\r\nlf\nends\r\n",
    b"Subject: x\n\n.body\n..\n.\nlast",
    MSG1,
    MSG2,
]


def stuff(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.end()


def splits(data: bytes, pieces: int) -> list[list[bytes]]:
    """Every way to cut *data* into *pieces* consecutive (possibly empty) chunks."""
    out = []
    for cuts in itertools.combinations_with_replacement(range(len(data) + 1), pieces - 1):
        bounds = [0, *cuts, len(data)]
        out.append([data[a:b] for a, b in itertools.pairwise(bounds)])
    return out


# ------------------------------------------------------------ DotStuffer


@pytest.mark.parametrize("message", SAMPLES)
def test_dot_stuffer_whole(message: bytes) -> None:
    block = stuff([message])
    assert block == reference_block(message)
    assert unstuff(block) == crlf(message)
    assert len(unstuff(block)) == wire_size(message)


@pytest.mark.parametrize("message", [m for m in SAMPLES if len(m) <= 40])
def test_dot_stuffer_every_split(message: bytes) -> None:
    expected = reference_block(message)
    for chunks in splits(message, 2) + splits(message, 3):
        assert stuff(chunks) == expected, chunks
    assert stuff([message[i : i + 1] for i in range(len(message))]) == expected


@pytest.mark.parametrize("message", [MSG1, MSG2])
def test_dot_stuffer_every_split_long(message: bytes) -> None:
    expected = reference_block(message)
    for chunks in splits(message, 2):
        assert stuff(chunks) == expected


# Drawn as text and encoded: hypothesis's internal caches compare drawn bytes
# with ints, which ``python -bb`` turns into an error.
@given(st.text(alphabet="\r\n.x", max_size=60).map(str.encode), st.data())
def test_dot_stuffer_random(message: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(message)), max_size=6)))
    bounds = [0, *cuts, len(message)]
    chunks = [message[a:b] for a, b in itertools.pairwise(bounds)]
    block = stuff(chunks)
    assert block == reference_block(message)
    assert len(unstuff(block)) == wire_size(message)


def test_dot_stuffer_empty_chunks_change_nothing() -> None:
    stuffer = DotStuffer()
    assert stuffer.feed(b"") == b""
    assert stuffer.feed(b"a\r") == b"a\r"
    assert stuffer.feed(b"") == b""
    assert stuffer.feed(b"\n") == b"\n"
    assert stuffer.feed(b"") == b""
    assert stuffer.feed(b".") == b".."
    assert stuffer.end() == b"\r\n.\r\n"


def test_dot_stuffer_is_reusable_after_end() -> None:
    stuffer = DotStuffer()
    assert stuffer.feed(b"a\r") + stuffer.end() == b"a\r\n.\r\n"
    assert stuffer.feed(b".b") + stuffer.end() == b"..b\r\n.\r\n"
    assert stuffer.end() == b"\r\n.\r\n"  # nothing fed: the empty message


@pytest.mark.parametrize(
    ("chunks", "tail"),
    [
        ([], b"\r\n.\r\n"),  # the empty message is one empty line
        ([b""], b"\r\n.\r\n"),
        ([b"a\r\n"], b".\r\n"),
        ([b"a\n"], b".\r\n"),
        ([b"a"], b"\r\n.\r\n"),
        ([b"a\r"], b"\n.\r\n"),
        ([b"a\r", b"\n"], b".\r\n"),
        ([b"a\r\r"], b"\n.\r\n"),
    ],
)
def test_dot_stuffer_terminator(chunks: list[bytes], tail: bytes) -> None:
    stuffer = DotStuffer()
    for chunk in chunks:
        stuffer.feed(chunk)
    assert stuffer.end() == tail


# ------------------------------------------------------------ wire size


@pytest.mark.parametrize(
    ("message", "size"),
    [
        (b"", 2),  # sent as one empty line
        (b"a", 3),
        (b"a\n", 3),
        (b"a\r\n", 3),
        (b"\r", 2),
        (b"a\r", 3),
        (b"\n\n", 4),
        (b"\r\n\r\n", 4),
        (b"a\rb", 5),
        (b"a\r\rb\n", 6),
        (b".\r\n", 3),
        (MSG1, 120),
        (MSG2, 200),
    ],
)
def test_wire_size(message: bytes, size: int) -> None:
    assert wire_size(message) == size


@pytest.mark.parametrize("message", SAMPLES)
def test_wire_sizer_every_split(message: bytes) -> None:
    chunkings = splits(message, 2) + (splits(message, 3) if len(message) <= 40 else [])
    for chunks in chunkings:
        sizer = WireSizer()
        for chunk in chunks:
            sizer.feed(chunk)
        assert sizer.total() == wire_size(message) == len(crlf(message)), chunks


def test_wire_sizer_total_so_far() -> None:
    sizer = WireSizer()
    assert sizer.total() == 2  # nothing yet: the empty message, one empty line
    sizer.feed(b"ab")
    assert sizer.total() == 4
    sizer.feed(b"\r")
    assert sizer.total() == 4
    sizer.feed(b"")
    sizer.feed(b"\ncd\n")
    assert sizer.total() == 8


# ------------------------------------------------------------ TOP


TOP_SAMPLES = [
    *SAMPLES,
    b"H: 1\r\nH: 2\r\n\r\n1\r\n2\r\n3\r\n",
    b"H: 1\nH: 2\n\n1\n2\n3",
    b"H: 1\r\n\r\n\r\n\r\n.\r\n",
    b"H: x\r\r\nH: y\r\n\r\nbody\r\n",
    b"\r\nbody first\r\n",
    b"H: 1\r\nno blank line",
]


def top(chunks: list[bytes], lines: int) -> bytes:
    limiter = TopLimiter(lines)
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(limiter.feed(c)) for c in chunks) + stuffer.end()


@pytest.mark.parametrize("lines", [0, 1, 2, 3, 1000])
@pytest.mark.parametrize("message", [m for m in TOP_SAMPLES if len(m) <= 40])
def test_top_limiter_every_split(message: bytes, lines: int) -> None:
    expected = top([message], lines)
    assert unstuff(expected) == top_oracle(message, lines)
    for chunks in splits(message, 2) + splits(message, 3):
        assert top(chunks, lines) == expected, chunks


@pytest.mark.parametrize("lines", [0, 1, 2])
@pytest.mark.parametrize("message", [MSG1, MSG2])
def test_top_limiter_every_split_long(message: bytes, lines: int) -> None:
    expected = top([message], lines)
    assert unstuff(expected) == top_oracle(message, lines)
    for chunks in splits(message, 2):
        assert top(chunks, lines) == expected


def test_top_limiter_done() -> None:
    limiter = TopLimiter(1)
    assert not limiter.done
    assert limiter.feed(b"H: 1\r\n") == b"H: 1\r\n"
    assert limiter.feed(b"") == b""
    assert limiter.feed(b"\r\nbody 1\r") == b"\r\nbody 1\r"
    assert not limiter.done
    assert limiter.feed(b"\nbody 2\r\n") == b"\n"
    assert limiter.done
    assert limiter.feed(b"more\r\n") == b""


def test_top_limiter_zero_lines_stops_at_the_blank_line() -> None:
    limiter = TopLimiter(0)
    assert limiter.feed(b"H: 1\n\nbody\n") == b"H: 1\n\n"
    assert limiter.done


def test_top_limiter_without_blank_line_never_finishes() -> None:
    limiter = TopLimiter(0)
    assert limiter.feed(b"H: 1\r\nH: 2\r\n") == b"H: 1\r\nH: 2\r\n"
    assert limiter.feed(b"H: 3") == b"H: 3"
    assert not limiter.done
