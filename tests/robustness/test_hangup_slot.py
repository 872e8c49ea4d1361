"""Issue 15, finding 6: a client that hangs up during a failed-login delay frees its slot at once.

With one connection per address (loopback counted), a client fails a login
(delay 2 s) and hangs up while the server sleeps.  Its slot must be free
long before the delay ends: a new client from the same address is greeted
(not refused with "Too many connections") — but the penalty stays with the
address, so the new client's login waits for it.
"""

from __future__ import annotations

import socket

import pytest
from clients import HOST, Raw

from .conftest import Mail, wait_for
from .round2 import KINDS, captured, read_line, serving

DELAY = 2.0


@pytest.mark.parametrize("how", ["FIN", "RST"])
@pytest.mark.parametrize("kind", KINDS)
def test_hangup_during_the_delay_frees_the_slot_but_not_the_penalty(
    kind: str, how: str, mail: Mail
) -> None:
    options = mail.options(
        max_connections_per_address=1, limit_loopback=True,
        auth_failure_delay=DELAY, auth_failure_delay_max=15.0,
    )  # fmt: skip
    with captured() as log, serving(kind, **options) as server:
        port = server.cget("port")
        guesser = Raw(port)
        assert guesser.cmd("USER alice").startswith(b"+OK")
        guesser.send(b"PASS wrong\r\n")
        assert wait_for(lambda: log.of("login_failed"), 1.0), "the failure was not counted"
        if how == "RST":
            guesser.abort()
        else:
            guesser.close()
        # The slot is freed well before the 2 s delay is over.
        assert wait_for(lambda: server.connections() == [], DELAY / 2), server.connections()
        sock = socket.create_connection((HOST, port), timeout=10)
        try:
            greeting = read_line(sock, DELAY / 2)
            assert greeting is not None, "no greeting while the delay runs"
            assert greeting.startswith(b"+OK"), greeting
            sock.sendall(b"USER alice\r\n")
            assert read_line(sock, 5) == b"+OK"
            sock.sendall(f"PASS {mail.users['alice']}\r\n".encode())
            # The penalty stays with the address: the right password waits its turn...
            assert read_line(sock, 0.3) is None, "the login did not wait for the penalty"
            # ...and is then accepted.
            reply = read_line(sock, 10)
            assert reply is not None, "no answer after the penalty"
            assert reply.startswith(b"+OK"), reply
            sock.sendall(b"QUIT\r\n")
            assert read_line(sock, 5) is not None
        finally:
            sock.close()
    gone = [e for e in log.of("disconnect") if "failed-login delay" in str(e.get("reason"))]
    assert len(gone) == 1, log.of("disconnect")
    assert not log.of("refused"), log.of("refused")
