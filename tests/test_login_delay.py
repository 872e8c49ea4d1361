"""LOGIN-DELAY (RFC 2449 sections 6.8 and 8.1.2): enforced per user, global or per-user values.

Sessions run through the session driver with no sockets (``Host`` from
test_driver) and a wall clock the test sets, and once end to end with
poplib over the blocking transport.  A login within the delay gets
``-ERR [LOGIN-DELAY]`` only after its password checked out, and its maildrop
is not locked; the CAPA after login shows the user's value.
"""

from __future__ import annotations

import os
import poplib
from pathlib import Path
from typing import Any

import pytest
from clients import MESSAGES, make_env, port_of, running
from test_driver import Host

from pop3proto.maildir import MaildirStorage
from pop3proto.memstore import MemoryStorage
from pop3proto.passwd import DictAuthenticator, PasswdFile, parse_user_settings
from pop3proto.server import Server

T0 = 1_700_000_000.0


class ClockServer(Server):
    """A Server whose wall clock the test sets."""

    def __init__(self, **options: Any) -> None:
        self.clock = T0
        super().__init__(**options)

    def wall_clock(self) -> float:
        return self.clock


def make(storage: Any = None, *, extra: dict[str, str] | None = None,
         **options: Any) -> tuple[ClockServer, Any]:
    if storage is None:
        storage = MemoryStorage()
        storage.add("alice", b"Subject: one\n\nbody\n")
        storage.add("bob", b"Subject: two\n\nbody\n")
    auth = DictAuthenticator({"alice": "pencil", "bob": "secret"}, extra=extra)
    server = ClockServer(auth=auth, storage=storage, cleartext_auth=True, **options)
    return server, storage


def session(server: Server, *lines: str) -> bytes:
    """One whole session from the greeting to CLOSE (QUIT is not added)."""
    host = Host(server)
    return host.run(*[f"{line}\r\n".encode() for line in lines], b"")


def capa(out: bytes, after: int = 0) -> list[bytes]:
    """The capability lines of the *after*-th CAPA answer in *out*."""
    block = out.split(b"+OK Capability list follows\r\n")[after + 1]
    return block.split(b"\r\n.\r\n")[0].split(b"\r\n")


def test_a_second_login_within_the_delay_gets_login_delay() -> None:
    server, store = make(login_delay=60)
    first = session(server, "CAPA", "USER alice", "PASS pencil", "CAPA", "QUIT")
    assert b"LOGIN-DELAY 60" in capa(first, 0)
    assert b"LOGIN-DELAY 60" in capa(first, 1)
    assert b"+OK Logging out." in first

    server.clock = T0 + 59
    second = session(server, "USER alice", "PASS pencil", "STAT", "QUIT")
    assert b"-ERR [LOGIN-DELAY] " in second
    assert b"+OK 1 " not in second  # STAT is refused: never logged in
    assert store.lock("alice")  # the refused login never took the lock
    store.unlock("alice")

    server.clock = T0 + 60
    third = session(server, "USER alice", "PASS pencil", "STAT", "QUIT")
    assert b"+OK 1 " in third


def test_a_wrong_password_within_the_delay_tells_nothing() -> None:
    server, _ = make(login_delay=60, auth_failure_delay=0)
    session(server, "USER alice", "PASS pencil", "QUIT")
    server.clock = T0 + 1
    out = session(server, "USER alice", "PASS wrong", "QUIT")
    assert b"-ERR [AUTH] " in out
    assert b"LOGIN-DELAY]" not in out
    unknown = session(server, "USER nobody", "PASS pencil", "QUIT")
    assert b"-ERR [AUTH] " in unknown


def test_the_delay_is_per_user_and_a_refusal_is_no_failed_login() -> None:
    server, _ = make(login_delay=60, max_auth_failures=1)
    session(server, "USER alice", "PASS pencil", "QUIT")
    server.clock = T0 + 10
    out = session(server, "USER alice", "PASS pencil", "USER bob", "PASS secret", "STAT", "QUIT")
    assert b"-ERR [LOGIN-DELAY] " in out
    assert b"+OK 1 " in out  # bob logs in at once, in the same session
    # A refused login does not extend the delay: it counts from the last real one.
    server.clock = T0 + 60
    assert b"+OK 1 " in session(server, "USER alice", "PASS pencil", "STAT", "QUIT")


def test_a_per_user_value_overrides_the_global_one_and_shows_after_login() -> None:
    extra = {"bob": "uid=1000 userdb_pop3_login_delay=300", "alice": "userdb_pop3_login_delay=0"}
    server, _ = make(login_delay=60, extra=extra)
    out = session(server, "CAPA", "USER bob", "PASS secret", "CAPA", "QUIT")
    assert b"LOGIN-DELAY 60" in capa(out, 0)  # before login: the global value
    assert b"LOGIN-DELAY 300" in capa(out, 1)
    out = session(server, "USER alice", "PASS pencil", "CAPA", "QUIT")
    assert b"LOGIN-DELAY 0" in capa(out, 0)

    server.clock = T0 + 100
    assert b"-ERR [LOGIN-DELAY] " in session(server, "USER bob", "PASS secret", "QUIT")
    assert b"+OK 1 " in session(server, "USER alice", "PASS pencil", "STAT", "QUIT")
    server.clock = T0 + 300
    assert b"+OK 1 " in session(server, "USER bob", "PASS secret", "STAT", "QUIT")


def test_a_per_user_delay_without_a_global_one() -> None:
    server, _ = make(extra={"bob": "userdb_pop3_login_delay=30"})
    out = session(server, "CAPA", "USER bob", "PASS secret", "CAPA", "QUIT")
    assert not any(c.startswith(b"LOGIN-DELAY") for c in capa(out, 0))
    assert b"LOGIN-DELAY 30" in capa(out, 1)
    server.clock = T0 + 29
    assert b"-ERR [LOGIN-DELAY] " in session(server, "USER bob", "PASS secret", "QUIT")
    # alice has no delay at all
    session(server, "USER alice", "PASS pencil", "QUIT")
    assert b"+OK 1 " in session(server, "USER alice", "PASS pencil", "STAT", "QUIT")


class BareStore:
    """A Storage with only the required methods: no login times of its own."""

    def __init__(self) -> None:
        self.inner = MemoryStorage()
        self.inner.add("alice", b"Subject: one\n\nbody\n")

    def lock(self, mailbox: str) -> bool:
        return self.inner.lock(mailbox)

    def unlock(self, mailbox: str) -> None:
        self.inner.unlock(mailbox)

    def scan(self, mailbox: str) -> Any:
        return self.inner.scan(mailbox)

    def get(self, mailbox: str, key: str) -> Any:
        return self.inner.get(mailbox, key)

    def dele(self, mailbox: str, keys: Any) -> None:
        self.inner.dele(mailbox, keys)


def test_a_store_without_login_times_uses_the_servers_table() -> None:
    server, _ = make(BareStore(), login_delay=60)
    session(server, "USER alice", "PASS pencil", "QUIT")
    server.clock = T0 + 30
    assert b"-ERR [LOGIN-DELAY] " in session(server, "USER alice", "PASS pencil", "QUIT")
    assert server.last_login("alice") == T0


def test_the_maildir_record_holds_across_a_restart(tmp_path: Path) -> None:
    store = MaildirStorage(tmp_path, create=True)
    store.deliver("alice", b"Subject: one\n\nbody\n")
    server, _ = make(store, login_delay=60)
    assert b"+OK 1 " in session(server, "USER alice", "PASS pencil", "STAT", "QUIT")
    assert (tmp_path / "alice" / "pop3proto-last-login").read_text().strip() == f"{T0:.3f}"

    again, _ = make(MaildirStorage(tmp_path), login_delay=60)  # a new process, say
    again.clock = T0 + 20
    assert b"-ERR [LOGIN-DELAY] " in session(again, "USER alice", "PASS pencil", "QUIT")
    again.clock = T0 + 61
    assert b"+OK 1 " in session(again, "USER alice", "PASS pencil", "STAT", "QUIT")


def test_the_maildir_record_is_never_followed_through_a_link(tmp_path: Path) -> None:
    store = MaildirStorage(tmp_path, create=True)
    store.deliver("alice", b"Subject: one\n\nbody\n")
    outside = tmp_path / "outside"
    outside.write_text(f"{T0}\n")
    os.symlink(outside, tmp_path / "alice" / "pop3proto-last-login")
    server, _ = make(store, login_delay=60)
    server.clock = T0 + 5
    # The link is not read (no delay from it) and is replaced, not written through.
    assert b"+OK 1 " in session(server, "USER alice", "PASS pencil", "STAT", "QUIT")
    assert outside.read_text() == f"{T0}\n"
    record = tmp_path / "alice" / "pop3proto-last-login"
    assert not record.is_symlink()
    assert record.read_text().strip() == f"{T0 + 5:.3f}"


def test_passwd_file_extra_fields(tmp_path: Path) -> None:
    passwd = tmp_path / "users"
    passwd.write_text(
        "alice:{PLAIN}pencil:1000:1000::/home/alice::userdb_pop3_login_delay=120 "
        "userdb_pop3_expire=NEVER nodelay=y\n"
        "bob:{PLAIN}secret::::::userdb_pop3_expire=7\n"
        "carol:{PLAIN}x::::::userdb_pop3_login_delay=soon\n"
        "dave:{PLAIN}y::::::\n"
    )
    auth = PasswdFile(passwd)
    assert auth.user_settings("alice") == {"login_delay": 120, "expire": "NEVER"}
    assert auth.user_settings("bob") == {"expire": 7}
    assert auth.user_settings("dave") == {}
    # A bad value costs that user the login (never a guessed policy), named in errors.
    assert auth.lookup("carol") is None
    assert any("userdb_pop3_login_delay" in e and ":3:" in e for e in auth.errors)
    assert parse_user_settings("pop3_expire=0") == {"expire": 0}
    assert isinstance(parse_user_settings("pop3_expire=-1"), str)


@pytest.mark.parametrize("transport", ["blocking", "selectors", "anyio"])
def test_poplib_end_to_end(tmp_path: Path, transport: str) -> None:
    env = make_env(tmp_path)
    with running(transport, auth=env.auth, storage=env.storage, login_delay=60,
                 cleartext_auth=True) as server:
        port = port_of(server)
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        try:
            assert client.capa()["LOGIN-DELAY"] == ["60"]
            client.user("alice")
            client.pass_(env.users["alice"])
            assert client.stat()[0] == len(MESSAGES)
            assert client.capa()["LOGIN-DELAY"] == ["60"]
        finally:
            client.quit()
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        try:
            client.user("alice")
            with pytest.raises(poplib.error_proto) as caught:
                client.pass_(env.users["alice"])
            assert caught.value.args[0].startswith(b"-ERR [LOGIN-DELAY] ")
            client.user("bob")  # another user is not held back
            client.pass_(env.users["bob"])
            assert client.stat()[0] == len(MESSAGES)
        finally:
            client.quit()
