"""TLS cost benchmark: session set-up rate and large-RETR throughput, TLS next to plain TCP.

    python bench/tls.py                           # every available transport
    python bench/tls.py --transports selectors --seconds 2 --size-mb 5

For each transport, one server is started as ``python -m
pop3proto.transports.NAME`` (a process of its own, so the load generator
does not share its interpreter) on 127.0.0.1 with a plain port and an
implicit-TLS port, a throwaway Maildir and a ``{PLAIN}`` passwd-file, and a
certificate from a throwaway trustme CA.  Then, from this process:

* set-up rate: ``--threads`` client threads (default 8) for ``--seconds``
  (default 5) each open a connection, read the greeting, send QUIT, read the
  +OK and close, as often as they can: over plain TCP, over implicit TLS (a
  full handshake every time: no session resumption) and with STLS;
* RETR throughput: one client logs in and retrieves one ``--size-mb``
  message (default 20 MB, LF line ends on disk, about one line in 40 starting
  with ``.``), reading until the final ``.``; the best of ``--repeats``
  (default 3), over plain TCP and over implicit TLS.

With two or more CPUs the server is pinned to the first and this process to
the second (``--no-pin`` to leave them to the scheduler: better on a machine
that other work shares, where a pinned server gets only its share of one CPU).
The CPU line under each transport says how many cores each side kept busy.
Every loop is bounded in time and count; the server is stopped by SIGTERM
(then SIGKILL) at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSPORTS = ("blocking", "selectors", "anyio")
HOST = "127.0.0.1"
USER, PASSWORD = "bench", "bench-secret"
MAX_ITERATIONS = 10_000_000  # per thread: the time limit always comes first
IO_TIMEOUT = 30.0


def transport_missing(name: str) -> str | None:
    """Why ``pop3proto.transports.NAME`` cannot run here, or None."""
    if not os.path.exists(os.path.join(REPO, "pop3proto", "transports", f"{name}.py")):
        return f"pop3proto/transports/{name}.py does not exist"
    if name == "anyio" and importlib.util.find_spec("anyio") is None:
        return "the anyio package is not installed"
    return None


# ---------------------------------------------------------------- fixture


def big_message(size: int, seed: int = 1) -> bytes:
    """About *size* bytes of mail with LF line ends; one line in 40 starts with a dot."""
    rng = random.Random(seed)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    line = bytes(rng.choice(alphabet) for _ in range(76)) + b"\n"
    head = b"From: bench@example.org\nTo: bench@example.org\nSubject: 20 MB\n\n"
    out = bytearray(head)
    n = 0
    while len(out) < size:
        out += (b"." + line[1:]) if n % 40 == 39 else line
        n += 1
    return bytes(out)


@dataclass
class Fixture:
    directory: str
    maildir_root: str
    passwd: str
    cert: str
    key: str
    client_context: ssl.SSLContext
    message_size: int


def make_fixture(size: int) -> Fixture:
    import trustme

    from pop3proto.maildir import MaildirStorage

    directory = tempfile.mkdtemp(prefix="pop3proto-bench-tls-")
    root = os.path.join(directory, "mail")
    os.makedirs(root)
    MaildirStorage(root, create=True).deliver(USER, big_message(size))
    passwd = os.path.join(directory, "passwd")
    with open(passwd, "w", encoding="utf-8") as f:
        f.write(f"{USER}:{{PLAIN}}{PASSWORD}::::::\n")
    ca = trustme.CA()
    leaf = ca.issue_cert(HOST, "localhost")
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(key)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return Fixture(directory, root, passwd, cert, key, ctx, size)


# ---------------------------------------------------------------- the server


class ServerProcess:
    """``python -m pop3proto.transports.NAME`` with a plain and an implicit-TLS port."""

    def __init__(self, transport: str, fx: Fixture, cpu: int | None) -> None:
        argv = [
            sys.executable, "-m", f"pop3proto.transports.{transport}",
            "--host", HOST, "--port", "0", "--pop3s-port", "0",
            "--passwd-file", fx.passwd, "--maildir-root", fx.maildir_root,
            "--tls-cert", fx.cert, "--tls-key", fx.key,
            "--auth-failure-delay", "0", "--max-connections", "20000",
            "--log-level", "WARNING",
        ]  # fmt: skip

        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            preexec_fn=pin if cpu is not None else None,
        )  # fmt: skip
        self.port, self.pop3s_port = self._ports()

    def _ports(self) -> tuple[int, int]:
        assert self.proc.stdout is not None
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            found.append(self.proc.stdout.readline().decode(errors="replace"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(30)
        m = re.search(r"listening on \S+:(\d+), pop3s on (\d+)", found[0] if found else "")
        if m is None:
            self.stop()
            raise RuntimeError(f"server did not start: {found!r}")
        return int(m[1]), int(m[2])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ---------------------------------------------------------------- the client


def _readline(sock: socket.socket, buf: bytearray) -> bytes:
    while (end := buf.find(b"\r\n")) < 0:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed; got {bytes(buf)!r}")
        buf += data
    line = bytes(buf[:end])
    del buf[: end + 2]
    return line


def _expect_ok(sock: socket.socket, buf: bytearray) -> bytes:
    line = _readline(sock, buf)
    if not line.startswith(b"+OK"):
        raise ConnectionError(f"expected +OK, got {line!r}")
    return line


def _session(mode: str, port: int, ctx: ssl.SSLContext) -> None:
    """Connect, (TLS,) greeting, QUIT, +OK, close."""
    sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "pop3s":
            sock = ctx.wrap_socket(sock, server_hostname=HOST)
        buf = bytearray()
        _expect_ok(sock, buf)
        if mode == "stls":
            sock.sendall(b"STLS\r\n")
            _expect_ok(sock, buf)
            sock = ctx.wrap_socket(sock, server_hostname=HOST)
        sock.sendall(b"QUIT\r\n")
        _expect_ok(sock, buf)
    finally:
        sock.close()


def cpu_seconds(pid: int | None = None) -> float:
    """User+system CPU seconds of process *pid* (this one when None); 0 where unknown."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class SetupResult:
    sessions: int = 0
    errors: int = 0
    seconds: float = 0.0
    first_error: str = ""
    server_cpu: float = 0.0  # CPU seconds per wall second (1.0 = one core busy)
    client_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.sessions / self.seconds if self.seconds else 0.0


def setup_rate(
    mode: str, port: int, ctx: ssl.SSLContext, threads: int, seconds: float, server_pid: int
) -> SetupResult:
    result = SetupResult()
    lock = threading.Lock()
    start = threading.Barrier(threads + 1)
    deadline: list[float] = []

    def worker() -> None:
        done = errors = 0
        first = ""
        start.wait(timeout=30)
        end = deadline[0]
        for _ in range(MAX_ITERATIONS):
            if time.monotonic() >= end:
                break
            try:
                _session(mode, port, ctx)
                done += 1
            except (OSError, ssl.SSLError) as exc:
                errors += 1
                first = first or f"{type(exc).__name__}: {exc}"
        with lock:
            result.sessions += done
            result.errors += errors
            result.first_error = result.first_error or first

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    server0, client0 = cpu_seconds(server_pid), cpu_seconds()
    t0 = time.monotonic()
    deadline.append(t0 + seconds)
    start.wait(timeout=30)
    for t in pool:
        t.join(seconds + IO_TIMEOUT + 5)
    result.seconds = time.monotonic() - t0
    result.server_cpu = (cpu_seconds(server_pid) - server0) / result.seconds
    result.client_cpu = (cpu_seconds() - client0) / result.seconds
    return result


def retr_seconds(mode: str, port: int, ctx: ssl.SSLContext) -> tuple[float, int]:
    """(seconds from RETR sent to final '.', octets received) for message 1."""
    sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "pop3s":
            sock = ctx.wrap_socket(sock, server_hostname=HOST)
        buf = bytearray()
        _expect_ok(sock, buf)
        sock.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
        _expect_ok(sock, buf)
        _expect_ok(sock, buf)
        t0 = time.perf_counter()
        sock.sendall(b"RETR 1\r\n")
        _expect_ok(sock, buf)
        received = len(buf)
        tail = bytes(buf[-5:])
        chunk = bytearray(1 << 20)
        view = memoryview(chunk)
        deadline = time.monotonic() + 10 * IO_TIMEOUT
        while not (b"\r\n" + tail).endswith(b"\r\n.\r\n"):
            if time.monotonic() > deadline:
                raise TimeoutError("RETR did not finish")
            n = sock.recv_into(view)
            if not n:
                raise ConnectionError("closed during RETR")
            received += n
            tail = (tail + bytes(view[max(0, n - 5) : n]))[-5:]
        elapsed = time.perf_counter() - t0
        sock.sendall(b"QUIT\r\n")
        with contextlib.suppress(OSError):
            _readline(sock, bytearray())
        return elapsed, received
    finally:
        sock.close()


# ---------------------------------------------------------------- the run


@dataclass
class Row:
    transport: str
    setup: dict[str, SetupResult] = field(default_factory=dict)
    retr: dict[str, float] = field(default_factory=dict)  # MB/s, best of the repeats
    error: str = ""


def bench_transport(
    transport: str, fx: Fixture, args: argparse.Namespace, cpus: tuple[int | None, int | None]
) -> Row:
    row = Row(transport)
    server = ServerProcess(transport, fx, cpus[0])
    try:
        ports = {"plain": server.port, "pop3s": server.pop3s_port, "stls": server.port}
        for mode in ("plain", "pop3s", "stls"):
            row.setup[mode] = setup_rate(
                mode, ports[mode], fx.client_context, args.threads, args.seconds, server.proc.pid
            )
        for mode in ("plain", "pop3s"):
            best = 0.0
            for _ in range(args.repeats):
                seconds, octets = retr_seconds(mode, ports[mode], fx.client_context)
                best = max(best, octets / seconds / 1e6)
            row.retr[mode] = best
    except Exception as exc:  # report and go on with the next transport
        row.error = f"{type(exc).__name__}: {exc}"
    finally:
        server.stop()
    return row


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def print_table(rows: list[Row], args: argparse.Namespace, skipped: dict[str, str]) -> None:
    print()
    print(
        f"set-up: connect+handshake+greeting+QUIT, {args.threads} client threads x "
        f"{args.seconds:g} s; RETR: one {args.size_mb:g} MB message, best of {args.repeats}"
    )
    head = (
        f"{'transport':<10} {'plain/s':>9} {'pop3s/s':>9} {'ratio':>6} {'stls/s':>9} "
        f"{'ratio':>6} | {'RETR plain MB/s':>15} {'RETR pop3s MB/s':>15} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        if row.error and not row.setup:
            print(f"{row.transport:<10} failed: {row.error}")
            continue
        s = {m: r.rate for m, r in row.setup.items()}
        r = row.retr
        print(
            f"{row.transport:<10} {s.get('plain', 0):>9.0f} {s.get('pop3s', 0):>9.0f} "
            f"{ratio(s.get('pop3s', 0), s.get('plain', 0)):>6} {s.get('stls', 0):>9.0f} "
            f"{ratio(s.get('stls', 0), s.get('plain', 0)):>6} | "
            f"{r.get('plain', 0):>15.1f} {r.get('pop3s', 0):>15.1f} "
            f"{ratio(r.get('pop3s', 0), r.get('plain', 0)):>6}"
        )
        cpu = ", ".join(
            f"{m} {res.server_cpu:.2f}/{res.client_cpu:.2f}" for m, res in row.setup.items()
        )
        print(f"  set-up CPU (cores busy, server/clients): {cpu}")
        for mode, res in row.setup.items():
            if res.errors:
                print(f"  {mode}: {res.errors} failed sessions, first: {res.first_error}")
        if row.error:
            print(f"  stopped early: {row.error}")
    for name, why in skipped.items():
        print(f"{name:<10} skipped: {why}")
    print("ratio = TLS figure / plain figure")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--transports", default=",".join(TRANSPORTS))
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--size-mb", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-pin", action="store_true", help="leave both processes unpinned")
    args = p.parse_args(argv)
    sys.path.insert(0, REPO)
    names = [n.strip() for n in args.transports.split(",") if n.strip()]
    skipped = {n: why for n in names if (why := transport_missing(n))}
    cpus_allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cpus: tuple[int | None, int | None] = (None, None)
    if len(cpus_allowed) >= 2 and not args.no_pin:
        cpus = (cpus_allowed[0], cpus_allowed[1])
        os.sched_setaffinity(0, {cpus_allowed[1]})
    fx = make_fixture(int(args.size_mb * 1024 * 1024))
    rows: list[Row] = []
    try:
        for name in names:
            if name in skipped:
                continue
            print(f"{name}: running ...", file=sys.stderr, flush=True)
            rows.append(bench_transport(name, fx, args, cpus))
    finally:
        shutil.rmtree(fx.directory, ignore_errors=True)
    print_table(rows, args, skipped)
    pinned = "unpinned"
    if cpus[0] is not None:
        pinned = f"server on CPU {cpus[0]}, clients on CPU {cpus[1]}"
    print(f"{pinned}; {ssl.OPENSSL_VERSION}; Python {sys.version.split()[0]}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
