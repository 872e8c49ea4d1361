"""Benchmark: PgStore next to MaildirStorage, same messages, blocking transport.

    python bench/pgstore.py [--db CONNINFO] [--clients 16] [--seconds 10] [--big-mb 50]

Builds (or reuses) the benchmark fixture of ``bench/fixture.py`` (one user per
client with 20 messages of 2-50 KB, and a 50 MB message), imports the same
Maildirs and passwd-file into PostgreSQL with ``pgstore.import_maildir``, then
runs each storage behind ``Server(transport="blocking")`` in its own server
process (``python bench/pgstore.py serve ...``) and measures, from separate
client processes:

* sessions/s: each client logs in as its own user (the maildrop lock allows
  one session per user) and runs full sessions: USER, PASS, STAT, LIST,
  UIDL, RETR of all 20 messages, QUIT;
* RETR MB/s of the 50 MB message (wire bytes, 10^6 per MB; best of 3), and
  the server process's peak RSS.

Without ``--db`` a throwaway PostgreSQL cluster is started with
``tests/pgserver.py`` (fsync off, as for the tests).  Secrets are ``{PLAIN}``
so that neither run measures a password hash.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE), str(REPO / "tests")]

import fixture  # noqa: E402

TERMINATOR = b"\r\n.\r\n"


# -- the server process ------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    """Run one Server until SIGTERM; print its port first."""
    from pop3proto.server import Server

    closers: list[Any] = []
    if args.backend == "pg":
        from pop3proto.pgstore import PgAuthenticator, PgStore

        storage: Any = PgStore(args.db, min_size=4, max_size=args.clients + 8,
                               fetch_size=args.fetch_size)  # fmt: skip
        auth: Any = PgAuthenticator(args.db, max_size=8)
        closers += [storage, auth]
    else:
        from pop3proto.maildir import MaildirStorage
        from pop3proto.passwd import PasswdFile

        storage, auth = MaildirStorage(args.mail), PasswdFile(args.passwd)
    server = Server(transport="blocking", host="127.0.0.1", port=0, auth=auth, storage=storage,
                    auth_failure_delay=0, idle_timeout=120)  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.up()
    print(server.cget("port"), flush=True)
    while not stop.wait(0.2):
        pass
    server.destroy("kill", timeout=10)
    for c in closers:
        c.close()
    return 0


class ServerProcess:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "serve", *argv],
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"server {argv[0]} did not start")
        self.port = int(line)

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- the clients -------------------------------------------------------------------------


class Client:
    """A minimal POP3 client: one command at a time, responses read whole."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.line()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        out = bytes(self.buf[:i])
        del self.buf[: i + 2]
        if not out.startswith(b"+OK"):
            raise RuntimeError(out.decode("ascii", "replace"))
        return out

    def command(self, text: str, multi: bool = False) -> int:
        """Send *text*; read the status line and, if *multi*, the body. Octets read."""
        self.sock.sendall(text.encode("ascii") + b"\r\n")
        status = self.line()
        if not multi:
            return len(status)
        self.buf[0:0] = b"\r\n"  # the status line's, so that an empty body ".\r\n" matches
        start = 0
        while (i := self.buf.find(TERMINATOR, start)) < 0:
            start = max(0, len(self.buf) - 4)
            self._fill()
        n = i + len(TERMINATOR)
        del self.buf[:n]
        return n - 2

    def close(self) -> None:
        self.sock.close()


def session(port: int, user: str, messages: int) -> None:
    c = Client(port)
    try:
        c.command(f"USER {user}")
        c.command(f"PASS {fixture.password(user)}")
        c.command("STAT")
        c.command("LIST", multi=True)
        c.command("UIDL", multi=True)
        for i in range(1, messages + 1):
            c.command(f"RETR {i}", multi=True)
        c.command("QUIT")
    finally:
        c.close()


def client_loop(port: int, user: str, start: float, end: float, q: Any) -> None:
    done = 0
    error = ""
    try:
        while time.time() < end:
            session(port, user, 20)
            if start <= time.time() <= end:
                done += 1
    except Exception as e:  # reported, not raised: the parent prints it
        error = f"{user}: {type(e).__name__}: {e}"
    q.put((done, error))


def sessions_per_second(port: int, users: list[str], seconds: float) -> float:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    start = time.time() + 3.0  # after the clients have started and warmed up
    end = start + seconds
    procs = [ctx.Process(target=client_loop, args=(port, u, start, end, q)) for u in users]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    errors = [e for _, e in results if e]
    if errors:
        raise SystemExit("client failed: " + errors[0])
    return sum(n for n, _ in results) / seconds


def retr_big(port: int, user: str) -> tuple[float, int]:
    """(seconds, octets) for one RETR of the big message, after login."""
    c = Client(port)
    try:
        c.command(f"USER {user}")
        c.command(f"PASS {fixture.password(user)}")
        t0 = time.perf_counter()
        octets = c.command("RETR 1", multi=True)
        elapsed = time.perf_counter() - t0
        c.command("QUIT")
    finally:
        c.close()
    return elapsed, octets


# -- the run -----------------------------------------------------------------------------


def measure(argv: list[str], fx: fixture.Fixture, args: argparse.Namespace) -> dict[str, float]:
    server = ServerProcess(argv)
    try:
        users = fx.users[: args.clients]
        for u in users:  # warm both caches (page cache, pop3proto-cache) the same way
            session(server.port, u, 20)
        rate = sessions_per_second(server.port, users, args.seconds)
        rss_sessions = server.peak_rss_mb()
        runs = [retr_big(server.port, fx.big_users[0]) for _ in range(3)]
        best = min(t for t, _ in runs)
        octets = runs[0][1]
        speeds = [octets / t / 1e6 for t, _ in runs]
        return {
            "sessions/s": rate,
            "MB/s best": octets / best / 1e6,
            "MB/s median": statistics.median(speeds),
            "RSS MB after sessions": rss_sessions,
            "RSS MB after RETR": server.peak_rss_mb(),
        }
    finally:
        server.stop()


def load_postgres(db: str, fx: fixture.Fixture, clients: int) -> None:
    import psycopg

    from pop3proto import pgstore

    pgstore.migrate(db)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("TRUNCATE messages, users RESTART IDENTITY")
        pgstore.import_passwd_file(conn, fx.passwd)
        t0 = time.monotonic()
        results = pgstore.import_maildir(conn, fx.mail, fx.users[:clients] + fx.big_users[:1])
        conn.execute("VACUUM ANALYZE messages")
    n = sum(r.imported for r in results)
    print(f"imported {n} messages into PostgreSQL in {time.monotonic() - t0:.1f}s",
          file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="(internal) run one server")
    s.add_argument("backend", choices=["maildir", "pg"])
    s.add_argument("--db")
    s.add_argument("--mail")
    s.add_argument("--passwd")
    s.add_argument("--clients", type=int, default=16)
    s.add_argument("--fetch-size", type=int, default=256 * 1024)
    p.add_argument("--db", help="an existing PostgreSQL database (its pop3proto tables are "
                   "TRUNCATED); default: a throwaway cluster")  # fmt: skip
    p.add_argument("--fixture", default=os.path.join(tempfile.gettempdir(), "pop3proto-bench-pg"),
                   help="where the Maildir fixture is built or reused")  # fmt: skip
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--big-mb", type=int, default=50)
    p.add_argument("--fetch-size", type=int, default=256 * 1024,
                   help="PgStore's fetch_size (bytes per query when streaming)")  # fmt: skip
    args = p.parse_args(argv)
    if args.command == "serve":
        return serve(args)

    fx = fixture.ensure(args.fixture, users=max(args.clients, 1), idle_users=0,
                        big_mb=args.big_mb, many=0)  # fmt: skip
    cluster = None
    db = args.db
    if db is None:
        import pgserver

        cluster = pgserver.PgCluster.start()
        db = cluster.createdb("bench")
    try:
        load_postgres(db, fx, args.clients)
        results = {
            "MaildirStorage": measure(["maildir", "--mail", fx.mail, "--passwd", fx.passwd],
                                      fx, args),
            "PgStore": measure(["pg", "--db", db, "--clients", str(args.clients),
                                "--fetch-size", str(args.fetch_size)], fx, args),
        }  # fmt: skip
    finally:
        if cluster is not None:
            cluster.stop()
    print(f"{args.clients} clients, sessions of 20 messages (2-50 KB), {args.seconds:g}s; "
          f"RETR of a {fx.big_size / 1e6:.0f} MB message (best of 3); {os.cpu_count()} CPUs; "
          f"PgStore fetch_size {args.fetch_size}")  # fmt: skip
    keys = list(next(iter(results.values())))
    print(f"{'':24}" + "".join(f"{name:>16}" for name in results))
    for key in keys:
        print(f"{key:24}" + "".join(f"{r[key]:16.1f}" for r in results.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
