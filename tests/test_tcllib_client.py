"""Tcllib's ``pop3`` client (tclsh) against every transport, plain and implicit TLS.

Tcllib's ``pop3`` is the client that Tcllib ``pop3d`` users fetch with.  Each
test runs it as a subprocess (``clients.tcllib_pop3``) on a real Maildir and
compares what ``pop3::retrieve`` and ``pop3::top`` return byte for byte with
the files, in Tcllib's conventions (``clients.tcl_text``: LF line ends, the
lines un-stuffed, an empty message as one empty line).  The client writes every
command and its CRLF in two writes; the 200-message fetch prints how long that
takes on each transport (no timed assertion).  The tests skip when tclsh,
Tcllib or (for TLS) the Tcl ``tls`` package is missing.
"""

from __future__ import annotations

import contextlib
import importlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clients import (
    TRANSPORTS,
    MailEnv,
    make_env,
    need_tcllib,
    port_of,
    require_transport,
    running,
    tcl_text,
    tcl_top,
    tcllib_pop3,
    wire,
)
from tlsutil import TLSFiles

from pop3proto.server import Server

pytestmark = pytest.mark.clients

ALICE, ALICE_PW = "alice", "alice-Secret-1"

#: Dot lines ('.', '..x', '.x' at line starts) in every position, an empty message,
#: a message without a final newline, CRLF and 8-bit bodies, and messages whose
#: stuffing ends Tcllib's sized read (``read $chan <octets>``, then line reads up
#: to the terminator) at a line end, inside a line, and right after a line's dot.
CORPUS: tuple[bytes, ...] = (
    b"",
    b"From: a@example.org\nSubject: dots\n\n.\n..x\n.x\nmiddle\n.\n",
    b"Subject: no final newline\n\nfirst\n.second\nthird",
    b"Subject: crlf\r\n\r\n..x\r\n.\r\n.x\r\nend\r\n",
    "Subject: 8bit\n\nGrüße, naïve café\n.ü\n".encode(),
    b"Subject: two at the end\n\n..\n.\n",
    b"Subject: three at the end\n\n.\n..\n...\n",
    b"Subject: sized read ends after a dot\n\nbody\n.\n.\n.\n",
    b"Subject: and again\n\n" + b".\n" * 7,
    b"Subject: dot line last, no newline\n\nbody\n.last",
    b"Subject: only a header",
    b"Subject: long\n\n"
    + b"".join(
        (b"." if i % 3 == 0 else b"..x" if i % 5 == 0 else b"") + b"%05d\n" % i for i in range(4000)
    ),
)


def size(data: bytes) -> int:
    """The octets the server announces for *data* (an empty message is one empty line)."""
    return len(wire(data)) or 2


@dataclass(frozen=True)
class Endpoint:
    """Where the Tcllib client connects, and the CA file it verifies with (TLS only)."""

    port: int
    cafile: Path | None


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    require_transport(name)
    return name


@pytest.fixture(params=["plain", "tls"])
def mode(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    need_tcllib(tls=name == "tls")
    return name


@contextlib.contextmanager
def serve(
    transport: str, mode: str, env: MailEnv, tls: TLSFiles, **options: object
) -> Iterator[tuple[Server, Endpoint]]:
    """A server for *env*; in TLS mode it listens for implicit TLS (pop3s) as well."""
    if mode == "tls":
        options = {"ssl_context": tls.server_context(), "pop3s_port": 0, **options}
    with running(transport, **env.options(**options)) as server:
        if mode == "tls":
            port = server.cget("pop3s_port")
            assert isinstance(port, int)
            yield server, Endpoint(port, tls.ca_pem)
        else:
            yield server, Endpoint(port_of(server), None)


def test_login_stat_list_retr_top_dele_quit(
    transport: str, mode: str, tls: TLSFiles, tmp_path: Path
) -> None:
    env = make_env(tmp_path, {ALICE: ALICE_PW}, messages=CORPUS)
    sizes = [size(m) for m in CORPUS]
    count = len(CORPUS)
    deleted = (1, 4)
    tops = [f"top {n} {lines}" for n in range(1, count + 1) for lines in (0, 2)]
    with serve(transport, mode, env, tls) as (_, at):
        run = tcllib_pop3(
            at.port,
            ALICE,
            ALICE_PW,
            [
                "status",
                "list",
                "list 3",
                "retrieve 1 end",
                *tops,
                *(f"delete {n}" for n in deleted),
                "status",
                "retrieve 1",
                "close",
            ],
            cafile=at.cafile,
        )
        assert run.returncode == 0, run
        assert run.opened.ok, run.opened
        steps = iter(run.steps)

        stat = next(steps)
        assert (stat.command, stat.ok) == ("status", True)
        assert stat.value == b"%d %d" % (count, sum(sizes))
        listing = next(steps)
        assert listing.ok
        assert listing.value == b"".join(b"%d %d\n" % (n, s) for n, s in enumerate(sizes, 1))
        assert next(steps).value == b"3 %d" % sizes[2]

        fetched = next(steps)
        assert fetched.ok, fetched
        assert len(fetched.values) == count
        for n, (got, data) in enumerate(zip(fetched.values, CORPUS, strict=True), 1):
            assert got == tcl_text(data), f"RETR {n}"

        for n in range(1, count + 1):
            for lines in (0, 2):
                step = next(steps)
                assert step.ok, step
                assert step.value == tcl_top(CORPUS[n - 1], lines), f"TOP {n} {lines}"

        for _ in deleted:
            dele = next(steps)
            assert (dele.command, dele.ok) == ("delete", True), dele
        after = next(steps)
        left = sum(s for n, s in enumerate(sizes, 1) if n not in deleted)
        assert after.value == b"%d %d" % (count - len(deleted), left)
        gone = next(steps)
        assert (gone.command, gone.ok) == ("retrieve", False)
        assert gone.value.strip(), gone  # the server's -ERR text (Tcllib drops the "-ERR")
        quit_ = next(steps)
        assert (quit_.command, quit_.ok) == ("close", True)
        assert next(steps, None) is None

        kept = [m for n, m in enumerate(CORPUS, 1) if n not in deleted]
        assert env.on_disk(ALICE) == kept  # the QUIT was sent and the update ran

        again = tcllib_pop3(at.port, ALICE, ALICE_PW, ["retrieve 1 end", "close"], cafile=at.cafile)
        assert again.returncode == 0, again
        assert list(again[0].values) == [tcl_text(m) for m in kept]
        assert again[1].ok
    assert env.on_disk(ALICE) == kept


def test_a_wrong_password_fails_the_open_and_changes_nothing(
    transport: str, mode: str, tls: TLSFiles, tmp_path: Path
) -> None:
    env = make_env(tmp_path, {ALICE: ALICE_PW}, messages=CORPUS)
    with serve(transport, mode, env, tls, auth_failure_delay=0) as (_, at):
        run = tcllib_pop3(at.port, ALICE, "wrong", ["delete 1", "close"], cafile=at.cafile)
        assert run.returncode == 2, run
        assert not run.opened.ok
        assert b"POP3 LOGIN ERROR" in run.opened.value
        assert b"[AUTH]" in run.opened.value
        assert run.steps == ()
    assert env.on_disk(ALICE) == list(CORPUS)


def test_tls_client_refuses_a_certificate_from_another_ca(
    transport: str, tls: TLSFiles, tmp_path: Path
) -> None:
    need_tcllib(tls=True)
    (tmp_path / "other-ca").mkdir()
    other = TLSFiles.create(tmp_path / "other-ca")
    env = make_env(tmp_path, {ALICE: ALICE_PW}, messages=CORPUS[:2])
    with serve(transport, "tls", env, tls) as (_, at):
        run = tcllib_pop3(at.port, ALICE, ALICE_PW, ["close"], cafile=other.ca_pem)
        assert run.returncode == 2, run
        assert not run.opened.ok
    assert env.on_disk(ALICE) == list(CORPUS[:2])


def test_200_message_fetch_with_split_command_writes(
    transport: str,
    mode: str,
    tls: TLSFiles,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every command arrives as two TCP segments ('RETR n', then CRLF): print the fetch time.

    Tcllib's client leaves Nagle on, so its CRLF waits for the server's ACK of
    the command; the transport sets TCP_QUICKACK when a read ends inside a
    line (counted here through the transport's ``quickack``) instead of letting
    a delayed ACK cost each command tens of milliseconds.
    """
    module = importlib.import_module(f"pop3proto.transports.{transport}")
    original = module.quickack
    acked: list[object] = []

    def counting_quickack(sock: socket.socket) -> None:
        acked.append(sock)
        original(sock)

    monkeypatch.setattr(module, "quickack", counting_quickack)
    messages = [b"Subject: %d\n\n.\nbody %d\n..x\n" % (n, n) for n in range(1, 201)]
    env = make_env(tmp_path, {ALICE: ALICE_PW}, messages=messages)
    with serve(transport, mode, env, tls) as (_, at):
        run = tcllib_pop3(
            at.port, ALICE, ALICE_PW, ["retrieve 1 end", "close"], cafile=at.cafile, timeout=120
        )
        assert run.returncode == 0, run
        fetch = run[0]
        assert list(fetch.values) == [tcl_text(m) for m in messages]
        assert run[1].ok
    assert env.on_disk(ALICE) == messages
    assert acked, "no read ended inside a line, or the transport did not ask for a quick ACK"
    with capsys.disabled():
        print(
            f"\nTcllib pop3 {transport}/{mode}: login {run.opened.seconds * 1000:.1f} ms, "
            f"200 x RETR {fetch.seconds * 1000:.1f} ms "
            f"({fetch.seconds / 200 * 1000:.2f} ms a message), "
            f"{len(acked)} quick ACKs"
        )
