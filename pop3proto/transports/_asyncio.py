"""asyncio host of the SessionDriver: Protocol callbacks, no streams, no task per connection.

What ``pop3proto.transports.anyio`` runs when its backend is asyncio (set
``POP3PROTO_ANYIO_STREAMS=1`` for anyio's streams instead).  Each
connection is a ``_Session`` (an ``asyncio.Protocol``) that performs its
driver's actions from the loop's callbacks:

* RECEIVE: wait for ``data_received``/``eof_received`` or the one timer
  (``call_at``), moved only when the driver's deadline moves earlier or it fires;
* Write: ``transport.write``; when that pauses writing (the buffer is past
  its high-water mark) the next action waits for ``resume_writing``, and the
  write fails when the driver's deadline passes first;
* Call: inline on the loop (a coroutine is run as a task), or in one of at
  most ``THREADS`` worker threads, whose result is always reported, even
  when the connection is gone (a lock just taken is released);
* START_TLS: ``loop.start_tls`` with the server's handshake time-out.

Bytes that arrive while the session is not reading (a Call or a blocked
write is outstanding) are held, and reading pauses until it reads again,
so input stays bounded.  The listeners are watched with ``add_reader`` and
accepted from here (EMFILE and friends pause accepting for 10 ms); a PROXY
header is read from the raw socket (exactly, never past it) before the
transport exists, and implicit TLS makes the transport with its TLS layer
(``connect_accepted_socket(ssl=...)``), so no byte of the handshake can
reach the session first.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pop3proto.driver import CLOSE, RECEIVE, START_TLS, Call, SessionDriver, Write

from ._common import CallPool, ProxyReader, open_listeners, ports_of, quickack, raise_nofile

if TYPE_CHECKING:
    from pop3proto.server import Server

__all__ = ["serve", "start"]

#: Worker threads for blocking Calls (anyio's default limiter holds as many).
THREADS = 40
#: Seconds the goodbyes and the locks' release may take when the service stops.
_FINAL = 5.0
#: Seconds the accept loop pauses after EMFILE, ENFILE, ENOBUFS or ENOMEM.
_BACKOFF = 0.01
#: Connections accepted per readiness callback of a listener.
_ACCEPT_BATCH = 64
#: The handshake time-out when the server has none (asyncio insists on one).
_NO_TIMEOUT = 365 * 86400.0
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Session(asyncio.Protocol):
    """One connection: the transport's callbacks in, the driver's actions out."""

    driver: SessionDriver
    transport: Any

    def __init__(self, service: _Service, sock: socket.socket, peer: Any, tls: bool) -> None:
        self.service = service
        self.loop = service.loop
        self.clock = service.loop.time
        self.sock = sock
        self.peer = peer
        self.secure = False  # a TLS layer is (being) set up: eof_received cannot keep it open
        self.busy = False  # a Call or the handshake is outstanding
        self.write_paused = False  # the transport said pause_writing
        self.write_wait = False  # the session waits for resume_writing
        self.read_paused = False
        self.held: bytes | None = None  # input that came while not reading (b"": EOF)
        self.gone = False  # the transport has called connection_lost
        self.aborting = False  # the last write did not get out: abort, do not flush
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf
        self.task: asyncio.Future[Any] | None = None  # an awaited Call's result
        self.tls_task: asyncio.Future[Any] | None = None
        self.transport: Any = None  # until connection_made (after the handshake: implicit TLS)
        self.driver = SessionDriver(service.server, peer, tls=tls, now=self.clock())
        service.server.set_killer(self.driver, service.in_loop_caller(self.kill))
        service.sessions.add(self)

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.tls_task is None:  # else implicit TLS: tls_done goes on
            self.pump()

    def data_received(self, data: bytes) -> None:
        if self.busy or self.write_wait:  # not reading now: hold it, read no more
            self.hold(data)
            return
        driver = self.driver
        driver.receive_data(data)
        if driver.partial_line:
            self.service.quickack(self.sock)
        self.pump()

    def eof_received(self) -> bool:
        if self.busy or self.write_wait:
            self.hold(b"")
        else:
            self.driver.receive_data(b"")
            self.pump()
        # Plain TCP stays half-open so the last reply can still go (TLS cannot).
        return not self.secure

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        if self.timer is not None:  # (after CLOSE: the abort of an unflushed close)
            self.timer.cancel()
            self.timer, self.timer_at = None, math.inf
        if self.driver.closed:
            return
        self.write_wait = False
        self.driver.connection_lost(exc or ConnectionResetError("connection lost"))
        self.pump()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.write_wait:
            # Not from inside the transport's write callback: a close there makes
            # asyncio's selector transport report connection_lost twice.
            self.loop.call_soon(self.resumed)

    def resumed(self) -> None:
        if self.write_wait and not self.write_paused:
            self.write_wait = False
            self.pump()

    # ------------------------------------------------------------------ the driver's actions

    def pump(self) -> None:
        """Perform the driver's actions until it waits (input, a write, a Call, the handshake)."""
        if self.busy or self.write_wait:
            return
        driver, clock = self.driver, self.clock
        while True:
            action = driver.next_action(clock())
            if action is RECEIVE:
                held = self.held
                if held is not None:  # what came while not reading
                    self.held = None
                    self.resume_reading()
                    driver.receive_data(held)
                    if held and driver.partial_line:
                        self.service.quickack(self.sock)
                    continue
                if self.read_paused:
                    self.resume_reading()
                self.arm(driver.deadline)
                return
            if isinstance(action, Write):
                self.transport.write(action.data)
                if self.write_paused:  # past the high-water mark: wait for the drain
                    self.write_wait = True
                    self.arm(driver.deadline)
                    return
            elif isinstance(action, Call):
                self.call(action)
                if self.busy:
                    return
            elif action is START_TLS:
                self.start_tls()
                return
            else:
                assert action is CLOSE
                self.close()
                return

    def hold(self, data: bytes) -> None:
        """Keep input that came while not reading; read no more until the next RECEIVE."""
        self.held = data if self.held is None else self.held + data
        # Right after a handshake, before tls_done has run, the TLS transport is not
        # ours yet: hold its first bytes without pausing (tls_done comes next).
        if not self.read_paused and not self.gone and self.tls_task is None:
            self.read_paused = True
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):  # pragma: no cover - a closing transport
                pass

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if not self.gone:
                try:
                    self.transport.resume_reading()
                except (RuntimeError, AttributeError):  # pragma: no cover - closing
                    pass

    def arm(self, deadline: float | None) -> None:
        """Make the timer fire by *deadline* (moved only when it comes earlier)."""
        if deadline is not None and deadline < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self.on_timer)

    def on_timer(self) -> None:
        self.timer, self.timer_at = None, math.inf
        driver = self.driver
        if driver.closed:
            return
        if self.write_wait:
            deadline = driver.deadline
            if deadline is not None and self.clock() >= deadline:
                self.write_wait = False
                self.aborting = True
                driver.connection_lost(TimeoutError("write timed out"))
                self.pump()
            else:
                self.arm(deadline)
            return
        if not self.busy:
            self.pump()

    # ------------------------------------------------------------------ calls

    def call(self, action: Call) -> None:
        """Run *action*: inline (a coroutine becomes a task) or in a worker thread."""
        driver = self.driver
        if not action.inline:
            self.busy = True
            try:
                self.service.threads.submit(lambda: self.in_thread(action))
            except Exception as exc:  # no thread to run it (a task limit): it never runs
                self.busy = False
                driver.call_failed(exc)
            return
        try:
            result = action.fn(*action.args)
        except Exception as exc:
            driver.call_failed(exc)
            return
        if hasattr(result, "__await__"):
            self.await_result(result)
        else:
            driver.call_done(result)

    def in_thread(self, action: Call) -> None:
        """In a worker thread: run the call and hand its outcome to the loop."""
        try:
            outcome: tuple[bool, Any] = (True, action.fn(*action.args))
        except Exception as exc:
            outcome = (False, exc)
        try:
            self.loop.call_soon_threadsafe(self.call_ended, *outcome)
        except RuntimeError:  # the loop has closed: nobody is left to tell
            pass

    def call_ended(self, ok: bool, value: Any) -> None:
        if ok and hasattr(value, "__await__"):
            self.await_result(value)
            return
        self.busy = False
        if ok:
            self.driver.call_done(value)
        else:
            self.driver.call_failed(value)
        self.pump()

    def await_result(self, awaitable: Any) -> None:
        """Await a Call's awaitable result in a task of its own; report it when done."""
        self.busy = True
        task = asyncio.ensure_future(awaitable, loop=self.loop)
        self.task = task
        task.add_done_callback(self.awaited)

    def awaited(self, task: asyncio.Future[Any]) -> None:
        self.task = None
        self.busy = False
        if task.cancelled():
            self.driver.call_failed(ConnectionAbortedError("the call was cancelled"))
        else:
            exc = task.exception()
            if exc is None:
                self.driver.call_done(task.result())
            elif isinstance(exc, Exception):
                self.driver.call_failed(exc)
            else:  # pragma: no cover - KeyboardInterrupt and the like
                self.driver.call_failed(ConnectionAbortedError(repr(exc)))
        self.pump()

    # ------------------------------------------------------------------ TLS

    def start_tls(self) -> None:
        driver = self.driver
        if self.held is not None:  # bytes sent after STLS before its +OK: not a handshake
            self.held = None
            self.aborting = True
            driver.connection_lost(ConnectionAbortedError("data before the TLS handshake"))
            self.pump()
            return
        self.busy = self.secure = True
        timeout = driver.settings.handshake_timeout or _NO_TIMEOUT
        coro: Any
        if self.transport is None:  # implicit TLS: the transport is made with its TLS layer
            coro = self.loop.connect_accepted_socket(
                lambda: self, self.sock, ssl=driver.ssl_context, ssl_handshake_timeout=timeout
            )
        else:
            # Nothing may reach this protocol before the TLS protocol takes the transport.
            self.transport.pause_reading()
            self.read_paused = False  # start_tls resumes reading for the TLS protocol
            coro = self.loop.start_tls(
                self.transport, self, driver.ssl_context, server_side=True,
                ssl_handshake_timeout=timeout,
            )
        task = asyncio.ensure_future(coro, loop=self.loop)
        self.tls_task = task
        task.add_done_callback(self.tls_done)

    def tls_done(self, task: asyncio.Future[Any]) -> None:
        self.tls_task = None
        self.busy = False
        driver = self.driver
        exc: BaseException | None
        if task.cancelled():
            exc = ConnectionAbortedError("TLS handshake cancelled")
        else:
            exc = task.exception()
        result = None if exc is not None else task.result()
        if isinstance(result, tuple):  # connect_accepted_socket: (transport, protocol)
            result = result[0]
        if result is not None:
            self.transport = result
            driver.tls_started()
        else:
            self.gone = True  # start_tls or connect_accepted_socket closed the transport
            self.sock.close()  # (already detached or closed: this only makes sure)
            driver.connection_lost(exc or ConnectionAbortedError("TLS handshake failed"))
        self.pump()

    # ------------------------------------------------------------------ the end

    def kill(self) -> None:
        """End the session (in the loop): stop the wait; a goodbye follows if it can."""
        driver = self.driver
        if driver.closed:
            return
        if self.write_wait:  # its bytes are not all out: the connection is given up
            self.write_wait = False
            self.aborting = True
            driver.connection_lost(None)
        driver.shutdown()
        if self.tls_task is not None:  # no line can go mid-handshake: stop it
            self.tls_task.cancel()
        self.pump()

    def abandon(self) -> None:
        """The service stops and the goodbye did not get out in time: give the connection up."""
        if self.driver.closed:
            return
        self.write_wait = False
        self.aborting = True
        self.driver.connection_lost(None)
        self.pump()

    def close(self) -> None:
        """CLOSE: flush what is buffered (at most ``_FINAL`` seconds), then close."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer, self.timer_at = None, math.inf
        self.service.sessions.discard(self)
        transport = self.transport
        if self.gone:
            return
        if transport is None:  # no transport was made
            self.sock.close()
            return
        if self.aborting:
            transport.abort()
            return
        transport.close()
        try:
            buffered = transport.get_write_buffer_size()
        except (RuntimeError, AttributeError):  # pragma: no cover
            buffered = 0
        if buffered:
            self.timer = self.loop.call_later(_FINAL, transport.abort)


class _Service:
    """One listening service in one loop: the accept callbacks, the sessions, the threads."""

    loop: asyncio.AbstractEventLoop

    def __init__(self, server: Server, listeners: list[tuple[socket.socket, bool]],
                 ack: Callable[[socket.socket], None] = quickack) -> None:
        self.server, self.listeners = server, listeners
        #: Asks for an ACK at once (the anyio module's ``quickack``, which tests count).
        self.quickack = ack
        self.ports = ports_of(listeners)
        self.thread = 0
        self.threads = CallPool(THREADS)
        self.sessions: set[_Session] = set()
        self.pending: set[asyncio.Future[Any]] = set()  # PROXY headers, transports being made
        self.backoffs: dict[int, asyncio.TimerHandle] = {}  # listener fd: when to accept again
        self.listening = False
        self.not_listening = threading.Event()

    # ------------------------------------------------------------------ threads

    def in_loop(self, fn: Callable[[], Any]) -> None:
        """Run *fn* in the service's loop, from any thread."""
        if threading.get_ident() == self.thread:
            fn()
            return
        try:
            self.loop.call_soon_threadsafe(fn)
        except (RuntimeError, AttributeError):  # the loop has finished (or never started)
            pass

    def in_loop_caller(self, fn: Callable[[], Any]) -> Callable[[], None]:
        return lambda: self.in_loop(fn)

    # ------------------------------------------------------------------ listening

    async def run(self, started: Callable[[dict[str, int]], None],
                  until: asyncio.Future[Any] | None = None) -> None:
        """Accept and serve until *until* is done or the task is cancelled; then end sessions."""
        import anyio

        loop = self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        try:
            for sock, tls in self.listeners:
                sock.setblocking(False)
                loop.add_reader(sock.fileno(), self.accept, sock, tls)
            self.listening = True
            started(self.ports)
            await (until if until is not None else loop.create_future())
        finally:
            self.stop_listening_now()
            with anyio.CancelScope(shield=True):
                await self.finish()

    def stop_listening(self) -> None:
        """Close the listeners (from any thread); sessions go on."""
        self.in_loop(self.stop_listening_now)
        if threading.get_ident() != self.thread:
            self.not_listening.wait(5.0)

    def stop_listening_now(self) -> None:
        if self.listening:
            self.listening = False
            for handle in self.backoffs.values():
                handle.cancel()
            self.backoffs.clear()
            for sock, _ in self.listeners:
                try:
                    self.loop.remove_reader(sock.fileno())
                except (OSError, ValueError):  # pragma: no cover
                    pass
        for sock, _ in self.listeners:
            sock.close()
        self.not_listening.set()

    def accept(self, listener: socket.socket, tls: bool) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError:  # EMFILE and friends: back off, keep serving
                if self.listening:
                    fd = listener.fileno()
                    self.loop.remove_reader(fd)
                    self.backoffs[fd] = self.loop.call_later(_BACKOFF, self.resume, listener, tls)
                return
            self.connection(sock, addr, tls)

    def resume(self, listener: socket.socket, tls: bool) -> None:
        self.backoffs.pop(listener.fileno(), None)
        if self.listening:
            self.loop.add_reader(listener.fileno(), self.accept, listener, tls)

    def connection(self, sock: socket.socket, addr: Any, tls: bool) -> None:
        try:
            sock.setblocking(False)
            sock.setsockopt(*_NODELAY)
        except OSError:
            pass
        peer: Any = addr[:2] if isinstance(addr, tuple) else (str(addr), 0)
        if self.server.proxy_expected():
            coro = self.proxied(sock, peer, tls)
        else:
            coro = self.attach(sock, peer, tls)
        task = self.loop.create_task(coro)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def attach(self, sock: socket.socket, peer: Any, tls: bool) -> None:
        """Start a session on an accepted socket; make its transport (TLS: after the handshake)."""
        try:
            session = _Session(self, sock, peer, tls)
        except Exception as exc:  # one connection's failure never stops the listener
            self.server.log.warning("could not set up a connection: %s", exc)
            sock.close()
            return
        if tls and session.driver.refused is None:
            session.pump()  # START_TLS: connect_accepted_socket with the TLS layer
            return
        try:
            await self.loop.connect_accepted_socket(lambda: session, sock)
        except Exception as exc:
            session.gone = True
            session.driver.connection_lost(exc)
            session.pump()
            sock.close()

    async def proxied(self, sock: socket.socket, peer: Any, tls: bool) -> None:
        """Read the PROXY header from the raw socket (exactly, never past it); then attach."""
        source = None
        try:
            if self.server.proxy_trusted(peer[0]):
                source = await asyncio.wait_for(
                    self.read_proxy(sock, ProxyReader(peer)),
                    self.server.cget("handshake_timeout") or 30.0,
                )
        except (ValueError, OSError, asyncio.TimeoutError):
            source = None
        except BaseException:
            sock.close()
            raise
        if source is None:
            sock.close()
            return
        await self.attach(sock, source, tls)

    async def read_proxy(self, sock: socket.socket, reader: ProxyReader) -> Any:
        while True:
            source = reader.feed(await self.loop.sock_recv(sock, reader.want()))
            if source is not None:
                return source

    # ------------------------------------------------------------------ the end

    async def finish(self) -> None:
        """The service stops: goodbyes, locks released, connections closed — bounded."""
        for task in list(self.pending):
            task.cancel()
        for session in list(self.sessions):
            session.kill()
        loop = self.loop
        deadline = loop.time() + _FINAL
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for session in list(self.sessions):
            session.abandon()
        while self.sessions:  # only Calls in flight are left: their results release locks
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # let the transports' last callbacks run


class _Handle:
    """A service in a background thread with its own asyncio loop (a TransportHandle)."""

    service: _Service
    ports: dict[str, int]
    _thread: threading.Thread | None

    def __init__(self, server: Server, uvloop: bool,
                 ack: Callable[[socket.socket], None] = quickack) -> None:
        self.uvloop = uvloop
        self.service = _Service(server, open_listeners(server), ack)
        self.ports = self.service.ports
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="pop3proto-asyncio")
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            loop: asyncio.AbstractEventLoop
            if self.uvloop:
                import uvloop

                loop = uvloop.new_event_loop()
            else:
                loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._main())
            finally:
                try:
                    _cancel_tasks(loop)
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()
        except BaseException as exc:
            if self._ready.is_set():
                self.service.server.log.exception("asyncio transport failed")
            else:
                self._error = exc
                for sock, _ in self.service.listeners:
                    sock.close()
        finally:
            self._ready.set()

    async def _main(self) -> None:
        # The loop lives until join(), not until the last session ends, so
        # stop_listening() and the killers can always reach it.
        self._stop = asyncio.get_running_loop().create_future()
        await self.service.run(lambda ports: self._ready.set(), self._stop)

    def _set_stop(self) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)

    def stop_listening(self) -> None:
        """Close the listeners (from any thread; returns once they are closed)."""
        self.service.stop_listening()

    def join(self, timeout: float | None = None) -> bool:
        """End the loop (sessions still live are ended without updates); wait for it."""
        if self._thread is None:  # serve() in the caller's loop: it ends when cancelled
            return self.service.not_listening.wait(timeout)
        self.service.in_loop(self._set_stop)
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _cancel_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks left in *loop* and let them end (as ``asyncio.run`` does)."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


async def serve(server: Server, task_status: Any = None,
                ack: Callable[[socket.socket], None] = quickack) -> None:
    """Listen and serve in the running asyncio loop until cancelled (see ``anyio.serve``)."""
    raise_nofile()
    service = _Service(server, open_listeners(server), ack)
    handle = _Handle.__new__(_Handle)
    handle.service, handle.ports, handle._thread = service, service.ports, None

    def started(ports: dict[str, int]) -> None:
        server.listening(handle)
        if task_status is not None:
            task_status.started(ports)

    try:
        await service.run(started)
    finally:
        server.stopped(handle)


def start(server: Server, uvloop: bool = False,
          ack: Callable[[socket.socket], None] = quickack) -> _Handle:
    """Listen and serve in a background thread with its own loop (uvloop if asked)."""
    raise_nofile()
    return _Handle(server, uvloop, ack)
