"""9. Disconnects: a drop deletes nothing unless QUIT was sent; the lock is released either way.

"FIN" is an ordinary close, "RST" an abortive one (SO_LINGER 0), as a
crashing client or a dropped NAT mapping would look.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import Raw, running

from pop3proto.server import Server

from .conftest import Mail, body, logged_in, make_mail, wait_for

BIG = body(1, size=8 << 20)
USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}


@pytest.fixture
def big(tmp_path: Path) -> Mail:
    return make_mail(tmp_path, USERS, [BIG, *(body(n) for n in range(2, 6))])


@pytest.fixture
def served(transport: str, big: Mail) -> Iterator[Server]:
    with running(transport, **big.options(auth_failure_delay=0.5)) as server:
        yield server


def drop(client: Raw, how: str) -> None:
    if how == "RST":
        client.abort()
    else:
        client.close()


def relogin(server: Server, user: str, timeout: float = 5.0) -> Raw:
    """Log in again, retrying while the dropped session still holds the lock."""
    deadline = time.monotonic() + timeout
    while True:
        c = Raw(server.cget("port"))
        reply = c.login(user, USERS[user])
        if reply.startswith(b"+OK"):
            return c
        c.close()
        assert b"[IN-USE]" in reply, reply
        assert time.monotonic() < deadline, "still locked"
        time.sleep(0.02)


HOW = ["FIN", "RST"]


@pytest.mark.parametrize("how", HOW)
def test_drop_mid_retr_deletes_nothing_and_unlocks(served: Server, big: Mail, how: str) -> None:
    c = logged_in(served.cget("port"), "alice", USERS["alice"])
    assert c.cmd("DELE 2").startswith(b"+OK")
    assert c.cmd("RETR 1").startswith(b"+OK")
    got = 0
    while got < 200_000:
        got += len(c.sock.recv(65536))
    drop(c, how)
    with relogin(served, "alice") as again:
        assert again.cmd("STAT").startswith(b"+OK 5 ")
        assert again.cmd("QUIT").startswith(b"+OK")
    assert len(big.on_disk("alice")) == 5
    assert wait_for(lambda: served.connections() == [], 5)


@pytest.mark.parametrize("how", HOW)
def test_drop_before_quit_deletes_nothing_and_unlocks(served: Server, big: Mail, how: str) -> None:
    c = logged_in(served.cget("port"), "alice", USERS["alice"])
    for n in range(1, 6):
        assert c.cmd(f"DELE {n}").startswith(b"+OK")
    drop(c, how)
    with relogin(served, "alice") as again:
        assert again.cmd("STAT").startswith(b"+OK 5 ")
        assert again.cmd("QUIT").startswith(b"+OK")
    assert len(big.on_disk("alice")) == 5


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("pipelined", [False, True], ids=["acked-deles", "pipelined-deles"])
def test_drop_right_after_quit_still_completes_the_update(
    served: Server, big: Mail, how: str, pipelined: bool
) -> None:
    c = logged_in(served.cget("port"), "alice", USERS["alice"])
    if pipelined:  # the DELE replies are still unsent when the client goes
        c.send(b"DELE 2\r\nDELE 3\r\nQUIT\r\n")
    else:
        assert c.cmd("DELE 2").startswith(b"+OK")
        assert c.cmd("DELE 3").startswith(b"+OK")
        c.send(b"QUIT\r\n")
    drop(c, how)
    assert wait_for(lambda: len(big.on_disk("alice")) == 3, 5), len(big.on_disk("alice"))
    with relogin(served, "alice") as again:
        assert again.cmd("STAT").startswith(b"+OK 3 ")
        assert again.cmd("QUIT").startswith(b"+OK")


@pytest.mark.parametrize("how", HOW)
def test_drop_during_the_failed_login_delay_and_mid_sasl(served: Server, how: str) -> None:
    c = Raw(served.cget("port"))
    assert c.cmd("USER alice").startswith(b"+OK")
    c.send(b"PASS wrong\r\n")  # the server now sleeps 0.5 s before answering
    time.sleep(0.1)
    drop(c, how)
    c = Raw(served.cget("port"))
    assert c.cmd("AUTH LOGIN").startswith(b"+ ")
    drop(c, how)
    assert wait_for(lambda: served.connections() == [], 5), served.connections()
    with relogin(served, "bob") as again:
        assert again.cmd("QUIT").startswith(b"+OK")


def test_many_drops_leave_no_session_behind(served: Server, big: Mail) -> None:
    """200 sessions dropped at random points: no session, lock or deletion left."""
    port = served.cget("port")
    for i in range(200):
        c = Raw(port)
        if i % 4:
            c.login("bob", USERS["bob"]) if i % 4 != 3 else c.cmd("AUTH PLAIN")
        if i % 4 == 2:
            c.send(b"DELE 1\r\nRETR 2\r\n")
        drop(c, HOW[i % 2])
    assert wait_for(lambda: served.connections() == [], 10), served.connections()
    with relogin(served, "bob") as again:
        assert again.cmd("STAT").startswith(b"+OK 5 ")
        assert again.cmd("QUIT").startswith(b"+OK")
