"""Argument parsers, and every command line read whole, byte by byte and with trailing data."""

from __future__ import annotations

import pytest
import replies as R
from helpers import cfg, feed, feed_bytewise, greeted, logged_in, next_events

from pop3proto import (
    ApopLogin,
    AuthStart,
    Connection,
    Err,
    Event,
    Login,
    RetrieveMessage,
    TopOfMessage,
)
from pop3proto._readers import decode_base64, parse_number, parse_username

W = R.wire

# ------------------------------------------------------------ parse_number


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        (b"1", 1),
        (b"01", 1),
        (b"0", 0),
        (b"000", 0),
        (b"42", 42),
        (b"999999999999", 999_999_999_999),
        (b"0000000000001", 1),
        (b"0" * 5000 + b"7", 7),
        (b"1000000000000", 1_000_000_000_000),
        (b"9" * 5000, 1_000_000_000_000),
        (b"", None),
        (b"-1", None),
        (b"+1", None),
        (b" 1", None),
        (b"1 ", None),
        (b"1.0", None),
        (b"0x1", None),
        (b"1e3", None),
        (b"1_000", None),
        ("\u0661".encode(), None),  # ARABIC-INDIC DIGIT ONE
        ("\uff11".encode(), None),  # FULLWIDTH DIGIT ONE
        ("\u00b2".encode(), None),  # SUPERSCRIPT TWO
        (b"\x00", None),
    ],
)
def test_parse_number(arg: bytes, value: int | None) -> None:
    assert parse_number(arg) == value


# ------------------------------------------------------------ decode_base64


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        (b"", b""),
        (b"Zm9v", b"foo"),
        (b"Zm8=", b"fo"),
        (b"Zg==", b"f"),
        (b"AGEAYg==", b"\0a\0b"),
        (b"Zg", None),
        (b"Zm9", None),
        (b"Zm 9", None),
        (b"Zm9v\n", None),
        (b"Zg=a", None),
        (b"====", None),
        (b"Zm9-", None),
        (b"Zm9\xff", None),
        (b"=", None),
    ],
)
def test_decode_base64(arg: bytes, value: bytes | None) -> None:
    assert decode_base64(arg) == value


# ------------------------------------------------------------ parse_username


@pytest.mark.parametrize(
    ("arg", "utf8", "value"),
    [
        (b"mrose", False, "mrose"),
        (b"mrose@example.org", False, "mrose@example.org"),
        (b"a~!#$%^&*()", False, "a~!#$%^&*()"),
        (b"", False, None),
        (b"", True, None),
        (b"a\x00b", True, None),
        (b"a\x1fb", False, None),
        (b"a\x7fb", False, None),
        ("mrösé".encode(), False, None),
        ("mrösé".encode(), True, "mrösé"),
        ("mrose\u0301".encode(), True, "mrosé"),
        ("\uff4d\uff52\uff4f\uff53\uff45".encode(), True, "mrose"),  # fullwidth
        ("\ufb01".encode(), True, "fi"),  # LATIN SMALL LIGATURE FI
        ("a\u0080b".encode(), True, None),
        ("a\u009fb".encode(), True, None),
        ("a\u00a0b".encode(), True, "a b"),
        (b"\xc3", True, None),
        (b"\xed\xa0\x80", True, None),
    ],
)
def test_parse_username(arg: bytes, utf8: bool, value: str | None) -> None:
    assert parse_username(arg, utf8) == value


# ------------------------------------------------------------ command lines, three ways

# (setup lines, command line, events, reply bytes once each event is refused)
AUTHORIZATION_LINES: list[tuple[bytes, bytes, list[Event], bytes]] = [
    (b"", b"USER mrose\r\n", [], W(R.OK)),
    (b"", b"user mrose\n", [], W(R.OK)),
    (b"", b"CAPA\r\n", [], W(*R.capa("USER", "SASL PLAIN LOGIN", "UTF8 USER", "LANG"))),
    (b"", b"UTF8\r\n", [], W(R.UTF8_ENABLED)),
    (b"", b"AUTH\r\n", [], W(R.OK, "PLAIN", "LOGIN", R.END)),
    (
        b"",
        b"AUTH LOGIN\r\n",
        [AuthStart(mechanism="LOGIN", initial_response=None)],
        W(R.BAD_CREDENTIALS),
    ),
    (
        b"",
        b"AUTH PLAIN =\r\n",
        [AuthStart(mechanism="PLAIN", initial_response=b"")],
        W(R.BAD_CREDENTIALS),
    ),
    (
        b"USER mrose\r\n",
        b"PASS a b\r\n",
        [Login(username="mrose", password="a b")],
        W(R.BAD_CREDENTIALS),
    ),
    (
        b"",
        f"APOP mrose {R.RFC_DIGEST}\r\n".encode(),
        [ApopLogin(username="mrose", digest=R.RFC_DIGEST)],
        W(R.BAD_CREDENTIALS),
    ),
    (b"", b"STAT\r\n", [], W(R.WRONG_STATE)),
    (b"", b"XYZZY\r\n", [], W(R.UNKNOWN)),
    (b"", b"PASS x\r\n", [], W(R.NO_USERNAME)),
]

TRANSACTION_LINES: list[tuple[bytes, bytes, list[Event], bytes]] = [
    (b"", b"STAT\r\n", [], W(R.STAT_2)),
    (b"", b"LIST\r\n", [], W(R.LIST_2, "1 120", "2 200", R.END)),
    (b"", b"LIST 2\r\n", [], W("+OK 2 200")),
    (b"", b"LIST  2 \r\n", [], W("+OK 2 200")),
    (b"", b"UIDL\r\n", [], W(R.OK, "1 uid-1", "2 uid-2", R.END)),
    (b"", b"UIDL 1\n", [], W("+OK 1 uid-1")),
    (b"", b"DELE 1\r\n", [], W(R.DELETED)),
    (b"DELE 1\r\n", b"RSET\r\n", [], W(R.RSET_2)),
    (b"", b"NOOP\r\n", [], W(R.OK)),
    (b"", b"CAPA\r\n", [], W(*R.capa("LANG"))),
    (b"", b"RETR 2\r\n", [RetrieveMessage(number=2, key="m2", size=200)], W(R.MESSAGE_UNAVAILABLE)),
    (b"", b"TOP 1 5\r\n", [TopOfMessage(number=1, key="m1", lines=5)], W(R.MESSAGE_UNAVAILABLE)),
    (b"", b"UTF8\r\n", [], W(R.WRONG_STATE)),
]

NO_IMPL = cfg(implementation=None, apop=True)


def setup(phase: str, lines: bytes) -> Connection:
    conn = logged_in(NO_IMPL) if phase == "transaction" else greeted(NO_IMPL, apop=True)
    if lines:
        assert feed(conn, lines) == []
        conn.data_to_send()
    return conn


def answer(conn: Connection, events: list[Event]) -> None:
    """Refuse each event: Err(code="AUTH") for logins, Err() for messages."""
    for event in events:
        conn.send(Err() if isinstance(event, (RetrieveMessage, TopOfMessage)) else Err(code="AUTH"))


CASES = [("authorization", *case) for case in AUTHORIZATION_LINES] + [
    ("transaction", *case) for case in TRANSACTION_LINES
]


@pytest.mark.parametrize(("phase", "before", "line", "events", "reply"), CASES)
def test_command_whole(
    phase: str, before: bytes, line: bytes, events: list[Event], reply: bytes
) -> None:
    conn = setup(phase, before)
    assert feed(conn, line) == events
    answer(conn, events)
    assert conn.data_to_send() == reply


@pytest.mark.parametrize(("phase", "before", "line", "events", "reply"), CASES)
def test_command_bytewise(
    phase: str, before: bytes, line: bytes, events: list[Event], reply: bytes
) -> None:
    conn = setup(phase, before)
    assert feed_bytewise(conn, line[:-1]) == []
    assert conn.data_to_send() == b""
    assert feed(conn, line[-1:]) == events
    answer(conn, events)
    assert conn.data_to_send() == reply


@pytest.mark.parametrize(("phase", "before", "line", "events", "reply"), CASES)
def test_command_with_trailing_data(
    phase: str, before: bytes, line: bytes, events: list[Event], reply: bytes
) -> None:
    conn = setup(phase, before)
    # A command valid in the phase, then the start of another one.
    other, then = (b"NOOP", W(R.OK)) if phase == "transaction" else (b"UTF8", W(R.UTF8_ENABLED))
    assert feed(conn, line + other + b"\r\n" + other[:2]) == events
    answer(conn, events)
    assert next_events(conn) == []
    assert conn.data_to_send() == reply + then
    assert feed(conn, other[2:] + b"\r\n") == []
    assert conn.data_to_send() == then
