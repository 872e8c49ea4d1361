"""TLS (STLS, implicit TLS, reloads), SASL, APOP and UTF8 against a running Server.

Every test runs once per transport (``blocking``, ``selectors``, ``anyio``);
a transport whose module does not import, or has no ``start``, is skipped.
Servers listen on 127.0.0.1 with port 0 and are destroyed in teardown.  The
certificates come from ``tlsutil`` (a trustme CA).  Every socket read,
subprocess and wait has a timeout.

Clients: a small line-level client (``Client``) where the test must see the
exact bytes, stdlib ``poplib`` where a real client library is the point,
and ``curl``/``mpop`` (marker ``clients``; skipped when not installed).
"""

from __future__ import annotations

import base64
import contextlib
import gc
import hashlib
import hmac
import importlib
import os
import poplib
import queue
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tlsutil import HOST, TLSFiles

from pop3proto.memstore import MemoryStorage
from pop3proto.passwd import DictAuthenticator, PasswdFile, hash_password
from pop3proto.server import Server

REPO = Path(__file__).resolve().parents[1]
TRANSPORTS = ["blocking", "selectors", "anyio"]
TIMEOUT = 10.0  # every socket operation and subprocess wait
CRLF = b"\r\n"

# ------------------------------------------------------------------ users and mail

ALICE_PW = "alice-pw"  # {PLAIN}: every mechanism works
SCRAM_PW = "scram-pw"  # {SCRAM-SHA-256}: PLAIN, LOGIN, SCRAM; no CRAM-MD5, no APOP
HASHED_PW = "hashed-pw"  # {SHA512-CRYPT}: PLAIN and LOGIN only
JORG = "jörg"
JORG_PW = "jörg-pw"

MSG1 = (
    b"From: Bob <bob@example.org>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: one\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"..\r\n"
    b"last line\r\n"
)
MSG2 = b"Subject: two\r\n\r\n" + b"x" * 998 + b"\r\n" + b"y\r\n" * 200
MSG3 = (
    b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.org>\r\nSubject: plain ascii three\r\n\r\ntail\r\n"
)
UTF8_MSG = (
    "From: Jörg Müller <jörg@bücher.example>\r\n"
    "To: Zoë <zoë@example.org>\r\n"
    "Subject: Grüße aus Köln ✓\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Schöne Grüße.\r\n"
    ".Punkt am Anfang: ü\r\n"
).encode()
ALICE_MSGS = [MSG1, MSG2, MSG3]


def big_message(size: int) -> bytes:
    """About *size* octets, CRLF lines of varied length; every 7th starts with a dot."""
    out = bytearray(b"Subject: big\r\n\r\n")
    n = 0
    while len(out) < size:
        body = b"%07d " % n + b"abcdefghij" * (n % 9)
        out += (b"." + body if n % 7 == 0 else body) + b"\r\n"
        if n % 1000 == 999:
            out += b".\r\n"  # a line that is just a dot
        n += 1
    return bytes(out)


BIG = big_message(4 * 1024 * 1024)


def users() -> dict[str, str]:
    """A mixed table: one user per kind of stored secret."""
    return {
        "alice": "{PLAIN}" + ALICE_PW,
        "scrammy": hash_password(SCRAM_PW, "SCRAM-SHA-256"),
        "hashed": hash_password(HASHED_PW, "SHA512-CRYPT"),
        JORG: "{PLAIN}" + JORG_PW,
        "big": "{PLAIN}big-pw",
    }


_USERS = users()  # hashing once is enough


def storage() -> MemoryStorage:
    store = MemoryStorage()
    for msg in ALICE_MSGS:
        store.add("alice", msg)
    store.add("scrammy", MSG3)
    store.add("hashed", MSG3)
    store.add(JORG, UTF8_MSG)
    store.add("big", BIG)
    return store


LONG_TOKEN = "good-" + "x" * 2400  # real bearer tokens run to kilobytes


def good_token(user: str, token: str) -> bool:
    return token in ("good", LONG_TOKEN)


# ------------------------------------------------------------------ fixtures


def _unavailable(name: str) -> str | None:
    """Why transport *name* cannot be tested yet, or None."""
    try:
        module = importlib.import_module(f"pop3proto.transports.{name}")
    except Exception as exc:  # still being written, or a missing dependency
        return f"transport {name!r} does not import: {type(exc).__name__}: {exc}"
    if not callable(getattr(module, "start", None)):
        return f"transport {name!r} has no start()"
    return None


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    reason = _unavailable(request.param)
    if reason:
        pytest.skip(reason)
    return str(request.param)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(tmp_path_factory.mktemp("tls"))


MakeServer = Callable[..., Server]


@pytest.fixture
def make_server(transport: str, tls: TLSFiles) -> Iterator[MakeServer]:
    """``make_server(**options)``: a Server brought up; all destroyed at teardown."""
    made: list[Server] = []

    def make(**options: Any) -> Server:
        opts: dict[str, Any] = {
            "transport": transport,
            "host": HOST,
            "port": 0,
            "ssl_context": tls.server_context(),
            "auth": DictAuthenticator(_USERS),
            "storage": storage(),
            "auth_failure_delay": 0,
        }
        opts.update(options)
        server = Server(**opts)
        server.up()
        made.append(server)
        return server

    yield make
    # Every session ends once its client is gone (the tests close theirs).
    leaked = [s for s in made if not s.wait_sessions(TIMEOUT)]
    for server in made:
        server.destroy("kill", timeout=TIMEOUT)
    assert not leaked, "sessions outlived their clients"


@pytest.fixture
def server(make_server: MakeServer) -> Server:
    """Plain and implicit-TLS ports, an OAuth checker, the default cleartext policy."""
    return make_server(pop3s_port=0, oauth=good_token)


# ------------------------------------------------------------------ a line-level client


class Client:
    """A POP3 client that shows the exact bytes; every read times out after TIMEOUT."""

    def __init__(
        self, port: int, *, context: ssl.SSLContext | None = None, timeout: float = TIMEOUT
    ) -> None:
        sock = socket.create_connection((HOST, port), timeout=timeout)
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_hostname=HOST)
            except BaseException:
                sock.close()
                raise
        self.sock: socket.socket = sock
        self.buf = bytearray()
        self.greeting = self.line()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line without its CRLF; EOFError if the server closed first."""
        while CRLF not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; unterminated {bytes(self.buf)!r}")
            self.buf += data
        line, _, rest = bytes(self.buf).partition(CRLF)
        self.buf = bytearray(rest)
        return line

    def cmd(self, command: str | bytes) -> bytes:
        if isinstance(command, str):
            command = command.encode("utf-8")
        self.send(command + CRLF)
        return self.line()

    def block(self) -> list[bytes]:
        """The rest of a multi-line reply, dot-unstuffed, without the final ``.``."""
        lines = []
        while (line := self.line()) != b".":
            lines.append(line[1:] if line.startswith(b".") else line)
        return lines

    def multi(self, command: str) -> tuple[bytes, list[bytes]]:
        status = self.cmd(command)
        assert status.startswith(b"+OK"), status
        return status, self.block()

    def capa(self) -> dict[str, list[str]]:
        _, lines = self.multi("CAPA")
        caps: dict[str, list[str]] = {}
        for line in lines:
            name, *args = line.decode("utf-8").split()
            caps[name.upper()] = args
        return caps

    def retr(self, n: int) -> bytes:
        _, lines = self.multi(f"RETR {n}")
        return b"".join(line + CRLF for line in lines)

    def stls(self, context: ssl.SSLContext) -> bytes:
        reply = self.cmd("STLS")
        assert reply.startswith(b"+OK"), reply
        assert not self.buf, f"bytes after the STLS reply: {bytes(self.buf)!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=HOST)
        return reply

    def login(self, user: str = "alice", password: str = ALICE_PW) -> None:
        assert self.cmd(f"USER {user}").startswith(b"+OK")
        reply = self.cmd(f"PASS {password}")
        assert reply.startswith(b"+OK"), reply

    def quit(self) -> bytes:
        reply = self.cmd("QUIT")
        self.close()
        return reply

    def wait_closed(self, within: float) -> bool:
        """Whether the server closes the connection within *within* seconds (input ignored)."""
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except (ConnectionError, ssl.SSLError):
                return True
        return False


def connect(server: Server, mode: str, tls: TLSFiles) -> Client:
    """A client greeted over plain TCP, after STLS, or on the implicit-TLS port."""
    if mode == "pop3s":
        return Client(server.cget("pop3s_port"), context=tls.client_context())
    client = Client(server.cget("port"))
    if mode == "stls":
        try:
            client.stls(tls.client_context())
        except BaseException:
            client.close()
            raise
    return client


@contextlib.contextmanager
def pop(port: int, context: ssl.SSLContext | None = None) -> Iterator[poplib.POP3]:
    """A poplib client (POP3_SSL when *context* is given), closed on the way out."""
    if context is None:
        p = poplib.POP3(HOST, port, timeout=TIMEOUT)
    else:
        p = poplib.POP3_SSL(HOST, port, timeout=TIMEOUT, context=context)
    try:
        yield p
    finally:
        p.close()


def poplib_message(lines: list[bytes]) -> bytes:
    return b"".join(line + CRLF for line in lines)


def poplib_error(fn: Callable[..., Any], *args: Any) -> bytes:
    """The -ERR line with which poplib call *fn* failed (poplib raises it as bytes)."""
    with pytest.raises(poplib.error_proto) as info:
        fn(*args)
    reply = info.value.args[0]
    assert isinstance(reply, bytes)
    return reply


def wait_for(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ------------------------------------------------------------------ SASL helpers


def b64(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def challenge(line: bytes) -> bytes:
    """The decoded data of a ``+ base64`` continuation line."""
    assert line.startswith(b"+ ") or line == b"+", line
    return base64.b64decode(line[2:], validate=True)


def plain_ir(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


class ScramClient:
    """The client side of SCRAM-SHA-256 (RFC 5802 / RFC 7677), no channel binding."""

    def __init__(self, user: str, password: str, *, authzid: str = "") -> None:
        self.password = password
        self.cnonce = secrets.token_urlsafe(18)
        name = user.replace("=", "=3D").replace(",", "=2C")
        self.gs2 = f"n,{'a=' + authzid if authzid else ''},"
        self.bare = f"n={name},r={self.cnonce}"
        self.server_signature = b""

    def first(self) -> str:
        return b64(self.gs2 + self.bare)

    def final(self, server_first: bytes, *, wrong_proof: bool = False) -> str:
        text = server_first.decode("utf-8")
        attrs = dict(kv.split("=", 1) for kv in text.split(","))
        nonce = attrs["r"]
        assert nonce.startswith(self.cnonce), text
        assert len(nonce) > len(self.cnonce), text
        salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
        assert iterations >= 4096, text
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c={b64(self.gs2)},r={nonce}"
        auth_message = f"{self.bare},{text},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        if wrong_proof:
            proof = bytes([proof[0] ^ 1]) + proof[1:]
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        self.server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return b64(f"{without_proof},p={b64(proof)}")

    def check_final(self, server_final: bytes) -> None:
        assert server_final == b"v=" + base64.b64encode(self.server_signature), server_final


def scram_login(client: Client, user: str, password: str, *, initial: bool = True) -> bytes:
    """A whole SCRAM-SHA-256 exchange; the final status line."""
    scram = ScramClient(user, password)
    if initial:
        server_first = challenge(client.cmd(f"AUTH SCRAM-SHA-256 {scram.first()}"))
    else:
        assert challenge(client.cmd("AUTH SCRAM-SHA-256")) == b""
        server_first = challenge(client.cmd(scram.first()))
    server_final = challenge(client.cmd(scram.final(server_first)))
    scram.check_final(server_final)
    return client.cmd("")


def assert_logged_in(client: Client, messages: list[bytes]) -> None:
    """The session is in TRANSACTION on *messages*: STAT, then RETR 1 byte for byte."""
    stat = client.cmd("STAT")
    assert stat == b"+OK %d %d" % (len(messages), sum(len(m) for m in messages)), stat
    assert client.retr(1) == messages[0]
    assert client.quit().startswith(b"+OK")


def is_auth_err(reply: bytes) -> bool:
    return reply.startswith(b"-ERR [AUTH]")


# ================================================================== STLS


def test_stls_with_poplib(server: Server, tls: TLSFiles) -> None:
    with pop(server.cget("port")) as p:
        before = p.capa()
        assert "STLS" in before
        assert "USER" in before  # loopback: cleartext allowed
        assert p.stls(tls.client_context()).startswith(b"+OK")
        after = p.capa()
        assert "STLS" not in after
        assert after["SASL"] == before["SASL"]
        # A second STLS (poplib itself refuses to send it; its private _shortcmd, not in
        # the stubs, does).
        shortcmd = p._shortcmd  # type: ignore[attr-defined]
        assert poplib_error(shortcmd, "STLS").startswith(b"-ERR")
        p.user("alice")
        assert p.pass_(ALICE_PW).startswith(b"+OK")
        session = [server.connection_state(i) for i in server.connections()]
        assert [s["tls"] for s in session] == [True]
        assert poplib_error(shortcmd, "STLS").startswith(b"-ERR")  # after login
        for n, msg in enumerate(ALICE_MSGS, 1):
            assert poplib_message(p.retr(n)[1]) == msg
        assert p.quit().startswith(b"+OK")


def test_stls_after_login_on_plain_connection(server: Server, tls: TLSFiles) -> None:
    with connect(server, "plain", tls) as c:
        c.login()
        assert c.cmd("STLS").startswith(b"-ERR")
        assert c.cmd("NOOP") == b"+OK"  # the session goes on, still in clear
        assert c.quit().startswith(b"+OK")


def test_stls_refused_on_implicit_tls_port(server: Server, tls: TLSFiles) -> None:
    with connect(server, "pop3s", tls) as c:
        assert "STLS" not in c.capa()
        assert c.cmd("STLS").startswith(b"-ERR")
        c.login()
        assert c.quit().startswith(b"+OK")


def test_no_stls_without_a_certificate(make_server: MakeServer) -> None:
    srv = make_server(ssl_context=None)
    with Client(srv.cget("port")) as c:
        assert "STLS" not in c.capa()
        assert c.cmd("STLS").startswith(b"-ERR")
        c.login()  # the session is unharmed
        assert c.quit().startswith(b"+OK")


def assert_quiet(client: Client, wait: float = 0.3) -> None:
    """Nothing more arrives within *wait* seconds (nothing buffered either)."""
    assert not client.buf, f"unexpected bytes: {bytes(client.buf)!r}"
    client.sock.settimeout(wait)
    try:
        data = client.sock.recv(65536, socket.MSG_PEEK)
    except (TimeoutError, ConnectionError):  # nothing, or closed without a word
        data = b""
    finally:
        client.sock.settimeout(TIMEOUT)
    assert data == b"", f"unexpected bytes: {data!r}"


@pytest.mark.parametrize(
    ("packet", "answered_in_clear"),
    [
        (b"STLS\r\nCAPA\r\n", 0),
        (b"STLS\r\nUSER alice\r\nPASS " + ALICE_PW.encode() + b"\r\nSTAT\r\n", 0),
        (b"CAPA\r\nSTLS\r\nCAPA\r\nQUIT\r\n", 1),
    ],
    ids=["capa", "login", "capa-stls-capa"],
)
def test_starttls_injection_is_discarded(
    server: Server, tls: TLSFiles, packet: bytes, answered_in_clear: int
) -> None:
    """CVE-2011-0411: commands pipelined behind STLS in the same packet never run."""
    with Client(server.cget("port")) as client:
        client.send(packet)  # one write: one TCP segment on loopback
        for _ in range(answered_in_clear):
            assert client.line().startswith(b"+OK Capability")
            client.block()
        assert client.line().startswith(b"+OK Begin")
        assert_quiet(client)  # no plaintext reply to the injected commands
        client.sock = tls.client_context().wrap_socket(client.sock, server_hostname=HOST)
        # The first reply after the handshake answers OUR command, and only one list comes.
        status, lines = client.multi("CAPA")
        assert status.startswith(b"+OK Capability")
        assert b"STLS" not in lines
        # An injected USER was dropped: PASS has no user to go with.
        assert client.cmd("PASS " + ALICE_PW) == b"-ERR No username given."
        assert client.cmd("QUIT") == b"+OK Logging out."
        assert client.wait_closed(TIMEOUT)
        assert not client.buf, f"extra replies: {bytes(client.buf)!r}"


def test_starttls_injection_in_a_second_packet(server: Server, tls: TLSFiles) -> None:
    """CAPA sent in clear right after STLS, before the +OK is read, is never answered."""
    with Client(server.cget("port")) as client:
        client.send(b"STLS\r\n")
        client.send(b"CAPA\r\n")
        assert client.line().startswith(b"+OK Begin")
        assert_quiet(client)
        # Either the server read both lines at once (the CAPA was dropped and the
        # handshake works) or it gave "CAPA\r\n" to TLS (and the handshake fails).
        with warnings.catch_warnings():
            # When the peer has reset, CPython's SSLSocket._create raises ECONNRESET
            # from its recv(1) probe without closing the SSLSocket it made: that
            # object's ResourceWarning is Python's, not a leak in this test.
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                client.sock = tls.client_context().wrap_socket(client.sock, server_hostname=HOST)
            except (ssl.SSLError, OSError):
                client.sock.close()
                gc.collect()
                return
        assert isinstance(client.sock, ssl.SSLSocket)
        if client.sock.version() is None:  # already reset: wrap_socket skips the handshake
            return
        status, _ = client.multi("CAPA")
        assert status.startswith(b"+OK Capability")
        assert client.cmd("QUIT") == b"+OK Logging out."
        assert client.wait_closed(TIMEOUT)
        assert not client.buf


def test_plaintext_on_the_implicit_tls_port_gets_no_pop3_reply(server: Server) -> None:
    with socket.create_connection((HOST, server.cget("pop3s_port")), timeout=TIMEOUT) as sock:
        sock.sendall(b"CAPA\r\nUSER alice\r\n")
        data = b""
        deadline = time.monotonic() + TIMEOUT
        with contextlib.suppress(ConnectionError):
            while time.monotonic() < deadline and (chunk := sock.recv(65536)):
                data += chunk
        assert b"+OK" not in data, data
        assert b"-ERR" not in data, data
        assert time.monotonic() < deadline, "not closed"


# ================================================================== implicit TLS


def test_implicit_tls_full_session(server: Server, tls: TLSFiles) -> None:
    ctx = tls.client_context()
    with pop(server.cget("pop3s_port"), ctx) as p:
        assert isinstance(p.sock, ssl.SSLSocket)
        assert p.sock.getpeercert(binary_form=True) == tls.der(1)
        assert p.getwelcome().startswith(b"+OK")
        caps = p.capa()
        assert "STLS" not in caps
        assert "USER" in caps
        p.user("alice")
        assert p.pass_(ALICE_PW).startswith(b"+OK")
        assert p.stat() == (3, sum(map(len, ALICE_MSGS)))
        listing = p.list()[1]
        assert listing == [b"%d %d" % (n, len(m)) for n, m in enumerate(ALICE_MSGS, 1)]
        uids = p.uidl()[1]
        assert len(uids) == 3
        for n, msg in enumerate(ALICE_MSGS, 1):
            assert poplib_message(p.retr(n)[1]) == msg
        head = poplib_message(p.top(1, 0)[1])
        assert head == MSG1.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        assert p.dele(2).startswith(b"+OK")
        assert p.noop().startswith(b"+OK")
        assert p.quit().startswith(b"+OK")
    with pop(server.cget("pop3s_port"), ctx) as p:
        p.user("alice")
        p.pass_(ALICE_PW)
        assert p.stat() == (2, len(MSG1) + len(MSG3))
        assert poplib_message(p.retr(2)[1]) == MSG3
        p.quit()


@pytest.mark.parametrize("mode", ["stls", "pop3s"])
def test_large_message_over_tls_read_slowly(server: Server, tls: TLSFiles, mode: str) -> None:
    """4 MB through TLS, dot-stuffed across record boundaries, to a client that reads late."""
    with connect(server, mode, tls) as c:
        c.login("big", "big-pw")
        assert c.cmd("LIST 1") == b"+OK 1 %d" % len(BIG)
        c.send(b"RETR 1\r\n")
        time.sleep(0.5)  # the server meets a full socket buffer first
        assert c.line().startswith(b"+OK")
        got = bytearray()
        for line in c.block():
            got += line + CRLF
        assert bytes(got) == BIG
        assert c.cmd("NOOP") == b"+OK"
        assert c.quit().startswith(b"+OK")


# ================================================================== handshake timeouts


def client_hello(tls: TLSFiles) -> bytes:
    """A real ClientHello from a memory-BIO TLS client."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls.client_context().wrap_bio(incoming, outgoing, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_stalled_handshakes_time_out_while_others_are_served(
    make_server: MakeServer, tls: TLSFiles
) -> None:
    limit = 2.0  # room for the two other sessions to finish first on a loaded machine
    srv = make_server(pop3s_port=0, handshake_timeout=limit)
    t0 = time.monotonic()
    silent = [
        socket.create_connection((HOST, srv.cget("pop3s_port")), timeout=TIMEOUT) for _ in range(3)
    ]
    after_stls = Client(srv.cget("port"))
    try:
        assert after_stls.cmd("STLS").startswith(b"+OK")
        t_stls = time.monotonic()
        # Meanwhile, both ports serve whole sessions at once.
        with pop(srv.cget("pop3s_port"), tls.client_context()) as p:
            p.user("alice")
            p.pass_(ALICE_PW)
            assert poplib_message(p.retr(1)[1]) == MSG1
            p.quit()
        with pop(srv.cget("port")) as p:
            p.stls(tls.client_context())
            p.user("scrammy")
            p.pass_(SCRAM_PW)
            p.quit()
        assert time.monotonic() - t0 < limit, "the others waited for the stalled handshakes"
        for sock in silent:
            sock.settimeout(limit + 5)
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
        elapsed = time.monotonic() - t0
        assert limit * 0.8 <= elapsed < limit + 4, elapsed
        assert after_stls.wait_closed(limit + 5)
        assert limit * 0.8 <= time.monotonic() - t_stls < limit + 4
        assert wait_for(lambda: srv.connections() == [])
    finally:
        after_stls.close()
        for sock in silent:
            sock.close()


def test_trickled_client_hello_is_cut_off_at_handshake_timeout(
    make_server: MakeServer, tls: TLSFiles
) -> None:
    """handshake_timeout bounds the whole handshake, not each read of it."""
    limit = 1.0
    srv = make_server(pop3s_port=0, handshake_timeout=limit)
    hello = client_hello(tls)
    with socket.create_connection((HOST, srv.cget("pop3s_port")), timeout=TIMEOUT) as sock:
        t0 = time.monotonic()
        closed_at = None
        for byte in hello[:-1]:  # never complete: one byte each 0.25 s, for 8 s at most
            if time.monotonic() - t0 > 8:
                break
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.25)
                if sock.recv(100) == b"":
                    closed_at = time.monotonic()
                    break
            except TimeoutError:
                continue
            except ConnectionError:
                closed_at = time.monotonic()
                break
        assert closed_at is not None, "a trickling client held the handshake open"
        assert closed_at - t0 < limit + 3, closed_at - t0
    assert wait_for(lambda: srv.connections() == [])


def test_destroy_kills_sessions_in_a_tls_handshake(make_server: MakeServer, tls: TLSFiles) -> None:
    """destroy("kill") aborts handshakes at once, not after handshake_timeout."""
    srv = make_server(pop3s_port=0, handshake_timeout=30)
    with (
        socket.create_connection((HOST, srv.cget("pop3s_port")), timeout=TIMEOUT) as silent,
        Client(srv.cget("port")) as after_stls,
    ):
        assert after_stls.cmd("STLS").startswith(b"+OK")
        assert wait_for(lambda: len(srv.connections()) == 2)
        time.sleep(0.2)  # both are inside the handshake now
        t0 = time.monotonic()
        srv.destroy("kill", timeout=TIMEOUT)
        assert time.monotonic() - t0 < 3
        assert srv.connections() == []
        silent.settimeout(TIMEOUT)
        with contextlib.suppress(ConnectionError):
            assert silent.recv(100) == b""
        assert after_stls.wait_closed(TIMEOUT)


# ================================================================== cleartext policy


def test_cleartext_never_before_tls(make_server: MakeServer, tls: TLSFiles) -> None:
    srv = make_server(cleartext_auth=False)
    with Client(srv.cget("port")) as c:
        caps = c.capa()
        assert "USER" not in caps
        assert "STLS" in caps
        assert not {"PLAIN", "LOGIN"} & set(caps.get("SASL", []))
        assert caps["UTF8"] == []  # "UTF8 USER" only where USER is offered
        assert c.cmd("USER alice").startswith(b"-ERR")
        assert c.cmd("PASS " + ALICE_PW).startswith(b"-ERR")
        assert c.cmd("AUTH PLAIN " + plain_ir("alice", ALICE_PW)).startswith(b"-ERR")
        assert c.cmd("AUTH LOGIN").startswith(b"-ERR")
        assert c.cmd("AUTH PLAIN").startswith(b"-ERR")
        c.send(b"AUTH\r\n")
        assert c.line().startswith(b"+OK")
        assert not {b"PLAIN", b"LOGIN"} & set(c.block())
        c.stls(tls.client_context())
        caps = c.capa()
        assert "USER" in caps
        assert {"PLAIN", "LOGIN"} <= set(caps["SASL"])
        c.login()
        assert_logged_in(c, ALICE_MSGS)
    with Client(srv.cget("port")) as c:
        c.stls(tls.client_context())
        assert c.cmd("AUTH PLAIN " + plain_ir("alice", ALICE_PW)).startswith(b"+OK")
        assert c.quit().startswith(b"+OK")


def test_cleartext_never_still_allows_challenge_response(
    make_server: MakeServer, tls: TLSFiles
) -> None:
    srv = make_server(cleartext_auth=False)
    with Client(srv.cget("port")) as c:
        assert {"CRAM-MD5", "SCRAM-SHA-256"} <= set(c.capa()["SASL"])
        assert scram_login(c, "alice", ALICE_PW).startswith(b"+OK")
        assert c.quit().startswith(b"+OK")


@pytest.mark.parametrize("policy", ["loopback", True])
def test_cleartext_allowed_on_loopback(
    make_server: MakeServer, tls: TLSFiles, policy: object
) -> None:
    srv = make_server(cleartext_auth=policy)
    with Client(srv.cget("port")) as c:
        caps = c.capa()
        assert "USER" in caps
        assert "STLS" in caps
        assert caps["SASL"][:2] == ["PLAIN", "LOGIN"]
        c.login()
        assert_logged_in(c, ALICE_MSGS)
    with Client(srv.cget("port")) as c:
        assert c.cmd("AUTH PLAIN " + plain_ir("alice", ALICE_PW)).startswith(b"+OK")
        assert c.quit().startswith(b"+OK")


# ================================================================== SASL

MODES = ["plain", "stls", "pop3s"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def client(server: Server, tls: TLSFiles, mode: str) -> Iterator[Client]:
    with connect(server, mode, tls) as c:
        yield c


def test_sasl_plain_initial_response(client: Client) -> None:
    assert client.cmd("AUTH PLAIN " + plain_ir("alice", ALICE_PW)).startswith(b"+OK")
    assert_logged_in(client, ALICE_MSGS)


def test_sasl_plain_lowercase_mechanism_and_authzid(client: Client) -> None:
    reply = client.cmd("auth plain " + plain_ir("alice", ALICE_PW, authzid="alice"))
    assert reply.startswith(b"+OK"), reply
    assert_logged_in(client, ALICE_MSGS)


def test_sasl_plain_other_authzid_refused(client: Client) -> None:
    assert is_auth_err(client.cmd("AUTH PLAIN " + plain_ir("alice", ALICE_PW, authzid="bob")))
    assert client.cmd("AUTH PLAIN " + plain_ir("alice", ALICE_PW)).startswith(b"+OK")


def test_sasl_plain_empty_initial_response_fails_cleanly(client: Client) -> None:
    reply = client.cmd("AUTH PLAIN =")
    assert reply.startswith(b"-ERR"), reply
    # Still in AUTHORIZATION and in step: a proper attempt works.
    assert client.cmd("AUTH PLAIN " + plain_ir("scrammy", SCRAM_PW)).startswith(b"+OK")
    assert_logged_in(client, [MSG3])


def test_sasl_plain_without_initial_response(client: Client) -> None:
    line = client.cmd("AUTH PLAIN")
    assert line in (b"+ ", b"+"), line
    assert client.cmd(plain_ir("hashed", HASHED_PW)).startswith(b"+OK")
    assert_logged_in(client, [MSG3])


def test_sasl_plain_wrong_password(client: Client) -> None:
    assert is_auth_err(client.cmd("AUTH PLAIN " + plain_ir("alice", "nope")))
    assert is_auth_err(client.cmd("AUTH PLAIN " + plain_ir("nobody", "nope")))
    assert client.cmd("AUTH PLAIN " + plain_ir("alice", ALICE_PW)).startswith(b"+OK")


def test_sasl_login(client: Client) -> None:
    assert challenge(client.cmd("AUTH LOGIN")) == b"Username:"
    assert challenge(client.cmd(b64("hashed"))) == b"Password:"
    assert client.cmd(b64(HASHED_PW)).startswith(b"+OK")
    assert_logged_in(client, [MSG3])


def test_sasl_login_with_initial_response(client: Client) -> None:
    assert challenge(client.cmd("AUTH LOGIN " + b64("alice"))) == b"Password:"
    assert is_auth_err(client.cmd(b64("wrong")))
    assert challenge(client.cmd("AUTH LOGIN")) == b"Username:"
    assert challenge(client.cmd(b64("alice"))) == b"Password:"
    assert client.cmd(b64(ALICE_PW)).startswith(b"+OK")
    assert_logged_in(client, ALICE_MSGS)


def cram(client: Client, user: str, secret: str) -> bytes:
    data = challenge(client.cmd("AUTH CRAM-MD5"))
    assert re.fullmatch(rb"<[^<>@\s]+@[^<>@\s]+>", data), data
    digest = hmac.new(secret.encode(), data, hashlib.md5).hexdigest()
    return client.cmd(b64(f"{user} {digest}"))


def test_sasl_cram_md5(client: Client) -> None:
    assert is_auth_err(cram(client, "alice", "wrong"))
    assert is_auth_err(cram(client, "scrammy", SCRAM_PW))  # no cleartext secret stored
    assert cram(client, "alice", ALICE_PW).startswith(b"+OK")
    assert_logged_in(client, ALICE_MSGS)


def test_sasl_cram_md5_challenges_differ(server: Server, tls: TLSFiles, mode: str) -> None:
    seen = set()
    for _ in range(3):
        with connect(server, mode, tls) as c:
            seen.add(challenge(c.cmd("AUTH CRAM-MD5")))
            assert c.cmd("*").startswith(b"-ERR")
    assert len(seen) == 3


@pytest.mark.parametrize(
    ("user", "password", "messages"),
    [("alice", ALICE_PW, ALICE_MSGS), ("scrammy", SCRAM_PW, [MSG3]), (JORG, JORG_PW, [UTF8_MSG])],
    ids=["plain-secret", "scram-secret", "utf8-name"],
)
@pytest.mark.parametrize("initial", [True, False], ids=["ir", "no-ir"])
def test_sasl_scram_sha_256(
    client: Client, user: str, password: str, messages: list[bytes], initial: bool
) -> None:
    reply = scram_login(client, user, password, initial=initial)
    assert reply.startswith(b"+OK"), reply
    assert_logged_in(client, messages)


def test_sasl_scram_wrong_proof(client: Client) -> None:
    scram = ScramClient("scrammy", SCRAM_PW)
    server_first = challenge(client.cmd("AUTH SCRAM-SHA-256 " + scram.first()))
    assert is_auth_err(client.cmd(scram.final(server_first, wrong_proof=True)))
    assert scram_login(client, "scrammy", SCRAM_PW).startswith(b"+OK")


def test_sasl_scram_unknown_user_looks_the_same(client: Client) -> None:
    scram = ScramClient("nobody", "whatever")
    server_first = challenge(client.cmd("AUTH SCRAM-SHA-256 " + scram.first()))
    assert re.fullmatch(rb"r=[^,]+,s=[A-Za-z0-9+/=]+,i=\d+", server_first), server_first
    assert is_auth_err(client.cmd(scram.final(server_first)))


def test_sasl_scram_for_a_hash_only_user_fails(client: Client) -> None:
    scram = ScramClient("hashed", HASHED_PW)
    server_first = challenge(client.cmd("AUTH SCRAM-SHA-256 " + scram.first()))
    assert is_auth_err(client.cmd(scram.final(server_first)))


def test_sasl_scram_other_authzid_refused(client: Client) -> None:
    """A gs2 header asking to act as someone else must not log in as the authcid."""
    scram = ScramClient("alice", ALICE_PW, authzid="scrammy")
    first = client.cmd("AUTH SCRAM-SHA-256 " + scram.first())
    if first.startswith(b"-ERR"):
        return
    reply = client.cmd(scram.final(challenge(first)))
    if reply.startswith(b"+ "):
        reply = client.cmd("")
    assert reply.startswith(b"-ERR"), f"logged in as alice although authzid=scrammy: {reply!r}"


@pytest.mark.parametrize("mech", ["OAUTHBEARER", "XOAUTH2"])
def test_sasl_oauth(client: Client, mech: str) -> None:
    def message(user: str, token: str) -> str:
        if mech == "XOAUTH2":
            return b64(f"user={user}\x01auth=Bearer {token}\x01\x01")
        return b64(f"n,a={user},\x01host={HOST}\x01port=110\x01auth=Bearer {token}\x01\x01")

    for user, token in (("alice", "bad"), ("nobody", "good")):
        # RFC 7628 s3.2.2: the failure comes as a JSON challenge the client acknowledges.
        status = challenge(client.cmd(f"AUTH {mech} {message(user, token)}"))
        assert b'"status":"invalid_token"' in status
        assert is_auth_err(client.cmd("AQ=="))
    assert challenge(client.cmd(f"AUTH {mech}")) == b""
    assert client.cmd(message("alice", "good")).startswith(b"+OK")
    assert_logged_in(client, ALICE_MSGS)


@pytest.mark.parametrize("mech", ["OAUTHBEARER", "XOAUTH2"])
@pytest.mark.parametrize("initial", [True, False], ids=["ir", "no-ir"])
def test_sasl_oauth_long_token(client: Client, mech: str, initial: bool) -> None:
    """A bearer token of kilobytes fits an AUTH line (longer than the 255-octet limit)."""
    if mech == "XOAUTH2":
        message = b64(f"user=alice\x01auth=Bearer {LONG_TOKEN}\x01\x01")
    else:
        message = b64(f"n,a=alice,\x01auth=Bearer {LONG_TOKEN}\x01\x01")
    if initial:
        reply = client.cmd(f"AUTH {mech} {message}")
    else:
        assert challenge(client.cmd(f"AUTH {mech}")) == b""
        reply = client.cmd(message)
    assert reply.startswith(b"+OK"), reply
    assert_logged_in(client, ALICE_MSGS)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "XOAUTH2"])
def test_sasl_cancel_then_retry(client: Client, mech: str) -> None:
    assert client.cmd(f"AUTH {mech}").startswith(b"+")
    reply = client.cmd("*")
    assert reply.startswith(b"-ERR"), reply
    assert client.cmd("NOOP").startswith(b"-ERR")  # AUTHORIZATION again, not mid-exchange
    assert client.cmd("AUTH PLAIN " + plain_ir("alice", ALICE_PW)).startswith(b"+OK")
    assert_logged_in(client, ALICE_MSGS)


@pytest.mark.parametrize("where", ["initial", "continuation"])
@pytest.mark.parametrize("junk", ["!!!!", "YW=j", "YWJjZA", "YWJj ZGVm", "=="])
def test_sasl_malformed_base64(client: Client, where: str, junk: str) -> None:
    if where == "initial":
        reply = client.cmd(f"AUTH PLAIN {junk}")
    else:
        assert client.cmd("AUTH PLAIN").startswith(b"+")
        reply = client.cmd(junk)
    assert reply.startswith(b"-ERR"), reply
    assert client.cmd("AUTH PLAIN " + plain_ir("alice", ALICE_PW)).startswith(b"+OK")
    assert client.quit().startswith(b"+OK")


def test_sasl_unknown_mechanism(client: Client) -> None:
    assert client.cmd("AUTH GSSAPI").startswith(b"-ERR")
    assert client.cmd("AUTH X-NONSENSE " + b64("x")).startswith(b"-ERR")
    assert client.cmd("AUTH PLAIN " + plain_ir("alice", ALICE_PW)).startswith(b"+OK")


def test_sasl_three_failures_close_the_session(client: Client) -> None:
    for _ in range(3):
        assert is_auth_err(client.cmd("AUTH PLAIN " + plain_ir("alice", "nope")))
    assert client.wait_closed(TIMEOUT)


def test_bare_auth_lists_the_capa_mechanisms(client: Client) -> None:
    sasl = client.capa()["SASL"]
    expected = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "OAUTHBEARER", "XOAUTH2"]
    assert sasl == expected
    status, lines = client.multi("AUTH")
    assert status.startswith(b"+OK")
    assert [x.decode() for x in lines] == sasl


@pytest.mark.parametrize(
    ("table", "oauth", "expected"),
    [
        ({"h": "{SHA512-CRYPT}"}, False, ["PLAIN", "LOGIN"]),
        ({"s": "{SCRAM-SHA-256}"}, False, ["PLAIN", "LOGIN", "SCRAM-SHA-256"]),
        ({"p": "{PLAIN}"}, False, ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]),
        ({"h": "{SHA512-CRYPT}", "s": "{SCRAM-SHA-256}"}, True,
         ["PLAIN", "LOGIN", "SCRAM-SHA-256", "OAUTHBEARER", "XOAUTH2"]),
        ({"h": "{SHA512-CRYPT}", "p": "{PLAIN}"}, False,
         ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]),
    ],
    ids=["hash-only", "scram-only", "plain-only", "hash-scram-oauth", "hash-plain"],
)  # fmt: skip
def test_sasl_capa_lists_usable_mechanisms(
    make_server: MakeServer,
    tls: TLSFiles,
    table: dict[str, str],
    oauth: bool,
    expected: list[str],
) -> None:
    entries = {}
    for user, kind in table.items():
        scheme = kind.strip("{}")
        entries[user] = "{PLAIN}pw" if scheme == "PLAIN" else hash_password("pw", scheme)
    srv = make_server(
        auth=DictAuthenticator(entries), oauth=good_token if oauth else None, apop=True
    )
    with Client(srv.cget("port")) as c:
        assert c.capa()["SASL"] == expected
        c.send(b"AUTH\r\n")
        assert c.line().startswith(b"+OK")
        assert [x.decode() for x in c.block()] == expected
        # APOP needs cleartext secrets too: the greeting offers it only then.
        assert (b"<" in c.greeting) == ("CRAM-MD5" in expected)


def _write_passwd(path: Path, lines: list[str]) -> None:
    before = path.stat() if path.exists() else None
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if before is not None:  # make sure the change is seen even within one mtime tick
        ns = max(before.st_mtime_ns + 1_000_000, path.stat().st_mtime_ns)
        os.utime(path, ns=(ns, ns))


def test_sasl_capa_follows_passwd_file_changes(make_server: MakeServer, tmp_path: Path) -> None:
    """Mechanisms that need cleartext secrets come and go with the passwd-file."""
    passwd = tmp_path / "users"
    _write_passwd(passwd, [f"hashed:{hash_password(HASHED_PW, 'SHA512-CRYPT')}::::::"])
    srv = make_server(auth=PasswdFile(passwd))
    with Client(srv.cget("port")) as c:
        assert c.capa()["SASL"] == ["PLAIN", "LOGIN"]
    _write_passwd(passwd, [f"alice:{{PLAIN}}{ALICE_PW}::::::"])
    with Client(srv.cget("port")) as c:
        assert "CRAM-MD5" in c.capa()["SASL"], "CRAM-MD5 not offered after {PLAIN} appeared"
        assert cram(c, "alice", ALICE_PW).startswith(b"+OK")
        c.quit()
    _write_passwd(passwd, [f"hashed:{hash_password(HASHED_PW, 'SHA512-CRYPT')}::::::"])
    with Client(srv.cget("port")) as c:
        assert c.capa()["SASL"] == ["PLAIN", "LOGIN"], "CRAM-MD5 offered with no {PLAIN} left"


def test_sasl_utf8_user_name_needs_no_utf8_command(client: Client) -> None:
    """SASL identities are UTF-8 by definition (RFC 4616), before or after UTF8."""
    assert client.cmd("AUTH PLAIN " + plain_ir(JORG, JORG_PW)).startswith(b"+OK")
    assert_logged_in(client, [UTF8_MSG])


# ================================================================== APOP

TIMESTAMP = re.compile(rb"^\+OK .*(<[^<>@\s]+@[^<>\s]+>)$")


def test_apop(make_server: MakeServer) -> None:
    srv = make_server(apop=True)
    stamps = set()
    for _ in range(2):
        with pop(srv.cget("port")) as p:
            m = TIMESTAMP.match(p.getwelcome())
            assert m, p.getwelcome()
            stamps.add(m[1])
            assert p.apop("alice", ALICE_PW).startswith(b"+OK")
            assert p.stat()[0] == 3
            assert poplib_message(p.retr(1)[1]) == MSG1
            p.quit()
    assert len(stamps) == 2, "the APOP timestamp must differ per connection"
    with pop(srv.cget("port")) as p:
        assert is_auth_err(poplib_error(p.apop, "alice", "wrong secret"))
        # Only SCRAM keys are stored for scrammy: no APOP.
        assert is_auth_err(poplib_error(p.apop, "scrammy", SCRAM_PW))
        assert p.apop("alice", ALICE_PW).startswith(b"+OK")  # the third try
        p.quit()
    with pop(srv.cget("port")) as p:
        assert is_auth_err(poplib_error(p.apop, "nobody", "x"))
        assert p.apop("alice", ALICE_PW).startswith(b"+OK")
        p.quit()


def test_apop_over_tls(make_server: MakeServer, tls: TLSFiles) -> None:
    srv = make_server(apop=True, pop3s_port=0)
    with pop(srv.cget("pop3s_port"), tls.client_context()) as p:
        assert TIMESTAMP.match(p.getwelcome())
        assert p.apop("alice", ALICE_PW).startswith(b"+OK")
        p.quit()


def test_apop_refused_with_only_hashed_secrets(make_server: MakeServer) -> None:
    auth = DictAuthenticator(
        {"hashed": hash_password(HASHED_PW, "SHA512-CRYPT"), "scrammy": _USERS["scrammy"]}
    )
    srv = make_server(apop=True, auth=auth)
    with Client(srv.cget("port")) as c:
        assert b"<" not in c.greeting
        digest = hashlib.md5(b"<1.2@x>" + HASHED_PW.encode()).hexdigest()
        assert c.cmd(f"APOP hashed {digest}").startswith(b"-ERR")
        c.login("hashed", HASHED_PW)
        c.quit()


def test_apop_offer_matches_the_cleartext_policy(make_server: MakeServer, tls: TLSFiles) -> None:
    """A greeting timestamp is an offer: APOP must then work (it never shows the secret)."""
    srv = make_server(apop=True, cleartext_auth=False)
    with Client(srv.cget("port")) as c:
        m = TIMESTAMP.match(c.greeting)
        if m is not None:
            digest = hashlib.md5(m[1] + ALICE_PW.encode()).hexdigest()
            reply = c.cmd(f"APOP alice {digest}")
            assert reply.startswith(b"+OK"), f"APOP offered in the greeting, then: {reply!r}"
            assert c.quit().startswith(b"+OK")
    with Client(srv.cget("port")) as c:
        m = TIMESTAMP.match(c.greeting)
        c.stls(tls.client_context())
        if m is not None:  # after STLS the greeting's timestamp still counts
            digest = hashlib.md5(m[1] + ALICE_PW.encode()).hexdigest()
            assert c.cmd(f"APOP alice {digest}").startswith(b"+OK")
            assert c.quit().startswith(b"+OK")


def test_apop_off_by_default(make_server: MakeServer) -> None:
    srv = make_server()
    with Client(srv.cget("port")) as c:
        assert b"<" not in c.greeting
        assert c.cmd("APOP alice " + "0" * 32).startswith(b"-ERR")


# ================================================================== UTF8


@pytest.mark.parametrize("mode", ["plain", "stls"])
def test_utf8_user_name(server: Server, tls: TLSFiles, mode: str) -> None:
    with connect(server, mode, tls) as c:
        assert "UTF8" in c.capa()
        reply = c.cmd(f"USER {JORG}")
        assert reply.startswith(b"-ERR"), reply
        assert b"UTF8" in reply, reply
        assert c.cmd("UTF8").startswith(b"+OK")
        assert c.cmd(f"USER {JORG}").startswith(b"+OK")
        assert c.cmd(f"PASS {JORG_PW}").startswith(b"+OK")
        uid = c.cmd("UIDL 1")
        assert uid.startswith(b"+OK 1 ")
        assert c.cmd("LIST 1") == b"+OK 1 %d" % len(UTF8_MSG)
        assert c.retr(1) == UTF8_MSG
        _, lines = c.multi("TOP 1 0")
        assert b"".join(x + CRLF for x in lines) == UTF8_MSG.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        assert c.quit().startswith(b"+OK")


def test_utf8_user_name_wrong_password(server: Server) -> None:
    with Client(server.cget("port")) as c:
        assert c.cmd("UTF8").startswith(b"+OK")
        assert c.cmd(f"USER {JORG}").startswith(b"+OK")
        assert is_auth_err(c.cmd("PASS jorg-pw"))


def test_utf8_is_reset_by_stls(server: Server, tls: TLSFiles) -> None:
    """STLS starts the session over (RFC 2595): UTF8 must be sent again."""
    with Client(server.cget("port")) as c:
        assert c.cmd("UTF8").startswith(b"+OK")
        c.stls(tls.client_context())
        assert c.cmd(f"USER {JORG}").startswith(b"-ERR")
        assert c.cmd("UTF8").startswith(b"+OK")
        assert c.cmd(f"USER {JORG}").startswith(b"+OK")


# ================================================================== certificate reload


def peer_der(port: int, tls: TLSFiles) -> bytes:
    with Client(port, context=tls.client_context()) as c:
        assert isinstance(c.sock, ssl.SSLSocket)
        der = c.sock.getpeercert(binary_form=True)
        assert der is not None
        c.quit()
        return der


def stls_peer_der(port: int, tls: TLSFiles) -> bytes:
    with Client(port) as c:
        c.stls(tls.client_context())
        assert isinstance(c.sock, ssl.SSLSocket)
        der = c.sock.getpeercert(binary_form=True)
        assert der is not None
        c.quit()
        return der


def _live_sessions(srv: Server, tls: TLSFiles) -> tuple[Client, Client]:
    a = Client(srv.cget("pop3s_port"), context=tls.client_context())
    b = Client(srv.cget("port"))
    b.stls(tls.client_context())
    a.login()
    b.login("scrammy", SCRAM_PW)
    for c in (a, b):
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.sock.getpeercert(binary_form=True) == tls.der(1)
    return a, b


def _finish(a: Client, b: Client) -> None:
    with a, b:
        assert a.retr(1) == MSG1
        assert b.retr(1) == MSG3
        assert a.quit().startswith(b"+OK")
        assert b.quit().startswith(b"+OK")


def test_reload_by_configure(make_server: MakeServer, tls: TLSFiles) -> None:
    srv = make_server(
        ssl_context=None, tls_cert=str(tls.cert_pem), tls_key=str(tls.key_pem), pop3s_port=0
    )
    a, b = _live_sessions(srv, tls)
    srv.configure(tls_cert=str(tls.cert2_pem), tls_key=str(tls.key2_pem))
    assert peer_der(srv.cget("pop3s_port"), tls) == tls.der(2)
    assert stls_peer_der(srv.cget("port"), tls) == tls.der(2)
    _finish(a, b)


def test_reload_tls_after_rewriting_the_files(
    make_server: MakeServer, tls: TLSFiles, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copyfile(tls.cert_pem, cert)
    shutil.copyfile(tls.key_pem, key)
    srv = make_server(ssl_context=None, tls_cert=str(cert), tls_key=str(key), pop3s_port=0)
    a, b = _live_sessions(srv, tls)
    shutil.copyfile(tls.cert2_pem, cert)
    shutil.copyfile(tls.key2_pem, key)
    assert peer_der(srv.cget("pop3s_port"), tls) == tls.der(1)  # not reloaded yet
    srv.reload_tls()
    assert peer_der(srv.cget("pop3s_port"), tls) == tls.der(2)
    assert stls_peer_der(srv.cget("port"), tls) == tls.der(2)
    _finish(a, b)


def test_reload_by_new_ssl_context(make_server: MakeServer, tls: TLSFiles) -> None:
    srv = make_server(pop3s_port=0)
    a, b = _live_sessions(srv, tls)
    srv.configure(ssl_context=tls.server_context(2))
    assert peer_der(srv.cget("pop3s_port"), tls) == tls.der(2)
    assert stls_peer_der(srv.cget("port"), tls) == tls.der(2)
    _finish(a, b)


def test_failed_reload_keeps_the_old_certificate(
    make_server: MakeServer, tls: TLSFiles, tmp_path: Path
) -> None:
    srv = make_server(
        ssl_context=None, tls_cert=str(tls.cert_pem), tls_key=str(tls.key_pem), pop3s_port=0
    )
    with pytest.raises(FileNotFoundError):
        srv.configure(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(tls.key2_pem))
    assert peer_der(srv.cget("pop3s_port"), tls) == tls.der(1)
    assert srv.cget("tls_cert") == str(tls.cert_pem), "options changed by a failed configure"
    srv.reload_tls()  # what SIGHUP does: must still work with the old, good files
    assert peer_der(srv.cget("pop3s_port"), tls) == tls.der(1)


# ================================================================== real clients

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
needs_mpop = pytest.mark.skipif(shutil.which("mpop") is None, reason="mpop is not installed")


def run(argv: list[str], *, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=timeout, check=False)


def curl(url: str, *extra: str) -> bytes:
    argv = ["curl", "--silent", "--show-error", "--max-time", "20", *extra, url]
    done = run(argv)
    assert done.returncode == 0, (argv, done.stderr.decode(errors="replace"))
    return done.stdout


@pytest.fixture
def traced(make_server: MakeServer) -> tuple[Server, list[str]]:
    """A server (plain + implicit TLS) that records every command line it gets."""
    lines: list[str] = []

    def trace(session_id: int, direction: str, line: str) -> None:
        if direction == "C":
            lines.append(line)

    return make_server(pop3s_port=0, trace=trace, oauth=good_token), lines


@pytest.mark.clients
@needs_curl
def test_curl_stls(traced: tuple[Server, list[str]], tls: TLSFiles) -> None:
    srv, lines = traced
    for n, msg in enumerate(ALICE_MSGS, 1):
        url = f"pop3://alice:{ALICE_PW}@{HOST}:{srv.cget('port')}/{n}"
        assert curl(url, "--ssl-reqd", "--cacert", str(tls.ca_pem)) == msg
    assert "STLS" in lines


@pytest.mark.clients
@needs_curl
def test_curl_pop3s(server: Server, tls: TLSFiles) -> None:
    for n, msg in enumerate(ALICE_MSGS, 1):
        url = f"pop3s://alice:{ALICE_PW}@{HOST}:{server.cget('pop3s_port')}/{n}"
        assert curl(url, "--cacert", str(tls.ca_pem)) == msg
    listing = curl(f"pop3s://alice:{ALICE_PW}@{HOST}:{server.cget('pop3s_port')}/",
                   "--cacert", str(tls.ca_pem))  # fmt: skip
    assert listing == b"".join(b"%d %d\r\n" % (n, len(m)) for n, m in enumerate(ALICE_MSGS, 1))


@pytest.mark.clients
@needs_curl
def test_curl_large_message_over_stls(server: Server, tls: TLSFiles) -> None:
    url = f"pop3://big:big-pw@{HOST}:{server.cget('port')}/1"
    assert curl(url, "--ssl-reqd", "--cacert", str(tls.ca_pem)) == BIG


@pytest.mark.clients
@needs_curl
def test_curl_rejects_an_untrusted_certificate(server: Server) -> None:
    url = f"pop3s://alice:{ALICE_PW}@{HOST}:{server.cget('pop3s_port')}/1"
    done = run(["curl", "--silent", "--max-time", "20", url])
    assert done.returncode != 0
    assert done.stdout == b""


@pytest.mark.clients
@needs_curl
@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_curl_login_options(
    traced: tuple[Server, list[str]], tls: TLSFiles, mech: str, mode: str
) -> None:
    srv, lines = traced
    if mode == "pop3s":
        scheme, port = "pop3s", srv.cget("pop3s_port")
    else:
        scheme, port = "pop3", srv.cget("port")
    extra = ["--login-options", f"AUTH={mech}"]
    if mode != "plain":
        extra += ["--ssl-reqd", "--cacert", str(tls.ca_pem)]
    for n, msg in enumerate(ALICE_MSGS, 1):
        assert curl(f"{scheme}://alice:{ALICE_PW}@{HOST}:{port}/{n}", *extra) == msg
    assert any(line.startswith(f"AUTH {mech}") for line in lines), lines
    assert ("STLS" in lines) == (mode == "stls")


def mpop(
    port: int, tls: TLSFiles, maildir: Path, *, user: str, password: str, auth: str,
    starttls: bool | None, extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    argv = [
        "mpop", "--half-quiet", f"--host={HOST}", f"--port={port}", f"--user={user}",
        f"--passwordeval=printf %s {shlex.quote(password)}", f"--auth={auth}",
        "--timeout=20", "--keep=on", "--only-new=off", "--received-header=off",
        f"--uidls-file={maildir.parent / (maildir.name + '.uidls')}",
        f"--delivery=maildir,{maildir}",
    ]  # fmt: skip
    if starttls is None:
        argv.append("--tls=off")
    else:
        argv += ["--tls=on", f"--tls-starttls={'on' if starttls else 'off'}",
                 f"--tls-trust-file={tls.ca_pem}"]  # fmt: skip
    argv += list(extra)
    return run(argv, timeout=60)


def delivered(maildir: Path) -> list[bytes]:
    files = sorted((maildir / "new").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    return sorted(p.read_bytes() for p in files)


def lf(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n")


MPOP_CASES = [
    ("user", "alice", ALICE_PW, ALICE_MSGS),
    ("plain", "alice", ALICE_PW, ALICE_MSGS),
    ("login", "hashed", HASHED_PW, [MSG3]),
    ("cram-md5", "alice", ALICE_PW, ALICE_MSGS),
    ("scram-sha-256", "alice", ALICE_PW, ALICE_MSGS),
    ("scram-sha-256", "scrammy", SCRAM_PW, [MSG3]),
    ("oauthbearer", "alice", "good", ALICE_MSGS),
    ("xoauth2", "alice", "good", ALICE_MSGS),
]


def _mpop_methods() -> set[str]:
    if shutil.which("mpop") is None:
        return set()
    out = run(["mpop", "--version"], timeout=20).stdout.decode(errors="replace")
    m = re.search(r"Supported authentication methods:\s*\n(.*)\n", out)
    return set(m[1].split()) if m else set()


@pytest.mark.clients
@needs_mpop
@pytest.mark.parametrize("mode", ["stls", "pop3s"])
@pytest.mark.parametrize(
    ("auth", "user", "password", "messages"),
    MPOP_CASES,
    ids=[f"{a}-{u}" for a, u, _, _ in MPOP_CASES],
)
def test_mpop(
    traced: tuple[Server, list[str]], tls: TLSFiles, tmp_path: Path, mode: str,
    auth: str, user: str, password: str, messages: list[bytes],
) -> None:  # fmt: skip
    if auth not in _mpop_methods():
        pytest.skip(f"this mpop does not support {auth}")
    srv, lines = traced
    port = srv.cget("pop3s_port") if mode == "pop3s" else srv.cget("port")
    maildir = tmp_path / "Maildir"
    done = mpop(port, tls, maildir, user=user, password=password, auth=auth,
                starttls=mode == "stls")  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert delivered(maildir) == sorted(lf(m) for m in messages)
    assert ("STLS" in lines) == (mode == "stls")
    if auth != "user":
        assert any(line.startswith(f"AUTH {auth.upper()}") for line in lines), lines


@pytest.mark.clients
@needs_mpop
def test_mpop_apop(make_server: MakeServer, tls: TLSFiles, tmp_path: Path) -> None:
    if "apop" not in _mpop_methods():
        pytest.skip("this mpop does not support apop")
    srv = make_server(apop=True)
    maildir = tmp_path / "Maildir"
    done = mpop(srv.cget("port"), tls, maildir, user="alice", password=ALICE_PW, auth="apop",
                starttls=None)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert delivered(maildir) == sorted(lf(m) for m in ALICE_MSGS)


@pytest.mark.clients
@needs_mpop
def test_mpop_refuses_cleartext_before_tls_policy(
    make_server: MakeServer, tls: TLSFiles, tmp_path: Path
) -> None:
    """With cleartext_auth=False, mpop without TLS cannot use USER, and fails cleanly."""
    srv = make_server(cleartext_auth=False)
    done = mpop(srv.cget("port"), tls, tmp_path / "Maildir", user="alice", password=ALICE_PW,
                auth="user", starttls=None)  # fmt: skip
    assert done.returncode != 0
    assert list((tmp_path / "Maildir" / "new").iterdir()) == []


# ================================================================== the command


class _Lines:
    """The lines a subprocess prints, read by a thread, each wait bounded."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.q: queue.Queue[bytes] = queue.Queue()
        assert proc.stdout is not None
        self.thread = threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.q.put(line)
        self.q.put(b"")

    def until(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.q.get(timeout=left).decode("utf-8", "replace")
            except queue.Empty:
                break
            if not line:
                break
            seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError(f"no line matching {pattern!r} in {seen!r}")


@pytest.mark.clients
@needs_curl
def test_demo_command_prints_a_working_tls_curl_line(transport: str, tls: TLSFiles) -> None:
    from pop3proto.transports._cli import DEMO_MESSAGES

    argv = [sys.executable, "-m", f"pop3proto.transports.{transport}", "--demo", "--port", "0",
            "--tls-cert", str(tls.cert_pem), "--tls-key", str(tls.key_pem),
            "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        out = _Lines(proc)
        line = out.until(r"^TLS:\s+(curl .*)$").group(1)
        words = shlex.split(line)
        assert "--ssl-reqd" in words, line
        assert "-k" in words, line
        words[words.index("-k") : words.index("-k") + 1] = ["--cacert", str(tls.ca_pem)]
        words[1:1] = ["--silent", "--show-error", "--max-time", "20"]
        done = run(words)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert done.stdout == DEMO_MESSAGES[0].replace(b"\n", b"\r\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
