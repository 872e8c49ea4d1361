"""What is special to the selectors transport: MemoryBIO TLS, back-pressure, timers, kill.

The cross-transport behaviour is in ``test_transports.py``; these drive the
one-thread loop with the stdlib ``poplib`` client over real sockets.
"""

from __future__ import annotations

import poplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from pop3proto.auth import PlainVerifier
from pop3proto.memstore import MemoryStorage
from pop3proto.server import Server

HOST = "127.0.0.1"
BIG = 20 * 1024 * 1024


class Auth:
    """user -> password; the mailbox is the user name."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def lookup(self, name: str) -> tuple[PlainVerifier, str] | None:
        password = self.users.get(name)
        return None if password is None else (PlainVerifier(password), name)


@pytest.fixture
def store() -> MemoryStorage:
    store = MemoryStorage()
    store.add("alice", b"Subject: one\n\nfirst\n")
    store.add("alice", b"Subject: two\n\n.dot line\nsecond\n")
    store.add("bob", b"Subject: hi bob\n\nhello\n")
    return store


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


@pytest.fixture
def make_server(store: MemoryStorage) -> Iterator[Any]:
    servers: list[Server] = []

    def make(**options: Any) -> Server:
        opts: dict[str, Any] = {
            "transport": "selectors",
            "host": HOST,
            "port": 0,
            "auth": Auth({"alice": "pw", "bob": "pw2"}),
            "storage": store,
            "auth_failure_delay": 0,
        }
        opts.update(options)
        server = Server(**opts)
        server.up()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.destroy("kill", timeout=5)


def _login(server: Server, user: str = "alice", password: str = "pw") -> poplib.POP3:
    client = poplib.POP3(HOST, server.cget("port"), timeout=5)
    client.user(user)
    client.pass_(password)
    return client


def _raw(server: Server, port: int | None = None, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect((HOST, port or server.cget("port")))
    return sock


def _read_until_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _closed_without_a_word(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def _wait(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def test_poplib_session(make_server: Any, store: MemoryStorage) -> None:
    server = make_server()
    client = _login(server)
    count, size = client.stat()
    assert count == 2
    listing = client.list()[1]
    assert len(listing) == 2
    assert sum(int(line.split()[1]) for line in listing) == size
    assert client.retr(1)[1] == [b"Subject: one", b"", b"first"]
    assert client.retr(2)[1] == [b"Subject: two", b"", b".dot line", b"second"]
    client.dele(1)
    assert client.quit().startswith(b"+OK")
    client.close()
    assert store.messages("alice") == [b"Subject: two\n\n.dot line\nsecond\n"]
    assert _wait(lambda: server.connections() == [])
    assert store.lock("alice")


def test_stls_through_memory_bio(
    make_server: Any, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = tls_contexts
    server = make_server(ssl_context=server_ctx, cleartext_auth=False)
    client = poplib.POP3(HOST, server.cget("port"), timeout=5)
    assert "STLS" in client.capa()
    client.stls(context=client_ctx)
    client.user("alice")
    client.pass_("pw")
    [sid] = server.connections()
    assert server.connection_state(sid)["tls"] is True
    assert client.retr(2)[1] == [b"Subject: two", b"", b".dot line", b"second"]
    assert client.quit().startswith(b"+OK")
    client.close()


def test_implicit_tls_and_a_big_message(
    make_server: Any, store: MemoryStorage, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = tls_contexts
    body = b"".join(b"line %d\n" % i for i in range(300_000)) + b".\n..\n"
    store.add("bob", body)
    server = make_server(ssl_context=server_ctx, pop3s_port=0)
    port = server.cget("pop3s_port")
    assert port not in (0, server.cget("port"))
    client = poplib.POP3_SSL(HOST, port, context=client_ctx, timeout=10)
    client.user("bob")
    client.pass_("pw2")
    assert client.stat()[0] == 2
    lines = client.retr(2)[1]
    assert b"\n".join(lines) + b"\n" == body
    assert client.quit().startswith(b"+OK")
    client.close()


def _stall_a_big_retr(server: Server, store: MemoryStorage) -> socket.socket:
    """Log in as alice, ask for a 20 MB message and never read the answer."""
    store.add("alice", (b"y" * 99 + b"\n") * (BIG // 100))
    sock = _raw(server, rcvbuf=4096)
    sock.recv(4096)
    sock.sendall(b"USER alice\r\nPASS pw\r\n")
    buf = b""
    while buf.count(b"\r\n") < 2:
        buf += sock.recv(4096)
    sock.sendall(b"RETR 3\r\n")
    return sock


def test_a_client_that_stops_reading_stalls_nobody(make_server: Any, store: MemoryStorage) -> None:
    server = make_server()
    stalled = _stall_a_big_retr(server, store)
    [sid] = server.connections()
    handle: Any = server._handle

    def steady() -> bool:
        before = server.connection_state(sid)["bytes_out"]
        time.sleep(0.2)
        return bool(server.connection_state(sid)["bytes_out"] == before)

    assert _wait(steady)
    started = time.monotonic()
    other = _login(server, "bob", "pw2")
    assert other.retr(1)[1][-1] == b"hello"
    other.quit()
    assert time.monotonic() - started < 2.0
    [held] = [len(c.out) for c in handle.clients if c.driver.id == sid]
    assert held <= 512 * 1024
    assert server.connection_state(sid)["bytes_out"] < BIG // 2
    stalled.close()
    assert _wait(lambda: server.connections() == [])
    assert store.lock("alice")


def test_stalled_writes_hit_the_idle_timeout(make_server: Any, store: MemoryStorage) -> None:
    server = make_server(idle_timeout=0.5)
    stalled = _stall_a_big_retr(server, store)
    assert _wait(lambda: server.connections() == [], timeout=5)
    assert store.lock("alice")
    stalled.close()


def test_idle_timeout_closes_a_silent_connection(make_server: Any) -> None:
    server = make_server(login_timeout=0.3)
    sock = _raw(server)
    started = time.monotonic()
    data = _read_until_eof(sock)
    assert 0.25 < time.monotonic() - started < 3
    greeting, bye = data.splitlines()
    assert greeting.startswith(b"+OK")
    assert bye.startswith(b"-ERR")
    assert _wait(lambda: server.connections() == [])
    sock.close()


def test_handshake_timeout(make_server: Any, tls_contexts: tuple[ssl.SSLContext, Any]) -> None:
    server = make_server(ssl_context=tls_contexts[0], pop3s_port=0, handshake_timeout=0.3)
    sock = _raw(server, port=server.cget("pop3s_port"))
    assert _read_until_eof(sock) == b""  # nothing in clear, then closed
    assert _wait(lambda: server.connections() == [])
    sock.close()


def test_failed_login_delay_parks_only_that_connection(make_server: Any) -> None:
    server = make_server(auth_failure_delay=1.0)
    slow = poplib.POP3(HOST, server.cget("port"), timeout=5)
    slow.user("alice")
    done = threading.Event()
    failed: list[bool] = []

    def bad_login() -> None:
        try:
            slow.pass_("wrong")
        except poplib.error_proto:
            failed.append(True)
        done.set()

    threading.Thread(target=bad_login).start()
    time.sleep(0.1)
    started = time.monotonic()
    # Another client is served meanwhile (from the same address a login would wait
    # out the address's failed-login penalty, so this one only talks).
    other = poplib.POP3(HOST, server.cget("port"), timeout=5)
    assert "USER" in other.capa()
    other.quit()
    assert time.monotonic() - started < 0.5
    assert not done.is_set()
    assert done.wait(3)
    assert failed == [True]
    slow.close()


def test_destroy_kill_from_another_thread(make_server: Any, store: MemoryStorage) -> None:
    server = make_server()
    stalled = _stall_a_big_retr(server, store)
    idle = _login(server, "bob", "pw2")
    assert _wait(lambda: len(server.connections()) == 2)
    started = time.monotonic()
    server.destroy("kill", timeout=5)
    assert time.monotonic() - started < 2
    assert server.connections() == []
    assert store.lock("alice")
    assert store.lock("bob")
    assert store.messages("bob")  # killed: no update
    for sock in (stalled, idle.sock):
        sock.close()


def test_down_from_another_thread_keeps_sessions(make_server: Any) -> None:
    server = make_server()
    port = server.cget("port")
    client = _login(server)
    server.down()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=2)
    assert client.stat()[0] == 2
    client.quit()
    assert server._handle is not None
    assert server._handle.join(5)


def test_proxy_header_read_without_blocking_the_loop(make_server: Any) -> None:
    server = make_server(proxy_protocol=True, trusted_proxies=("127.0.0.0/8",))
    slow = _raw(server)
    header = b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 110\r\n"
    slow.sendall(header[:10])  # the rest comes later: nobody else waits for it
    other = _raw(server)
    other.sendall(b"PROXY TCP4 198.51.100.1 127.0.0.1 4444 110\r\nCAPA\r\n")
    assert other.recv(4096).startswith(b"+OK")
    for byte in header[10:]:
        slow.sendall(bytes([byte]))
    assert slow.recv(4096).startswith(b"+OK")
    peers = sorted(server.connection_state(sid)["peer"] for sid in server.connections())
    assert peers == ["198.51.100.1", "203.0.113.7"]
    for sock in (slow, other):
        sock.close()


def test_proxy_v2_then_implicit_tls(
    make_server: Any, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = tls_contexts
    server = make_server(
        ssl_context=server_ctx,
        pop3s_port=0,
        proxy_protocol=True,
        trusted_proxies=("127.0.0.1/32",),
    )
    body = socket.inet_aton("192.0.2.9") + socket.inet_aton("127.0.0.1") + b"\x15\xb3\x03\xe3"
    header = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + len(body).to_bytes(2, "big") + body
    sock = _raw(server, port=server.cget("pop3s_port"))
    sock.sendall(header)
    with client_ctx.wrap_socket(sock, server_hostname=HOST) as tls:
        assert tls.recv(4096).startswith(b"+OK")
        [sid] = server.connections()
        state = server.connection_state(sid)
        assert (state["peer"], state["port"], state["tls"]) == ("192.0.2.9", 5555, True)


def test_proxy_header_timeout_drops_only_the_silent(make_server: Any) -> None:
    server = make_server(
        proxy_protocol=True, trusted_proxies=("127.0.0.0/8",), handshake_timeout=0.3
    )
    silent, talker = _raw(server), _raw(server)
    talker.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 110\r\n")
    assert talker.recv(4096).startswith(b"+OK")
    assert _closed_without_a_word(silent)
    time.sleep(0.3)
    talker.sendall(b"CAPA\r\n")  # the header's timer no longer applies
    assert talker.recv(4096).startswith(b"+OK")
    for sock in (silent, talker):
        sock.close()


def test_proxy_header_refused_from_untrusted_or_garbled(make_server: Any) -> None:
    server = make_server(proxy_protocol=True, trusted_proxies=("10.0.0.0/8",))
    sock = _raw(server)
    sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 110\r\n")
    assert _closed_without_a_word(sock)
    sock.close()
    server = make_server(proxy_protocol=True, trusted_proxies=("127.0.0.0/8",))
    sock = _raw(server)
    sock.sendall(b"USER alice\r\n")
    assert _closed_without_a_word(sock)
    sock.close()
    assert server.connections() == []


_EMFILE_SERVER = """
import os, resource, sys, time
from pop3proto.server import Server
server = Server(transport="selectors", host="127.0.0.1", port=0)
server.up()
fds = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (fds + 4, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(server.cget("port"), flush=True)
sys.stdin.readline()
cpu = time.process_time()
time.sleep(1.0)
print(time.process_time() - cpu, flush=True)
sys.stdin.readline()
server.destroy("kill", timeout=5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc/self/fd")
def test_out_of_file_descriptors_backs_off_without_spinning() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _EMFILE_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    socks: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())
        socks.extend(socket.create_connection((HOST, port), timeout=5) for _ in range(8))
        assert socks[0].recv(100).startswith(b"+OK")
        for sock in socks:
            sock.settimeout(0.3)
        greeted = [socks[0]] + [s for s in socks[1:] if _greeted(s)]
        waiting = [s for s in socks if s not in greeted]
        assert waiting  # the server ran out of descriptors
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert float(proc.stdout.readline()) < 0.2  # seconds of CPU in one second
        for sock in greeted:
            sock.close()
        waiting[0].settimeout(3)
        assert waiting[0].recv(100).startswith(b"+OK")  # accepting again
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(10) == 0
    finally:
        for sock in socks:
            sock.close()
        proc.kill()
        proc.communicate()


def _greeted(sock: socket.socket) -> bool:
    try:
        return sock.recv(100).startswith(b"+OK")
    except TimeoutError:
        return False
