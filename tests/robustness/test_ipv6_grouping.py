"""Issue 15, finding 4: IPv6 clients are counted by prefix, not per /128.

Connections come from 127.0.0.1 through PROXY v2 headers that name IPv6
sources.  Per-address limits group by ``address_ipv6_prefix`` (default
64), failed-login penalties by ``penalty_ipv6_prefix`` (default 48): the
penalty a failure earns is read from the ``login_failed`` log event's
``delay`` field (the base doubles per failure of the same group).
"""

from __future__ import annotations

import socket

import pytest

from .conftest import Mail, wait_for
from .round2 import KINDS, captured, connect_as, read_line, serving

PROXIED = {"proxy_protocol": True, "trusted_proxies": ("127.0.0.0/8",), "cleartext_auth": True}
BASE = 0.1


def greeting(sock: socket.socket) -> bytes:
    line = read_line(sock, 10)
    assert line is not None, "no greeting"
    return line


@pytest.mark.parametrize("kind", KINDS)
def test_one_slash_64_shares_the_per_address_limit(kind: str, mail: Mail) -> None:
    options = mail.options(max_connections_per_address=1, **PROXIED)
    with serving(kind, **options) as server:
        port = server.cget("port")
        socks = []
        try:
            first = connect_as(port, "2001:db8:1:2::1")
            socks.append(first)
            assert greeting(first).startswith(b"+OK")
            same64 = connect_as(port, "2001:db8:1:2:ffff:ffff:ffff:fffe")
            socks.append(same64)
            assert greeting(same64) == b"-ERR [SYS/TEMP] Too many connections from your address."
            other64 = connect_as(port, "2001:db8:1:3::1")
            socks.append(other64)
            assert greeting(other64).startswith(b"+OK")
            mapped = connect_as(port, "::ffff:192.0.2.7")  # IPv4-mapped counts as IPv4
            socks.append(mapped)
            assert greeting(mapped).startswith(b"+OK")
        finally:
            for s in socks:
                s.close()
        assert wait_for(lambda: server.connections() == [], 5)
        # The slot is free again.
        again = connect_as(port, "2001:db8:1:2::99")
        try:
            assert greeting(again).startswith(b"+OK")
        finally:
            again.close()


def fail_once(port: int, source: str) -> None:
    sock = connect_as(port, source)
    try:
        assert greeting(sock).startswith(b"+OK")
        sock.sendall(b"USER alice\r\nPASS wrong\r\n")
        assert read_line(sock, 10) == b"+OK"
        assert read_line(sock, 10) == b"-ERR [AUTH] Authentication failed."
    finally:
        sock.close()


@pytest.mark.parametrize("kind", KINDS)
def test_one_slash_48_shares_a_penalty_and_another_does_not(kind: str, mail: Mail) -> None:
    options = mail.options(auth_failure_delay=BASE, auth_failure_delay_max=5.0, **PROXIED)
    sources = [
        "2001:db8:1:2::1",     # a fresh /48: the base delay
        "2001:db8:1:ff::5",    # another /64 of the same /48: doubled
        "2001:db8:1:2::1",     # the first again: doubled again
        "2001:db8:2::1",       # another /48: the base delay
        "2001:db8:2:0:1::7",   # its neighbour: doubled
    ]  # fmt: skip
    with captured() as log, serving(kind, **options) as server:
        port = server.cget("port")
        for source in sources:
            fail_once(port, source)
    failed = log.of("login_failed")
    assert [e["rip"] for e in failed] == sources
    assert [e["delay"] for e in failed] == [BASE, 2 * BASE, 4 * BASE, BASE, 2 * BASE], failed
