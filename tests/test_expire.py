"""EXPIRE (RFC 2449 section 6.7): retrieved messages deleted at a later session's UPDATE.

Sessions run through the session driver with no sockets (``Host`` from
test_driver) and a wall clock the test sets; the crash test kills a server
process in the middle of a session.  ``EXPIRE 0`` deletes what a session
retrieved at its own QUIT, DELE or not; ``EXPIRE N`` deletes, at a later
session's QUIT, what was first retrieved N days ago or more.  Only a session
that reaches UPDATE records or deletes anything.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from clients import MESSAGES, Proc, Raw, login, make_env, port_of, running
from test_driver import Host

from pop3proto.maildir import MaildirStorage
from pop3proto.memstore import MemoryStorage
from pop3proto.passwd import DictAuthenticator
from pop3proto.server import Server

T0 = 1_700_000_000.0
DAY = 86400.0
ONE = b"Subject: one\n\nfirst body\n"
TWO = b"Subject: two\n\nsecond body\n"
THREE = b"Subject: three\n\nthird body\n"


class ClockServer(Server):
    """A Server whose wall clock the test sets."""

    def __init__(self, **options: Any) -> None:
        self.clock = T0
        super().__init__(**options)

    def wall_clock(self) -> float:
        return self.clock


def make(storage: Any, *, extra: dict[str, str] | None = None, **options: Any) -> ClockServer:
    auth = DictAuthenticator({"alice": "pencil"}, extra=extra)
    return ClockServer(auth=auth, storage=storage, cleartext_auth=True, **options)


def session(server: Server, *lines: str, quit: bool = True) -> bytes:
    """One session to its end: with QUIT, or dropped (the client hangs up) without."""
    host = Host(server)
    script = [f"{line}\r\n".encode() for line in (*lines, *(["QUIT"] if quit else []))]
    return host.run(*script, b"")


def memory() -> MemoryStorage:
    store = MemoryStorage()
    for data in (ONE, TWO, THREE):
        store.add("alice", data)
    return store


def maildir(root: Path) -> MaildirStorage:
    store = MaildirStorage(root, create=True)
    for data in (ONE, TWO, THREE):
        store.deliver("alice", data)
    return store


def on_disk(root: Path) -> list[bytes]:
    box = root / "alice"
    return sorted(p.read_bytes() for d in ("cur", "new") for p in (box / d).iterdir())


def records(root: Path) -> dict[str, int]:
    raw = (root / "alice" / "pop3proto-retrieved").read_bytes().split(b"\0")
    assert raw[0] == b"pop3proto-retrieved 1"
    assert raw[-1] == b""
    return {k.decode(): int(t) for t, _, k in (e.partition(b" ") for e in raw[1:-1])}


# ------------------------------------------------------------------ EXPIRE 0


def test_expire_0_deletes_retrieved_messages_at_quit_without_dele() -> None:
    store = memory()
    server = make(store, expire=0)
    out = session(server, "CAPA", "USER alice", "PASS pencil", "RETR 2", "TOP 3 0", "QUIT")
    assert b"EXPIRE 0\r\n" in out
    assert out.endswith(b"+OK Logging out.\r\n")
    assert store.messages("alice") == [ONE, THREE]  # TOP is no retrieval


def test_expire_0_deletes_nothing_when_the_session_is_dropped() -> None:
    store = memory()
    server = make(store, expire=0)
    session(server, "USER alice", "PASS pencil", "RETR 1", "RETR 2", quit=False)
    assert store.messages("alice") == [ONE, TWO, THREE]
    assert store.retrievals("alice") == {}


def test_expire_0_with_dele_and_rset_deletes_each_message_once() -> None:
    store = memory()
    server = make(store, expire=0)
    session(server, "USER alice", "PASS pencil", "RETR 1", "DELE 1", "DELE 3", "RSET",
            "DELE 1")
    assert store.messages("alice") == [TWO, THREE]


def test_expire_0_on_a_maildir(tmp_path: Path) -> None:
    server = make(maildir(tmp_path), expire=0)
    session(server, "USER alice", "PASS pencil", "RETR 1", "RETR 3")
    assert on_disk(tmp_path) == [TWO]


# ------------------------------------------------------------------ EXPIRE N


def test_expire_1_deletes_a_message_retrieved_two_days_ago_at_the_next_quit(
    tmp_path: Path,
) -> None:
    server = make(maildir(tmp_path), expire=1)
    out = session(server, "CAPA", "USER alice", "PASS pencil", "RETR 1", "RETR 2")
    assert b"EXPIRE 1\r\n" in out
    assert on_disk(tmp_path) == sorted([ONE, TWO, THREE])  # kept a day at least
    recorded = records(tmp_path)
    assert sorted(recorded.values()) == [int(T0), int(T0)]

    # Message 1's record says two days ago; message 2's stays at T0.
    key1 = min(recorded)
    box = tmp_path / "alice" / "pop3proto-retrieved"
    box.write_bytes(box.read_bytes().replace(
        b"%d %s\0" % (int(T0), key1.encode()), b"%d %s\0" % (int(T0 - 2 * DAY), key1.encode())
    ))
    server = make(MaildirStorage(tmp_path), expire=1)
    server.clock = T0 + DAY / 2

    session(server, "USER alice", "PASS pencil", "STAT", quit=False)  # dropped: no UPDATE
    assert on_disk(tmp_path) == sorted([ONE, TWO, THREE])

    out = session(server, "USER alice", "PASS pencil", "STAT")
    assert out.endswith(b"+OK Logging out.\r\n")
    assert on_disk(tmp_path) == sorted([TWO, THREE])
    assert key1 not in records(tmp_path)

    server.clock = T0 + DAY  # message 2 is a day old now
    session(server, "USER alice", "PASS pencil", "RETR 2")  # message 3 now
    assert on_disk(tmp_path) == [THREE]
    assert list(records(tmp_path).values()) == [int(T0 + DAY)]


def test_expire_counts_from_the_first_retrieval() -> None:
    store = memory()
    server = make(store, expire=2)
    session(server, "USER alice", "PASS pencil", "RETR 1")
    server.clock = T0 + DAY
    session(server, "USER alice", "PASS pencil", "RETR 1", "RETR 2")
    assert store.retrievals("alice") == {"m1": T0, "m2": T0 + DAY}
    server.clock = T0 + 2 * DAY
    session(server, "USER alice", "PASS pencil")
    assert store.messages("alice") == [TWO, THREE]


def test_expire_never_and_unannounced_delete_nothing() -> None:
    for expire in ("NEVER", None):
        store = memory()
        server = make(store, expire=expire)
        out = session(server, "CAPA", "USER alice", "PASS pencil", "RETR 1")
        assert (b"EXPIRE NEVER\r\n" in out) == (expire == "NEVER")
        server.clock = T0 + 1000 * DAY
        session(server, "USER alice", "PASS pencil", "RETR 1")
        assert store.messages("alice") == [ONE, TWO, THREE]
        assert store.retrievals("alice") == {}


def test_a_per_user_expire_overrides_the_global_one_and_shows_after_login() -> None:
    store = memory()
    server = make(store, expire=30, extra={"alice": "userdb_pop3_expire=0"})
    out = session(server, "CAPA", "USER alice", "PASS pencil", "CAPA", "RETR 1")
    before, after = out.split(b"+OK Logged in.")
    assert b"EXPIRE 30\r\n" in before
    assert b"EXPIRE 0\r\n" in after
    assert store.messages("alice") == [TWO, THREE]


def test_the_expired_deletions_fail_like_any_other() -> None:
    class Failing(MemoryStorage):
        def dele(self, mailbox: str, keys: Any) -> None:
            raise OSError("disk on fire")

    store = Failing()
    store.add("alice", ONE)
    server = make(store, expire=0)
    out = session(server, "USER alice", "PASS pencil", "RETR 1")
    assert out.endswith(b"-ERR [SYS/TEMP] Some messages could not be deleted.\r\n")
    assert store.messages("alice") == [ONE]
    assert store.lock("alice")  # released all the same


@pytest.mark.parametrize("transport", ["blocking", "anyio"])
def test_expire_0_with_poplib(tmp_path: Path, transport: str) -> None:
    env = make_env(tmp_path)
    with running(transport, auth=env.auth, storage=env.storage, expire=0,
                 cleartext_auth=True) as server:
        port = port_of(server)
        client = login(port, "alice", env.users["alice"])
        assert client.capa()["EXPIRE"] == ["0"]
        client.retr(1)
        head = client.top(2, 0)[1]  # TOP is no retrieval
        client.quit()
        client = login(port, "alice", env.users["alice"])
        assert client.stat()[0] == len(MESSAGES) - 1
        assert client.top(1, 0)[1] == head  # the first message is gone
        client.retr(1)
        client.quit()
        client = login(port, "alice", env.users["alice"])
        assert client.stat()[0] == len(MESSAGES) - 2
        client.quit()


# ------------------------------------------------------------------ crash safety

CHILD = textwrap.dedent("""
    import sys
    import time
    from pop3proto.maildir import MaildirStorage
    from pop3proto.passwd import DictAuthenticator
    from pop3proto.server import Server

    server = Server(host="127.0.0.1", port=0, transport="blocking", cleartext_auth=True,
                    auth=DictAuthenticator({"alice": "pencil"}),
                    storage=MaildirStorage(sys.argv[1]), expire=int(sys.argv[2]))
    server.up()
    print("port", server.cget("port"), flush=True)
    time.sleep(120)  # the test kills this process long before
""")


@pytest.mark.parametrize("expire", [0, 1])
def test_a_killed_server_deletes_nothing_and_leaves_the_record_intact(
    tmp_path: Path, expire: int
) -> None:
    maildir(tmp_path)
    server = make(MaildirStorage(tmp_path), expire=1)
    server.clock = T0 - 2 * DAY
    session(server, "USER alice", "PASS pencil", "RETR 3")  # recorded two days ago, kept
    before = (tmp_path / "alice" / "pop3proto-retrieved").read_bytes()
    assert on_disk(tmp_path) == sorted([ONE, TWO, THREE])

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = Proc([sys.executable, str(script), str(tmp_path), str(expire)])
    try:
        port = int(proc.expect(r"^port (\d+)$").group(1))
        client = Raw(port)
        try:
            assert client.login("alice", "pencil").startswith(b"+OK")
            status, body = client.multi("RETR 1")
            assert status.startswith(b"+OK")
            assert body == ONE.replace(b"\n", b"\r\n")
            assert client.cmd("DELE 2").startswith(b"+OK")
            os.kill(proc.p.pid, signal.SIGKILL)  # before QUIT: no UPDATE
            assert proc.wait() == -signal.SIGKILL
        finally:
            client.close()
    finally:
        proc.kill()
    assert on_disk(tmp_path) == sorted([ONE, TWO, THREE])
    assert (tmp_path / "alice" / "pop3proto-retrieved").read_bytes() == before
    assert not (tmp_path / "alice" / "pop3proto-retrieved.tmp").exists()

    # The next session that reaches UPDATE applies the record.
    server = make(MaildirStorage(tmp_path), expire=1)
    session(server, "USER alice", "PASS pencil")
    assert on_disk(tmp_path) == sorted([ONE, TWO])


def test_a_torn_or_corrupt_record_never_deletes_sooner(tmp_path: Path) -> None:
    store = maildir(tmp_path)
    server = make(store, expire=1)
    session(server, "USER alice", "PASS pencil", "RETR 1")
    box = tmp_path / "alice"
    good = (box / "pop3proto-retrieved").read_bytes()
    # A crash during the rewrite leaves at most a temporary file beside the record.
    (box / "pop3proto-retrieved.tmp").write_bytes(good.replace(b"%d" % int(T0), b"1"))
    server.clock = T0 + DAY / 2
    session(server, "USER alice", "PASS pencil")
    assert on_disk(tmp_path) == sorted([ONE, TWO, THREE])
    # A record cut short is ignored as a whole (logged): nothing expires from it.
    (box / "pop3proto-retrieved").write_bytes(good[:-1].replace(b"%d" % int(T0), b"1"))
    server.clock = T0 + 10 * DAY
    session(server, "USER alice", "PASS pencil")
    assert on_disk(tmp_path) == sorted([ONE, TWO, THREE])
