"""The event lines, the JSON-lines formatter and the journal encoder, on synthetic records."""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pop3proto.ops import logfmt

LOGIN = {"event": "login", "session": "4242-17", "pid": 4242, "rip": "127.0.0.1",
         "rport": 40000, "user": "alice", "method": "PLAIN", "tls": True}
FAILED = {"event": "login_failed", "session": "4242-18", "pid": 4242, "rip": "203.0.113.5",
          "rport": 40000, "user": "alice", "method": "USER", "tls": False,
          "reason": "password mismatch", "delay": 2.0}
GONE = {"event": "disconnect", "session": "4242-18", "pid": 4242, "rip": "203.0.113.5",
        "rport": 40000, "user": "alice", "tls": False, "reason": "auth failed, 3 attempts"}
LOGOUT = {"event": "logout", "session": "4242-17", "pid": 4242, "rip": "127.0.0.1",
          "rport": 40000, "user": "alice", "tls": False, "top": [0, 0], "retr": [1, 218],
          "del": [0, 1], "size": 218, "in": 52, "out": 312, "commands": 4, "duration": 0.25}


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("pop3proto.test-ops")
    saved = log.handlers[:], log.propagate, log.level
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    log.handlers[:], log.propagate, log.level = saved[0], saved[1], saved[2]


def emit(log: logging.Logger, handler: logging.Handler, fields: dict[str, Any]) -> None:
    log.handlers[:] = [handler]
    log.info("%s", logfmt.event_message(fields), extra={"pop3": fields})


def test_event_lines_read_like_dovecot() -> None:
    assert logfmt.event_message(LOGIN) == (
        "Login: user=<alice>, method=PLAIN, rip=127.0.0.1, rport=40000, secured, "
        "session=<4242-17>")
    assert logfmt.event_message(FAILED) == (
        "Login failed (password mismatch): user=<alice>, method=USER, rip=203.0.113.5, "
        "rport=40000, session=<4242-18>")
    assert logfmt.event_message(GONE) == (
        "Disconnected (auth failed, 3 attempts): user=<alice>, rip=203.0.113.5, rport=40000, "
        "session=<4242-18>")
    assert logfmt.event_message(LOGOUT) == (
        "Logged out: user=<alice>, top=0/0, retr=1/218, del=0/1, size=218, in=52, out=312, "
        "rip=127.0.0.1, rport=40000, session=<4242-17>")


def test_user_names_cannot_forge_fields() -> None:
    line = logfmt.event_message({**FAILED, "user": "x>, rip=6.6.6.6\n\\<"})
    assert "user=<x\\x3e, rip=6.6.6.6\\x0a\\x5c\\x3c>, method=USER, rip=203.0.113.5," in line
    assert logfmt.escape_user(None) == "<>"
    assert logfmt.event_message({**GONE, "user": None}).startswith(
        "Disconnected (auth failed, 3 attempts): user=<>, rip=")


def test_json_lines_carry_every_field_at_the_top_level(logger: logging.Logger) -> None:
    out = io.StringIO()
    handler, warning = logfmt.make_handler("json", "stderr", stream=out)
    assert warning is None
    emit(logger, handler, LOGOUT)
    emit(logger, handler, {**FAILED, "user": 'eve"\n'})
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["time"].endswith("+00:00")
    assert first["time"][10] == "T"
    assert first["level"] == "INFO"
    assert first["logger"] == "pop3proto.test-ops"
    assert first["message"].startswith("Logged out: user=<alice>, top=0/0, retr=1/218")
    for key, value in LOGOUT.items():
        assert first[key] == value
    assert second["user"] == 'eve"\n'
    assert second["delay"] == 2.0


def test_text_format_has_level_logger_and_pid(logger: logging.Logger) -> None:
    out = io.StringIO()
    handler, _ = logfmt.make_handler("text", "stderr", stream=out)
    emit(logger, handler, FAILED)
    line = out.getvalue().rstrip("\n")
    assert " INFO pop3proto.test-ops[" in line
    assert line.endswith("]: " + logfmt.event_message(FAILED))


def _decode_journal(data: bytes) -> dict[str, str]:
    fields = {}
    while data:
        head, sep, rest = data.partition(b"\n")
        assert sep
        if b"=" in head:
            key, _, value = head.partition(b"=")
            data = rest
        else:
            key = head
            (size,) = struct.unpack("<Q", rest[:8])
            value = rest[8:8 + size]
            assert rest[8 + size:9 + size] == b"\n"
            data = rest[9 + size:]
        fields[key.decode()] = value.decode()
    return fields


def test_journal_entries_over_the_native_socket(logger: logging.Logger, tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as journal:
        journal.bind(path)
        journal.settimeout(5)
        handler, warning = logfmt.make_handler("text", "journal", journal_socket=path)
        assert warning is None
        try:
            emit(logger, handler, LOGOUT)
            logger.warning("two\nlines")
        finally:
            handler.close()
        entry = _decode_journal(journal.recv(65536))
        plain = _decode_journal(journal.recv(65536))
    assert entry["MESSAGE"] == logfmt.event_message(LOGOUT)
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "pop3proto"
    assert entry["SYSLOG_FACILITY"] == "2"
    assert entry["POP3_EVENT"] == "logout"
    assert entry["POP3_RETR"] == "1/218"
    assert entry["POP3_DEL"] == "0/1"
    assert entry["POP3_IN"] == "52"
    assert entry["POP3_TLS"] == "false"
    assert entry["POP3_SESSION"] == "4242-17"
    assert plain["MESSAGE"] == "two\nlines"
    assert plain["PRIORITY"] == "4"
    assert not any(k.startswith("POP3_") for k in plain)


def test_encoder_bounds_each_field() -> None:
    data = logfmt.encode_journal([("MESSAGE", "x" * (logfmt.MAX_JOURNAL_FIELD + 10))])
    assert data == b"MESSAGE=" + b"x" * logfmt.MAX_JOURNAL_FIELD + b"\n"


@pytest.mark.parametrize("target", ["syslog", "journal"])
def test_a_missing_socket_falls_back_to_stderr_with_a_warning(
    target: str, tmp_path: Path
) -> None:
    missing = str(tmp_path / "none")
    handler, warning = logfmt.make_handler("text", target, syslog_address=missing,
                                           journal_socket=missing)
    assert isinstance(handler, logging.StreamHandler)
    assert warning is not None
    assert missing in warning
    assert target in warning
