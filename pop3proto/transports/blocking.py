"""Blocking sockets, one thread per connection (standard library only).

Each thread performs its ``SessionDriver``'s actions with plain blocking
calls; the socket time-out is set to the driver's deadline before every
wait.  ``start(server)`` listens in background threads (what ``Server.up``
calls); ``serve(server)`` serves in the caller's thread until the server is
destroyed; ``main()`` is the command.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from pop3proto.driver import CLOSE, RECEIVE, START_TLS, Call, SessionDriver, Write
from pop3proto.server import Server

from ._common import ProxyReader, open_listeners, perform_call, ports_of, quickack, raise_nofile

__all__ = ["main", "serve", "start"]

_RECV = 16384  # a waiting thread holds a buffer this big: keep idle sessions small
_REFUSE_WAIT = 1.0  # the most a refusal line may take to send (from the accept thread)


def _timeout(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _Client:
    """One connection: a socket and the driver whose actions this thread performs."""

    def __init__(self, server: Server, sock: socket.socket, peer: Any, tls: bool) -> None:
        self.sock = sock
        self.killed = self.handshaking = False
        self.driver = SessionDriver(server, peer, tls=tls, now=time.monotonic())
        server.set_killer(self.driver, self.kill)

    def kill(self) -> None:
        """End the session from any thread: wake the read; the goodbye is still written.

        A write the client does not take, or a handshake, is cut off shortly after.
        """
        self.killed = True
        self._shut(socket.SHUT_RDWR if self.handshaking else socket.SHUT_RD)
        try:
            threading.Timer(_REFUSE_WAIT, self._shut, (socket.SHUT_RDWR,)).start()
        except RuntimeError:  # no thread to be had: cut it off now
            self._shut(socket.SHUT_RDWR)

    def _shut(self, how: int) -> None:
        if not self.driver.closed:
            try:
                self.sock.shutdown(how)
            except OSError:
                pass

    def run(self) -> None:
        driver, sock = self.driver, self.sock
        try:
            while True:
                if self.killed:
                    driver.shutdown()
                action = driver.next_action(time.monotonic())
                if action is RECEIVE:
                    self.receive()
                elif isinstance(action, Write):
                    try:
                        self.sock.settimeout(_timeout(driver.deadline))
                        self.sock.sendall(action.data)
                    except (OSError, ValueError) as exc:
                        driver.connection_lost(exc)
                elif isinstance(action, Call):
                    perform_call(driver, action)
                elif action is START_TLS:
                    self.handshake()
                else:
                    assert action is CLOSE
                    return
        finally:
            sock = self.sock
            sock.close()

    def receive(self) -> None:
        driver = self.driver
        try:
            self.sock.settimeout(_timeout(driver.deadline))
            data = self.sock.recv(_RECV)
        except TimeoutError:
            return  # the driver sees its deadline has passed
        except (OSError, ValueError) as exc:
            if not self.killed:
                driver.connection_lost(exc)
            return
        if self.killed:
            return  # woken by kill(): the goodbye follows
        driver.receive_data(data)
        if data and driver.partial_line:
            quickack(self.sock)

    def handshake(self) -> None:
        driver = self.driver
        self.handshaking = True
        try:
            self.sock.settimeout(_timeout(driver.deadline))
            # Wrap first and shake hands after, so the killer always sees the live socket.
            tls = driver.ssl_context.wrap_socket(
                self.sock, server_side=True, do_handshake_on_connect=False
            )
            self.sock = tls
            tls.do_handshake()
        except (OSError, ValueError, AttributeError) as exc:
            driver.connection_lost(exc)
            return
        finally:
            self.handshaking = False
        driver.tls_started()


class _Handle:
    """A running blocking server: accept threads, stoppable (a TransportHandle)."""

    def __init__(self, server: Server, listeners: list[tuple[socket.socket, bool]]) -> None:
        self.server = server
        self.listeners = listeners
        self.ports = ports_of(listeners)
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._accept, args=(sock, tls), daemon=True,
                             name=f"pop3proto-accept-{port}")
            for (sock, tls), port in zip(listeners, self.ports.values(), strict=True)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _accept(self, listener: socket.socket, tls: bool) -> None:
        server = self.server
        while not self._stopped.is_set():
            try:
                sock, peer = listener.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                time.sleep(0.01)  # EMFILE and friends: back off, keep serving
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if server.proxy_expected():
                    if not server.proxy_trusted(peer[0]):
                        sock.close()
                        continue
                    if not self._thread(self._proxied, sock, peer[:2], tls):
                        sock.close()
                else:
                    self._open(sock, peer[:2], tls)
            except Exception as exc:  # one connection's failure never stops the listener
                server.log.warning("could not set up a connection from %s: %s", peer[0], exc)
                sock.close()

    def _thread(self, target: Any, *args: Any) -> bool:
        """Run *target* in a new thread; False (and nothing started) if no thread can be had."""
        try:
            threading.Thread(target=target, args=args, daemon=True).start()
        except RuntimeError as exc:  # a pids/task limit (containers, RLIMIT_NPROC)
            self.server.log.warning("cannot start a thread: %s", exc)
            return False
        return True

    def _open(self, sock: socket.socket, peer: Any, tls: bool) -> None:
        client = _Client(self.server, sock, peer, tls)
        if client.driver.refused is None and self._thread(client.run):
            return
        # Refused (over a limit), or no thread for it: answer from here, briefly.
        if client.driver.refused is None:
            client.driver.shutdown(client.driver.conn.text("server_busy"))
        sock.settimeout(_REFUSE_WAIT)
        client.run()

    def _proxied(self, sock: socket.socket, peer: Any, tls: bool) -> None:
        """Read the PROXY header (exactly), then run the session in this thread."""
        reader = ProxyReader(peer)
        deadline = time.monotonic() + (self.server.cget("handshake_timeout") or 30.0)
        try:
            source = None
            while source is None:
                sock.settimeout(_timeout(deadline))
                source = reader.feed(sock.recv(reader.want()))
        except (OSError, ValueError):
            sock.close()
            return
        client = _Client(self.server, sock, source, tls)
        client.run()

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
            t.join(_timeout(deadline))
        return not any(t.is_alive() for t in self._threads)


def start(server: Server) -> _Handle:
    """Listen and serve in background threads; returns once the ports are bound.

    The soft open-file limit is raised to the hard one first (a descriptor per session).
    """
    raise_nofile()
    handle = _Handle(server, open_listeners(server))
    handle.start()
    return handle


def serve(server: Server) -> None:
    """Serve until ``server.destroy()`` (or ``down()``) stops listening (``serve_forever``)."""
    server.configure(transport="blocking") if server.state == "down" else None
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """``python -m pop3proto.transports.blocking``."""
    from ._cli import run

    return run("blocking", argv)


if __name__ == "__main__":
    raise SystemExit(main())
