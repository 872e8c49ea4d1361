"""One thread, non-blocking sockets, ``selectors`` (standard library only).

The loop performs every connection's ``SessionDriver`` actions without
waiting: a read that would block, a deadline, an outbound buffer above
``_HIGH`` or a Call running in the worker pool parks the connection until
its socket, its timer or the pool wakes it.  Calls that are not marked
inline (password hashing, maildrop scans, deletions) run in a small thread
pool, so one slow login never stalls the other clients.  TLS (implicit, or
after STLS) runs through ``SSLContext.wrap_bio`` and two ``MemoryBIO``.
Other threads (``destroy("kill")``, ``stop_listening``, the pool) queue
actions and wake the loop through a socketpair.  ``start(server)`` runs the
loop in a background thread; ``serve(server)`` waits in the caller's
thread; ``main()`` is the command.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import queue
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from pop3proto.driver import CLOSE, RECEIVE, START_TLS, Call, SessionDriver, Write
from pop3proto.server import Server

from ._common import (
    CallPool,
    ProxyReader,
    open_listeners,
    perform_call,
    ports_of,
    quickack,
    raise_nofile,
    run_call,
)

__all__ = ["main", "serve", "start"]

_RECV = 65536
_HIGH = 256 * 1024  # outbound bytes above which a connection waits for the socket
_BUDGET = 64  # actions per turn before a busy connection lets the others run
_POOL = 16  # worker threads for blocking calls
_FINAL = 5.0  # the most the last bytes of a closing connection may take
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class _Client:
    """One connection: socket, driver, outbound buffer, TLS objects, what it waits for."""

    def __init__(self, sock: socket.socket, driver: SessionDriver) -> None:
        self.sock, self.driver = sock, driver
        self.out = bytearray()  # bytes for the socket (TLS records once TLS is on)
        self.tls: ssl.SSLObject | None = None
        self.bio_in, self.bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.handshaking = self.want_read = self.in_call = self.closing = self.closed = False
        self.events = 0  # what the selector watches for
        self.armed: float | None = None  # the earliest timer in the heap for us


class _Loop:
    """The event loop; also the handle ``start`` returns (ports, stop_listening, join)."""

    def __init__(self, server: Server, listeners: list[tuple[socket.socket, bool]]) -> None:
        self.server = server
        self.listeners = listeners
        self.ports = ports_of(listeners)
        self.sel = selectors.DefaultSelector()
        self.clients: set[_Client] = set()
        self.proxied: set[socket.socket] = set()  # still sending their PROXY header
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.actions: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.pool = CallPool(_POOL)
        self.rwake, self.wwake = socket.socketpair()
        self.stopping = self.paused = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="pop3proto-selectors", daemon=True)
        for sock in (self.rwake, self.wwake, *(s for s, _ in listeners)):
            sock.setblocking(False)
        self.sel.register(self.rwake, _READ, self._run_actions)
        self._listen()

    # -- the handle

    def stop_listening(self) -> None:
        """Close the listening sockets (any thread; waits for the loop); sessions go on."""
        if threading.current_thread() is self.thread or not self.thread.is_alive():
            self._stop()
        else:
            self.call_soon(self._stop)
            self.stopped.wait(5.0)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the loop has ended (stopped listening, no session left)."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run *fn* in the loop thread (from any thread)."""
        self.actions.put(fn)
        with contextlib.suppress(OSError):  # buffer full: a wake-up is pending anyway
            self.wwake.send(b"\0")

    # -- the loop

    def run(self) -> None:
        try:
            while not (self.stopping and not self.clients):
                for key, mask in self.sel.select(self._fire_timers()):
                    key.data(mask)
        except Exception:
            self.server.log.exception("selectors loop failed")
        finally:
            self._stop()
            for c in list(self.clients):
                self._lost(c)
            for sock in list(self.proxied):
                self._unproxy(sock, True)
            self.pool.shutdown()
            self.sel.close()
            self.rwake.close()
            self.wwake.close()

    def _run_actions(self, mask: int) -> None:
        with contextlib.suppress(OSError):
            while self.rwake.recv(4096):
                pass
        while not self.actions.empty():
            self.actions.get()()

    def _fire_timers(self) -> float | None:
        """Run the timers that are due; the seconds until the next one."""
        while self.timers:
            wait = self.timers[0][0] - time.monotonic()
            if wait > 0:
                return wait
            heapq.heappop(self.timers)[2]()
        return None

    def _at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), fn))

    def _listen(self) -> None:
        self.paused = False
        for sock, tls in self.listeners if not self.stopping else ():
            self.sel.register(sock, _READ, partial(self._accept, sock, tls))

    def _stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            for sock, _ in self.listeners:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(sock)
                sock.close()
        self.stopped.set()

    def _accept(self, listener: socket.socket, tls: bool, mask: int) -> None:
        server = self.server
        while True:
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE and friends: pause accepting, don't spin
                if not self.paused:
                    server.log.warning("accept failed: %s", exc)
                    self.paused = True
                    for s, _ in self.listeners:
                        self.sel.unregister(s)
                    self._at(time.monotonic() + 0.1, self._listen)
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if not server.proxy_expected():
                    self._open(sock, peer[:2], tls)
                elif server.proxy_trusted(peer[0]):
                    self._proxy(sock, tls, ProxyReader(peer[:2]))
                else:
                    sock.close()
            except Exception as exc:  # one connection's failure never stops the listener
                server.log.warning("could not set up a connection from %s: %s", peer[0], exc)
                sock.close()

    def _proxy(self, sock: socket.socket, tls: bool, reader: ProxyReader, *_: Any) -> None:
        """Read the PROXY header exactly (a TLS ClientHello stays unread), then open."""
        if sock not in self.proxied:
            self.proxied.add(sock)
            self.sel.register(sock, _READ, partial(self._proxy, sock, tls, reader))
            timeout = self.server.cget("handshake_timeout") or 30.0
            self._at(time.monotonic() + timeout, partial(self._unproxy, sock, True))
        try:
            while (source := reader.feed(sock.recv(reader.want()))) is None:
                pass
        except BlockingIOError:
            return
        except (OSError, ValueError):
            self._unproxy(sock, True)
            return
        self._unproxy(sock, False)
        self._open(sock, source, tls)

    def _unproxy(self, sock: socket.socket, close: bool) -> None:
        """Stop waiting for *sock*'s PROXY header (and *close* it if it was still waiting)."""
        if sock in self.proxied:
            self.proxied.discard(sock)
            self.sel.unregister(sock)
            if close:
                sock.close()

    def _open(self, sock: socket.socket, peer: Any, tls: bool) -> None:
        c = _Client(sock, SessionDriver(self.server, peer, tls=tls, now=time.monotonic()))
        self.clients.add(c)
        self.server.set_killer(c.driver, partial(self.call_soon, partial(self._kill, c)))
        self._pump(c)

    # -- one connection

    def _kill(self, c: _Client) -> None:
        if not c.closed:
            c.handshaking = False  # a handshake in progress is abandoned, not finished
            if c.out:  # the socket is full (the client does not read): no goodbye gets through
                self._lost(c, ConnectionAbortedError("server shutting down"))
                return
            c.driver.shutdown()
            self._pump(c)

    def _lost(self, c: _Client, exc: BaseException | None = None) -> None:
        """The socket failed: the driver releases what it holds, then the socket closes."""
        c.out.clear()
        c.driver.connection_lost(exc)
        self._pump(c)

    def _pump(self, c: _Client, mask: int = 0) -> None:
        """Perform *c*'s actions as far as they go without waiting."""
        if c.closed or c.in_call:
            return
        try:
            self._advance(c)
        except Exception as exc:  # a bug: log it and end the connection
            self.server.log.exception("session %s failed", c.driver.id)
            c.driver.connection_lost(exc)
            c.out.clear()
            with contextlib.suppress(Exception):
                self._advance(c)
            if not c.closed:
                self._close(c)
        if c.closed:
            return
        want = _READ if c.want_read else 0
        if c.out:
            want |= _WRITE
        if want != c.events:
            if not c.events:
                self.sel.register(c.sock, want, partial(self._pump, c))
            elif not want:
                self.sel.unregister(c.sock)
            else:
                self.sel.modify(c.sock, want, partial(self._pump, c))
            c.events = want
        self._arm(c)

    def _advance(self, c: _Client) -> None:
        driver = c.driver
        c.want_read = False
        for _ in range(_BUDGET):
            if c.out and not self._send(c):
                return
            if len(c.out) >= _HIGH:
                return  # wait for the socket to drain
            if c.handshaking and not self._handshake(c):
                return
            action = driver.next_action(time.monotonic())
            if action is RECEIVE:
                if not self._read(c):
                    return
            elif isinstance(action, Write):
                self._queue(c, action.data)
            elif isinstance(action, Call):
                if action.inline:
                    perform_call(c.driver, action)
                else:
                    try:
                        self.pool.submit(partial(self._in_thread, c, action))
                    except RuntimeError as exc:  # no thread to be had (a task limit)
                        driver.call_failed(exc)
                        continue
                    c.in_call = True
                    return
            elif action is START_TLS:
                c.tls = driver.ssl_context.wrap_bio(c.bio_in, c.bio_out, server_side=True)
                c.handshaking = True
            else:
                assert action is CLOSE
                c.closing = True
                if not c.out:
                    self._close(c)
                else:  # the last bytes get a little time, no more
                    self._at(time.monotonic() + _FINAL, partial(self._close, c))
                return
        self.call_soon(partial(self._pump, c))  # budget spent: let the others run first

    def _in_thread(self, c: _Client, action: Call) -> None:
        """In a pool thread: run the call, hand the result to the loop."""
        try:
            value, error = run_call(action), None
        except Exception as exc:
            value, error = None, exc

        def done() -> None:
            c.in_call = False
            if error is not None:
                c.driver.call_failed(error)
            else:
                c.driver.call_done(value)
            self._pump(c)

        self.call_soon(done)

    def _handshake(self, c: _Client) -> bool:
        """Advance the TLS handshake; False to wait for the socket."""
        assert c.tls is not None
        while True:
            try:
                c.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._queue(c, b"")  # our handshake records go out first
                if not self._read_raw(c):
                    return False
                if not c.handshaking:  # the socket failed
                    return True
                continue
            except (ssl.SSLError, OSError) as exc:
                c.handshaking = False
                self._queue(c, b"")  # the alert, if any
                c.driver.connection_lost(exc)
                return True
            c.handshaking = False
            self._queue(c, b"")
            c.driver.tls_started()
            return True

    def _read_raw(self, c: _Client) -> bool:
        """Move socket bytes into the TLS input BIO; False (waiting) when none are there."""
        try:
            data = c.sock.recv(_RECV)
        except BlockingIOError:
            c.want_read = True
            return False
        except OSError as exc:
            c.handshaking = False
            c.driver.connection_lost(exc)
            return True
        if data:
            c.bio_in.write(data)
        else:
            c.bio_in.write_eof()
        return True

    def _read(self, c: _Client) -> bool:
        """Feed the driver the client's next bytes; False to wait for the socket."""
        driver = c.driver
        if c.tls is not None:
            while True:
                try:
                    data = c.tls.read(_RECV)
                except ssl.SSLWantReadError:
                    self._queue(c, b"")  # TLS may owe the peer an answer (an alert)
                    if not self._read_raw(c):
                        return False
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                except (ssl.SSLError, OSError) as exc:
                    driver.connection_lost(exc)
                    return True
                driver.receive_data(data)
                if data and driver.partial_line:
                    quickack(c.sock)
                self._queue(c, b"")
                return True
        try:
            data = c.sock.recv(_RECV)
        except BlockingIOError:
            c.want_read = True
            return False
        except OSError as exc:
            driver.connection_lost(exc)
            return True
        driver.receive_data(data)
        if data and driver.partial_line:
            quickack(c.sock)
        return True

    def _queue(self, c: _Client, data: bytes) -> None:
        """Add *data* to the outbound buffer (through TLS once it is on)."""
        if c.tls is not None:
            if data:
                try:
                    c.tls.write(data)
                except (ssl.SSLError, OSError) as exc:
                    c.driver.connection_lost(exc)
                    return
            c.out += c.bio_out.read()
        elif data:
            c.out += data

    def _send(self, c: _Client) -> bool:
        """Write what the socket takes; False when it takes no more for now."""
        while c.out:
            try:
                sent = c.sock.send(c.out)
            except BlockingIOError:
                return False
            except OSError as exc:
                self._lost(c, exc)
                return False
            del c.out[:sent]
        if c.closing:
            self._close(c)
            return False
        return True

    # -- timers

    def _arm(self, c: _Client) -> None:
        """Make sure the heap has an entry no later than *c*'s deadline."""
        due = c.driver.deadline
        if due is not None and not c.closed and (c.armed is None or due < c.armed):
            c.armed = due
            self._at(due, partial(self._timer, c, due))

    def _timer(self, c: _Client, when: float) -> None:
        if c.armed == when:
            c.armed = None
        if c.closed or c.in_call:
            return
        due = c.driver.deadline
        if due is not None and due <= time.monotonic():
            if c.handshaking:
                c.handshaking = False
                c.driver.connection_lost(TimeoutError("TLS handshake timed out"))
            elif c.out:  # the socket took nothing more by the write's deadline
                self._lost(c, TimeoutError("write timed out"))
                return
            self._pump(c)
        else:
            self._arm(c)

    # -- the end

    def _close(self, c: _Client) -> None:
        if c.closed:
            return
        c.closed = True
        self.clients.discard(c)
        if c.events:
            self.sel.unregister(c.sock)
        c.sock.close()
        c.out.clear()
        if len(self.timers) > 64 + 4 * len(self.clients):  # forget the dead ones' timers
            self.timers = [t for t in self.timers if t[0] > time.monotonic()]
            heapq.heapify(self.timers)


def start(server: Server) -> _Loop:
    """Listen and serve in a background thread; returns once the ports are bound.

    The soft open-file limit is raised to the hard one first (a descriptor per session).
    """
    raise_nofile()
    loop = _Loop(server, open_listeners(server))
    loop.thread.start()
    return loop


def serve(server: Server) -> None:
    """Serve until ``server.destroy()`` (or ``down()``) stops listening (``serve_forever``)."""
    server.configure(transport="selectors") if server.state == "down" else None
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """``python -m pop3proto.transports.selectors``."""
    from ._cli import run

    return run("selectors", argv)


if __name__ == "__main__":
    raise SystemExit(main())
