"""Reply latency for a client that writes a command and its CRLF in two sends, Nagle on.

    python bench/splitwrite.py                       # blocking, selectors, anyio, dovecot
    python bench/splitwrite.py --servers anyio,dovecot --count 50

Tcllib's ``pop3`` client writes ``NOOP`` and then ``\\r\\n``.  With Nagle's algorithm on
in the client (``TCP_NODELAY`` off, the default) the second send waits for the ACK of
the first; a server that delays its ACK because it only holds part of a line answers
one delayed-ACK timeout later (about 40 ms on Linux).  A server that sets
``TCP_QUICKACK`` when a read ends inside a line answers at once.

For each server (started with a TLS certificate, pinned to the first CPU like
``run.py`` does, this client on the second) a logged-in session sends ``NOOP`` as
two sends *count* times, over plain POP3 and over implicit TLS (each TLS ``send`` is
its own record), and the median and p90 of the time from the first send to the
reply line are printed.  ``run.py --workloads splitwrite`` runs the same
measurement as part of the table.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
import time
from typing import Any

import fixture
from load import HOST, Pop3Error, client_tls_context, percentile, raise_nofile

__all__ = ["run_splitwrite", "split_latencies"]


def _line(sock: socket.socket, buf: bytearray) -> bytes:
    while True:
        i = buf.find(b"\r\n")
        if i >= 0:
            line = bytes(buf[:i])
            del buf[: i + 2]
            return line
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("server closed the connection")
        buf += data


def split_latencies(
    port: int,
    user: str,
    password: str,
    *,
    count: int = 20,
    tls: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> list[float]:
    """Seconds from ``send(b"NOOP")`` to the reply line, *count* times, Nagle on."""
    raw = socket.create_connection((HOST, port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    sock: socket.socket = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
    buf = bytearray()
    out: list[float] = []
    try:
        for command in (None, b"USER %s" % user.encode(), b"PASS %s" % password.encode()):
            if command is not None:
                sock.sendall(command + b"\r\n")
            line = _line(sock, buf)
            if not line.startswith(b"+OK"):
                raise Pop3Error(f"{command!r}: {line!r}")
        perf = time.perf_counter
        for _ in range(count):
            t0 = perf()
            sock.sendall(b"NOOP")
            sock.sendall(b"\r\n")
            line = _line(sock, buf)
            out.append(perf() - t0)
            if not line.startswith(b"+OK"):
                raise Pop3Error(f"NOOP: {line!r}")
        sock.sendall(b"QUIT\r\n")
        _line(sock, buf)
    finally:
        sock.close()
    return out


def run_splitwrite(target: Any, fx: Any, *, count: int = 20) -> dict[str, Any]:
    """Split-write NOOP latency over plain POP3 and, when the server has it, implicit TLS."""
    user = fx.users[1]
    out: dict[str, Any] = {}
    modes: list[tuple[str, int | None, ssl.SSLContext | None]] = [("", target.port, None)]
    modes.append((" TLS", getattr(target, "pop3s_port", None), client_tls_context()))
    for label, port, ctx in modes:
        if port is None:
            continue
        lat = split_latencies(port, user, fx.password(user), count=count, tls=ctx)
        out[f"split NOOP{label} p50 ms"] = percentile(lat, 50) * 1000
        out[f"split NOOP{label} p90 ms"] = percentile(lat, 90) * 1000
        out[f"split NOOP{label} max ms"] = max(lat) * 1000
    return out


def main(argv: list[str] | None = None) -> int:
    import servers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="blocking,selectors,anyio,dovecot")
    p.add_argument("--count", type=int, default=20, help="NOOPs per session")
    p.add_argument("--fixture", default="/tmp/pop3proto-bench-fixture")
    p.add_argument("--no-pin", action="store_true")
    args = p.parse_args(argv)
    names, skipped = servers.available([s.strip() for s in args.servers.split(",") if s.strip()])
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    allowed = sorted(os.sched_getaffinity(0))
    server_cpus = None
    if not args.no_pin and len(allowed) >= 2:
        server_cpus = {allowed[0]}
        os.sched_setaffinity(0, {allowed[1]})
    raise_nofile()
    fx = fixture.ensure(args.fixture)
    cert = servers.make_tls_cert(fx.path)
    print(f"# load average {os.getloadavg()[0]:.2f}; {args.count} split NOOPs per session")
    print("| server | plain p50 ms | plain p90 ms | TLS p50 ms | TLS p90 ms |")
    print("|---|---|---|---|---|")
    failed = 0
    for name in names:
        srv = servers.make_server(name, fx, cpus=server_cpus, tls=cert, log_level="WARNING")
        try:
            srv.start()
            r = run_splitwrite(srv, fx, count=args.count)
        except Exception as exc:  # report and go on with the next server
            print(f"| {name} | {exc!r} | | | |")
            failed += 1
            continue
        finally:
            srv.stop()
            srv.cleanup()
        cells = [
            f"{r[k]:.2f}"
            for k in (
                "split NOOP p50 ms",
                "split NOOP p90 ms",
                "split NOOP TLS p50 ms",
                "split NOOP TLS p90 ms",
            )
        ]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
