"""anyio (asyncio or trio): one task per connection, blocking callbacks in worker threads.

``await serve(server)`` listens and serves in the caller's event loop until
cancelled; ``start(server)`` (what ``Server.up`` calls) runs it in a thread
of its own with ``anyio.run`` (backend: ``start(backend=...)``, else
``$POP3PROTO_ANYIO_BACKEND``, else asyncio); ``main()`` is the command.

A ``Call`` runs in ``anyio.to_thread.run_sync``, shielded so that a result
(a lock just taken) is never lost to a cancellation; a coroutine function,
or an awaitable result, is awaited in the loop.  Cheap calls run inline:
methods of ``MemoryStorage``, ``io.BytesIO`` and ``PlainVerifier`` (those
exact types) and of any object with ``nonblocking = True``.  Replies are
written when more input is needed, at each RETR/TOP chunk and before TLS,
so one read's pipelined replies go out in one write; ``send`` returns once
the bytes are with the kernel, which is the back-pressure.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import os
import socket
import threading
from functools import partial
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import (
    ByteStream,
    SocketAttribute,
    SocketListener,
    SocketStream,
    TaskGroup,
    TaskStatus,
)
from anyio.streams.tls import TLSStream

from pop3proto import NEED_DATA, PAUSED, ConnectionClosed, Data, Phase, RemoteProtocolError
from pop3proto.auth import PlainVerifier
from pop3proto.memstore import MemoryStorage
from pop3proto.proxy import MAX_HEADER, V2_SIGNATURE, parse_proxy_header
from pop3proto.server import START_TLS, Call, Server, Sleep, Steps

__all__ = ["main", "serve", "start"]

_RECV = 65536
_FINAL = 5.0  # the most a last reply (timeout, protocol error, shutdown) may take to send
_IO_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)
# Reads of a regular file already opened (a message body) are page-cache fast.
_INLINE_TYPES = (MemoryStorage, io.BytesIO, io.BufferedReader, io.FileIO, PlainVerifier)


class _StepFailed(Exception):
    """The session's step generator raised (a storage read error mid-RETR, a bug)."""


async def _proxied_peer(server: Server, stream: ByteStream, peer: Any) -> Any:
    """The client address from a PROXY header (read exactly, never past it), or None."""
    if not server.proxy_trusted(peer[0]):
        return None
    buf = b""
    with anyio.move_on_after(server.cget("handshake_timeout") or None):
        try:
            while True:
                if len(buf) >= 16 and buf.startswith(V2_SIGNATURE):
                    want = 16 + int.from_bytes(buf[14:16], "big") - len(buf)
                else:
                    want = max(1, 15 - len(buf))  # no header is shorter than 15 octets
                buf += await stream.receive(min(want, MAX_HEADER))
                parsed = parse_proxy_header(buf)
                if parsed is not None:
                    return parsed[0].source or peer
        except (ValueError, *_IO_ERRORS):
            pass
    return None


class _Client:
    """One connection: its stream (plain, then maybe TLS) and its session's steps."""

    def __init__(self, server: Server, raw: SocketStream, peer: Any, tls: bool) -> None:
        self.server, self.raw, self.tls = server, raw, tls
        self.stream: ByteStream = raw
        self.session = server.open_session(peer, tls=tls)
        self.conn = self.session.conn
        self.watchdog = anyio.CancelScope()

    def arm(self) -> None:
        """Restart the idle timer: one long-lived scope whose deadline moves.

        (A ``fail_after`` per read and per write costs more than the work.)
        """
        timeout = self.session.idle_timeout()
        self.watchdog.deadline = anyio.current_time() + timeout if timeout else math.inf

    async def flush(self, timeout: float | None = None) -> None:
        data = self.conn.data_to_send()
        if not data:
            return
        if timeout is None:
            self.arm()
            await self.stream.send(data)
        else:
            with anyio.fail_after(timeout):
                await self.stream.send(data)

    async def receive(self) -> None:
        """Feed the client's next bytes (b"" at EOF) to the core."""
        self.arm()
        try:
            data = await self.stream.receive(_RECV)
        except anyio.EndOfStream:
            data = b""
        self.session.touch()
        self.conn.receive_data(data)

    async def call(self, step: Call) -> Any:
        fn = step.fn
        owner = getattr(fn, "__self__", None)
        if (
            inspect.iscoroutinefunction(fn)
            or type(owner) in _INLINE_TYPES
            or getattr(owner, "nonblocking", False) is True
            or getattr(fn, "nonblocking", False) is True
        ):
            result = fn(*step.args)
        else:
            with anyio.CancelScope(shield=True):
                result = await anyio.to_thread.run_sync(fn, *step.args)
        return (await result) if inspect.isawaitable(result) else result

    async def run_steps(self, steps: Steps) -> None:
        """Carry out a session's steps: responses, calls, sleeps, the TLS switch."""
        value: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    step = steps.throw(error) if error is not None else steps.send(value)
                except StopIteration:
                    return
                except Exception as exc:
                    raise _StepFailed(str(exc)) from exc
                value = error = None
                if isinstance(step, Call):
                    try:
                        value = await self.call(step)
                    except Exception as exc:
                        error = exc
                elif isinstance(step, Sleep):
                    await anyio.sleep(step.seconds)
                elif step is START_TLS:
                    await self.flush()
                    await self.handshake()
                else:
                    self.conn.send(step)
                    if isinstance(step, Data):
                        await self.flush()
        finally:
            steps.close()

    async def handshake(self) -> None:
        ctx = self.server.ssl_context()
        if ctx is None:
            raise anyio.BrokenResourceError("TLS is no longer configured")
        with anyio.fail_after(self.server.cget("handshake_timeout") or None):
            self.stream = await TLSStream.wrap(
                self.raw, server_side=True, ssl_context=ctx, standard_compatible=False
            )

    async def run(self) -> None:
        with self.watchdog:
            await self.serve()
        if self.watchdog.cancelled_caught:  # the idle timer fired: no update (RFC 1939)
            with contextlib.suppress(Exception):
                self.conn.send(self.session.timed_out())
                await self.flush(_FINAL)

    async def serve(self) -> None:
        conn, session = self.conn, self.session
        try:
            if self.tls:
                await self.handshake()
            await self.run_steps(session.greet())
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    await self.flush()
                    await self.receive()
                elif event is PAUSED:  # over the output high-water mark: drain
                    if conn.pending is not None:
                        raise RuntimeError(f"event left unanswered: {conn.pending!r}")
                    await self.flush()
                else:
                    assert not isinstance(event, type(NEED_DATA))
                    await self.run_steps(session.handle(event))
                    if isinstance(event, ConnectionClosed):
                        await self.flush()
                        return
        except RemoteProtocolError:
            with contextlib.suppress(*_IO_ERRORS):
                await self.flush(_FINAL)  # the final -ERR the core queued
        except _IO_ERRORS:
            conn.send_failed()
        except Exception as exc:  # _StepFailed, LocalProtocolError: log it, end the session
            conn.send_failed()
            self.server.log.error("session %s failed: %r", session.id, exc, exc_info=exc)

    async def goodbye(self) -> None:
        """``serve()`` is being cancelled: say so if a reply can be sent (best effort)."""
        if self.conn.phase not in (Phase.GREETING, Phase.CLOSED, Phase.ERROR):
            with contextlib.suppress(Exception):
                self.conn.send(self.session.shutting_down())
                await self.flush(_FINAL)

    async def close(self) -> None:
        """Release the lock (through the steps, so an async unlock works), forget, close."""
        conn, session = self.conn, self.session
        if conn.phase is not Phase.CLOSED and session.end_reason == "Disconnected":
            session.end_reason = "Connection closed by peer"
        try:
            if session.locked:
                await self.run_steps(session.handle(ConnectionClosed()))
        except _StepFailed:
            pass
        finally:
            try:
                with contextlib.suppress(*_IO_ERRORS):
                    await self.stream.aclose()
            finally:
                self.server.close_session(session)


class _Service:
    """One ``serve()``: the listeners' accept loops and the connection tasks."""

    def __init__(self, server: Server, listeners: list[tuple[socket.socket, bool]]) -> None:
        self.server, self.listeners = server, listeners
        self.ports = {("pop3s" if tls else "pop3"): s.getsockname()[1] for s, tls in listeners}
        self.token: anyio.lowlevel.EventLoopToken | None = None
        self.thread = 0
        self.accepting: anyio.CancelScope | None = None
        self.not_listening: anyio.Event | None = None

    async def run(self, *, task_status: TaskStatus[dict[str, int]]) -> None:
        self.token, self.thread = anyio.lowlevel.current_token(), threading.get_ident()
        self.accepting, self.not_listening = anyio.CancelScope(), anyio.Event()
        try:
            async with anyio.create_task_group() as clients:
                try:
                    with self.accepting:
                        async with anyio.create_task_group() as accepts:
                            for sock, tls in self.listeners:
                                listener = await SocketListener.from_socket(sock)
                                accepts.start_soon(self.accept, listener, tls, clients)
                            task_status.started(self.ports)
                finally:
                    self.not_listening.set()
        finally:
            for sock, _ in self.listeners:
                sock.close()

    async def stop_listening(self) -> None:
        """Close the listeners and wait until they are closed; sessions go on."""
        if self.accepting is not None and self.not_listening is not None:
            self.accepting.cancel()
            await self.not_listening.wait()

    def kill(self, scope: anyio.CancelScope) -> None:
        """A session's killer: cancel its task, from any thread."""
        if threading.get_ident() == self.thread:
            scope.cancel()
        else:
            anyio.from_thread.run_sync(scope.cancel, token=self.token)

    async def accept(self, listener: SocketListener, tls: bool, clients: TaskGroup) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except anyio.ClosedResourceError:
                    return
                except (OSError, anyio.BrokenResourceError):
                    await anyio.sleep(0.01)  # EMFILE and friends: back off, keep serving
                    continue
                clients.start_soon(self.connection, stream, tls)

    async def connection(self, raw: SocketStream, tls: bool) -> None:
        with contextlib.suppress(OSError):  # anyio sets it too; AF_UNIX has no such option
            raw.extra(SocketAttribute.raw_socket).setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
        addr = raw.extra(SocketAttribute.remote_address)
        peer: Any = addr[:2] if isinstance(addr, tuple) else (str(addr), 0)
        if self.server.proxy_expected():
            peer = await _proxied_peer(self.server, raw, peer)
        if peer is None:
            await raw.aclose()
            return
        client = _Client(self.server, raw, peer, tls)
        scope = anyio.CancelScope()
        client.session.set_killer(partial(self.kill, scope))
        try:
            with scope:
                await client.run()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await client.goodbye()
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await client.close()


async def serve(
    server: Server, *, task_status: TaskStatus[dict[str, int]] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Listen and serve in this event loop until cancelled; sessions then end without updates.

    ``task_status.started`` gets the bound ports: ``{"pop3": n}`` plus ``"pop3s"``.
    """
    await _Service(server, server.open_listeners()).run(task_status=task_status)


class _Handle:
    """``serve()`` in a background thread with its own event loop (a TransportHandle)."""

    def __init__(self, server: Server, backend: str) -> None:
        self.service = _Service(server, server.open_listeners())
        self.ports = self.service.ports
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._shutdown: anyio.Event | None = None
        self._thread = threading.Thread(
            target=self._run, args=(backend,), daemon=True, name=f"pop3proto-anyio-{backend}"
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self, backend: str) -> None:
        try:
            anyio.run(self._main, backend=backend)
        except BaseException as exc:
            if self._ready.is_set():
                self.service.server.log.exception("anyio transport failed")
            else:
                self._error = exc
                for sock, _ in self.service.listeners:
                    sock.close()
        finally:
            self._ready.set()

    async def _main(self) -> None:
        # The loop lives until join(), not until the last session ends, so
        # stop_listening() and the killers can always reach it.
        self._shutdown = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(self.service.run)
            self._ready.set()
            await self._shutdown.wait()

    def stop_listening(self) -> None:
        """Close the listeners (from any thread; returns once they are closed)."""
        service = self.service
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop has finished
            if threading.get_ident() == service.thread and service.accepting is not None:
                service.accepting.cancel()  # the loop's own thread cannot wait for it
            else:
                anyio.from_thread.run(service.stop_listening, token=service.token)

    def join(self, timeout: float | None = None) -> bool:
        """End the loop once its sessions are gone; wait for its thread."""
        with contextlib.suppress(RuntimeError):
            if self._shutdown is not None:
                anyio.from_thread.run_sync(self._shutdown.set, token=self.service.token)
        self._thread.join(timeout)
        return not self._thread.is_alive()


def start(server: Server, backend: str | None = None) -> _Handle:
    """Listen and serve in a background thread; returns once the ports are bound."""
    return _Handle(server, backend or os.environ.get("POP3PROTO_ANYIO_BACKEND") or "asyncio")


def main(argv: list[str] | None = None) -> int:
    """``python -m pop3proto.transports.anyio``."""
    from ._cli import run

    return run("anyio", argv)


if __name__ == "__main__":
    raise SystemExit(main())
