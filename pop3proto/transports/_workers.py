"""Pre-forked worker processes sharing the listening sockets (``workers`` > 1).

The parent binds the listeners once, forks N children that each run the
configured transport on those same sockets (the kernel spreads accepts among
them), and supervises: a child that dies unexpectedly is replaced, SIGTERM
or SIGINT to the parent stops every child cleanly (each closes its sessions
without their deletions and releases its locks).  Maildir locks are
``flock`` locks, so they hold across the workers.  The children inherit the
parent's stderr, so there is one log stream.

What the workers share besides the sockets:

* failed-login penalties: one ``SharedPenalties`` table in shared memory,
  made before the first fork, so N workers allow no more guesses than one;
* certificate reloads: ``Server.reload_tls()`` in the parent (SIGHUP to the
  CLI) sends SIGHUP to every worker, and a worker handles SIGHUP by
  reloading its own certificate and logging the outcome (a SIGHUP sent to
  one worker reloads that one and never kills it);
* their parent's life: on Linux each child asks the kernel for SIGTERM when
  its parent dies (``PR_SET_PDEATHSIG``), and every child also polls its
  parent's pid, so a parent killed with SIGKILL leaves no worker serving.

Every fork happens on the supervisor thread, which lives as long as any
worker: Linux sends the parent-death signal when the *thread* that forked
exits, so forking from a short-lived caller's thread would kill the workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ..shared_penalties import SharedPenalties
from ._common import open_listeners, ports_of

if TYPE_CHECKING:
    from ..server import Server

__all__ = ["WorkerPool"]

#: Signals a child handles itself; blocked across fork so none is lost or mishandled.
_CHILD_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_PR_SET_PDEATHSIG = 1
#: How often a worker checks that its parent is alive (the fallback for prctl).
_PARENT_POLL = 0.5


def _prctl() -> Any:
    """libc's ``prctl`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


class WorkerPool:
    """N forked children serving *server*'s listeners; a TransportHandle for ``Server.up``."""

    def __init__(self, server: Server, count: int) -> None:
        self.server = server
        self.count = count
        self.listeners = open_listeners(server)
        self.ports = ports_of(self.listeners)
        #: The failed-login penalties every worker counts in.
        self.penalties = SharedPenalties(
            float(server.cget("auth_failure_delay")),
            float(server.cget("auth_failure_delay_max")),
            clock=time.monotonic,
        )
        self._prctl = _prctl()
        self._pids: set[int] = set()
        self._stopping = False
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: OSError | None = None
        self._reaper = threading.Thread(target=self._supervise, daemon=True,
                                        name="pop3proto-workers")
        self._reaper.start()
        if not self._ready.wait(60):
            self._error = OSError("the worker processes did not start")
        if self._error is not None:
            self.stop_listening()
            self.join(10)
            raise self._error

    # ------------------------------------------------------------------ parent

    def _spawn(self) -> None:
        """Fork one worker (on the supervisor thread only)."""
        parent = os.getpid()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                code = 1
                try:
                    code = self._child(parent)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(code)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        with self._lock:
            self._pids.add(pid)

    def _supervise(self) -> None:
        try:
            for _ in range(self.count):
                self._spawn()
        except OSError as exc:  # no fork (a task limit, no memory): up() fails
            self._error = exc
        finally:
            self._ready.set()
        while True:
            with self._lock:
                pids = list(self._pids)
                if (self._stopping or self._error) and not pids:
                    return
            for pid in pids:
                try:
                    done, _status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    with self._lock:
                        self._pids.discard(pid)
            with self._lock:
                short = not self._stopping and self._error is None and \
                    len(self._pids) < self.count
            if short:  # replace a worker that died (no fork now: try next round)
                with contextlib.suppress(OSError):
                    self._spawn()
            time.sleep(0.1)

    def pids(self) -> list[int]:
        """The live workers' process ids."""
        with self._lock:
            return sorted(self._pids)

    def _signal_all(self, signum: int) -> None:
        with self._lock:
            pids = list(self._pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def reload_tls(self) -> None:
        """Ask every worker to reload its certificate (SIGHUP); each logs the outcome."""
        self._signal_all(signal.SIGHUP)

    def stop_listening(self) -> None:
        """Stop every worker (sessions closed without updates, locks released)."""
        with self._lock:
            self._stopping = True
        self._signal_all(signal.SIGTERM)
        for sock, _ in self.listeners:
            with contextlib.suppress(OSError):
                sock.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every worker to exit (SIGKILL for those left after *timeout*)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pids():
            if deadline is not None and time.monotonic() > deadline:
                self._signal_all(signal.SIGKILL)
                return False
            time.sleep(0.05)
        return True

    # ------------------------------------------------------------------ child

    def _child(self, parent: int) -> int:  # pragma: no cover - runs in the child
        """A worker's life: serve until SIGTERM/SIGINT or the parent's death; SIGHUP reloads."""
        if self._prctl is not None:
            self._prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            return 0
        self.penalties.after_fork()
        wake = threading.Event()
        pending: dict[int, bool] = {}

        def on_signal(signum: int, frame: Any) -> None:
            pending[signum] = True
            wake.set()

        for signum in _CHILD_SIGNALS:
            signal.signal(signum, on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_SIGNALS)
        child = self._make_server()
        child.up()
        log = child.log
        pid = os.getpid()
        while True:
            wake.wait(_PARENT_POLL)
            wake.clear()
            if pending.pop(signal.SIGHUP, False):
                self._reload(child, pid)
            if pending.get(signal.SIGTERM) or pending.get(signal.SIGINT):
                break
            if os.getppid() != parent:
                log.warning("worker %d: the parent process is gone; stopping", pid)
                break
        child.destroy("kill", timeout=10)
        return 0

    @staticmethod
    def _reload(child: Server, pid: int) -> None:  # pragma: no cover - runs in the child
        """A worker's SIGHUP: reload its certificate and log what happened."""
        log = child.log
        if not child.cget("tls_cert"):
            log.info("SIGHUP: no TLS certificate to reload (worker %d)", pid)
            return
        try:
            child.reload_tls()
        except (OSError, ValueError) as exc:
            log.error("TLS reload failed (worker %d): %s", pid, exc)
        else:
            log.info("TLS certificate reloaded (worker %d)", pid)

    def _make_server(self) -> Server:  # pragma: no cover - runs in the child
        """The worker's own Server on the inherited listeners, counting in the shared table."""
        from ..server import Server

        socks = iter([s for s, _ in self.listeners])
        opts = {k: v for k, v in self.server.configure().items()  # type: ignore[union-attr]
                if k not in ("workers", "socket_factory", "port", "pop3s_port")}
        child = Server(**opts, socket_factory=lambda host, port: next(socks),
                       port=self.ports["pop3"], pop3s_port=self.ports.get("pop3s"))
        child.use_penalties(self.penalties)
        return child
