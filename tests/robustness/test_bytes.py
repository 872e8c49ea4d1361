"""7. Bytes: NUL, 8-bit, bare CR and invalid UTF-8 get -ERR, never a crash; bodies arrive exact.

The hostile-input tests run the server as a subprocess so that its stderr
can be searched for tracebacks; a seeded barrage of random bytes in random
splits checks that every reply is a well-formed status line and that the
server keeps serving others.  Message bodies with dot lines, bare CRs and
no final newline are compared byte for byte, un-stuffed by our own code
and by poplib.
"""

from __future__ import annotations

import base64
import contextlib
import poplib
import random
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import HOST, Raw, running

from pop3proto.server import Server

from .conftest import Figure, Mail, ServerProc, logged_in, make_mail

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}


@pytest.fixture
def proc(transport: str, mail: Mail) -> Iterator[ServerProc]:
    server = ServerProc(transport, mail, "--auth-failure-delay", "0")
    try:
        yield server
    finally:
        server.stop()
        assert server.tracebacks() == [], "\n".join(server.proc.stderr)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


STATUS = re.compile(rb"(\+OK|-ERR|\+ )")


@pytest.mark.parametrize("logged", [False, True], ids=["before-login", "after-login"])
def test_nul_in_a_command_gets_err_and_close_and_the_maildrop_is_released(
    proc: ServerProc, mail: Mail, logged: bool
) -> None:
    for line in (b"NOOP\x00\r\n", b"USER al\x00ice\r\n", b"\x00\r\n", b"STAT \x00\r\n"):
        with logged_in(proc.port, "alice", USERS["alice"]) if logged else Raw(proc.port) as c:
            c.send(line)
            assert c.line() == b"-ERR NUL in command."
            assert c.closed(5) == b""
    with logged_in(proc.port, "alice", USERS["alice"]) as c:  # not left locked
        assert c.cmd("QUIT").startswith(b"+OK")


HOSTILE_LINES = [
    # (line, the reply it must get)
    (b"USER \xe9l\xe8ve", b"-ERR Non-ASCII user name needs the UTF8 command first."),
    (b"USER \xff\xfe", b"-ERR Non-ASCII user name needs the UTF8 command first."),
    (b"\xff\xfe\xfd", b"-ERR Unknown command."),
    (b"N\xc3\x96OP", b"-ERR Unknown command."),
    (b"NOOP\r", b"-ERR Unknown command."),  # bare CR before the CRLF
    (b"USER alice\rPASS x", b"-ERR Syntax error."),  # bare CR inside
    (b"USER a\x01b", b"-ERR Invalid user name."),
    (b"USER a\x1bb", b"-ERR Invalid user name."),
    (b"USER a\x7fb", b"-ERR Invalid user name."),
]


def test_8bit_bare_cr_and_controls_before_login(proc: ServerProc) -> None:
    for line, want in HOSTILE_LINES:
        with Raw(proc.port) as c:
            assert c.cmd(line) == want, line
            assert c.cmd("CAPA").startswith(b"+OK")  # the session goes on
            c.block()


def test_invalid_utf8_after_the_utf8_command(proc: ServerProc) -> None:
    with Raw(proc.port) as c:
        assert c.cmd("UTF8").startswith(b"+OK")
        for name in (b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"a\xc2\x85b", b"\xc0\xaf"):
            reply = c.cmd(b"USER " + name)
            assert reply == b"-ERR Invalid user name.", (name, reply)
            c.cmd("CAPA")
            c.block()
        # A valid UTF-8 name that is no user, and an invalid UTF-8 password.
        assert c.cmd("USER \u00e9l\u00e8ve").startswith(b"+OK")
        assert c.cmd(b"PASS \xff\xfe\xc3") == b"-ERR [AUTH] Authentication failed."
    with Raw(proc.port) as c:
        # Invalid UTF-8 in PLAIN's authcid, authzid and password.
        for message in (b"\0\xff\0pw", b"\xff\0alice\0pw", b"\0alice\0\xff\xfe"):
            reply = c.cmd(b"AUTH PLAIN " + b64(message))
            assert reply.startswith(b"-ERR"), reply
        assert c.closed(5) is not None  # three failures: closed
    with Raw(proc.port) as c:
        assert c.cmd(b"AUTH LOGIN " + b64(b"\xff\xfe")).startswith(b"-ERR")


def test_8bit_and_bare_cr_after_login(proc: ServerProc) -> None:
    with logged_in(proc.port, "bob", USERS["bob"]) as c:
        for line in (b"RETR \xff", b"DELE 1\r2", b"LIST \xc3\xa9", b"\xff", b"RETR 1\x85"):
            assert c.cmd(line).startswith(b"-ERR"), line
        # A CR before the CRLF is whitespace to the argument splitter: still message 1.
        assert c.cmd(b"LIST 1\r") == c.cmd(b"LIST 1")
        assert c.cmd("STAT").startswith(b"+OK 5 ")
        assert c.cmd("QUIT").startswith(b"+OK")


def test_random_bytes_barrage_never_crashes_the_server(proc: ServerProc, figure: Figure) -> None:
    """300 connections of seeded random bytes in random splits, half of them logged in."""
    rng = random.Random(1939)
    alphabet = [bytes([b]) for b in range(256)] + [b"\r\n", b"\n", b"\r", b" ", b"."] * 20
    words = [
        b"USER ", b"PASS ", b"AUTH ", b"APOP ", b"STLS", b"UTF8", b"CAPA", b"RETR ",
        b"TOP ", b"LIST ", b"UIDL ", b"DELE ", b"RSET", b"NOOP", b"STAT", b"*", b"=",
    ]  # fmt: skip
    replies = 0
    t0 = time.monotonic()
    for i in range(300):
        parts = [rng.choice(words) if rng.random() < 0.3 else rng.choice(alphabet)
                 for _ in range(rng.randrange(1, 400))]  # fmt: skip
        data = b"".join(parts)
        try:
            c = logged_in(proc.port, "alice", USERS["alice"]) if i % 2 else Raw(proc.port)
        except AssertionError:  # a previous session still holds alice's lock
            c = Raw(proc.port)
        with c:
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                pos = 0
                while pos < len(data):
                    step = rng.randrange(1, 64)
                    c.sock.sendall(data[pos : pos + step])
                    pos += step
                c.sock.shutdown(socket.SHUT_WR)
            rest = c.closed(10)
        assert rest is not None, f"connection {i} was not closed after EOF"
        for line in rest.split(b"\r\n"):
            if line and not line.startswith((b" ", b".")) and STATUS.match(line):
                replies += 1
    figure("barrage_connections", 300)
    figure("barrage_status_lines", replies)
    figure("barrage_s", round(time.monotonic() - t0, 2))
    with logged_in(proc.port, "bob", USERS["bob"]) as c:
        assert c.cmd("STAT").startswith(b"+OK 5 ")
        assert c.cmd("QUIT").startswith(b"+OK")
    assert proc.alive()


# --------------------------------------------------------------------- exact bodies

BODIES = [
    b"Subject: dots\n\n.\n..\n...\n.x\nx.\n",
    b"Subject: crlf dots\r\n\r\n.\r\n..\r\n.\r\n",
    b"Subject: bare cr\n\n.\rX\n.\r\n..\r\nmid\rline\n",
    b"Subject: ends with a bare cr\n\nlast.\r",
    b"Subject: ends with dot cr\n\n.\r",
    b"Subject: no final newline\n\nlast line",
    b"Subject: ends with a dot\n\n.",
    b".",
    b"..",
    b".\n.\n",
    b"",
    b"\n",
    b"Subject: many dot lines\n\n" + (b"." + b"y" * 1000 + b"\n") * 100,  # over a 64K chunk
]


def expected_wire(data: bytes) -> bytes:
    """The message as the client must see it after un-stuffing (RFC 1939; DotStuffer.end)."""
    out = re.sub(rb"\r?\n", b"\r\n", data)
    if not out:
        return b"\r\n"  # an empty message is sent as one empty line (Tcllib's client needs it)
    if out.endswith(b"\r"):
        return out + b"\n"
    if out and not out.endswith(b"\n"):
        out += b"\r\n"
    return out


def unstuff(raw: bytes) -> bytes:
    lines = raw.split(b"\r\n")
    assert lines[-1] == b""
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines[:-1])


@pytest.fixture
def bodies(transport: str, tmp_path: Path) -> Iterator[tuple[Server, Mail]]:
    mail = make_mail(tmp_path, {"alice": USERS["alice"]}, BODIES)
    with running(transport, **mail.options()) as server:
        yield server, mail


def test_bodies_are_received_exactly_raw(bodies: tuple[Server, Mail]) -> None:
    server, _ = bodies
    with logged_in(server.cget("port"), "alice", USERS["alice"]) as c:
        for n, data in enumerate(BODIES, 1):
            want = expected_wire(data)
            assert c.cmd(f"LIST {n}") == b"+OK %d %d" % (n, len(want))
            assert c.cmd(f"RETR {n}") == b"+OK %d octets" % len(want)
            raw = c.raw_block()
            for line in raw.split(b"\r\n"):
                assert not line.startswith(b".") or line.startswith(b".."), (n, line[:20])
            assert b"\n" not in raw.replace(b"\r\n", b""), n  # no bare LF on the wire
            assert unstuff(raw) == want, n


def test_bodies_are_received_exactly_by_poplib(bodies: tuple[Server, Mail]) -> None:
    server, _ = bodies
    client = poplib.POP3(HOST, server.cget("port"), timeout=10)
    try:
        client.user("alice")
        client.pass_(USERS["alice"])
        for n, data in enumerate(BODIES, 1):
            want = expected_wire(data)
            _, lines, _ = client.retr(n)
            got = b"".join(line + b"\r\n" for line in lines)
            if not any(line.startswith(b"\r") for line in want.split(b"\r\n")):
                assert got == want, n  # poplib drops a line's leading CR
            _, lines, _ = client.top(n, 0)
            head = want.split(b"\r\n\r\n", 1)[0]
            assert b"".join(line + b"\r\n" for line in lines).startswith(head[:50]), n
        client.quit()
    finally:
        client.close()


def test_a_crash_free_server_after_hostile_bytes_serves_a_client_on_another_socket(
    proc: ServerProc,
) -> None:
    """Two hostile connections interleaved with a normal one: the normal one never notices."""
    with logged_in(proc.port, "bob", USERS["bob"]) as good:
        for junk in (b"\x00\r\n", b"\xff" * 300 + b"\r\n", b"AUTH PLAIN\r\n\xff\xff\r\n"):
            with Raw(proc.port) as bad:
                bad.send(junk)
                bad.sock.shutdown(socket.SHUT_WR)
                assert bad.closed(5) is not None
            assert good.cmd("NOOP") == b"+OK"
        assert good.cmd("QUIT").startswith(b"+OK")
