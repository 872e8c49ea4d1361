"""Property tests of the streaming writers against the line-at-a-time oracles.

For any message bytes and any chunking:

* ``unstuff(DotStuffer output + end())`` is the CRLF-normalised message (plus
  a final line end when it had none), and its length is ``wire_size`` and
  what a ``WireSizer`` fed the same chunks says;
* ``TopLimiter(n)`` passes exactly the header, the blank line and at most n
  body lines: the same bytes as a simple line-based TOP, however the
  message is cut, and nothing once ``done``.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pop3_oracles import draw_chunks, messages, normalise, top_raw, top_wire, unstuff

from pop3proto import wire_size
from pop3proto._writers import DotStuffer, TopLimiter, WireSizer


def _stuff(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(chunk) for chunk in chunks) + stuffer.end()


@given(st.data(), messages())
def test_stuffing_round_trips(data: st.DataObject, message: bytes) -> None:
    chunks = draw_chunks(data.draw, message)
    wire = _stuff(chunks)
    assert unstuff(wire) == normalise(message)
    # The chunking never changes a byte of the output.
    assert wire == _stuff([message])


@given(st.data(), messages())
def test_sizes_agree(data: st.DataObject, message: bytes) -> None:
    chunks = draw_chunks(data.draw, message)
    sizer = WireSizer()
    for chunk in chunks:
        sizer.feed(chunk)
    expected = len(unstuff(_stuff(chunks)))
    assert expected == len(normalise(message))
    assert wire_size(message) == expected
    assert sizer.total() == expected


@given(st.data(), messages(), st.integers(0, 12))
def test_top_limiter_matches_line_reference(
    data: st.DataObject, message: bytes, lines: int
) -> None:
    chunks = draw_chunks(data.draw, message)
    limiter = TopLimiter(lines)
    kept = []
    done_at = None
    for i, chunk in enumerate(chunks):
        if limiter.done:
            done_at = i if done_at is None else done_at
            assert limiter.feed(chunk) == b"", "bytes passed after done"
            continue
        part = limiter.feed(chunk)
        assert chunk.startswith(part)
        kept.append(part)
    expected, cut_short = top_raw(message, lines)
    assert b"".join(kept) == expected
    assert limiter.done == cut_short


@given(st.data(), messages(), st.integers(0, 12))
def test_top_output_on_the_wire(data: st.DataObject, message: bytes, lines: int) -> None:
    """TopLimiter + DotStuffer, as the core chains them: header, blank line, <= n lines."""
    chunks = draw_chunks(data.draw, message)
    limiter = TopLimiter(lines)
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(limiter.feed(chunk)) for chunk in chunks) + stuffer.end()
    body = unstuff(wire)
    assert body == top_wire(message, lines)
    # Directly from the definition: the header is every line before the first
    # blank one; after the blank line, at most `lines` lines follow.
    text = normalise(message)
    if b"\r\n\r\n" in b"\r\n" + text:
        header, _, rest = (b"\r\n" + text).partition(b"\r\n\r\n")
        header = header[2:]
        assert body.startswith(header + b"\r\n\r\n" if header else b"\r\n")
        body_lines = body[len(header) + 4 if header else 2 :].count(b"\r\n")
        assert body_lines == min(lines, rest.count(b"\r\n"))
    else:
        assert body == text  # no blank line: it is all header
