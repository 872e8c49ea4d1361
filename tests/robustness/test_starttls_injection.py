"""1. STARTTLS injection (CVE-2011-0411 class): nothing pipelined behind STLS is executed.

The TLS suite covers CAPA behind STLS; here the injected commands are the
ones an attacker wants: USER/PASS (a login the victim then completes over
TLS), AUTH PLAIN, and a whole login plus DELE/QUIT.  Proof is twofold: what
the client sees after the handshake, and the server's own command trace
(``trace`` option), which must show no command between STLS and the
handshake.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
from collections.abc import Iterator

import pytest
from clients import HOST, Raw, running
from tlsutil import TLSFiles

from pop3proto.server import Server

from .conftest import Figure, Mail

ALICE, PW = "alice", "alice-Secret-1"
PLAIN_IR = base64.b64encode(f"\0{ALICE}\0{PW}".encode()).decode()

INJECTIONS = {
    "user": f"USER {ALICE}\r\n",
    "user-pass": f"USER {ALICE}\r\nPASS {PW}\r\n",
    "user-pass-dele-quit": f"USER {ALICE}\r\nPASS {PW}\r\nDELE 1\r\nDELE 2\r\nQUIT\r\n",
    "auth-plain": f"AUTH PLAIN {PLAIN_IR}\r\nDELE 1\r\n",
}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def traced(transport: str, mail: Mail, tls: TLSFiles) -> Iterator[tuple[Server, list[str]]]:
    lines: list[str] = []

    def trace(session: int, direction: str, line: str) -> None:
        lines.append(f"{direction} {line}")

    options = mail.options(
        ssl_context=tls.server_context(), trace=trace, auth_failure_delay=0, cleartext_auth=True
    )
    with running(transport, **options) as server:
        yield server, lines


def commands(trace: list[str]) -> list[str]:
    return [line[2:] for line in trace if line.startswith("C ")]


def wrap(client: Raw, tls: TLSFiles) -> None:
    """Switch *client* to TLS; the SSL socket is the client's even if the handshake fails."""
    client.sock = tls.client_context().wrap_socket(
        client.sock, server_hostname=HOST, do_handshake_on_connect=False
    )
    client.sock.do_handshake()


@pytest.mark.parametrize("injected", list(INJECTIONS), ids=list(INJECTIONS))
def test_commands_in_the_stls_packet_are_never_executed(
    traced: tuple[Server, list[str]], tls: TLSFiles, mail: Mail, injected: str, figure: Figure
) -> None:
    server, trace = traced
    with Raw(server.cget("port")) as client:
        client.send(b"STLS\r\n" + INJECTIONS[injected].encode())  # one write, one segment
        assert client.line().startswith(b"+OK")
        assert not client.buf, f"plaintext after the STLS reply: {bytes(client.buf)!r}"
        wrap(client, tls)
        assert commands(trace) == ["STLS"], trace
        # The injected USER (or AUTH) did not survive the switch: PASS has no user and
        # the session is still in AUTHORIZATION.
        assert client.cmd(f"PASS {PW}") == b"-ERR No username given."
        assert client.cmd("STAT").startswith(b"-ERR")
        # The session itself is healthy: a real login over TLS works.
        assert client.login(ALICE, PW).startswith(b"+OK")
        assert client.cmd("STAT").startswith(b"+OK 5 ")
        assert client.cmd("QUIT").startswith(b"+OK")
    assert commands(trace) == ["STLS", "PASS ***", "STAT", f"USER {ALICE}", "PASS ***", "STAT",
                               "QUIT"]  # fmt: skip
    assert len(mail.on_disk(ALICE)) == 5, "an injected DELE was applied"
    figure("commands_executed_before_tls", 1)


# When the server has already reset the connection, CPython's SSLSocket._create
# raises ECONNRESET from its pre-handshake recv(1) after detaching the socket and
# without closing the new SSLSocket: that leak is the client library's, not ours.
@pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")
def test_injection_in_a_second_segment_is_not_executed(
    traced: tuple[Server, list[str]], tls: TLSFiles, mail: Mail
) -> None:
    """USER/PASS written right after STLS, before its +OK is read (two segments)."""
    server, trace = traced
    with Raw(server.cget("port")) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.send(b"STLS\r\n")
        client.send(INJECTIONS["user-pass-dele-quit"].encode())
        assert client.line().startswith(b"+OK")
        # Either both writes were read at once (the injection was dropped) or the
        # injected bytes went to the TLS layer (the handshake fails): never executed.
        with contextlib.suppress(ssl.SSLError, ConnectionError, TimeoutError, EOFError):
            wrap(client, tls)
            assert client.cmd(f"PASS {PW}") == b"-ERR No username given."
    assert commands(trace)[:2] in (["STLS"], ["STLS", "PASS ***"]), trace
    assert len(mail.on_disk(ALICE)) == 5


def test_user_before_stls_is_forgotten_by_the_switch(
    traced: tuple[Server, list[str]], tls: TLSFiles
) -> None:
    """RFC 2595: after TLS the session starts over; a USER given in clear does not count."""
    server, _ = traced
    with Raw(server.cget("port")) as client:
        assert client.cmd(f"USER {ALICE}").startswith(b"+OK")
        assert client.cmd("STLS").startswith(b"+OK")
        wrap(client, tls)
        assert client.cmd(f"PASS {PW}") == b"-ERR No username given."


def test_stls_is_refused_inside_the_tls_session_and_after_login(
    traced: tuple[Server, list[str]], tls: TLSFiles
) -> None:
    server, _ = traced
    with Raw(server.cget("port")) as client:
        assert client.cmd("STLS").startswith(b"+OK")
        wrap(client, tls)
        assert client.cmd("STLS").startswith(b"-ERR")
        assert client.login(ALICE, PW).startswith(b"+OK")
        assert client.cmd("STLS").startswith(b"-ERR")
