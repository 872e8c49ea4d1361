"""One thread, non-blocking sockets, ``selectors`` (standard library only).

``start(server)`` runs the loop in a background thread (what ``Server.up``
calls); ``serve(server)`` waits in the caller's thread; ``main()`` is the
command.  A connection's session steps are advanced only while its outbound
buffer holds less than ``_HIGH`` bytes, and its socket is read only when the
core returns NEED_DATA: a client that stops reading costs a few chunks and
stalls nobody.  ``Call`` steps run inline; a ``Sleep`` parks the connection
on a timer.  TLS (implicit, or after STLS) runs through
``SSLContext.wrap_bio`` and two ``MemoryBIO``.  Idle, handshake and sleep
timers share one heap.  Other threads (``destroy("kill")``,
``stop_listening``) queue actions and wake the loop through a socketpair.
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

from pop3proto import NEED_DATA, PAUSED, ConnectionClosed, Phase, RemoteProtocolError
from pop3proto.proxy import MAX_HEADER, V2_SIGNATURE, parse_proxy_header
from pop3proto.server import START_TLS, Call, Server, Session, Sleep, Steps, run_call_sync

__all__ = ["main", "serve", "start"]

_RECV = 65536
_HIGH = 256 * 1024  # outbound bytes above which a session's steps wait
_BUDGET = 64  # steps per turn before a busy connection lets the others run
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class _Client:
    """One connection: socket, session, outbound buffer, TLS objects, timers."""

    def __init__(self, sock: socket.socket, session: Session) -> None:
        self.sock, self.session, self.conn = sock, session, session.conn
        self.out = bytearray()  # bytes for the socket (TLS records once TLS is on)
        self.steps: Steps | None = session.greet()
        self.value: Any = None  # what the last Call returned, or raised:
        self.error: BaseException | None = None
        self.ending = self.closed = self.want_read = self.more = self.handshaking = False
        self.events = 0  # what the selector watches for
        self.tls: ssl.SSLObject | None = None
        self.bio_in, self.bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.wake: float | None = None  # end of a Sleep
        self.deadline: float | None = None  # idle (or handshake) timeout
        self.armed: float | None = None  # the earliest entry for us in the heap


class _Loop:
    """The event loop; also the handle ``start`` returns (ports, stop_listening, join)."""

    def __init__(self, server: Server, listeners: list[tuple[socket.socket, bool]]) -> None:
        self.server = server
        self.listeners = listeners
        self.ports = {("pop3s" if tls else "pop3"): s.getsockname()[1] for s, tls in listeners}
        self.sel = selectors.DefaultSelector()
        self.clients: set[_Client] = set()
        self.proxied: set[socket.socket] = set()  # still sending their PROXY header
        self.timers: list[tuple[float, int, _Client | None, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.actions: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.rwake, self.wwake = socket.socketpair()
        self.stopping = self.accept_failing = self.paused = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="pop3proto-selectors", daemon=True)
        for sock in (self.rwake, self.wwake, *(s for s, _ in listeners)):
            sock.setblocking(False)
        self.sel.register(self.rwake, _READ, self._run_actions)
        self._listen()

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
                timeout = self._fire_timers()
                for key, mask in self.sel.select(timeout):
                    key.data(mask)
        except Exception:
            self.server.log.exception("selectors loop failed")
        finally:
            self._stop()
            for c in list(self.clients):
                self._kill(c)
            for sock in list(self.proxied):
                self._drop(sock, True)
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
            heapq.heappop(self.timers)[3]()
        return None

    def _at(self, when: float, fn: Callable[[], None], c: _Client | None = None) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), c, fn))

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
        while True:
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE and friends: pause accepting, don't spin
                if not self.accept_failing:
                    self.server.log.warning("accept failed: %s", exc)
                self.accept_failing = True
                if not self.paused:
                    self.paused = True
                    for s, _ in self.listeners:
                        self.sel.unregister(s)
                    self._at(time.monotonic() + 0.1, self._listen)
                return
            self.accept_failing = False
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self.server.proxy_expected():
                self._open(sock, peer[:2], tls)
            elif self.server.proxy_trusted(peer[0]):
                self._proxy(sock, peer[:2], tls, bytearray())
            else:
                sock.close()

    def _proxy(self, sock: socket.socket, peer: Any, tls: bool, buf: bytearray, *_: int) -> None:
        """Read the PROXY header exactly (a TLS ClientHello stays unread), then open."""
        try:
            while (parsed := parse_proxy_header(bytes(buf))) is None:
                if len(buf) >= 16 and buf.startswith(V2_SIGNATURE):
                    want = 16 + int.from_bytes(buf[14:16], "big") - len(buf)
                else:
                    want = max(1, 15 - len(buf))  # 15: the shortest header
                data = sock.recv(min(want, MAX_HEADER))
                if not data:
                    raise ValueError("EOF in PROXY header")
                buf += data
        except BlockingIOError:
            if sock not in self.proxied:
                self.proxied.add(sock)
                self.sel.register(sock, _READ, partial(self._proxy, sock, peer, tls, buf))
                timeout = self.server.cget("handshake_timeout") or 30.0
                self._at(time.monotonic() + timeout, partial(self._drop, sock, True))
            return
        except (OSError, ValueError):
            self._drop(sock)
            sock.close()
            return
        self._drop(sock)
        self._open(sock, parsed[0].source or peer, tls)

    def _drop(self, sock: socket.socket, close: bool = False) -> None:
        """Stop waiting for *sock*'s PROXY header (and *close* it if still waiting)."""
        if sock in self.proxied:
            self.proxied.discard(sock)
            self.sel.unregister(sock)
            if close:
                sock.close()

    def _open(self, sock: socket.socket, peer: Any, tls: bool) -> None:
        c = _Client(sock, self.server.open_session(peer, tls=tls))
        self.clients.add(c)
        c.session.set_killer(partial(self.call_soon, partial(self._kill, c)))
        if tls:
            self._start_tls(c)
        else:
            self._touch(c)
        self._pump(c)

    # -- one connection

    def _pump(self, c: _Client, mask: int = 0) -> None:
        """Advance *c* as far as it goes without waiting; errors end it."""
        if c.closed:
            return
        try:
            self._advance(c)
        except RemoteProtocolError:  # the core queued its final error reply
            with contextlib.suppress(Exception):
                self._flush(c)
            self._close(c)
        except Exception as exc:  # the socket, TLS or the session's steps failed
            if not isinstance(exc, OSError):
                self.server.log.exception("session %s failed", c.session.id)
            self._kill(c)
        if c.closed:
            return
        events = (_READ if c.want_read else 0) | (_WRITE if c.out or c.more else 0)
        if events != c.events:
            if not c.events:
                self.sel.register(c.sock, events, partial(self._pump, c))
            elif not events:
                self.sel.unregister(c.sock)
            else:
                self.sel.modify(c.sock, events, partial(self._pump, c))
            c.events = events

    def _advance(self, c: _Client) -> None:
        c.want_read = c.more = False
        for _ in range(_BUDGET):
            if c.tls is not None and c.handshaking:
                try:
                    c.tls.do_handshake()
                except ssl.SSLWantReadError:
                    self._flush(c)
                    if self._read(c):
                        continue
                    return
                c.handshaking = False
                self._touch(c)
            self._send(c)
            if len(c.out) >= _HIGH or c.wake is not None:
                return  # wait for the socket to drain, or the Sleep to end
            if c.steps is not None:
                self._step(c, c.steps)
                continue
            if c.ending:  # the ConnectionClosed steps are done
                self._flush(c)
                if not c.out:
                    self._close(c)
                return
            # What the core answered on its own is written with the next reply,
            # or before waiting for input: an Update already parsed is applied
            # even if the client reset the connection right after its QUIT.
            event = c.conn.next_event()
            if event is NEED_DATA:
                self._flush(c)
                if self._read(c):
                    continue
                return
            if event is PAUSED:  # output_high_water: drain
                if c.conn.pending is not None:
                    raise RuntimeError(f"event left unanswered: {c.conn.pending!r}")
                self._flush(c)
                continue
            assert not isinstance(event, type(NEED_DATA))
            c.steps = c.session.handle(event)
            c.ending = isinstance(event, ConnectionClosed)
        c.more = True  # budget spent: come back once the others had a turn

    def _step(self, c: _Client, steps: Steps) -> None:
        """Carry out one step: a response, a call, a sleep or the switch to TLS."""
        value, error, c.value, c.error = c.value, c.error, None, None
        try:
            step = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration:
            c.steps = None
            return
        if isinstance(step, Call):
            try:
                c.value = run_call_sync(step)
            except Exception as exc:
                c.error = exc
        elif isinstance(step, Sleep):
            if step.seconds > 0:
                c.wake, c.deadline = time.monotonic() + step.seconds, None
                self._arm(c)
        elif step is START_TLS:
            self._flush(c)  # the reply goes out in clear, ahead of the handshake
            self._start_tls(c)
        else:
            c.conn.send(step)
            self._flush(c)

    def _start_tls(self, c: _Client) -> None:
        ctx = self.server.ssl_context()
        assert ctx is not None
        c.tls = ctx.wrap_bio(c.bio_in, c.bio_out, server_side=True)
        c.handshaking = True
        self._touch(c, float(self.server.cget("handshake_timeout")))

    def _read(self, c: _Client) -> bool:
        """Read into the core (or into TLS); False, and wait for the socket, if nothing is there."""
        if c.tls is not None and not c.handshaking:
            try:
                c.conn.receive_data(c.tls.read(_RECV))
                return True
            except ssl.SSLWantReadError:
                pass  # no complete record yet: read the socket
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                c.conn.receive_data(b"")
                return True
        try:
            data = c.sock.recv(_RECV)
        except BlockingIOError:
            c.want_read = True
            return False
        c.session.touch()
        self._touch(c)
        if c.tls is None:
            c.conn.receive_data(data)
        elif data:
            c.bio_in.write(data)
        else:
            c.bio_in.write_eof()
        return True

    def _flush(self, c: _Client) -> None:
        """Move ``data_to_send()`` to the outbound buffer; write what the socket takes."""
        data = c.conn.data_to_send()
        if c.tls is not None:
            if data:
                c.tls.write(data)
            c.out += c.bio_out.read()
        elif data:
            c.out += data
        self._send(c)

    def _send(self, c: _Client) -> None:
        """Write what the socket takes of the outbound buffer."""
        while c.out:
            try:
                sent = c.sock.send(c.out)
            except BlockingIOError:
                return
            del c.out[:sent]
            self._touch(c)

    # -- timers

    def _touch(self, c: _Client, timeout: float | None = None) -> None:
        """Restart the idle timer after progress; a handshake's own timer is not restarted."""
        if c.wake is None and (timeout is not None or not c.handshaking):
            if timeout is None:
                timeout = c.session.idle_timeout()
            c.deadline = time.monotonic() + timeout if timeout > 0 else None
            self._arm(c)

    def _arm(self, c: _Client) -> None:
        """Make sure the heap has an entry no later than *c*'s next timer."""
        due = min((t for t in (c.wake, c.deadline) if t is not None), default=None)
        if due is not None and not c.closed and (c.armed is None or due < c.armed):
            c.armed = due
            self._at(due, partial(self._timer, c, due), c)

    def _timer(self, c: _Client, when: float) -> None:
        if c.armed == when:
            c.armed = None
        if c.closed:
            return
        now = time.monotonic()
        if c.wake is not None and c.wake <= now:
            c.wake = None
            self._touch(c)
            self._pump(c)
        elif c.deadline is not None and c.deadline <= now:
            if c.handshaking or c.conn.phase in (Phase.CLOSED, Phase.ERROR):
                self._kill(c)
                return
            with contextlib.suppress(Exception):
                c.conn.send(c.session.timed_out())  # no update (RFC 1939)
                self._flush(c)
            self._close(c)
        self._arm(c)

    # -- the end

    def _kill(self, c: _Client) -> None:
        if not c.closed:
            c.conn.send_failed()
            self._close(c)

    def _close(self, c: _Client) -> None:
        """End a connection: its steps, its socket, then ``close_session`` (once)."""
        if c.closed:
            return
        c.closed = True
        self.clients.discard(c)
        if c.steps is not None:
            with contextlib.suppress(Exception):
                c.steps.close()
        if c.events:
            self.sel.unregister(c.sock)
        c.sock.close()
        c.out.clear()
        if len(self.timers) > 64 + 2 * len(self.clients):  # forget the dead ones' timers
            self.timers = [t for t in self.timers if t[2] is None or not t[2].closed]
            heapq.heapify(self.timers)
        if c.conn.phase is not Phase.CLOSED and c.session.end_reason == "Disconnected":
            c.session.end_reason = "Connection closed by peer"
        self.server.close_session(c.session)


def start(server: Server) -> _Loop:
    """Listen and serve in a background thread; returns once the ports are bound."""
    loop = _Loop(server, server.open_listeners())
    loop.thread.start()
    return loop


def serve(server: Server) -> None:
    """Serve in this thread until ``server.destroy()`` (or ``down()``) stops listening."""
    if server.state != "up":
        server.up()
    handle = server._handle
    assert handle is not None
    handle.join(None)


def main(argv: list[str] | None = None) -> int:
    """``python -m pop3proto.transports.selectors``."""
    from ._cli import run

    return run("selectors", argv)


if __name__ == "__main__":
    raise SystemExit(main())
