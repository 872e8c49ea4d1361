"""anyio (asyncio or trio): one task per connection performing its driver's actions.

``await serve(server)`` listens and serves in the caller's event loop until
cancelled (``server.state`` is then ``up`` and ``cget("port")`` the bound
port, as after ``server.up()``); ``start(server)`` (what ``Server.up``
calls) runs it in a thread of its own with ``anyio.run`` (backend:
``start(backend=...)``, else ``$POP3PROTO_ANYIO_BACKEND``, else asyncio);
``main()`` is the command.  A Call the driver marks ``inline`` runs on the
loop (a coroutine is awaited); any other runs in a worker thread, shielded,
so that a result (a lock just taken) is never lost to a cancellation.

On asyncio, ``start`` (and so ``Server.up`` and the command) runs the loop on
uvloop when it is installed (the ``uvloop`` extra), as uvicorn does;
``POP3PROTO_UVLOOP=0`` (or ``start(uvloop=False)``) keeps the standard loop.
``serve()`` runs in the caller's loop, whatever it is.

On asyncio (``start``, ``Server.up`` and ``await serve()`` in an asyncio
loop) the sessions are hosted by ``_asyncio``: asyncio Protocols performing
the same driver's actions without anyio's streams, tasks or cancel scopes
per connection (the same behaviour at a fraction of the CPU per session).
``POP3PROTO_ANYIO_STREAMS=1`` keeps anyio's streams on asyncio too; trio
always uses them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from ._common import missing_extra

try:
    import anyio
    import anyio.from_thread
    import anyio.lowlevel
    import anyio.to_thread
    from anyio.abc import ByteStream, SocketAttribute, SocketListener, SocketStream, TaskStatus
    from anyio.streams.tls import TLSStream
except ImportError as exc:  # pragma: no cover - depends on the environment
    if __name__ == "__main__":
        missing_extra("anyio", "anyio", exc)
    raise

from pop3proto.driver import CLOSE, RECEIVE, START_TLS, Call, SessionDriver, Write
from pop3proto.server import Server

from . import _asyncio
from ._common import ProxyReader, open_listeners, ports_of, quickack, raise_nofile

__all__ = ["main", "serve", "start"]

_RECV = 65536
_FINAL = 5.0  # the most the last bytes (a goodbye) and the lock release may take at shutdown
_IO_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


class _Client:
    """One connection: its stream (plain, then maybe TLS) and the driver it serves."""

    def __init__(self, server: Server, raw: SocketStream, peer: Any, tls: bool,
                 service: _Service) -> None:
        self.raw = raw
        self.stream: ByteStream = raw
        self.sock: socket.socket | None = raw.extra(SocketAttribute.raw_socket, None)
        self.clock = service.clock
        self.driver = SessionDriver(server, peer, tls=tls, now=self.clock())
        self.scope = anyio.CancelScope()
        self.killed = self.writing = False
        server.set_killer(self.driver, lambda: service.in_loop(self.kill))

    def kill(self) -> None:
        """End the session (in the loop): interrupt the wait; a goodbye follows if it can."""
        self.killed = True
        self.scope.cancel()

    async def run(self) -> None:
        """Perform the driver's actions until CLOSE."""
        driver = self.driver
        while not driver.closed:
            self.scope = anyio.CancelScope()
            with self.scope:
                await self.perform()
            if not self.scope.cancelled_caught:
                continue
            if self.writing:  # a write cut short: its bytes are not all out
                self.writing = False
                driver.connection_lost(None if self.killed else TimeoutError("write timed out"))
            if self.killed:  # else a deadline passed
                self.killed = False
                driver.shutdown()

    async def perform(self) -> None:
        driver, scope, clock = self.driver, self.scope, self.clock
        while True:
            action = driver.next_action(clock())
            deadline = driver.deadline
            due = math.inf if deadline is None else deadline
            if action is RECEIVE:
                # A read may be interrupted early and asked for again, so the scope's
                # timer only ever moves earlier here: no timer churn per command.
                if due < scope.deadline:
                    scope.deadline = due
                try:
                    data = await self.stream.receive(_RECV)
                except anyio.EndOfStream:
                    data = b""
                except _IO_ERRORS as exc:
                    driver.connection_lost(exc)
                    continue
                driver.receive_data(data)
                if data and self.sock is not None and driver.partial_line:
                    quickack(self.sock)
            elif isinstance(action, Write):
                # A write must not be interrupted before its own deadline: exact.
                if due != scope.deadline:
                    scope.deadline = due
                self.writing = True  # left set if the write is cancelled (see run)
                try:
                    await self.stream.send(action.data)
                except _IO_ERRORS as exc:
                    driver.connection_lost(exc)
                self.writing = False
            elif isinstance(action, Call):
                if action.inline:
                    # On the loop: no thread, and no shield unless there is an await.
                    try:
                        result = action.fn(*action.args)
                    except Exception as exc:
                        driver.call_failed(exc)
                        continue
                    if hasattr(result, "__await__"):
                        await self.wait_for(result)
                    else:
                        driver.call_done(result)
                else:
                    await self.call(action)
            elif action is START_TLS:
                if due != scope.deadline:
                    scope.deadline = due
                try:
                    self.stream = await TLSStream.wrap(
                        self.raw, server_side=True, ssl_context=driver.ssl_context,
                        standard_compatible=False,
                    )
                except (*_IO_ERRORS, Exception) as exc:
                    driver.connection_lost(exc)
                    continue
                driver.tls_started()
            else:
                assert action is CLOSE
                return

    async def wait_for(self, awaitable: Any) -> None:
        """Await an inline Call's result, shielded (a lock just taken is never lost)."""
        driver = self.driver
        with anyio.CancelScope(shield=True):
            try:
                result = await awaitable
            except Exception as exc:
                driver.call_failed(exc)
            else:
                driver.call_done(result)

    async def call(self, action: Call) -> None:
        driver = self.driver
        with anyio.CancelScope(shield=True):
            try:
                if action.inline:
                    result = action.fn(*action.args)
                else:
                    result = await anyio.to_thread.run_sync(action.fn, *action.args)
                if hasattr(result, "__await__"):
                    result = await result
            except Exception as exc:
                driver.call_failed(exc)
            else:
                driver.call_done(result)

    async def finish(self) -> None:
        """Cancelled from outside (the service stops): goodbye, release, close — bounded."""
        driver = self.driver
        with anyio.CancelScope(shield=True), anyio.move_on_after(_FINAL):
            if self.writing:
                self.writing = False
                driver.connection_lost()
            driver.shutdown()
            self.scope = anyio.CancelScope()
            await self.perform()
        if not driver.closed:  # the goodbye could not be written in time
            driver.connection_lost()
            with anyio.CancelScope(shield=True):
                while not driver.closed:
                    action = driver.next_action(self.clock())
                    if isinstance(action, Call):
                        await self.call(action)
                    elif action is CLOSE:
                        break

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except (*_IO_ERRORS, Exception):
                pass


class _Service:
    """One ``serve()``: the listeners' accept loops and the connection tasks."""

    def __init__(self, server: Server, listeners: list[tuple[socket.socket, bool]]) -> None:
        self.server, self.listeners = server, listeners
        self.ports = ports_of(listeners)
        self.token: Any = None
        self.thread = 0
        #: The loop's clock (asyncio: the loop's own ``time``, without anyio's lookups).
        self.clock: Callable[[], float] = anyio.current_time
        self.accepting: anyio.CancelScope | None = None
        self.not_listening = threading.Event()

    def in_loop(self, fn: Any) -> None:
        """Run *fn* in the service's loop, from any thread."""
        if threading.get_ident() == self.thread:
            fn()
        else:
            try:
                anyio.from_thread.run_sync(fn, token=self.token)
            except RuntimeError:  # the loop has finished
                pass

    async def run(self, *, task_status: TaskStatus[dict[str, int]]) -> None:
        self.token, self.thread = anyio.lowlevel.current_token(), threading.get_ident()
        self.clock = _loop_clock()
        self.accepting = anyio.CancelScope()
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

    def stop_listening(self) -> None:
        """Close the listeners (from any thread); sessions go on."""
        if self.accepting is not None:
            self.in_loop(self.accepting.cancel)
            if threading.get_ident() != self.thread:
                self.not_listening.wait(5.0)

    async def accept(self, listener: SocketListener, tls: bool, clients: Any) -> None:
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
        server = self.server
        try:
            addr = raw.extra(SocketAttribute.remote_address)
            peer: Any = addr[:2] if isinstance(addr, tuple) else (str(addr), 0)
            if server.proxy_expected():
                peer = await self.proxied_peer(raw, peer)
                if peer is None:
                    await raw.aclose()
                    return
            client = _Client(server, raw, peer, tls, self)
        except Exception as exc:  # one connection's failure never stops the listener
            server.log.warning("could not set up a connection: %s", exc)
            with anyio.CancelScope(shield=True):
                await raw.aclose()
            return
        try:
            await client.run()
        except anyio.get_cancelled_exc_class():
            await client.finish()
            raise
        finally:
            await client.close()

    async def proxied_peer(self, stream: SocketStream, peer: Any) -> Any:
        """The client address from a PROXY header (read exactly, never past it), or None."""
        if not self.server.proxy_trusted(peer[0]):
            return None
        reader = ProxyReader(peer)
        with anyio.move_on_after(self.server.cget("handshake_timeout") or 30.0):
            try:
                while True:
                    source = reader.feed(await stream.receive(reader.want()))
                    if source is not None:
                        return source
            except (ValueError, *_IO_ERRORS):
                pass
        return None


def _loop_clock() -> Callable[[], float]:
    """The running loop's clock: what anyio's deadlines compare against, looked up once."""
    try:
        import sniffio

        if sniffio.current_async_library() == "asyncio":
            import asyncio

            return asyncio.get_running_loop().time
    except Exception:  # pragma: no cover - anyio brings sniffio
        pass
    return anyio.current_time


async def serve(
    server: Server, *, task_status: TaskStatus[dict[str, int]] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Listen and serve in this event loop until cancelled; sessions then end without updates.

    While it runs, ``server.state`` is ``up`` and ``cget("port")`` the bound
    port.  ``task_status.started`` gets the ports: ``{"pop3": n}`` plus ``"pop3s"``.
    """
    if _protocols() and _running_asyncio():
        await _asyncio.serve(server, task_status, quickack)
        return
    raise_nofile()
    handle = _InLoop(_Service(server, open_listeners(server)))
    try:
        async with anyio.create_task_group() as tg:
            ports = await tg.start(handle.service.run)
            server.listening(handle)
            task_status.started(ports)
    finally:
        server.stopped(handle)


class _InLoop:
    """The TransportHandle of ``serve()`` in the caller's loop (it ends when cancelled)."""

    def __init__(self, service: _Service) -> None:
        self.service, self.ports = service, service.ports

    def stop_listening(self) -> None:
        """Close the listeners (from any thread); sessions go on."""
        self.service.stop_listening()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the listeners are closed."""
        return self.service.not_listening.wait(timeout)


class _Handle:
    """``serve()`` in a background thread with its own event loop (a TransportHandle)."""

    def __init__(self, server: Server, backend: str, uvloop: bool = False) -> None:
        self.uvloop = uvloop
        self.service = _Service(server, open_listeners(server))
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
            options = {"use_uvloop": True} if self.uvloop else {}
            anyio.run(self._main, backend=backend, backend_options=options)
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
            tg.cancel_scope.cancel()

    def stop_listening(self) -> None:
        """Close the listeners (from any thread; returns once they are closed)."""
        self.service.stop_listening()

    def join(self, timeout: float | None = None) -> bool:
        """End the loop (sessions still live are ended without updates); wait for it."""
        if self._shutdown is not None:
            self.service.in_loop(self._shutdown.set)
        self._thread.join(timeout)
        return not self._thread.is_alive()


def use_uvloop(backend: str, requested: bool | None = None) -> bool:
    """Whether to run asyncio on uvloop: when installed, unless ``POP3PROTO_UVLOOP=0`` or False."""
    if backend != "asyncio":
        return False
    if requested is None:
        requested = os.environ.get("POP3PROTO_UVLOOP", "1").strip().lower() not in (
            "0", "no", "false", "off",
        )
    if not requested:
        return False
    return importlib.util.find_spec("uvloop") is not None


def _protocols() -> bool:
    """Whether asyncio runs the Protocol host (``_asyncio``), not anyio's streams."""
    return os.environ.get("POP3PROTO_ANYIO_STREAMS", "").strip().lower() not in (
        "1", "yes", "true", "on",
    )


def _running_asyncio() -> bool:
    try:
        import sniffio

        return sniffio.current_async_library() == "asyncio"
    except Exception:  # pragma: no cover - anyio brings sniffio
        return False


def start(
    server: Server, backend: str | None = None, uvloop: bool | None = None
) -> _Handle | _asyncio._Handle:
    """Listen and serve in a background thread; returns once the ports are bound.

    *backend*: "asyncio" or "trio" (default ``$POP3PROTO_ANYIO_BACKEND``, else
    asyncio).  *uvloop*: run asyncio on uvloop (default: when installed, unless
    ``$POP3PROTO_UVLOOP`` is 0).  The soft open-file limit is raised to the
    hard one first (one descriptor per idle session).
    """
    backend = backend or os.environ.get("POP3PROTO_ANYIO_BACKEND") or "asyncio"
    if backend == "asyncio" and _protocols():
        return _asyncio.start(server, use_uvloop(backend, uvloop), quickack)
    raise_nofile()
    return _Handle(server, backend, use_uvloop(backend, uvloop))


def main(argv: list[str] | None = None) -> int:
    """``python -m pop3proto.transports.anyio``."""
    from ._cli import run

    return run("anyio", argv)


if __name__ == "__main__":
    sys.exit(main())
