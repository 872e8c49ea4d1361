"""2. Memory: hostile clients cannot make the server's RSS grow without bound.

The server runs as ``python -m pop3proto.transports.NAME`` in a subprocess;
its resident set comes from ``/proc/PID/status``: VmRSS sampled every 20 ms
and the peak VmHWM, which is reset (``clear_refs`` 5) before each attack.
Growth is peak minus the RSS before the attack, after a warm-up session.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from clients import Raw

from pop3proto._writers import wire_size

from .conftest import (
    TRANSPORTS,
    Figure,
    Mail,
    ServerProc,
    body,
    fill,
    logged_in,
    make_mail,
    transport_problem,
    wait_for,
)

MB = 1 << 20
CRLF = b"\r\n"
BIG_SIZE = 16 * MB
USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "carol": "carol-Secret-3"}


def big_message() -> bytes:
    head = b"From: big@example.org\nSubject: sixteen megabytes\n\n"
    line = b"." + b"b" * 98 + b"\n"  # every line dot-stuffed: the worst case for the encoder
    return head + line * ((BIG_SIZE - len(head)) // len(line))


class Sampler:
    """Samples the server's VmRSS every 20 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self, server: ServerProc) -> None:
        self.server = server
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, self.server.rss_kb())
            self._stop.wait(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@contextlib.contextmanager
def attack(server: ServerProc, figure: Figure, name: str, limit_mb: float) -> Iterator[Sampler]:
    """Measure the peak growth of the server's RSS over the block; assert it stays under limit."""
    time.sleep(0.1)
    server.reset_hwm()
    base = server.rss_kb()
    with Sampler(server) as sampler:
        yield sampler
    peak = max(sampler.peak, server.hwm_kb())
    growth = (peak - base) / 1024
    after = (server.rss_kb() - base) / 1024
    figure(f"{name}_rss_base_mb", round(base / 1024, 1))
    figure(f"{name}_rss_growth_peak_mb", round(growth, 2))
    figure(f"{name}_rss_growth_after_mb", round(after, 2))
    assert growth < limit_mb, f"{name}: RSS grew {growth:.1f} MB (limit {limit_mb} MB)"


@pytest.fixture(scope="module", params=TRANSPORTS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProc, Mail]]:
    transport: str = request.param
    problem = transport_problem(transport)
    if problem is not None:
        pytest.skip(problem)
    mail = make_mail(tmp_path_factory.mktemp(f"memory-{transport}"), USERS)
    # alice: the 16 MB message first, then the small ones.
    for p in (mail.root / "alice" / "cur").iterdir():
        p.unlink()
    fill(mail.root, "alice", [big_message(), *(body(n) for n in range(2, 4))])
    server = ServerProc(transport, mail, "--auth-failure-delay", "0")
    try:
        warm_up(server)
        yield server, mail
    finally:
        server.stop()
        assert server.tracebacks() == [], server.proc.stderr


def warm_up(server: ServerProc) -> None:
    """One session of every kind the attacks use, so lazy imports and caches are paid for."""
    for user in USERS:
        with logged_in(server.port, user, USERS[user]) as c:
            assert c.cmd("RETR 2").startswith(b"+OK")
            c.raw_block()
            assert c.cmd("QUIT").startswith(b"+OK")
    with Raw(server.port) as c:
        c.send(b"X" * 300 + b"\r\n")
        c.closed()


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """sendall that stops quietly when the server closes first."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


@pytest.mark.parametrize("where", ["before-login", "in-sasl", "after-login"], ids=lambda w: str(w))
def test_a_1mb_line_without_crlf_is_cut_off(
    served: tuple[ServerProc, Mail], figure: Figure, where: str
) -> None:
    server, _ = served
    with attack(server, figure, f"line_1mb_{where}", limit_mb=4.0):
        if where == "after-login":
            client = logged_in(server.port, "bob", USERS["bob"])
        else:
            client = Raw(server.port)
        with client:
            if where == "in-sasl":
                assert client.cmd("AUTH PLAIN") == b"+ "
            t0 = time.monotonic()
            sender = threading.Thread(
                target=send_quietly, args=(client.sock, b"A" * MB), daemon=True
            )
            sender.start()
            rest = client.closed(timeout=10)
            sender.join(10)
            elapsed = time.monotonic() - t0
        assert rest is not None, "the server did not close the connection"
        assert rest.startswith(b"-ERR"), rest[:100]
        assert b"too long" in rest.lower(), rest[:100]
    figure(f"line_1mb_{where}_closed_after_s", round(elapsed, 3))
    assert server.alive()


def read_replies(client: Raw, count: int) -> list[bytes]:
    """Exactly *count* CRLF lines, read in bulk (faster than line by line)."""
    data = bytearray(client.buf)
    client.buf.clear()
    while data.count(b"\r\n") < count:
        chunk = client.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"closed after {data.count(CRLF)} replies")
        data += chunk
    lines = bytes(data).split(b"\r\n")
    client.buf += b"\r\n".join(lines[count:])
    return lines[:count]


def listing(n: int = 5) -> list[bytes]:
    sizes = [wire_size(body(k)) for k in range(1, n + 1)]
    return [
        b"+OK %d messages (%d octets)" % (n, sum(sizes)),
        *(b"%d %d" % (k, size) for k, size in enumerate(sizes, 1)),
        b".",
    ]


PIPELINES = {
    # 100,000 short commands, 0.7 MB in one write; 0.6 MB of single-line replies.
    "short": (b"NOOP\r\nLIST 1\r\n", 2, [b"+OK", b"+OK 1 %d" % wire_size(body(1))]),
    # 100,000 commands padded to the 255-octet limit (25 MB in one write) whose
    # replies (12 MB of LIST listings) are far more than the socket buffers hold:
    # the server must stop reading while we do not read.
    "padded": (b"LIST" + b" " * 249 + b"\r\n", 1, listing()),
}


@pytest.mark.parametrize("kind", list(PIPELINES), ids=list(PIPELINES))
def test_100000_pipelined_commands_from_a_slow_reader(
    served: tuple[ServerProc, Mail], figure: Figure, kind: str
) -> None:
    server, mail = served
    count = 100_000
    unit, per_unit, answer = PIPELINES[kind]
    payload = unit * (count // per_unit)
    expected = answer * (count // per_unit)
    name = f"pipelined_100k_{kind}"
    with (
        attack(server, figure, name, limit_mb=8.0),
        logged_in(server.port, "carol", USERS["carol"], timeout=30) as client,
    ):
        sender = threading.Thread(target=send_quietly, args=(client.sock, payload), daemon=True)
        sender.start()
        time.sleep(1.5)  # read nothing for a while: the server must stop, not buffer
        write_blocked = sender.is_alive()
        t0 = time.monotonic()
        replies = read_replies(client, len(expected))
        read_s = time.monotonic() - t0
        sender.join(20)
        assert not sender.is_alive()
        assert client.cmd("QUIT").startswith(b"+OK")
    assert replies == expected
    figure(f"{name}_payload_mb", round(len(payload) / MB, 1))
    figure(f"{name}_replies_mb", round(sum(len(r) + 2 for r in replies) / MB, 1))
    figure(f"{name}_client_write_blocked_while_not_reading", write_blocked)
    figure(f"{name}_read_all_replies_s", round(read_s, 2))
    assert len(mail.on_disk("carol")) == 5


def test_40_retr_of_16mb_never_read_and_another_client_logs_in(
    served: tuple[ServerProc, Mail], figure: Figure
) -> None:
    server, mail = served
    with attack(server, figure, "retr_16mb_x40", limit_mb=10.0):
        hog = logged_in(server.port, "alice", USERS["alice"])
        try:
            hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            hog.send(b"RETR 1\r\n" * 40)  # 640 MB of replies that nobody reads
            time.sleep(0.5)
            t0 = time.monotonic()
            with logged_in(server.port, "bob", USERS["bob"], timeout=5) as other:
                login_s = time.monotonic() - t0
                assert other.cmd("STAT").startswith(b"+OK 5 ")
                assert other.cmd("RETR 3").startswith(b"+OK")
                assert other.block() == body(3).replace(b"\n", b"\r\n")
                assert other.cmd("QUIT").startswith(b"+OK")
            time.sleep(1.0)  # let the hog's session sit on its unsent output
        finally:
            hog.abort()
    figure("retr_16mb_x40_other_login_s", round(login_s, 3))
    assert login_s < 1.0
    # The hog's session ended and released alice's maildrop; nothing was deleted.
    assert wait_for(lambda: _can_log_in(server.port, "alice"), 5)
    assert len(mail.on_disk("alice")) == 3


def _can_log_in(port: int, user: str) -> bool:
    with Raw(port) as c:
        ok = c.login(user, USERS[user]).startswith(b"+OK")
        c.cmd("QUIT")
    return ok


def test_rss_returns_near_base_after_the_attacks(
    served: tuple[ServerProc, Mail], figure: Figure
) -> None:
    """After every attack above has ended, a few ordinary sessions; RSS stays put."""
    server, _ = served
    with attack(server, figure, "after_attacks_10_sessions", limit_mb=4.0):
        for _ in range(10):
            assert _can_log_in(server.port, "bob")
