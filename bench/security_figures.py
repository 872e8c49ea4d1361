"""Figures for the security review's round two (issue 15): NOOP latency under a flood, guesses/min.

* ``flood``: a logged-in victim's NOOP latency (median, p90, max) while 20
  clients send 6 KB passwords to a passwd-file of SHA512-CRYPT users in a
  loop (no failed-login delay, so only the server's own work slows them),
  with the same figures without the flood for comparison, per transport.
* ``guesses``: passwords checked per minute from one address by 1, 10 and
  100 parallel guessers under the default penalties (2 s doubling to 15 s),
  counted from the server's ``login_failed`` events over a window.

Usage: ``python bench/security_figures.py [flood|guesses|all] [--window S]
[--kinds blocking,selectors,anyio-asyncio,anyio-trio]``.  Servers listen on
127.0.0.1, port 0, in this process, and are destroyed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pop3proto.maildir import MaildirStorage
from pop3proto.passwd import PasswdFile, hash_password
from pop3proto.server import Server

HOST = "127.0.0.1"
USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
KINDS = ("blocking", "selectors", "anyio-asyncio", "anyio-trio")


@contextlib.contextmanager
def serving(kind: str, **options: Any) -> Iterator[Server]:
    transport, _, backend = kind.partition("-")
    if backend:
        os.environ["POP3PROTO_ANYIO_BACKEND"] = backend
    server = Server(host=HOST, port=0, transport=transport, **options)
    server.up()
    try:
        yield server
    finally:
        server.destroy("kill", timeout=15)


def mail(base: Path) -> dict[str, Any]:
    """auth/storage options for a SHA512-CRYPT passwd-file and a 5-message Maildir per user."""
    base.mkdir(parents=True)
    passwd = base / "users"
    passwd.write_text("".join(f"{u}:{hash_password(p, 'SHA512-CRYPT')}::::::\n"
                              for u, p in USERS.items()), encoding="utf-8")
    storage = MaildirStorage(base / "mail")
    for user in USERS:
        for n in range(5):
            storage.deliver(user, f"Subject: {n}\n\nmessage {n}\n".encode())
    return {"auth": PasswdFile(passwd), "storage": storage}


class Client:
    """A tiny line client."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.buf = b""
        self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, _, self.buf = self.buf.partition(b"\r\n")
        return out

    def cmd(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def close(self) -> None:
        self.sock.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def noop_latencies(port: int, count: int) -> list[float]:
    victim = Client(port)
    assert victim.cmd("USER bob") == b"+OK"
    assert victim.cmd(f"PASS {USERS['bob']}").startswith(b"+OK")
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        assert victim.cmd("NOOP") == b"+OK"
        out.append(time.perf_counter() - t0)
        time.sleep(0.01)
    victim.cmd("QUIT")
    victim.close()
    return out


def flood(kind: str, base: Path, flooders: int = 20, count: int = 200) -> None:
    options = {**mail(base), "auth_failure_delay": 0, "max_line_length": 8192,
               "max_connections_per_address": 0}
    password = "x" * 6000
    with serving(kind, **options) as server:
        port = server.cget("port")
        quiet = noop_latencies(port, count)
        stop = threading.Event()
        answered = [0]

        def attacker() -> None:
            while not stop.is_set():
                try:
                    c = Client(port)
                    while not stop.is_set():
                        c.cmd("USER alice")
                        c.cmd(f"PASS {password}")
                        answered[0] += 1
                except (OSError, EOFError):
                    continue

        threads = [threading.Thread(target=attacker, daemon=True) for _ in range(flooders)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        t0, before = time.monotonic(), answered[0]
        loud = noop_latencies(port, count)
        rate = (answered[0] - before) / (time.monotonic() - t0)
        stop.set()
        for t in threads:
            t.join(10)

    def ms(v: list[float]) -> str:
        return (f"median {statistics.median(v) * 1000:7.2f} ms  p90 {pct(v, 0.9) * 1000:7.2f} ms"
                f"  max {max(v) * 1000:7.2f} ms")

    print(f"{kind:14s} quiet: {ms(quiet)}")
    print(f"{kind:14s} flood: {ms(loud)}  ({rate:.0f} long-password attempts/s answered)")


class Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "pop3", None)
        if isinstance(fields, dict) and fields.get("event") == "login_failed":
            self.count += 1


def guesses(kind: str, base: Path, parallel: int, window: float) -> float:
    options = {**mail(base), "max_connections_per_address": 0}
    logger = logging.getLogger("pop3proto")
    handler = Failures()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    stop = time.monotonic() + window

    def guesser(port: int) -> None:
        n = 0
        while time.monotonic() < stop:
            try:
                c = Client(port, timeout=max(0.1, stop - time.monotonic()))
                while time.monotonic() < stop:
                    c.sock.settimeout(max(0.1, stop - time.monotonic()))
                    c.cmd("USER alice")
                    n += 1
                    c.cmd(f"PASS guess-{n}")
            except (OSError, EOFError):
                continue

    try:
        with serving(kind, **options) as server:
            threads = [threading.Thread(target=guesser, args=(server.cget("port"),),
                                        daemon=True) for _ in range(parallel)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(window + 30)
            checked = handler.count
    finally:
        logger.removeHandler(handler)
    return checked * 60.0 / window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=["flood", "guesses", "all"])
    parser.add_argument("--window", type=float, default=60.0, help="seconds per guess run")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--guess-kind", default="blocking")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n = 0
        if args.what in ("flood", "all"):
            print("Victim NOOP latency, 20 clients sending 6 KB passwords (SHA512-CRYPT users):")
            for kind in args.kinds.split(","):
                n += 1
                flood(kind, Path(tmp) / str(n))
        if args.what in ("guesses", "all"):
            print(f"Passwords checked per minute from one address ({args.guess_kind}, "
                  f"delays 2 s doubling to 15 s, {args.window:.0f} s window):")
            for parallel in (1, 10, 100):
                n += 1
                rate = guesses(args.guess_kind, Path(tmp) / str(n), parallel, args.window)
                print(f"  {parallel:3d} parallel guessers: {rate:6.1f} guesses/min")


if __name__ == "__main__":
    main()
