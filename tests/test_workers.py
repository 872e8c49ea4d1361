"""Pre-forked workers share what they must: penalties, certificate reloads, their parent's life.

The table tests drive ``SharedPenalties`` directly (against ``Penalties``, and
across a fork).  The pool tests start the CLI with ``--workers 2`` and JSON
logs, and steer each connection to the worker they want by stopping the
other one (SIGSTOP) until it has been accepted; the log's ``rport`` and
``pid`` fields then say which worker served it.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import poplib
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tlsutil import HOST, TLSFiles

from pop3proto.limits import Penalties
from pop3proto.shared_penalties import SharedPenalties

# ------------------------------------------------------------------ the table


def test_shared_table_follows_the_rules_of_penalties() -> None:
    rng = random.Random(15)
    plain, shared = Penalties(2.0, 15.0), SharedPenalties(2.0, 15.0)
    now = 0.0
    for _ in range(5000):
        now += rng.random() * 4
        key = f"192.0.2.{rng.randrange(40)}"
        method = rng.choice(["wait", "failed", "failures"])
        assert getattr(shared, method)(key, now) == pytest.approx(getattr(plain, method)(key, now))


def test_a_failure_in_one_process_delays_the_next_in_another() -> None:
    table = SharedPenalties(1.0, 8.0)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=lambda: [table.failed("198.51.100.1", 100.0) for _ in range(3)])
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert table.failures("198.51.100.1", 100.0) == 3
    assert table.failed("198.51.100.1", 100.0) == 8.0  # the fourth failure: 1, 2, 4, 8
    assert table.wait("198.51.100.1", 100.0) == 15.0  # queued behind all four


def test_a_lock_held_too_long_elsewhere_is_waited_for_only_so_long() -> None:
    # A worker stopped (SIGSTOP, a debugger) while it holds the table's lock:
    # the others go on counting, each in a private table, instead of hanging.
    table = SharedPenalties(1.0, 8.0, lock_timeout=0.05)
    ctx = multiprocessing.get_context("fork")
    holding, release = ctx.Event(), ctx.Event()

    def hold() -> None:
        with table._locked():
            holding.set()
            release.wait(10)

    child = ctx.Process(target=hold)
    child.start()
    try:
        assert holding.wait(10)
        assert table.failed("192.0.2.77", 10.0) == 1.0
        assert table.failed("192.0.2.77", 10.0) == 2.0
    finally:
        release.set()
        child.join(10)
    assert table.failures("192.0.2.77", 10.0) == 0  # the shared table never saw them


def test_the_table_is_bounded_and_forgets_the_stalest() -> None:
    table = SharedPenalties(1.0, 4.0, max_entries=64)
    for i in range(1000):
        table.failed(f"group-{i}", float(i))
    assert table.slots == 64
    assert table.failures("group-999", 999.0) == 1  # the freshest are remembered
    remembered = sum(table.failures(f"group-{i}", 999.0) > 0 for i in range(1000))
    assert remembered <= 64


def test_with_a_clock_the_table_ignores_the_hosts_own_time() -> None:
    times = iter([50.0, 50.0])
    table = SharedPenalties(2.0, 8.0, clock=lambda: next(times))
    assert table.failed("203.0.113.9", 1e6) == 2.0  # counted at 50.0, not at 1e6
    assert table.wait("203.0.113.9", -1e6) == 2.0


# ------------------------------------------------------------------ the pool


def _proc_state(pid: int) -> str | None:
    """The process's state letter, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z", "X")


def _children(parent: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{name}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and fields[0] not in ("Z", "X"):
                out.append(int(name))
    return sorted(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Pool:
    """The CLI with ``--workers 2`` in a subprocess, its JSON log lines collected as they come."""

    def __init__(self, root: Path, *args: str) -> None:
        self.port = _free_port()
        users = root / "users"
        users.write_text("alice:{PLAIN}pw::::::\n")
        (root / "mail").mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pop3proto.transports.selectors", "--host", HOST,
             "--port", str(self.port), "--maildir-root", str(root / "mail"),
             "--passwd-file", str(users), "--workers", "2", "--log-format", "json", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 15
        self.workers: list[int] = []
        while len(self.workers) < 2:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the pool did not start: {self.records}")
            time.sleep(0.05)
            self.workers = _children(self.proc.pid)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"message": line.rstrip("\n")}
            with self._cond:
                if len(self.records) < 10_000:
                    self.records.append(record)
                self._cond.notify_all()

    def wait_for(self, match: Callable[[dict[str, Any]], bool],
                 timeout: float = 10.0) -> dict[str, Any]:
        """The first log record *match* accepts (waiting for it up to *timeout*)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for record in self.records:
                    if match(record):
                        return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no such log record in {self.records}")
                self._cond.wait(remaining)

    def served_by(self, rport: int) -> int:
        """The pid of the worker that logged a session line for client port *rport*."""
        record = self.wait_for(lambda r: "session" in r and r.get("rport") == rport)
        return int(record["pid"])

    @contextlib.contextmanager
    def only(self, worker: int) -> Iterator[None]:
        """While inside, every other worker is stopped: new connections go to *worker*."""
        others = [w for w in self.workers if w != worker]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        for pid in others:  # the signal is asynchronous: wait until it has stopped
            deadline = time.monotonic() + 10
            while _proc_state(pid) != "T" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _proc_state(pid) == "T"
        try:
            yield
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)

    def connect(self, worker: int, port: int | None = None,
                context: ssl.SSLContext | None = None) -> poplib.POP3:
        """A client greeted by *worker* (implicit TLS with *context*)."""
        with self.only(worker):
            if context is None:
                return poplib.POP3(HOST, port or self.port, timeout=10)
            return poplib.POP3_SSL(HOST, port or self.port, context=context, timeout=10)

    def stop(self) -> None:
        """SIGTERM the parent; anything left after a grace period is killed by its pid."""
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.workers:
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def start_pool(tmp_path: Path) -> Iterator[Callable[..., Pool]]:
    pools: list[Pool] = []

    def start(*args: str) -> Pool:
        pools.append(Pool(tmp_path, *args))
        return pools[-1]

    yield start
    for pool in pools:
        pool.stop()


def _local_port(client: poplib.POP3) -> int:
    return int(client.sock.getsockname()[1])


@pytest.mark.slow
def test_guesses_spread_over_the_workers_share_one_penalty(
    start_pool: Callable[..., Pool],
) -> None:
    pool = start_pool("--auth-failure-delay", "0.25", "--auth-failure-delay-max", "1")
    expected = [0.25, 0.5, 1.0, 1.0]
    served = []
    for k, delay in enumerate(expected):
        worker = pool.workers[k % 2]
        client = pool.connect(worker)
        client.user("alice")
        started = time.monotonic()
        with pytest.raises(poplib.error_proto) as err:
            client.pass_("guess")
        took = time.monotonic() - started
        assert err.value.args[0] == b"-ERR [AUTH] Authentication failed."
        # Whichever worker answers, the k-th failure waits the k-th delay
        # (a lower bound only: a loaded machine is slower, never faster).
        assert took >= delay * 0.9
        rport = _local_port(client)
        client.quit()
        served.append(pool.served_by(rport))

        def login_failed(r: dict[str, Any], p: int = rport) -> bool:
            return r.get("event") == "login_failed" and r.get("rport") == p

        failed = pool.wait_for(login_failed)
        assert failed["delay"] == delay
    assert served == [pool.workers[k % 2] for k in range(len(expected))]


@pytest.mark.slow
def test_sighup_to_the_parent_reloads_the_certificate_in_every_worker(
    start_pool: Callable[..., Pool], tmp_path: Path,
) -> None:
    tls = TLSFiles.create(tmp_path)
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(tls.cert_path(1), cert)
    shutil.copy(tls.key_path(1), key)
    pop3s = _free_port()
    pool = start_pool("--tls-cert", str(cert), "--tls-key", str(key),
                      "--pop3s-port", str(pop3s))

    def presented(worker: int) -> bytes:
        client = pool.connect(worker, pop3s, tls.client_context())
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
        rport = _local_port(client)
        client.quit()
        assert pool.served_by(rport) == worker
        assert der is not None
        return der

    assert [presented(w) for w in pool.workers] == [tls.der(1)] * 2
    shutil.copy(tls.cert_path(2), cert)
    shutil.copy(tls.key_path(2), key)
    os.kill(pool.proc.pid, signal.SIGHUP)
    for worker in pool.workers:

        def reloaded(r: dict[str, Any], w: int = worker) -> bool:
            return (r.get("message") == f"TLS certificate reloaded (worker {w})"
                    and r.get("pid") == w)

        pool.wait_for(reloaded)
    assert [presented(w) for w in pool.workers] == [tls.der(2)] * 2
    assert _children(pool.proc.pid) == pool.workers  # nobody died on the way


@pytest.mark.slow
def test_sighup_to_a_worker_keeps_it_serving(start_pool: Callable[..., Pool]) -> None:
    pool = start_pool()
    worker = pool.workers[0]
    os.kill(worker, signal.SIGHUP)
    pool.wait_for(lambda r: r.get("pid") == worker and "no TLS certificate to reload"
                  in r.get("message", ""))
    client = pool.connect(worker)
    client.user("alice")
    client.pass_("pw")
    assert client.stat() == (0, 0)
    rport = _local_port(client)
    client.quit()
    assert pool.served_by(rport) == worker
    assert _alive(worker)
    assert _children(pool.proc.pid) == pool.workers  # not replaced either


@pytest.mark.slow
def test_workers_exit_when_the_parent_is_killed(start_pool: Callable[..., Pool]) -> None:
    pool = start_pool()
    client = pool.connect(pool.workers[1])  # one of them in the middle of a session
    pool.proc.send_signal(signal.SIGKILL)
    pool.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in pool.workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [w for w in pool.workers if _alive(w)] == []
    # The session was closed, not left half-served.
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.stat()
    client.close()
