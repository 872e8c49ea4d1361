"""6. Message-number parsing: only plain ASCII decimals name a message, and only their own.

Every message's body names it (``X-Number: n``), so a RETR that answers
with the wrong message is caught.  After each odd argument the session must
go on (NOOP answers +OK) and the reply must be the documented one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from clients import Raw, running

from pop3proto._writers import wire_size
from pop3proto.server import Server

from .conftest import Mail, body, logged_in

COUNT = 5  # messages per maildrop (conftest.make_mail)

INVALID = b"-ERR Invalid message number."
NO_SUCH = b"-ERR No such message."
SYNTAX = b"-ERR Syntax error."
BAD_COUNT = b"-ERR Invalid line count."

ARGS: list[tuple[bytes, bytes | int]] = [
    # (argument, the reply's first line, or the message number it must select)
    (b"1", 1),
    (b"01", 1),
    (b"0005", 5),
    (b"000000000000000000000000000000001", 1),
    (b"0", NO_SUCH),
    (b"00", NO_SUCH),
    (b"6", NO_SUCH),
    (b"-1", INVALID),
    (b"+1", INVALID),
    (b"-0", INVALID),
    (b"1.0", INVALID),
    (b"1e0", INVALID),
    (b"0x1", INVALID),
    (b"0b1", INVALID),
    (b"1_0", INVALID),
    (b"4294967297", NO_SUCH),  # 2**32 + 1: a 32-bit wrap would give 1
    (b"18446744073709551617", NO_SUCH),  # 2**64 + 1
    (b"18446744073709551621", NO_SUCH),  # 2**64 + 5
    (b"9" * 200, NO_SUCH),
    ("\u0661".encode(), INVALID),  # ARABIC-INDIC DIGIT ONE: int() would take it
    ("\uff11".encode(), INVALID),  # FULLWIDTH DIGIT ONE
    ("¹".encode(), INVALID),  # SUPERSCRIPT ONE
    ("\U0001d7cf".encode(), INVALID),  # MATHEMATICAL BOLD DIGIT ONE
    (b"\xd9", INVALID),  # half of a UTF-8 sequence
    (b"1\xc2\xa0", INVALID),  # NBSP is no separator
    (b"one", INVALID),
    (b"*", INVALID),
]
ARG_IDS = [repr(a)[2:-1][:24] for a, _ in ARGS]


@pytest.fixture
def served(transport: str, mail: Mail) -> Iterator[Server]:
    with running(transport, **mail.options(auth_failure_delay=0)) as server:
        yield server


@pytest.fixture
def client(served: Server, mail: Mail) -> Iterator[Raw]:
    with logged_in(served.cget("port"), "alice", mail.users["alice"]) as c:
        yield c


def number_of(block: bytes) -> int:
    m = re.search(rb"X-Number: (\d+)", block)
    assert m is not None, block[:200]
    return int(m.group(1))


def still_going(c: Raw) -> None:
    assert c.cmd("NOOP") == b"+OK"


@pytest.mark.parametrize(("arg", "want"), ARGS, ids=ARG_IDS)
def test_retr_list_top_dele_uidl_agree_on_every_argument(
    client: Raw, arg: bytes, want: bytes | int
) -> None:
    c = client
    status = c.cmd(b"RETR " + arg)
    if isinstance(want, int):
        assert status == b"+OK %d octets" % wire_size(body(want))
        assert number_of(c.block()) == want
    else:
        assert status == want
    still_going(c)
    status = c.cmd(b"LIST " + arg)
    assert status == (b"+OK %d %d" % (want, wire_size(body(want))) if isinstance(want, int)
                      else want)  # fmt: skip
    status = c.cmd(b"UIDL " + arg)
    assert status.startswith(b"+OK %d " % want) if isinstance(want, int) else status == want
    status = c.cmd(b"TOP " + arg + b" 0")
    if isinstance(want, int):
        assert status.startswith(b"+OK")
        assert number_of(c.block()) == want
    else:
        assert status == want
    still_going(c)
    # TOP's line count goes through the same parser.
    status = c.cmd(b"TOP 1 " + arg)
    if arg.isdigit():  # any ASCII decimal is a line count, however large
        assert status.startswith(b"+OK")
        assert number_of(c.block()) == 1
    else:
        assert status == BAD_COUNT
    still_going(c)
    status = c.cmd(b"DELE " + arg)
    if isinstance(want, int):
        assert status.startswith(b"+OK")
        assert c.cmd("STAT").startswith(b"+OK %d " % (COUNT - 1))
        assert c.cmd(b"RETR " + arg) == b"-ERR Message is deleted."
        assert c.cmd("RSET").startswith(b"+OK")
    else:
        assert status == want
        assert c.cmd("STAT").startswith(b"+OK %d " % COUNT)
    still_going(c)


@pytest.mark.parametrize(
    ("line", "want"),
    [
        (b"LIST 1 2", SYNTAX),
        (b"RETR 1 2", SYNTAX),
        (b"RETR", SYNTAX),
        (b"TOP 1", SYNTAX),
        (b"TOP", SYNTAX),
        (b"TOP 1 2 3", SYNTAX),
        (b"TOP 1 -1", BAD_COUNT),
        (b"TOP 1 +1", BAD_COUNT),
        (b"TOP 1 1.5", BAD_COUNT),
        (b"TOP 1 0x10", BAD_COUNT),
        ("TOP 1 \u0661".encode(), BAD_COUNT),
        (b"DELE", SYNTAX),
        (b"DELE 1 1", SYNTAX),
        (b"STAT 1", SYNTAX),
        (b"NOOP 1", SYNTAX),
    ],
    ids=lambda v: repr(v)[2:-1] if isinstance(v, bytes) else "",
)
def test_wrong_argument_counts_get_the_documented_err(
    client: Raw, line: bytes, want: bytes
) -> None:
    assert client.cmd(line) == want
    still_going(client)
    assert client.cmd("STAT").startswith(b"+OK %d " % COUNT)


def test_top_with_a_huge_line_count_sends_the_whole_message(client: Raw) -> None:
    for count in (b"99999999999999999999999", b"18446744073709551616", b"4294967296"):
        assert client.cmd(b"TOP 2 " + count).startswith(b"+OK")
        assert client.block() == body(2).replace(b"\n", b"\r\n")


def test_a_storm_of_bad_numbers_ends_the_session_only_through_the_bad_command_limit(
    client: Raw,
) -> None:
    """Wrong numbers are not bad commands (the syntax is right); wrong counts are."""
    for _ in range(50):
        assert client.cmd("RETR 0x1") == INVALID
    for _ in range(19):
        assert client.cmd("LIST 1 2") == SYNTAX
    assert client.cmd("LIST 1 2").startswith(b"-ERR")  # the 20th in a row
    assert client.closed(5) == b""
