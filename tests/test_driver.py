"""The session driver and the server policy it runs, with no sockets and a fake clock.

A tiny host (``Host``) performs the driver's actions the way a transport
does: scripted client input, a clock the test moves, calls run inline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from pop3proto.auth import PlainVerifier
from pop3proto.driver import CLOSE, RECEIVE, START_TLS, Call, SessionDriver, Write
from pop3proto.memstore import MemoryStorage
from pop3proto.passwd import DictAuthenticator
from pop3proto.server import Server
from pop3proto.storage import MailboxRefused, StorageError
from pop3proto.transports._common import perform_call, run_call


class Host:
    """Performs a driver's actions: input from a script, a fake clock, calls inline."""

    def __init__(self, server: Server, peer: tuple[str, int] = ("192.0.2.10", 4000),
                 *, tls: bool = False) -> None:
        self.now = 100.0
        self.server = server
        self.driver = SessionDriver(server, peer, tls=tls, now=self.now)
        self.wire = bytearray()
        self.calls: list[str] = []
        self.sleeps = 0

    def run(self, *chunks: bytes, idle: bool = False, serve_delays: bool = True,
            max_actions: int = 10_000) -> bytes:
        """Feed *chunks* one per RECEIVE, then stop when input is needed (or on CLOSE).

        Failed-login delays are served by moving the clock (unless not
        *serve_delays*); with *idle*, once the chunks are used the clock jumps
        to the deadline (the client stays silent).  Returns what was written.
        """
        pending = list(chunks)
        start = len(self.wire)
        driver = self.driver
        for _ in range(max_actions):
            action = driver.next_action(self.now)
            if action is RECEIVE:
                deadline = driver.deadline
                if pending:
                    driver.receive_data(pending.pop(0))
                elif idle or (serve_delays and driver.delaying):
                    if deadline is None:
                        break
                    self.sleeps += driver.delaying
                    self.now = deadline
                else:
                    break
            elif isinstance(action, Write):
                self.wire += action.data
            elif isinstance(action, Call):
                self.calls.append(getattr(action.fn, "__name__", "?"))
                perform_call(driver, action)
            elif action is START_TLS:
                driver.tls_started()
            else:
                assert action is CLOSE
                break
        return bytes(self.wire[start:])


def make_server(**options: Any) -> tuple[Server, MemoryStorage]:
    store = MemoryStorage()
    store.add("alice", b"Subject: one\n\nbody\n")
    store.add("alice", b"Subject: two\n\n.dot\n")
    defaults: dict[str, Any] = {
        "auth": DictAuthenticator({"alice": "pencil", "bob": "secret"}),
        "storage": store,
        "cleartext_auth": True,
        "auth_failure_delay": 2.0,
    }
    defaults.update(options)
    return Server(**defaults), store


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("pop3proto")
    handler = Keep(level=logging.DEBUG)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)
    logger.setLevel(old)


def events(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    return [r.pop3 for r in records if hasattr(r, "pop3")]


def test_a_whole_session_greets_answers_and_logs_out(records: list[logging.LogRecord]) -> None:
    server, store = make_server()
    host = Host(server)
    out = host.run(b"USER alice\r\nPASS pencil\r\nSTAT\r\nRETR 2\r\nTOP 1 0\r\nDELE 1\r\nQUIT\r\n")
    assert out.startswith(b"+OK POP3 server ready.\r\n")
    assert b"+OK 2 " in out
    assert b"\r\n..dot\r\n.\r\n" in out
    assert out.endswith(b"+OK Logging out.\r\n")
    assert host.driver.closed
    assert store.messages("alice") == [b"Subject: two\n\n.dot\n"]
    assert server.connections() == []
    kinds = [e["event"] for e in events(records)]
    assert kinds == ["login", "logout"]
    logout = events(records)[-1]
    # octets on the wire for the message lines: dot-stuffed, TOP's cut applied
    assert logout["retr"] == [1, len(b"Subject: two\r\n\r\n..dot\r\n")]
    assert logout["top"] == [1, len(b"Subject: one\r\n\r\n")]
    assert logout["del"] == [1, 2]
    sizes = len(b"Subject: one\r\n\r\nbody\r\n") + len(b"Subject: two\r\n\r\n.dot\r\n")
    assert logout["size"] == sizes  # the maildrop at login, deletions included
    assert logout["session"] == host.driver.id


def test_pipelined_replies_leave_in_one_write() -> None:
    server, _ = make_server()
    host = Host(server)
    host.run()  # the greeting
    writes_before = len(host.wire)
    driver = host.driver
    driver.receive_data(b"USER alice\r\nPASS pencil\r\nSTAT\r\nLIST\r\nUIDL\r\nNOOP\r\n")
    writes = []
    while True:
        action = driver.next_action(host.now)
        if isinstance(action, Write):
            writes.append(action.data)
        elif isinstance(action, Call):
            driver.call_done(run_call(action))
        else:
            assert action is RECEIVE
            break
    assert len(writes) == 1
    assert writes[0].count(b"\r\n+OK") >= 5
    assert writes_before > 0


def test_failed_login_delay_is_served_before_the_err_and_a_hangup_frees_the_slot(
    records: list[logging.LogRecord],
) -> None:
    server, _ = make_server(max_connections_per_address=1, limit_loopback=True)
    host = Host(server)
    host.run(b"USER alice\r\nPASS wrong\r\n", serve_delays=False)
    driver = host.driver
    # The delay is running: no -ERR yet, and the host is asked to read until it ends.
    assert b"-ERR" not in host.wire
    assert driver.deadline == pytest.approx(host.now + 2.0)
    # The client hangs up during the delay: the session ends at once.
    driver.receive_data(b"")
    assert driver.next_action(host.now) is CLOSE
    assert server.connections() == []
    # ... and the penalty stays with the address: the next attempt waits for it.
    again = Host(server)
    again.run(b"USER alice\r\nPASS pencil\r\n", serve_delays=False)
    assert b"+OK Logged in" not in again.wire
    assert again.driver.deadline is not None
    assert again.driver.deadline > again.now
    failed = [e for e in events(records) if e["event"] == "login_failed"]
    assert failed
    assert failed[0]["reason"] == "password mismatch"
    assert failed[0]["user"] == "alice"
    assert failed[0]["method"] == "USER"


def test_unknown_user_and_wrong_password_look_the_same_to_the_client(
    records: list[logging.LogRecord],
) -> None:
    server, _ = make_server(auth_failure_delay=0)
    a, b = Host(server), Host(server, ("192.0.2.11", 1))
    out_a = a.run(b"USER nobody\r\nPASS x\r\n")
    out_b = b.run(b"USER alice\r\nPASS x\r\n")
    assert out_a == out_b
    reasons = [e["reason"] for e in events(records) if e["event"] == "login_failed"]
    assert reasons == ["unknown user", "password mismatch"]


def test_third_failure_gets_its_err_line_before_the_close() -> None:
    server, _ = make_server(auth_failure_delay=0)
    host = Host(server)
    out = host.run(b"USER a\r\nPASS x\r\n", b"USER a\r\nPASS x\r\n", b"USER a\r\nPASS x\r\n")
    assert out.count(b"-ERR [AUTH]") == 3
    assert host.driver.closed


def test_idle_timeout_says_goodbye_without_update() -> None:
    server, store = make_server(idle_timeout=600)
    host = Host(server)
    host.run(b"USER alice\r\nPASS pencil\r\nDELE 1\r\n")
    out = host.run(idle=True)
    assert out == b"-ERR Disconnected for inactivity.\r\n"
    assert host.driver.closed
    assert len(store.messages("alice")) == 2  # RFC 1939: no UPDATE on autologout
    assert store.lock("alice")  # and the lock was released


def test_login_deadline_counts_from_connect() -> None:
    server, _ = make_server(login_timeout=10, idle_timeout=600)
    host = Host(server)
    host.run()
    assert host.driver.deadline == pytest.approx(host.now + 10)
    host.now += 6
    host.run(b"NOOP\r\n")  # activity does not move a login deadline
    assert host.driver.deadline == pytest.approx(host.now + 4)


def test_shutdown_says_goodbye_releases_the_lock_and_applies_nothing(
    records: list[logging.LogRecord],
) -> None:
    server, store = make_server()
    host = Host(server)
    host.run(b"USER alice\r\nPASS pencil\r\nDELE 1\r\n")
    host.driver.shutdown()
    out = host.run()
    assert out == b"-ERR [SYS/TEMP] Server shutting down.\r\n"
    assert host.driver.closed
    assert len(store.messages("alice")) == 2
    assert store.lock("alice")
    assert events(records)[-1]["reason"] == "Server shutting down"


def test_shutdown_during_the_lock_call_still_releases_the_lock() -> None:
    server, store = make_server()
    host = Host(server)
    host.run()
    driver = host.driver
    driver.receive_data(b"USER alice\r\nPASS pencil\r\n")
    while True:
        action = driver.next_action(host.now)
        if isinstance(action, Call) and action.fn.__name__ == "lock":
            break
        if isinstance(action, Call):
            driver.call_done(run_call(action))
    driver.shutdown()  # arrives while the lock call runs
    driver.call_done(run_call(action))
    host.run()
    assert driver.closed
    assert store.lock("alice"), "the lock taken during shutdown was released"


def test_connection_lost_mid_session_releases_the_lock() -> None:
    server, store = make_server()
    host = Host(server)
    host.run(b"USER alice\r\nPASS pencil\r\n")
    host.driver.connection_lost(ConnectionResetError())
    host.run()
    assert host.driver.closed
    assert store.lock("alice")


def test_over_the_limit_a_client_is_refused_with_sys_temp() -> None:
    server, _ = make_server(max_connections=1)
    first = Host(server)
    first.run()
    second = Host(server, ("192.0.2.20", 5))
    assert second.driver.refused == "Too many connections."
    assert second.run() == b"-ERR [SYS/TEMP] Too many connections.\r\n"
    assert second.driver.closed
    assert server.connections() == [first.driver.id]


def test_ipv6_clients_of_one_prefix_share_the_per_address_limit() -> None:
    server, _ = make_server(max_connections_per_address=2, address_ipv6_prefix=64)
    hosts = [Host(server, (f"2001:db8::{i}", 1)) for i in range(1, 4)]
    assert [h.driver.refused for h in hosts] == [None, None,
                                                 "Too many connections from your address."]
    other = Host(server, ("2001:db8:0:1::1", 1))
    assert other.driver.refused is None


def test_ipv6_addresses_of_one_48_share_a_penalty() -> None:
    server, _ = make_server(penalty_ipv6_prefix=48)
    bad = Host(server, ("2001:db8:1:2::1", 1))
    bad.run(b"USER a\r\nPASS b\r\n", serve_delays=False)
    neighbour = Host(server, ("2001:db8:1:ffff::9", 1))
    neighbour.run(b"USER alice\r\nPASS pencil\r\n", serve_delays=False)
    assert b"Logged in" not in neighbour.wire  # waits for the /48's penalty first
    assert neighbour.driver.deadline is not None
    assert neighbour.driver.deadline > neighbour.now


def test_parallel_failures_queue_their_penalties() -> None:
    server, _ = make_server(auth_failure_delay=1.0, auth_failure_delay_max=4.0)
    now = 100.0
    delays = [server.login_failed("192.0.2.50", now) for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0]
    # The queue's end is the sum: a new guess waits for all of them.
    assert server.login_wait("192.0.2.50", now) == pytest.approx(15.0)


def test_a_storage_failure_at_lock_is_sys_temp_and_not_a_failed_login() -> None:
    class Broken(MemoryStorage):
        def lock(self, mailbox: str) -> bool:
            raise StorageError("disk on fire")

    server, _ = make_server(storage=Broken())
    host = Host(server)
    out = host.run(b"USER alice\r\nPASS pencil\r\n")
    assert out.endswith(b"-ERR [SYS/TEMP] Mailbox is temporarily unavailable.\r\n")
    assert server.login_wait("192.0.2.10", host.now) == 0


def test_a_refused_maildrop_is_sys_perm() -> None:
    class Linked(MemoryStorage):
        def lock(self, mailbox: str) -> bool:
            raise MailboxRefused("cur is a symlink")

    server, _ = make_server(storage=Linked())
    out = Host(server).run(b"USER alice\r\nPASS pencil\r\n")
    assert out.endswith(b"-ERR [SYS/PERM] Mailbox is not accessible.\r\n")


def test_an_authenticator_failure_is_sys_temp_and_not_counted() -> None:
    class Down:
        def exists(self, name: str) -> bool:
            raise OSError("database down")

        def lookup(self, name: str) -> Any:
            raise OSError("database down")

    server, _ = make_server(auth=Down())
    host = Host(server)
    out = host.run(b"USER alice\r\nPASS pencil\r\n")
    assert out.endswith(b"-ERR [SYS/TEMP] Authentication is temporarily unavailable.\r\n")
    assert server.login_wait("192.0.2.10", host.now) == 0


def test_blocking_callbacks_are_marked_for_a_thread_and_cheap_ones_inline() -> None:
    class Slow:
        def exists(self, name: str) -> bool:
            return True

        def lookup(self, name: str) -> Any:
            return PlainVerifier("pencil"), name

    server, _ = make_server(auth=Slow())
    host = Host(server)
    host.run()  # the config call and the greeting
    driver = host.driver
    seen = []
    driver.receive_data(b"USER alice\r\nPASS pencil\r\n")
    action: Any = driver.next_action(100.0)
    while not (action is RECEIVE or action is CLOSE):
        if isinstance(action, Call):
            seen.append((action.fn.__name__, action.inline))
            driver.call_done(run_call(action))
        action = driver.next_action(100.0)
    assert ("lookup", False) in seen
    assert ("lock", True) in seen  # MemoryStorage declares itself nonblocking


def test_implicit_tls_starts_with_the_handshake() -> None:
    server, _ = make_server()
    driver = SessionDriver(server, ("192.0.2.1", 1), tls=True, now=0.0)
    assert driver.next_action(0.0) is START_TLS
    driver.tls_started()
    action = driver.next_action(0.0)
    assert isinstance(action, Call)  # the config, then the greeting


def test_a_handshake_that_never_ends_times_out() -> None:
    server, _ = make_server(handshake_timeout=5)
    driver = SessionDriver(server, ("192.0.2.1", 1), tls=True, now=0.0)
    assert driver.next_action(0.0) is START_TLS
    assert driver.deadline == 5.0
    assert driver.next_action(5.0) is CLOSE
    assert server.connections() == []
