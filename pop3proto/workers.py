"""Pre-forked worker processes sharing the listening sockets (``workers`` > 1).

The parent binds the listeners once, forks N children that each run the
configured transport on those same sockets (the kernel spreads accepts among
them), and supervises: a child that dies unexpectedly is replaced, SIGTERM
or SIGINT to the parent stops every child cleanly (each closes its sessions
without their deletions and releases its locks).  Maildir locks are
``flock`` locks, so they hold across the workers.  The children inherit the
parent's stderr, so there is one log stream.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import Server

__all__ = ["WorkerPool"]


class WorkerPool:
    """N forked children serving *server*'s listeners; a TransportHandle for ``Server.up``."""

    def __init__(self, server: Server, count: int) -> None:
        self.server = server
        self.count = count
        from .transports._common import open_listeners, ports_of

        self.listeners = open_listeners(server)
        self.ports = ports_of(self.listeners)
        self._pids: set[int] = set()
        self._stopping = False
        self._lock = threading.Lock()
        for _ in range(count):
            self._spawn()
        self._reaper = threading.Thread(target=self._supervise, daemon=True,
                                        name="pop3proto-workers")
        self._reaper.start()

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                code = self._child()
            finally:
                os._exit(code)
        self._pids.add(pid)

    def _child(self) -> int:  # pragma: no cover - runs in the child
        from .server import Server

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        socks = iter([s for s, _ in self.listeners])
        opts = {k: v for k, v in self.server.configure().items()  # type: ignore[union-attr]
                if k not in ("workers", "socket_factory", "port", "pop3s_port")}
        child = Server(**opts, socket_factory=lambda host, port: next(socks),
                       port=self.ports["pop3"], pop3s_port=self.ports.get("pop3s"))
        child.up()
        while not stop.wait(0.5):
            pass
        child.destroy("kill", timeout=10)
        return 0

    def _supervise(self) -> None:
        while True:
            with self._lock:
                pids = list(self._pids)
                if self._stopping and not pids:
                    return
            for pid in pids:
                try:
                    done, _status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if not done:
                    continue
                with self._lock:
                    self._pids.discard(pid)
                    if not self._stopping:
                        self._spawn()  # replace a worker that died
            time.sleep(0.1)

    def stop_listening(self) -> None:
        """Stop every worker (sessions closed without updates, locks released)."""
        with self._lock:
            self._stopping = True
            pids = list(self._pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for sock, _ in self.listeners:
            with contextlib.suppress(OSError):
                sock.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every worker to exit."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pids:
            if deadline is not None and time.monotonic() > deadline:
                for pid in list(self._pids):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                return False
            time.sleep(0.05)
        return True
