"""11. Storage faults: a broken message costs that message, never the login or the others.

Message files are removed or replaced by a directory, a FIFO or a dangling
symlink (``chmod 000`` does not stop root, so "unreadable" is also made
with those) before and during the session.  Disk-full is a storage wrapper
whose ``dele`` raises ``OSError(ENOSPC)``; other wrappers fail ``lock``,
``scan`` and a read in the middle of RETR.  A logging handler that raises
on emit must not kill a session.
"""

from __future__ import annotations

import errno
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest
from clients import Raw, running

from pop3proto.maildir import MaildirStorage
from pop3proto.server import Server

from .conftest import Mail, body, logged_in, wait_for

SYS_TEMP = b"-ERR [SYS/TEMP] Message is temporarily unavailable."


def wire(n: int) -> bytes:
    return body(n).replace(b"\n", b"\r\n")


def message_path(mail: Mail, n: int) -> Path:
    files = sorted((mail.root / "alice" / "cur").iterdir())
    return files[n - 1]


def break_file(path: Path, how: str, outside: Path) -> None:
    path.unlink()
    if how == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"not a message")
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "dangling-symlink":
        path.symlink_to(path.parent / "no-such-file")
    elif how == "symlink-loop":
        path.symlink_to(path)
    elif how == "symlink-outside":
        path.symlink_to(outside)
    elif how == "mode-000":
        path.write_bytes(b"Subject: unreadable\n\n")
        path.chmod(0)
    else:
        assert how == "removed"


HOW = [
    "removed",
    "directory",
    "fifo",
    "dangling-symlink",
    "symlink-loop",
    pytest.param(
        "mode-000",
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files"),
    ),
]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"Subject: secret\n\nroot-only data outside the maildir\n")
    return secret


@pytest.fixture
def served(transport: str, mail: Mail) -> Iterator[Server]:
    with running(transport, **mail.options(auth_failure_delay=0)) as server:
        yield server


@pytest.mark.parametrize("how", HOW)
def test_broken_before_login_is_not_listed_and_the_rest_works(
    served: Server, mail: Mail, how: str, outside: Path
) -> None:
    break_file(message_path(mail, 2), how, outside)
    with logged_in(served.cget("port"), "alice", mail.users["alice"]) as c:
        assert c.cmd("STAT").startswith(b"+OK 4 ")
        for n, original in ((1, 1), (2, 3), (3, 4), (4, 5)):
            assert c.cmd(f"RETR {n}").startswith(b"+OK")
            assert c.block() == wire(original)
        assert c.cmd("DELE 2").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")
    left = sorted(mail.on_disk("alice").values())
    assert left == sorted([body(1), body(4), body(5)])


@pytest.mark.parametrize("how", HOW)
def test_broken_during_the_session_answers_sys_temp(
    served: Server, mail: Mail, how: str, outside: Path
) -> None:
    with logged_in(served.cget("port"), "alice", mail.users["alice"]) as c:
        assert c.cmd("STAT").startswith(b"+OK 5 ")
        break_file(message_path(mail, 2), how, outside)
        assert c.cmd("RETR 2") == SYS_TEMP
        assert c.cmd("TOP 2 0") == SYS_TEMP
        assert c.cmd("LIST 2").startswith(b"+OK 2 ")  # the listing is the login's snapshot
        for n in (1, 3, 5):
            assert c.cmd(f"RETR {n}").startswith(b"+OK")
            assert c.block() == wire(n)
        assert c.cmd("DELE 2").startswith(b"+OK")
        assert c.cmd("DELE 3").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")
    assert sorted(mail.on_disk("alice").values()) == sorted([body(1), body(4), body(5)])
    with logged_in(served.cget("port"), "alice", mail.users["alice"]) as c:
        assert c.cmd("STAT").startswith(b"+OK 3 ")


@pytest.mark.parametrize("when", ["before-login", "during-session"])
def test_a_symlink_to_a_file_outside_the_maildir_is_not_served(
    served: Server, mail: Mail, outside: Path, when: str
) -> None:
    if when == "before-login":
        break_file(message_path(mail, 2), "symlink-outside", outside)
    with logged_in(served.cget("port"), "alice", mail.users["alice"]) as c:
        if when == "during-session":
            break_file(message_path(mail, 2), "symlink-outside", outside)
        for n in range(1, int(c.cmd("STAT").split()[1]) + 1):
            status = c.cmd(f"RETR {n}")
            if status.startswith(b"+OK"):
                assert b"root-only" not in c.block(), n


def test_a_fifo_in_new_never_hangs_the_login(served: Server, mail: Mail) -> None:
    os.mkfifo(mail.root / "alice" / "new" / "1700000999.M1P1Q1.fifo")
    with logged_in(served.cget("port"), "alice", mail.users["alice"], timeout=5) as c:
        assert c.cmd("STAT").startswith(b"+OK 5 ")


# --------------------------------------------------------------------- failing storages


class Faulty:
    """Wraps a storage; ``fail[verb]`` is an exception to raise from that verb."""

    def __init__(self, inner: MaildirStorage, **fail: BaseException) -> None:
        self.inner = inner
        self.fail = fail
        self.calls: list[str] = []

    def _maybe(self, verb: str) -> None:
        self.calls.append(verb)
        exc = self.fail.get(verb)
        if exc is not None:
            raise exc

    def lock(self, mailbox: str) -> bool:
        self._maybe("lock")
        return self.inner.lock(mailbox)

    def unlock(self, mailbox: str) -> None:
        self._maybe("unlock")
        self.inner.unlock(mailbox)

    def scan(self, mailbox: str) -> Any:
        self._maybe("scan")
        return self.inner.scan(mailbox)

    def get(self, mailbox: str, key: str) -> BinaryIO:
        self._maybe("get")
        stream = self.inner.get(mailbox, key)
        exc = self.fail.get("read")
        return cast(BinaryIO, FailingReader(stream, exc)) if exc is not None else stream

    def dele(self, mailbox: str, keys: Sequence[str]) -> None:
        self._maybe("dele")
        self.inner.dele(mailbox, keys)


class FailingReader(io.RawIOBase):
    """Gives the first chunk, then raises (an I/O error in the middle of a RETR)."""

    def __init__(self, inner: BinaryIO, exc: BaseException) -> None:
        self.inner, self.exc, self.reads = inner, exc, 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise self.exc
        return self.inner.read(size)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.inner.close()
        super().close()


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
EIO = OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.fixture
def faulty(transport: str, mail: Mail) -> Callable[..., Any]:
    def make(**fail: BaseException) -> Any:
        storage = Faulty(MaildirStorage(mail.root), **fail)
        options = mail.options(storage=storage, auth_failure_delay=0)
        return storage, running(transport, **options)

    return make


def test_disk_full_at_quit_is_sys_temp_and_deletes_nothing(
    faulty: Callable[..., Any], mail: Mail
) -> None:
    storage, server_cm = faulty(dele=ENOSPC)
    with server_cm as server:
        with logged_in(server.cget("port"), "alice", mail.users["alice"]) as c:
            for n in (1, 2, 3):
                assert c.cmd(f"DELE {n}").startswith(b"+OK")
            assert c.cmd("QUIT") == b"-ERR [SYS/TEMP] Some messages could not be deleted."
            assert c.closed(5) == b""
        assert len(mail.on_disk("alice")) == 5
        storage.fail.clear()  # the disk has room again: the lock was released
        with logged_in(server.cget("port"), "alice", mail.users["alice"]) as c:
            assert c.cmd("STAT").startswith(b"+OK 5 ")


@pytest.mark.parametrize(
    ("verb", "exc"), [("lock", ENOSPC), ("scan", EIO), ("get", EIO)], ids=["lock", "scan", "get"]
)
def test_failing_lock_scan_get_are_sys_temp_and_release_the_lock(
    faulty: Callable[..., Any], mail: Mail, verb: str, exc: BaseException
) -> None:
    storage, server_cm = faulty(**{verb: exc})
    with server_cm as server:
        port = server.cget("port")
        with Raw(port) as c:
            reply = c.login("alice", mail.users["alice"])
            if verb == "get":
                assert reply.startswith(b"+OK")
                assert c.cmd("RETR 1") == SYS_TEMP
                assert c.cmd("STAT").startswith(b"+OK 5 ")
                assert c.cmd("QUIT").startswith(b"+OK")
            else:
                assert reply == b"-ERR [SYS/TEMP] Mailbox is temporarily unavailable.", reply
                assert c.cmd("NOOP").startswith(b"-ERR")  # still in AUTHORIZATION
        storage.fail.clear()
        with logged_in(port, "alice", mail.users["alice"]) as c:  # not left locked
            assert c.cmd("STAT").startswith(b"+OK 5 ")


def test_a_read_error_in_the_middle_of_retr_drops_the_connection_only(
    faulty: Callable[..., Any], mail: Mail, caplog: pytest.LogCaptureFixture
) -> None:
    big = body(1, size=300_000)
    for p in (mail.root / "alice" / "cur").iterdir():
        if p.read_bytes() == body(1):
            p.write_bytes(big)  # the W= in the name is now wrong; only sizes differ
    storage, server_cm = faulty(read=EIO)
    with server_cm as server:
        port = server.cget("port")
        with logged_in(port, "bob", mail.users["bob"]) as other:
            with logged_in(port, "alice", mail.users["alice"]) as c:
                assert c.cmd("DELE 2").startswith(b"+OK")
                assert c.cmd("RETR 3").startswith(b"+OK")
                rest = c.closed(5)
            # The block was cut off: no terminating dot line; the session is gone.
            assert rest is not None
            assert not rest.endswith(b"\r\n.\r\n")
            assert other.cmd("NOOP") == b"+OK"
        storage.fail.clear()
        with logged_in(port, "alice", mail.users["alice"]) as c:
            assert c.cmd("STAT").startswith(b"+OK 5 ")  # DELE 2 was not applied
    assert wait_for(lambda: len(mail.on_disk("alice")) == 5, 1)


def test_a_read_error_in_the_middle_of_retr_is_logged_once_as_a_storage_warning(
    faulty: Callable[..., Any], mail: Mail, caplog: pytest.LogCaptureFixture
) -> None:
    _, server_cm = faulty(read=EIO)
    caplog.set_level(logging.INFO, logger="pop3proto")
    with server_cm as server:
        with logged_in(server.cget("port"), "alice", mail.users["alice"]) as c:
            assert c.cmd("RETR 1").startswith(b"+OK")
            assert c.closed(5) is not None
        assert wait_for(lambda: server.connections() == [], 5)
    records = [r for r in caplog.records if r.name.startswith("pop3proto")]
    assert [r for r in records if r.exc_info] == [], "a traceback was logged"
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert any("Input/output error" in r.getMessage() for r in warnings), records
    assert not any("closed by peer" in r.getMessage() for r in records), records


class Raising(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.raised = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.raised += 1
        raise RuntimeError("log sink is broken")


@pytest.fixture
def raising_log() -> Iterator[Raising]:
    handler = Raising()
    logger = logging.getLogger("pop3proto")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def test_a_raising_log_handler_never_kills_a_session(
    transport: str, mail: Mail, raising_log: Raising
) -> None:
    """Sessions log their summary line at the end (and failed logins nothing)."""
    with running(transport, **mail.options(auth_failure_delay=0)) as server:
        port = server.cget("port")
        for _ in range(2):
            with logged_in(port, "alice", mail.users["alice"]) as c:
                assert c.cmd("STAT").startswith(b"+OK 5 ")
                assert c.cmd("RETR 1").startswith(b"+OK")
                c.block()
                assert c.cmd("QUIT").startswith(b"+OK")
        with Raw(port) as c:
            assert c.login("alice", "wrong").startswith(b"-ERR [AUTH]")
        # A storage error goes through the facade's guarded _log_error.
        message_path(mail, 1).unlink()
        with logged_in(port, "alice", mail.users["alice"]) as c:
            assert c.cmd("STAT").startswith(b"+OK 4 ")
    assert raising_log.raised > 0


def test_a_raising_log_handler_with_storage_warnings_never_kills_a_session(
    transport: str, mail: Mail, raising_log: Raising
) -> None:
    os.mkfifo(mail.root / "alice" / "cur" / "1700000999.M1P1Q1.fifo:2,")  # scan warns
    with running(transport, **mail.options(auth_failure_delay=0)) as server:
        port = server.cget("port")
        with logged_in(port, "bob", mail.users["bob"]) as bystander:
            with logged_in(port, "alice", mail.users["alice"]) as c:
                assert c.cmd("STAT").startswith(b"+OK 5 ")
                assert c.cmd("QUIT").startswith(b"+OK")
            assert bystander.cmd("NOOP") == b"+OK"
        with logged_in(port, "bob", mail.users["bob"]) as c:
            assert c.cmd("QUIT").startswith(b"+OK")
