"""Beyond one process: pre-forked workers, and HAProxy's PROXY protocol in front of two servers.

The HAProxy tests start Debian's ``haproxy`` on loopback in TCP mode in front of
two pop3proto servers (one fed PROXY v1, one v2), plain and with implicit TLS
passed through, and check that both serve and that each server sees the real
client address (the test connects from 127.0.0.7, haproxy from 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import poplib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tlsutil import TLSFiles

from pop3proto.memstore import MemoryStorage
from pop3proto.passwd import DictAuthenticator
from pop3proto.proxy import V2_SIGNATURE, parse_proxy_header
from pop3proto.server import Server

CLIENT_ADDR = "127.0.0.7"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


# ------------------------------------------------------------------ PROXY parser


@pytest.mark.parametrize(
    ("data", "source", "consumed"),
    [
        (b"PROXY TCP4 192.0.2.1 127.0.0.1 5555 110\r\nUSER x", ("192.0.2.1", 5555), 41),
        (b"PROXY TCP6 2001:db8::1 ::1 4000 110\r\n", ("2001:db8::1", 4000), 37),
        (b"PROXY UNKNOWN\r\n", None, 15),
        (
            V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([198, 51, 100, 7, 127, 0, 0, 1])
            + b"\x0f\xa0\x00\x6e",
            ("198.51.100.7", 4000),
            28,
        ),
        (V2_SIGNATURE + b"\x20\x00\x00\x00", None, 16),  # LOCAL (health check)
    ],
)
def test_proxy_header_parses(data: bytes, source: object, consumed: int) -> None:
    for cut in range(1, len(data[:consumed])):
        assert parse_proxy_header(data[:cut]) is None  # needs more, never a wrong answer
    parsed = parse_proxy_header(data)
    assert parsed is not None
    assert parsed[0].source == source
    assert parsed[1] == consumed


@pytest.mark.parametrize(
    "data",
    [
        b"USER alice\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 1\r\n",
        b"PROXY TCP4 ::1 ::1 1 1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 1\r\n",
        b"PROXY TCP4 " + b"1" * 120,
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),
        V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),
        V2_SIGNATURE + b"\x21\x11\xff\xff",
    ],
)
def test_proxy_header_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the parser has one error type
        parse_proxy_header(data)


# ------------------------------------------------------------------ servers behind HAProxy

TRANSPORTS = ["blocking", "selectors", "anyio"]


@pytest.fixture
def tls(tmp_path: Path) -> TLSFiles:
    return TLSFiles.create(tmp_path)


@contextlib.contextmanager
def _backend(transport: str, tls: TLSFiles, seen: list[str]) -> Iterator[Server]:
    storage = MemoryStorage()
    storage.add("alice", b"Subject: hi\n\nbody\n")
    server = Server(
        transport=transport,
        host="127.0.0.1",
        port=0,
        pop3s_port=0,
        tls_cert=str(tls.cert_pem),
        tls_key=str(tls.key_pem),
        auth=DictAuthenticator({"alice": "pw"}),
        storage=storage,
        auth_failure_delay=0,
        proxy_protocol=True,
        trusted_proxies=("127.0.0.1/32",),
        logger=logging.getLogger(f"pop3proto.test.{id(seen)}"),
    )
    handler = _Collect(seen)
    level = server.logger.level
    server.logger.addHandler(handler)
    server.logger.setLevel(logging.INFO)
    server.up()
    try:
        yield server
    finally:
        server.destroy("kill", timeout=10)
        server.logger.removeHandler(handler)
        server.logger.setLevel(level)


class _Collect(logging.Handler):
    def __init__(self, seen: list[str]) -> None:
        super().__init__(logging.INFO)
        self.seen = seen

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())


@contextlib.contextmanager
def _haproxy(tmp: Path, backends: list[tuple[int, str]], tls_backends: list[tuple[int, str]]
             ) -> Iterator[tuple[int, int]]:
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(exe):
        pytest.skip("haproxy is not installed (.ci/run installs it)")
    plain, secure = _free_port(), _free_port()

    def servers(entries: list[tuple[int, str]]) -> str:
        return "\n".join(
            f"    server s{i} 127.0.0.1:{port} {proxy}" for i, (port, proxy) in enumerate(entries)
        )

    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        "global\n    maxconn 200\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n"
        f"frontend pop3\n    bind 127.0.0.1:{plain}\n    default_backend plain\n"
        f"frontend pop3s\n    bind 127.0.0.1:{secure}\n    default_backend secure\n"
        f"backend plain\n    balance roundrobin\n{servers(backends)}\n"
        f"backend secure\n    balance roundrobin\n{servers(tls_backends)}\n"
    )
    check = subprocess.run([exe, "-c", "-f", str(cfg)], capture_output=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([exe, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_port(plain)
        _wait_port(secure)
        yield plain, secure
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def _session(port: int, context: ssl.SSLContext | None) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), 10, source_address=(CLIENT_ADDR, 0))
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    sock.settimeout(10)
    got = b""
    try:
        sock.sendall(b"USER alice\r\nPASS pw\r\nRETR 1\r\nQUIT\r\n")
        while not got.endswith(b"+OK Logging out.\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    finally:
        sock.close()
    return got


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_servers_behind_haproxy_see_the_client_address(
    transport: str, tls: TLSFiles, tmp_path: Path
) -> None:
    try:
        socket.create_connection(("127.0.0.1", 9), 0.1, source_address=(CLIENT_ADDR, 0))
    except ConnectionRefusedError:
        pass
    except OSError:
        pytest.skip(f"cannot bind {CLIENT_ADDR}")
    seen_a: list[str] = []
    seen_b: list[str] = []
    with _backend(transport, tls, seen_a) as a, _backend(transport, tls, seen_b) as b:
        plain = [(a.cget("port"), "send-proxy"), (b.cget("port"), "send-proxy-v2")]
        secure = [(a.cget("pop3s_port"), "send-proxy-v2"), (b.cget("pop3s_port"), "send-proxy")]
        with _haproxy(tmp_path, plain, secure) as (pport, sport):
            ctx = tls.client_context()
            for _ in range(4):  # round robin: two sessions land on each server
                assert b"+OK Logged in." in _session(pport, None)
                assert b"\r\nbody\r\n.\r\n" in _session(sport, ctx)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (len(seen_a) < 4 or len(seen_b) < 4):
            time.sleep(0.05)
    for seen in (seen_a, seen_b):
        logouts = [line for line in seen if line.startswith("Logged out: ")]
        assert len(logouts) == 4, seen
        assert all(f"rip={CLIENT_ADDR}," in line for line in logouts), logouts


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_proxy_header_from_an_untrusted_address_closes(transport: str, tls: TLSFiles) -> None:
    seen: list[str] = []
    with _backend(transport, tls, seen) as server:
        server_port = server.cget("port")
        # From 127.0.0.7 (not trusted): closed before any greeting, header or not.
        for payload in (b"PROXY TCP4 192.0.2.1 127.0.0.1 1 110\r\n", b"CAPA\r\n"):
            with socket.create_connection(
                ("127.0.0.1", server_port), 5, source_address=(CLIENT_ADDR, 0)
            ) as s:
                s.settimeout(5)
                with contextlib.suppress(OSError):
                    s.sendall(payload)
                try:
                    assert s.recv(100) == b""
                except ConnectionResetError:
                    pass
        # From the trusted proxy but malformed: closed with nothing read after it.
        with socket.create_connection(("127.0.0.1", server_port), 5) as s:
            s.settimeout(5)
            s.sendall(b"PROXY TCP4 nonsense\r\nCAPA\r\n")
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        assert server.connections() == []


# ------------------------------------------------------------------ workers


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, timeout=10).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["selectors", "anyio"])
def test_workers_share_the_port_and_the_locks(transport: str, tmp_path: Path) -> None:
    from pop3proto.maildir import MaildirStorage

    root = tmp_path / "mail"
    root.mkdir()
    store = MaildirStorage(str(root), create=True)
    for i in range(3):
        store.deliver("alice", f"Subject: {i}\n\nmessage {i}\n".encode())
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}pw::::::\n")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"pop3proto.transports.{transport}", "--port", str(port),
         "--maildir-root", str(root), "--passwd-file", str(users), "--workers", "2",
         "--auth-failure-delay", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_port(port)
        deadline = time.monotonic() + 10
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_children(proc.pid)) == 2
        for _ in range(10):
            client = poplib.POP3("127.0.0.1", port, timeout=10)
            client.user("alice")
            client.pass_("pw")
            assert client.stat() == (3, client.stat()[1])
            # A second session on the same maildrop, whichever worker takes it: [IN-USE].
            other = poplib.POP3("127.0.0.1", port, timeout=10)
            other.user("alice")
            with pytest.raises(poplib.error_proto) as err:
                other.pass_("pw")
            assert err.value.args[0].startswith(b"-ERR [IN-USE]")
            other.quit()
            client.quit()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
            raise
    assert proc.returncode == 0, stderr
    assert stderr.count("Logged out: user=<alice>") == 10  # one logout line per session
    assert stderr.count("Login failed (mailbox in use): user=<alice>") == 10  # the [IN-USE]s
    assert store.lock("alice")
    assert len(store.scan("alice")) == 3


def test_workers_auto_starts_one_worker_per_core(tmp_path: Path) -> None:
    from pop3proto.options import worker_count

    cores = len(os.sched_getaffinity(0))
    assert worker_count("auto") == cores
    assert worker_count(3) == 3
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}pw::::::\n")
    (tmp_path / "mail").mkdir()
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pop3proto.transports.selectors", "--port", str(port),
         "--workers", "auto", "--passwd-file", str(users), "--maildir-root",
         str(tmp_path / "mail"), "--cleartext-auth", "always"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_port(port)
        deadline = time.monotonic() + 10
        while len(_children(proc.pid)) < cores and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_children(proc.pid)) == cores
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    assert proc.returncode == 0
