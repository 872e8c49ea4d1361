"""Issue 15, finding 2: a connection that cannot get a thread is refused; the listener lives on.

Under a pids or task limit (containers, systemd ``TasksMax``,
``RLIMIT_NPROC``) ``Thread.start()`` raises RuntimeError.  It used to kill
the blocking transport's accept loop for good.  Now a connection that
cannot be set up is refused (``-ERR [SYS/TEMP]`` where possible) and the
next one, once threads can be had again, is served — on every transport
(selectors and anyio start worker threads for blocking Calls).

Two ways to make thread starts fail: a real ``RLIMIT_NPROC`` in a server
subprocess (root ignores it, so the server drops to ``nobody`` after it
has imported everything and bound its port), and, in-process, a patched
``Thread.start``.  Connections refused by the per-address limit get no
thread at all on the blocking transport.
"""

from __future__ import annotations

import os
import pwd
import socket
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from clients import HOST, REPO, Raw

from .conftest import Mail, logged_in, wait_for
from .round2 import KINDS, kind_env, read_line, serving

BUSY = b"-ERR [SYS/TEMP] "

# The server subprocess: imports, binds, drops to nobody, then obeys "limit N" / "unlimit"
# on stdin (RLIMIT_NPROC soft limit = nobody's tasks now + N; back to the hard limit).
CHILD = textwrap.dedent('''
    import os, pwd, resource, sys
    transport = sys.argv[1]
    import pop3proto.transports.blocking, pop3proto.transports.selectors
    if transport == "anyio":
        import anyio, anyio.to_thread, anyio.from_thread, anyio.streams.tls
        import anyio._backends._asyncio, anyio._backends._trio, trio
        import pop3proto.transports.anyio
    import logging, ssl, concurrent.futures, encodings.idna
    from pop3proto.auth import PlainVerifier
    from pop3proto.memstore import MemoryStorage
    from pop3proto.server import Server

    class Auth:
        """lookup is an ordinary (blocking) callback: selectors/anyio run it in a thread."""
        def lookup(self, name):
            return (PlainVerifier("alice-Secret-1"), name) if name == "alice" else None

    storage = MemoryStorage()
    storage.add("alice", b"Subject: hello\\n\\nhi\\n")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    nobody = pwd.getpwnam("nobody")
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]

    def tasks():
        """Tasks (threads) now charged to nobody, system-wide."""
        n = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(l.split(":", 1) for l in f if ":" in l)
            except OSError:
                continue
            if int(fields["Uid"].split()[0]) == nobody.pw_uid:
                n += int(fields["Threads"])
        return n

    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    server = Server(host="127.0.0.1", port=0, transport=transport, auth=Auth(),
                    storage=storage, auth_failure_delay=0)
    server.up()
    print("listening", server.cget("port"), flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "limit":
            n = tasks() + int(words[1])
            resource.setrlimit(resource.RLIMIT_NPROC, (n, hard))
        else:
            n = hard
            resource.setrlimit(resource.RLIMIT_NPROC, (hard, hard))
        print("ok", n, flush=True)
''')


@pytest.fixture
def nproc_server(request: pytest.FixtureRequest) -> Iterator[tuple[Any, int]]:
    """(Popen, port) of a server subprocess that obeys ``limit N``/``unlimit`` on stdin."""
    import subprocess

    kind = request.param
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to drop to")
    transport = kind.partition("-")[0]
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, transport],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=REPO, env={**os.environ, **kind_env(kind), "PYTHONPATH": str(REPO)},
        text=True, bufsize=1,
    )  # fmt: skip
    try:
        assert p.stdout is not None
        assert p.stderr is not None
        words = p.stdout.readline().split()
        assert words[:1] == ["listening"], (words, p.stderr.read() if p.poll() else "")
        yield p, int(words[1])
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()


def tell(p: Any, command: str) -> None:
    p.stdin.write(command + "\n")
    p.stdin.flush()
    assert p.stdout.readline().startswith("ok"), "the server subprocess did not answer"


def first_reply(port: int) -> bytes:
    """The greeting (or b"" if closed at once) of a new connection, then a login's answer."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        greeting = read_line(sock, 10)
        assert greeting is not None, "no answer and no close: the listener hangs"
        if not greeting.startswith(b"+OK"):
            return greeting
        sock.sendall(b"USER alice\r\nPASS alice-Secret-1\r\n")
        for _ in range(2):
            reply = read_line(sock, 10)
            assert reply is not None, "a login hung"
            if not reply.startswith(b"+OK") or reply != b"+OK":
                return reply
        return b"+OK"


@pytest.mark.parametrize("nproc_server", KINDS, indirect=True)
def test_rlimit_nproc_refuses_then_serves_again(nproc_server: tuple[Any, int]) -> None:
    p, port = nproc_server
    tell(p, "limit 0")  # no new thread can start now
    for _ in range(45):  # more than anyio's default thread limiter holds (40)
        reply = first_reply(port)
        # Served by a thread that already existed, or refused with [SYS/TEMP].
        assert reply.startswith((b"+OK", BUSY)), reply
    tell(p, "unlimit")
    for _ in range(3):
        with Raw(port) as c:
            assert c.greeting.startswith(b"+OK"), c.greeting
            assert c.login("alice", "alice-Secret-1").startswith(b"+OK")
            assert c.cmd("STAT").startswith(b"+OK 1 ")
            assert c.cmd("QUIT").startswith(b"+OK")
    assert p.poll() is None, "the server died"


# ---------------------------------------------------------------- in-process, blocking


class FailingStarts:
    """Makes ``Thread.start`` fail (as under a task limit) for threads the accept loop starts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failing = False
        self.started = 0
        self.refused = 0
        real = threading.Thread.start
        outer = self

        def start(thread: threading.Thread) -> None:
            if threading.current_thread().name.startswith("pop3proto-accept"):
                if outer.failing:
                    outer.refused += 1
                    raise RuntimeError("can't start new thread")
                outer.started += 1
            real(thread)

        monkeypatch.setattr(threading.Thread, "start", start)


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "proxy"])
def test_failed_thread_start_refuses_and_keeps_listening(
    mail: Mail, monkeypatch: pytest.MonkeyPatch, proxied: bool
) -> None:
    starts = FailingStarts(monkeypatch)
    options = mail.options(auth_failure_delay=0)
    if proxied:
        options.update(proxy_protocol=True, trusted_proxies=("127.0.0.0/8",))
    with serving("blocking", **options) as server:
        port = server.cget("port")

        def connect() -> socket.socket:
            sock = socket.create_connection((HOST, port), timeout=10)
            if proxied:
                sock.sendall(b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 110\r\n")
            return sock

        starts.failing = True
        for _ in range(3):
            with connect() as sock:
                line = read_line(sock, 5)
                assert line is not None, "neither refused nor closed"
                assert line == b"" or line.startswith(BUSY), line
                if line:
                    assert read_line(sock, 5) == b"", "not closed after the refusal"
        assert starts.refused == 3
        starts.failing = False
        for _ in range(3):
            with connect() as sock:
                greeting = read_line(sock, 5)
                assert greeting is not None, "the listener no longer serves"
                assert greeting.startswith(b"+OK"), greeting
                sock.sendall(f"USER bob\r\nPASS {mail.users['bob']}\r\nQUIT\r\n".encode())
                assert read_line(sock, 5) == b"+OK"
                pass_reply = read_line(sock, 5)
                assert pass_reply is not None
                assert pass_reply.startswith(b"+OK"), pass_reply
        assert wait_for(lambda: server.connections() == [], 5), server.connections()


def test_connections_over_the_per_address_limit_get_no_thread(
    mail: Mail, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts = FailingStarts(monkeypatch)
    options = mail.options(max_connections_per_address=1, limit_loopback=True)
    with serving("blocking", **options) as server:
        port = server.cget("port")
        with logged_in(port, "alice", mail.users["alice"]) as alice:
            started, threads = starts.started, threading.active_count()
            for _ in range(20):
                with Raw(port) as c:
                    assert c.greeting == b"-ERR [SYS/TEMP] Too many connections from your address."
                    assert c.closed(5) == b""
            assert starts.started == started, "refused connections got threads"
            assert threading.active_count() == threads
            assert alice.cmd("QUIT").startswith(b"+OK")
