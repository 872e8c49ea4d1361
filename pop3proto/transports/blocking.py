"""Blocking sockets, one thread per connection (standard library only).

``start(server)`` listens in a background thread (what ``Server.up`` calls);
``serve(server)`` runs in the caller's thread; ``main()`` is the command.
The socket timeout is the idle timer: when it fires the session closes
without an update (RFC 1939 autologout).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any

from pop3proto import NEED_DATA, PAUSED, ConnectionClosed, Data, Phase, RemoteProtocolError
from pop3proto.proxy import MAX_HEADER, parse_proxy_header
from pop3proto.server import (
    START_TLS,
    Call,
    Server,
    Session,
    Sleep,
    Step,
    Steps,
    run_call_sync,
)

__all__ = ["main", "serve", "start"]

_RECV = 16384  # a waiting thread holds a buffer this big: keep idle sessions small


def _once(step: Step) -> Steps:
    yield step


def _proxied_peer(server: Server, sock: socket.socket, peer: Any) -> Any:
    """The client address from a PROXY header, or None to drop the connection.

    The header is peeked and then consumed exactly, so bytes after it (a TLS
    ClientHello on the implicit-TLS port) stay in the socket.
    """
    if not server.proxy_trusted(peer[0]):
        return None
    deadline = time.monotonic() + (server.cget("handshake_timeout") or 30.0)
    sock.settimeout(server.cget("handshake_timeout") or None)
    seen = -1
    while time.monotonic() < deadline:
        data = sock.recv(MAX_HEADER, socket.MSG_PEEK)
        if not data:
            return None
        try:
            parsed = parse_proxy_header(data)
        except ValueError:
            return None
        if parsed is not None:
            header, size = parsed
            while size:
                size -= len(sock.recv(size))
            return header.source or peer
        if len(data) == seen:
            time.sleep(0.01)
        seen = len(data)
    return None


class _Client:
    """One connection's socket and session, run in its own thread."""

    def __init__(self, server: Server, sock: socket.socket, peer: Any, tls: bool) -> None:
        self.server = server
        self.sock: socket.socket = sock
        self.session: Session = server.open_session(peer[:2], tls=tls)
        self.conn = self.session.conn
        self.tls = tls
        self.gone = False
        self.killed = threading.Event()
        self.session.set_killer(self._kill)

    def _kill(self) -> None:
        self.killed.set()  # wakes a failed-login Sleep too
        self.sock.shutdown(socket.SHUT_RDWR)

    def flush(self) -> None:
        """Write what the core has queued.  A write error marks the peer gone.

        Input already received is still processed after that, so a QUIT that
        arrived before the peer reset still applies its deletions.
        """
        data = self.conn.data_to_send()
        if data and not self.gone:
            self.sock.settimeout(self.session.idle_timeout() or None)
            try:
                self.sock.sendall(data)
            except (OSError, ValueError):
                self.gone = True

    def run_steps(self, steps: Steps) -> None:
        """Carry out a session's steps: responses, calls, sleeps, the TLS switch."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(value)
            except StopIteration:
                return
            value = error = None
            if isinstance(step, Call):
                try:
                    value = run_call_sync(step)
                except Exception as exc:
                    error = exc
            elif isinstance(step, Sleep):
                if self.killed.wait(step.seconds):
                    raise ConnectionAbortedError("session killed")
            elif step is START_TLS:
                self.flush()
                self.handshake()
            else:
                if self.gone and isinstance(step, Data):
                    raise ConnectionResetError("peer gone during a message")
                self.conn.send(step)
                self.flush()

    def handshake(self) -> None:
        ctx = self.server.ssl_context()
        assert ctx is not None
        self.sock.settimeout(self.server.cget("handshake_timeout") or None)
        # Wrap first and shake hands after, so the killer always sees the live socket.
        self.sock = ctx.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock.do_handshake()

    def run(self) -> None:
        conn, session = self.conn, self.session
        try:
            if self.tls:
                self.tls = False
                self.handshake()
            self.run_steps(session.greet())
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    self.flush()  # one write for all the replies to one read
                    if self.gone:
                        return
                    self.sock.settimeout(session.idle_timeout() or None)
                    try:
                        data = self.sock.recv(_RECV)
                    except TimeoutError:
                        self.run_steps(_once(session.timed_out()))
                        return
                    session.touch()
                    conn.receive_data(data)
                elif event is PAUSED:
                    self.flush()
                    if conn.pending is not None:
                        raise RuntimeError(f"event left unanswered: {conn.pending!r}")
                else:
                    self.run_steps(session.handle(event))
                    if isinstance(event, ConnectionClosed):
                        self.flush()
                        return
        except RemoteProtocolError:
            self.flush()
        except (OSError, ssl.SSLError, ValueError):
            conn.send_failed()
        except Exception:
            conn.send_failed()
            self.server.log.exception("session %s failed", session.id)
        finally:
            if conn.phase is not Phase.CLOSED and session.end_reason == "Disconnected":
                session.end_reason = "Connection closed by peer"
            try:
                self.sock.close()
            finally:
                self.server.close_session(session)


class _Handle:
    """A running blocking server: accept threads, stoppable."""

    def __init__(self, server: Server, listeners: list[tuple[socket.socket, bool]]) -> None:
        self.server = server
        self.listeners = listeners
        self.ports = {
            ("pop3s" if tls else "pop3"): sock.getsockname()[1] for sock, tls in listeners
        }
        self._threads = [
            threading.Thread(target=self._accept, args=(sock, tls), daemon=True,
                             name=f"pop3proto-accept-{sock.getsockname()[1]}")
            for sock, tls in listeners
        ]
        self._stopped = threading.Event()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _accept(self, listener: socket.socket, tls: bool) -> None:
        while not self._stopped.is_set():
            try:
                sock, peer = listener.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                time.sleep(0.01)  # EMFILE and friends: back off, keep serving
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=self._start_client, args=(sock, peer, tls), daemon=True
            ).start()

    def _start_client(self, sock: socket.socket, peer: Any, tls: bool) -> None:
        if self.server.proxy_expected():
            try:
                peer = _proxied_peer(self.server, sock, peer)
            except OSError:
                peer = None
            if peer is None:
                sock.close()
                return
        _Client(self.server, sock, peer, tls).run()

    def stop_listening(self) -> None:
        self._stopped.set()
        for sock, _ in self.listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def join(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)


def start(server: Server) -> _Handle:
    """Listen and serve in background threads; returns once the ports are bound."""
    handle = _Handle(server, server.open_listeners())
    handle.start()
    return handle


def serve(server: Server) -> None:
    """Serve in this thread until ``server.destroy()`` (or ``down()``) stops listening."""
    if server.state != "up":
        server.up()
    handle = server._handle
    assert handle is not None
    handle.join(None)


def main(argv: list[str] | None = None) -> int:
    """``python -m pop3proto.transports.blocking``."""
    from ._cli import run

    return run("blocking", argv)


if __name__ == "__main__":
    raise SystemExit(main())
