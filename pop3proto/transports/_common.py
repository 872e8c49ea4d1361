"""What every transport shares: listening sockets, start-up, PROXY headers, running calls.

The transports differ only in how they wait (a thread per connection,
one selector, anyio tasks); everything else is written here once.
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import inspect
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pop3proto.driver import Call, SessionDriver
from pop3proto.options import worker_count
from pop3proto.proxy import MAX_HEADER, V2_SIGNATURE, parse_proxy_header

if TYPE_CHECKING:
    from pop3proto.server import Server, TransportHandle

__all__ = [
    "CallPool",
    "ProxyReader",
    "listen",
    "open_listeners",
    "perform_call",
    "quickack",
    "raise_nofile",
    "run_call",
    "start",
]


def listen(host: str, port: int) -> socket.socket:
    """The default listener: TCP, SO_REUSEADDR, a deep backlog, dual-stack for '::'."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server(
        (host, port),
        family=family,
        backlog=4096,
        reuse_port=False,
        dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6(),
    )


def open_listeners(server: Server) -> list[tuple[socket.socket, bool]]:
    """Bind the listening sockets: (socket, implicit TLS?) for ``port`` and ``pop3s_port``.

    ``socket_factory(host, port)`` (pop3d's ``-socket``) makes each one when set.

    Raises:
        OSError: a port is in use or the address is not available.
        ValueError: ``pop3s_port`` without a TLS context.
    """
    factory = server.cget("socket_factory") or listen
    host = server.cget("host")
    pop3s = server.cget("pop3s_port")
    if pop3s is not None and server.ssl_context() is None:
        raise ValueError("pop3s_port needs ssl_context or tls_cert/tls_key")
    out = [(factory(host, server.cget("port")), False)]
    if pop3s is not None:
        try:
            out.append((factory(host, pop3s), True))
        except OSError:
            out[0][0].close()
            raise
    return out


def ports_of(listeners: list[tuple[socket.socket, bool]]) -> dict[str, int]:
    """``{"pop3": n}`` plus ``"pop3s"``: the bound ports."""
    return {("pop3s" if tls else "pop3"): s.getsockname()[1] for s, tls in listeners}


def start(server: Server) -> TransportHandle:
    """Listen and serve in the background with the configured transport (or workers)."""
    workers = worker_count(server.cget("workers"))
    if workers > 1:
        from ._workers import WorkerPool

        return WorkerPool(server, workers)
    module = importlib.import_module(f"pop3proto.transports.{server.cget('transport')}")
    handle: TransportHandle = module.start(server)
    return handle


def run_call(call: Call) -> Any:
    """Run a Call in this thread (a coroutine result is run to completion with asyncio)."""
    result = call.fn(*call.args)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


class CallPool:
    """Worker threads for blocking Calls, started on demand, at most *limit*.

    Unlike ``ThreadPoolExecutor``, a job is queued only once a thread is there
    to run it: when a new thread cannot start (a pids/task limit), ``submit``
    raises RuntimeError and the job never runs, so a call cannot run later
    for a session that is gone.  Idle threads end after *idle* seconds.
    """

    def __init__(self, limit: int, idle: float = 10.0) -> None:
        self.limit, self.idle_timeout = limit, idle
        self.cond = threading.Condition(threading.Lock())
        self.jobs: collections.deque[Callable[[], None]] = collections.deque()
        self.idle = self.threads = 0
        self.closed = False

    def submit(self, job: Callable[[], None]) -> None:
        """Run *job* in a worker thread (RuntimeError: no thread could be started)."""
        with self.cond:
            if self.idle <= len(self.jobs) and self.threads < self.limit:
                thread = threading.Thread(target=self._work, name="pop3proto-call", daemon=True)
                thread.start()  # RuntimeError under a task limit: nothing is queued
                self.threads += 1
            self.jobs.append(job)
            self.cond.notify()

    def _work(self) -> None:
        cond, jobs = self.cond, self.jobs
        with cond:
            while True:
                if not jobs:
                    if self.closed:
                        self.threads -= 1
                        return
                    self.idle += 1
                    cond.wait(self.idle_timeout)
                    self.idle -= 1
                    if not jobs:
                        self.threads -= 1
                        return
                job = jobs.popleft()
                cond.release()
                try:
                    job()
                except Exception:  # pragma: no cover - jobs report their own exceptions
                    pass
                finally:
                    cond.acquire()

    def shutdown(self) -> None:
        """Let the workers end once the queued jobs are done."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def perform_call(driver: SessionDriver, call: Call) -> None:
    """Run *call* in this thread and report its result or exception to *driver*."""
    try:
        driver.call_done(run_call(call))
    except Exception as exc:
        driver.call_failed(exc)


async def _await(value: Any) -> Any:
    return await value


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def quickack(sock: socket.socket) -> None:
    """ACK at once: the client sent part of a line and (Nagle) waits for our ACK."""
    if _QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass


class ProxyReader:
    """Reads a PROXY header exactly, never past it (TLS bytes after it stay unread).

    ``want()`` says how many octets to read next; ``feed(data)`` returns the
    client address once the header is complete (the connection's own peer
    for LOCAL headers) and raises ValueError for anything malformed.
    """

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.buf = b""

    def want(self) -> int:
        """Octets to read next (at least 1)."""
        buf = self.buf
        if len(buf) >= 16 and buf.startswith(V2_SIGNATURE):
            return max(1, min(16 + int.from_bytes(buf[14:16], "big") - len(buf), MAX_HEADER))
        return max(1, 15 - len(buf)) if len(buf) < 15 else 1  # 15: the shortest header

    def feed(self, data: bytes) -> tuple[str, int] | None:
        """Add *data* (b"" at EOF); the client's address when the header is complete."""
        if not data:
            raise ValueError("EOF in PROXY header")
        self.buf += data
        parsed = parse_proxy_header(self.buf)
        if parsed is None:
            if len(self.buf) >= MAX_HEADER:
                raise ValueError("PROXY header too long")
            return None
        return parsed[0].source or self.peer


def missing_extra(transport: str, extra: str, exc: ImportError) -> None:
    """Exit with a one-line message naming the extra to install (no traceback)."""
    print(
        f"python -m pop3proto.transports.{transport}: needs the '{extra}' extra "
        f"(pip install 'pop3proto[{extra}]'): {exc}",
        file=sys.stderr,
    )
    raise SystemExit(2)


def raise_nofile() -> None:
    """Raise the soft open-file limit to the hard one (a server holds one per session).

    Every transport does it when it starts serving, as the command does at
    its start: the default soft limit (often 1,024) caps a server far below
    what the machine allows.  Failures are ignored: the limit stays as it was.
    """
    try:
        from pop3proto.ops.privileges import raise_nofile as _raise
    except ImportError:  # pragma: no cover - no ``resource`` module (not POSIX)
        return
    _raise()
