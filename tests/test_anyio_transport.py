"""The anyio transport on asyncio and trio: serve() in a task group, Server.up(), TLS, limits."""

from __future__ import annotations

import poplib
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import anyio
import pytest
import trustme
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from pop3proto.auth import PlainVerifier
from pop3proto.memstore import MemoryStorage
from pop3proto.server import Server
from pop3proto.transports.anyio import serve

BACKENDS = ["asyncio", "trio"]
MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello.\r\n.dot\r\n"


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """For Server.up(): the backend start() picks from the environment."""
    monkeypatch.setenv("POP3PROTO_ANYIO_BACKEND", request.param)
    return str(request.param)


class Auth:
    """alice, bob and carol, password "pw"; the mailbox is the user name."""

    users = ("alice", "bob", "carol")

    def exists(self, name: str) -> bool:
        return name in self.users

    def lookup(self, name: str) -> tuple[PlainVerifier, str] | None:
        return (PlainVerifier("pw"), name) if name in self.users else None


class SlowStorage:
    """MemoryStorage whose ``get`` takes a second (a slow disk), run in a worker thread."""

    def __init__(self, inner: MemoryStorage) -> None:
        self.inner = inner
        self.lock, self.unlock, self.scan = inner.lock, inner.unlock, inner.scan
        self.dele = inner.dele

    def get(self, mailbox: str, key: str) -> Any:
        time.sleep(1.0)
        return self.inner.get(mailbox, key)


def make_server(storage: Any = None, **options: Any) -> Server:
    if storage is None:
        storage = MemoryStorage()
        storage.add("alice", MESSAGE)
    return Server(
        transport="anyio", host="127.0.0.1", port=0, auth=Auth(), storage=storage,
        auth_failure_delay=0, **options,
    )


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


class Client:
    """A line-oriented POP3 client over an anyio stream."""

    opened: ClassVar[list[Client]] = []

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)
        Client.opened.append(self)

    @classmethod
    async def connect(cls, port: int) -> Client:
        client = cls(await anyio.connect_tcp("127.0.0.1", port))
        assert (await client.line()).startswith(b"+OK")
        return client

    async def line(self) -> bytes:
        return await self.reader.receive_until(b"\r\n", 1 << 16)

    async def multi(self) -> bytes:
        return await self.reader.receive_until(b"\r\n.\r\n", 1 << 26)

    async def cmd(self, text: str) -> bytes:
        await self.stream.send(text.encode() + b"\r\n")
        return await self.line()

    async def login(self, user: str) -> None:
        assert (await self.cmd(f"USER {user}")).startswith(b"+OK")
        assert (await self.cmd("PASS pw")).startswith(b"+OK")


@pytest.fixture
async def close_clients() -> Any:
    """Close every test client when the test ends."""
    yield
    while Client.opened:
        await Client.opened.pop().stream.aclose()


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_serve_session_and_pipelining() -> None:
    storage = MemoryStorage()
    storage.add("alice", MESSAGE)
    storage.add("alice", b"Subject: two\r\n\r\nSecond.\r\n")
    server = make_server(storage)
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        client = await Client.connect(ports["pop3"])
        await client.stream.send(b"USER alice\r\nPASS pw\r\nSTAT\r\nRETR 1\r\nDELE 2\r\n")
        assert await client.line() == b"+OK"
        assert (await client.line()).startswith(b"+OK")
        assert await client.line() == b"+OK 2 %d" % (
            sum(len(m) for m in storage.messages("alice"))
        )
        assert (await client.multi()).endswith(b"Hello.\r\n..dot")
        assert (await client.line()).startswith(b"+OK")
        assert (await client.cmd("QUIT")).startswith(b"+OK")
        with pytest.raises(anyio.EndOfStream):
            await client.reader.receive()
        await client.stream.aclose()
        await wait_for(lambda: not server.connections())
        assert storage.messages("alice") == [MESSAGE]
        assert storage.lock("alice")
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_cancel_closes_sessions_without_update() -> None:
    storage = MemoryStorage()
    storage.add("alice", MESSAGE)
    server = make_server(storage)
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            ports = await tg.start(serve, server)
            client = await Client.connect(ports["pop3"])
            await client.login("alice")
            assert (await client.cmd("DELE 1")).startswith(b"+OK")
            await wait_for(
                lambda: server.connection_state(server.connections()[0])["user"] == "alice"
            )
            outer.cancel()
    assert server.connections() == []
    assert storage.messages("alice") == [MESSAGE]  # no update
    assert storage.lock("alice")  # lock released
    assert await client.line() == b"-ERR [SYS/TEMP] Server shutting down."


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_slow_storage_does_not_block_the_loop() -> None:
    inner = MemoryStorage()
    inner.add("alice", MESSAGE)
    server = make_server(SlowStorage(inner))
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        a = await Client.connect(ports["pop3"])
        b = await Client.connect(ports["pop3"])
        await a.login("alice")
        await b.login("bob")
        t0 = time.monotonic()
        await a.stream.send(b"RETR 1\r\n")
        await anyio.sleep(0.2)
        assert await b.cmd("NOOP") == b"+OK"
        assert time.monotonic() - t0 < 0.8
        assert (await a.line()).startswith(b"+OK")
        assert time.monotonic() - t0 >= 0.9
        assert (await a.multi()).endswith(b"..dot")
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_client_that_never_reads_does_not_stop_others() -> None:
    storage = MemoryStorage()
    big = (b"y" * 998 + b"\r\n") * (20 * 1024)  # 20 MB
    storage.add("alice", big)
    storage.add("bob", MESSAGE)
    server = make_server(storage)
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        stuck = await Client.connect(ports["pop3"])
        await stuck.login("alice")
        await stuck.stream.send(b"RETR 1\r\n")  # and never read it
        await anyio.sleep(0.3)
        other = await Client.connect(ports["pop3"])
        await other.login("bob")
        assert (await other.cmd("RETR 1")).startswith(b"+OK")
        assert (await other.multi()).endswith(b"..dot")
        states = [server.connection_state(i) for i in server.connections()]
        sent = next(st for st in states if st["user"] == "alice")["bytes_out"]
        assert sent < len(big) // 2, sent  # back-pressure: the rest stays in storage
        print("bytes_out of the stalled RETR:", sent)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_idle_timeout_closes_without_update() -> None:
    storage = MemoryStorage()
    storage.add("alice", MESSAGE)
    server = make_server(storage, idle_timeout=0.3, login_timeout=0.3)
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        client = await Client.connect(ports["pop3"])
        await client.login("alice")
        assert (await client.cmd("DELE 1")).startswith(b"+OK")
        with anyio.fail_after(3):
            assert await client.line() == b"-ERR Disconnected for inactivity."
        await client.stream.aclose()
        await wait_for(lambda: not server.connections())
        assert storage.messages("alice") == [MESSAGE]
        assert storage.lock("alice")
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_protocol_error_gets_final_err() -> None:
    server = make_server()
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        client = await Client.connect(ports["pop3"])
        await client.stream.send(b"NO\x00OP\r\n")  # a NUL: beyond repair
        assert (await client.line()).startswith(b"-ERR")
        with anyio.fail_after(3):
            with pytest.raises((anyio.EndOfStream, anyio.IncompleteRead)):
                await client.line()
        await client.stream.aclose()
        await wait_for(lambda: not server.connections())
        tg.cancel_scope.cancel()


@pytest.fixture
def up_server(backend: str) -> Iterator[Server]:
    server = make_server()
    server.up()
    yield server
    server.destroy("kill", timeout=5)


def test_up_with_poplib(up_server: Server) -> None:
    pop = poplib.POP3("127.0.0.1", up_server.cget("port"), timeout=5)
    pop.user("alice")
    pop.pass_("pw")
    assert pop.stat() == (1, len(MESSAGE))
    _, lines, _ = pop.retr(1)
    assert lines[-1] == b".dot"
    assert pop.quit().startswith(b"+OK")


def test_down_stops_listening_but_sessions_go_on(up_server: Server) -> None:
    port = up_server.cget("port")
    pop = poplib.POP3("127.0.0.1", port, timeout=5)
    up_server.down()
    with pytest.raises(ConnectionRefusedError):
        poplib.POP3("127.0.0.1", port, timeout=2)
    pop.user("alice")
    pop.pass_("pw")
    assert pop.stat()[0] == 1
    pop.quit()


def test_destroy_kill(up_server: Server) -> None:
    storage = up_server.cget("storage")
    pop = poplib.POP3("127.0.0.1", up_server.cget("port"), timeout=5)
    pop.user("alice")
    pop.pass_("pw")
    pop.dele(1)
    t0 = time.monotonic()
    up_server.destroy("kill", timeout=5)
    assert time.monotonic() - t0 < 2
    assert up_server.connections() == []
    assert storage.lock("alice")
    assert len(storage.messages("alice")) == 1
    with pytest.raises((poplib.error_proto, OSError)):
        pop.noop()
    pop.close()


def test_stls(backend: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = contexts
    with make_server(ssl_context=server_ctx) as server:
        pop = poplib.POP3("127.0.0.1", server.cget("port"), timeout=5)
        assert "STLS" in pop.capa()
        pop.stls(context=client_ctx)
        pop.user("alice")
        pop.pass_("pw")
        assert pop.retr(1)[1][-1] == b".dot"
        assert server.connection_state(server.connections()[0])["tls"] is True
        pop.quit()


def test_implicit_tls(backend: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = contexts
    with make_server(ssl_context=server_ctx, pop3s_port=0) as server:
        port = server.cget("pop3s_port")
        assert port != server.cget("port")
        pop = poplib.POP3_SSL("127.0.0.1", port, context=client_ctx, timeout=5)
        pop.user("alice")
        pop.pass_("pw")
        assert pop.stat()[0] == 1
        pop.quit()


def test_kill_from_another_thread_while_retr_stalls(backend: str) -> None:
    storage = MemoryStorage()
    storage.add("alice", (b"z" * 998 + b"\r\n") * (20 * 1024))
    with make_server(storage) as server:
        pop = poplib.POP3("127.0.0.1", server.cget("port"), timeout=5)
        pop.user("alice")
        pop.pass_("pw")
        pop._putcmd("RETR 1")  # type: ignore[attr-defined]  # and never read the answer
        time.sleep(0.3)
        done = threading.Event()

        def destroy_then_signal() -> None:
            server.destroy("kill", timeout=5)
            done.set()

        threading.Thread(target=destroy_then_signal).start()
        assert done.wait(3)
        assert server.connections() == []
        assert storage.lock("alice")
        pop.close()


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_slow_reader_gets_everything_before_the_close() -> None:
    """A pipelined RETR + QUIT read slowly: the whole message and the sign-off arrive."""
    big = (b"q" * 998 + b"\r\n") * (8 * 1024)  # 8 MB
    storage = MemoryStorage()
    storage.add("alice", big)
    server = make_server(storage)
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        client = await Client.connect(ports["pop3"])
        await client.login("alice")
        await client.stream.send(b"RETR 1\r\nQUIT\r\n")
        await anyio.sleep(0.5)  # the server has run out of socket buffer by now
        assert (await client.line()).startswith(b"+OK")
        assert len(await client.multi()) == len(big) - 2
        assert await client.line() == b"+OK Logging out."
        with pytest.raises(anyio.EndOfStream):
            await client.reader.receive()
        tg.cancel_scope.cancel()


class AsyncStorage:
    """A storage whose methods are coroutines (awaited in the loop, never in a thread)."""

    def __init__(self, inner: MemoryStorage) -> None:
        self.inner = inner
        self.threads: set[int] = set()

    async def _run(self, fn: Any, *args: Any) -> Any:
        self.threads.add(threading.get_ident())
        await anyio.sleep(0.01)
        return fn(*args)

    async def lock(self, mailbox: str) -> bool:
        return bool(await self._run(self.inner.lock, mailbox))

    async def unlock(self, mailbox: str) -> None:
        await self._run(self.inner.unlock, mailbox)

    async def scan(self, mailbox: str) -> Any:
        return await self._run(self.inner.scan, mailbox)

    async def get(self, mailbox: str, key: str) -> Any:
        return await self._run(self.inner.get, mailbox, key)

    async def dele(self, mailbox: str, keys: Any) -> None:
        await self._run(self.inner.dele, mailbox, keys)


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_async_storage_runs_in_the_loop_and_unlocks_on_cancel() -> None:
    inner = MemoryStorage()
    inner.add("alice", MESSAGE)
    storage = AsyncStorage(inner)
    server = make_server(storage)
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            ports = await tg.start(serve, server)
            client = await Client.connect(ports["pop3"])
            await client.login("alice")
            assert (await client.cmd("RETR 1")).startswith(b"+OK")
            assert (await client.multi()).endswith(b"..dot")
            outer.cancel()
    assert storage.threads == {threading.get_ident()}
    assert inner.lock("alice")  # the async unlock ran at the cancellation
    assert server.connections() == []


class Recorder:
    """A storage that notes the thread each call runs in; ``nonblocking`` as given."""

    def __init__(self, inner: MemoryStorage, nonblocking: bool) -> None:
        self.inner, self.nonblocking = inner, nonblocking
        self.threads: set[int] = set()

    def _note(self) -> MemoryStorage:
        self.threads.add(threading.get_ident())
        return self.inner

    def lock(self, mailbox: str) -> bool:
        return self._note().lock(mailbox)

    def unlock(self, mailbox: str) -> None:
        self._note().unlock(mailbox)

    def scan(self, mailbox: str) -> Any:
        return self._note().scan(mailbox)


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
@pytest.mark.parametrize("nonblocking", [True, False])
async def test_nonblocking_owner_runs_inline(nonblocking: bool) -> None:
    inner = MemoryStorage()
    inner.add("alice", MESSAGE)
    storage = Recorder(inner, nonblocking)
    server = make_server(storage)
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        client = await Client.connect(ports["pop3"])
        await client.login("alice")
        assert (await client.cmd("QUIT")).startswith(b"+OK")
        tg.cancel_scope.cancel()
    in_loop = storage.threads == {threading.get_ident()}
    assert in_loop is nonblocking


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_one_read_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    from pop3proto import Connection

    writes: list[bytes] = []
    original = Connection.data_to_send

    def counting(self: Connection, max_bytes: int | None = None) -> bytes:
        data = original(self, max_bytes)
        if data:
            writes.append(data)
        return data

    monkeypatch.setattr(Connection, "data_to_send", counting)
    server = make_server()
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        client = await Client.connect(ports["pop3"])
        writes.clear()
        await client.stream.send(b"CAPA\r\nUSER alice\r\nPASS pw\r\nSTAT\r\nLIST\r\nNOOP\r\n")
        await client.multi()  # CAPA
        for _ in range(3):
            await client.line()
        await client.multi()  # LIST
        assert await client.line() == b"+OK"
        assert len(writes) == 1, writes
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_proxy_protocol_v1_and_untrusted() -> None:
    server = make_server(proxy_protocol=True, trusted_proxies=("127.0.0.0/8",))
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        stream = await anyio.connect_tcp("127.0.0.1", ports["pop3"])
        client = Client(stream)
        await stream.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 110\r\n")
        assert (await client.line()).startswith(b"+OK")
        assert server.connection_state(server.connections()[0])["peer"] == "192.0.2.7"
        bad = Client(await anyio.connect_tcp("127.0.0.1", ports["pop3"]))
        await bad.stream.send(b"USER alice\r\n")  # no header: dropped, nothing said
        with pytest.raises((anyio.EndOfStream, anyio.IncompleteRead)):
            await bad.line()
        tg.cancel_scope.cancel()


def test_proxy_v2_before_implicit_tls(
    backend: str, contexts: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    import socket
    import struct

    server_ctx, client_ctx = contexts
    header = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12)
    header += socket.inet_aton("198.51.100.9") + socket.inet_aton("127.0.0.1")
    header += struct.pack("!HH", 4242, 995)
    server = make_server(
        ssl_context=server_ctx, pop3s_port=0, proxy_protocol=True,
        trusted_proxies=("127.0.0.1/32",),
    )
    with server, socket.create_connection(("127.0.0.1", server.cget("pop3s_port")), 5) as raw:
        raw.sendall(header)
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.recv(100).startswith(b"+OK")
            state = server.connection_state(server.connections()[0])
            assert (state["peer"], state["port"], state["tls"]) == ("198.51.100.9", 4242, True)


def test_start_with_unknown_backend_raises_and_frees_the_port() -> None:
    from pop3proto.transports.anyio import start

    server = make_server()
    with pytest.raises(LookupError):
        start(server, backend="no-such-backend")
    assert server.connections() == []


class FailingReads:
    """A storage whose message 1 fails mid-read and whose message 2 cannot be opened."""

    def __init__(self, inner: MemoryStorage) -> None:
        self.inner = inner
        self.lock, self.unlock, self.scan = inner.lock, inner.unlock, inner.scan

    def get(self, mailbox: str, key: str) -> Any:
        keys = [m.key for m in self.inner.scan(mailbox)]
        if key == keys[1]:
            raise OSError("disk on fire")
        stream = self.inner.get(mailbox, key)
        first, original = [True], stream.read

        def read(n: int | None = -1) -> bytes:
            if first[0]:
                first[0] = False
                return original(n)
            raise OSError("read error")

        stream.read = read  # type: ignore[method-assign]
        return stream


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_storage_errors(caplog: pytest.LogCaptureFixture) -> None:
    inner = MemoryStorage()
    inner.add("alice", b"a" * 100_000)
    inner.add("alice", MESSAGE)
    server = make_server(FailingReads(inner), chunk_size=1000)
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        client = await Client.connect(ports["pop3"])
        await client.login("alice")
        assert await client.cmd("RETR 2") == b"-ERR [SYS/TEMP] Message is temporarily unavailable."
        assert (await client.cmd("RETR 1")).startswith(b"+OK")
        with pytest.raises((anyio.EndOfStream, anyio.IncompleteRead)):
            await client.multi()  # cut off mid-message, never a false end
        await wait_for(lambda: not server.connections())
        assert inner.lock("alice")
        assert "read error" in caplog.text
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_many_pipelined_commands_pass_the_high_water_mark() -> None:
    server = make_server()
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        client = await Client.connect(ports["pop3"])
        await client.login("alice")
        await client.stream.send(b"CAPA\r\n" * 5_000)  # 30 kB in, 750 kB out
        for _ in range(5_000):
            assert b"UIDL" in await client.multi()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_kill_from_the_loop_thread_and_untrusted_proxy() -> None:
    server = make_server()
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        client = await Client.connect(ports["pop3"])
        await client.login("alice")
        server.kill_sessions()  # from the loop's own thread
        assert await client.line() == b"-ERR [SYS/TEMP] Server shutting down."
        await wait_for(lambda: not server.connections())
        tg.cancel_scope.cancel()
    server = make_server(proxy_protocol=True, trusted_proxies=("10.0.0.0/8",))
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        client = Client(await anyio.connect_tcp("127.0.0.1", ports["pop3"]))
        await client.stream.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 110\r\n")
        with pytest.raises((anyio.EndOfStream, anyio.IncompleteRead)):
            await client.line()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.usefixtures("close_clients")
async def test_failed_login_delay_and_reset_mid_retr(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", "pop3proto")
    storage = MemoryStorage()
    storage.add("alice", (b"r" * 998 + b"\r\n") * 8192)
    storage.add("alice", MESSAGE)
    server = make_server(storage)
    server.configure(auth_failure_delay=0.3)
    async with anyio.create_task_group() as tg:
        ports = await tg.start(serve, server)
        client = await Client.connect(ports["pop3"])
        t0 = time.monotonic()
        assert (await client.cmd("USER alice")).startswith(b"+OK")
        assert await client.cmd("PASS wrong") == b"-ERR [AUTH] Authentication failed."
        assert time.monotonic() - t0 >= 0.3
        server.configure(auth_failure_delay=0)
        await client.login("alice")
        await client.stream.send(b"DELE 2\r\nRETR 1\r\n")
        assert (await client.line()).startswith(b"+OK")
        assert (await client.line()).startswith(b"+OK")
        await client.stream.aclose()  # gone mid-RETR: the write fails, no update
        await wait_for(lambda: not server.connections())
        assert "Disconnected (Connection lost)" in caplog.text
        assert len(storage.messages("alice")) == 2
        assert storage.lock("alice")
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_demo_command_serves_and_stops_on_sigterm(backend_name: str) -> None:
    import os
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "pop3proto.transports.anyio", "--demo", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "POP3PROTO_ANYIO_BACKEND": backend_name},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        match = re.search(r"curl pop3://demo:(\S+)@127\.0\.0\.1:(\d+)/1", lines[3])
        assert match, lines
        pop = poplib.POP3("127.0.0.1", int(match.group(2)), timeout=5)
        pop.user("demo")
        pop.pass_(match.group(1))
        assert pop.stat()[0] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        pop.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


class LoopSpy:
    """MemoryStorage whose ``scan`` is a coroutine: it notes the module of the loop it runs in."""

    def __init__(self, inner: MemoryStorage) -> None:
        self.inner = inner
        self.lock, self.unlock = inner.lock, inner.unlock
        self.get, self.dele = inner.get, inner.dele
        self.loops: list[str] = []

    async def scan(self, mailbox: str) -> Any:
        import asyncio

        self.loops.append(type(asyncio.get_running_loop()).__module__.split(".")[0])
        return self.inner.scan(mailbox)


@pytest.mark.parametrize("setting", [None, "0"])
def test_up_runs_asyncio_on_uvloop_unless_turned_off(
    setting: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("uvloop")  # the optional extra
    monkeypatch.setenv("POP3PROTO_ANYIO_BACKEND", "asyncio")
    if setting is None:
        monkeypatch.delenv("POP3PROTO_UVLOOP", raising=False)
    else:
        monkeypatch.setenv("POP3PROTO_UVLOOP", setting)
    inner = MemoryStorage()
    inner.add("alice", MESSAGE)
    spy = LoopSpy(inner)
    server = make_server(spy)
    server.up()
    try:
        pop = poplib.POP3("127.0.0.1", server.cget("port"), timeout=5)
        pop.user("alice")
        pop.pass_("pw")
        assert pop.stat() == (1, len(MESSAGE))
        pop.quit()
    finally:
        server.destroy("kill", timeout=5)
    assert spy.loops == (["uvloop"] if setting is None else ["asyncio"])


def test_start_raises_the_soft_open_file_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard, 1024)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    server = make_server()
    try:
        server.up()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        server.destroy("kill", timeout=5)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
