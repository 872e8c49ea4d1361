"""Issue 15, the rest: storage work off the loop, PROXY scope ids, the fail2ban log end to end.

* Finding 13 (storage part): a ``scan`` that blocks for 2 s (an ordinary
  callback, not marked nonblocking) must not stall another client: its
  NOOP is answered within 1 s meanwhile (selectors used to scan on its loop
  thread; checked on every transport).
* Finding 11 (transport side): a PROXY v1 header whose IPv6 source carries
  a scope id (``fe80::1%eth0``, or one with CR, LF or ESC in it) is refused:
  the connection is closed with nothing sent, and nothing of it reaches
  the log raw.
* A brute-force run on the blocking transport writes ``Login failed (...)``
  lines with ``rip=127.0.0.1`` that the shipped fail2ban filter matches.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from clients import HOST, Raw
from test_ops_fail2ban import fail2ban_hosts

from pop3proto.maildir import MaildirStorage
from pop3proto.ops import logfmt

from .conftest import Mail, logged_in, wait_for
from .round2 import KINDS, captured, proxy_v1, read_line, serving

SLOW_SCAN = 2.0


class SlowScan(MaildirStorage):
    """A Maildir whose ``scan`` of alice's maildrop blocks for 2 s (a cold, huge maildrop)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.scanning = threading.Event()

    def scan(self, mailbox: str) -> Any:
        if mailbox == "alice":
            self.scanning.set()
            time.sleep(SLOW_SCAN)
        return super().scan(mailbox)


@pytest.mark.parametrize("kind", KINDS)
def test_a_slow_scan_stalls_nobody_else(kind: str, mail: Mail) -> None:
    storage = SlowScan(mail.root)
    with serving(kind, auth=mail.auth, storage=storage, auth_failure_delay=0) as server:
        port = server.cget("port")
        with logged_in(port, "bob", mail.users["bob"]) as bob, Raw(port) as alice:
            assert alice.cmd("USER alice") == b"+OK"
            alice.send(f"PASS {mail.users['alice']}\r\n".encode())
            assert storage.scanning.wait(5), "alice's scan never started"
            for i in range(3):
                bob.send(b"NOOP\r\n")
                reply = read_line(bob.sock, 1.0)
                assert reply is not None, f"NOOP {i} waited for another client's scan"
                assert reply == b"+OK", reply
            assert alice.line().startswith(b"+OK"), "alice's login failed"
            assert alice.cmd("STAT").startswith(b"+OK 5 ")
            assert alice.cmd("QUIT").startswith(b"+OK")
            assert bob.cmd("QUIT").startswith(b"+OK")


SCOPED = [
    "fe80::1%eth0",
    "fe80::1%eth\r0",
    "fe80::1%\x1b[31mred",
    "fe80::1%x\ny",
]


@pytest.mark.parametrize("source", SCOPED, ids=["plain", "cr", "esc", "lf"])
@pytest.mark.parametrize("kind", KINDS)
def test_proxy_v1_scope_ids_are_refused(kind: str, mail: Mail, source: str) -> None:
    options = mail.options(proxy_protocol=True, trusted_proxies=("127.0.0.0/8",))
    with captured() as log, serving(kind, **options) as server:
        port = server.cget("port")
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(proxy_v1(source) + b"CAPA\r\n")
            assert read_line(sock, 5) == b"", "a scoped source was accepted"
        # The listener goes on: an honest header is served.
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(proxy_v1("2001:db8::1"))
            greeting = read_line(sock, 5)
            assert greeting is not None
            assert greeting.startswith(b"+OK"), greeting
        assert wait_for(lambda: server.connections() == [], 5)
    for message in log.messages:
        assert "fe80" not in message, message
        assert not any(c in message for c in "\r\n\x1b"), message


def test_a_brute_force_run_feeds_fail2ban(mail: Mail, tmp_path: Path) -> None:
    path = tmp_path / "pop3proto.log"
    with path.open("w", encoding="utf-8") as stream:
        handler, warning = logfmt.make_handler("text", "stderr", stream=stream)
        assert warning is None
        logger = logging.getLogger("pop3proto")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            options = mail.options(auth_failure_delay=0.01, auth_failure_delay_max=0.05)
            with serving("blocking", **options) as server:
                port = server.cget("port")
                for i in range(5):
                    with Raw(port) as c:
                        assert c.login("alice", f"guess-{i}").startswith(b"-ERR [AUTH]")
                assert wait_for(lambda: server.connections() == [], 5)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    lines = [line for line in path.read_text("utf-8").splitlines() if "Login failed (" in line]
    assert len(lines) == 5, path.read_text("utf-8")
    assert all("rip=127.0.0.1" in line for line in lines), lines
    matched, hosts = fail2ban_hosts(path)
    assert matched == 5, matched
    assert hosts == {"127.0.0.1"}, hosts
