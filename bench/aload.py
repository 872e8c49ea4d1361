"""The uvloop load generator for the sessions, pipelined and retr-large workloads.

This replaces the forked blocking-socket clients of ``load.py`` for the throughput
workloads (``python bench/run.py --load blocking`` still runs those, for comparison).
One process, pinned to the load CPU by ``run.py``, runs every connection on a uvloop
event loop with a small ``asyncio.Protocol`` (replies found with ``bytes.find`` on a
``bytearray``, a 50 MB RETR only counted), so the client side costs little CPU per
command and the server, not the generator, is what saturates.  Each result carries
``load cpu`` (the generator's share of its CPU over the window): near 1.0 means the
generator may have been the limit, and ``run.py`` says so.

uvloop is a benchmark requirement (``pip install uvloop``); ``require_uvloop()`` says
so clearly when it is missing.  Every wait is bounded: each workload runs under one
``asyncio.timeout`` and each loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import ssl
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import fixture as fixture_mod
from load import HOST, CpuWatch, Pop3Error, client_tls_context, percentile, unstuffed_size

__all__ = ["WORKLOADS", "require_uvloop"]

UVLOOP_HINT = "the benchmarks need uvloop for their load generator: pip install uvloop"


def require_uvloop() -> Any:
    """The ``uvloop`` module, or SystemExit with the install command."""
    try:
        import uvloop
    except ImportError:
        raise SystemExit(UVLOOP_HINT) from None
    return uvloop


def _run(coro_fn: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    uvloop = require_uvloop()
    return uvloop.run(coro_fn())  # type: ignore[no-any-return]


class _Conn(asyncio.Protocol):
    """One POP3 connection: waits for a line, a multi-line body, N lines, or a drained body."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.check: Callable[[], bool] | None = None
        self.error: BaseException | None = None
        # drain mode (a 50 MB body only counted)
        self.draining = False
        self.octets = 0
        self.tail = b""
        # count mode (pipelined: N single-line replies)
        self.lines_wanted = 0
        self.lines = 0
        self.chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.draining:
            self.octets += len(data)
            self.tail = (self.tail + data[-5:])[-5:]
            if self.tail == b"\r\n.\r\n":
                self.draining = False
                self._wake()
            return
        if self.lines_wanted:
            self.chunks.append(data)
            self.lines += data.count(b"\n")
            if self.lines >= self.lines_wanted:
                self.lines_wanted = 0
                self._wake()
            return
        self.buf += data
        if self.check is not None and self.check():
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc or ConnectionError("server closed the connection")
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(self.error)

    def _wake(self) -> None:
        self.check = None
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self, check: Callable[[], bool]) -> None:
        if check():
            return
        if self.error is not None:
            raise self.error
        self.waiter = asyncio.get_running_loop().create_future()
        self.check = check
        try:
            await self.waiter
        finally:
            self.waiter = None
            self.check = None

    async def line(self) -> bytes:
        """The next reply line, without CRLF."""
        buf = self.buf
        await self._wait(lambda: buf.find(b"\r\n") >= 0)
        i = buf.find(b"\r\n")
        out = bytes(buf[:i])
        del buf[: i + 2]
        return out

    async def ok(self, command: bytes) -> bytes:
        assert self.transport is not None
        self.transport.write(command)
        line = await self.line()
        if not line.startswith(b"+OK"):
            raise Pop3Error(f"{command.strip()!r}: {line!r}")
        return line

    async def multi(self, command: bytes, keep: bool = False) -> bytes:
        """A multi-line command: its body with the terminator (only when *keep*)."""
        await self.ok(command)
        buf = self.buf

        def done() -> bool:
            return buf.startswith(b".\r\n") or buf.find(b"\r\n.\r\n") >= 0

        await self._wait(done)
        end = 3 if buf.startswith(b".\r\n") else buf.find(b"\r\n.\r\n") + 5
        body = bytes(buf[:end]) if keep else b""
        del buf[:end]
        return body

    async def drain(self, command: bytes) -> int:
        """A multi-line command whose reply is only counted: its octets (status line included)."""
        assert self.transport is not None
        assert not self.buf
        self.octets, self.tail, self.draining = 0, b"", True
        self.transport.write(command)
        await self._wait(lambda: not self.draining)
        return self.octets

    async def replies(self, batch: bytes, count: int) -> bytes:
        """Write *batch* in one write and collect *count* single-line replies."""
        assert self.transport is not None
        assert not self.buf
        self.chunks, self.lines, self.lines_wanted = [], 0, count
        self.transport.write(batch)
        await self._wait(lambda: self.lines_wanted == 0)
        return b"".join(self.chunks)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(port: int, tls: ssl.SSLContext | None = None) -> _Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        _Conn, HOST, port, ssl=tls, server_hostname="localhost" if tls else None
    )
    return conn


async def login(c: _Conn, user: str, password: str) -> None:
    greeting = await c.line()
    if not greeting.startswith(b"+OK"):
        raise Pop3Error(f"greeting {greeting!r}")
    await c.ok(b"USER %s\r\n" % user.encode())
    await c.ok(b"PASS %s\r\n" % password.encode())


async def one_session(
    port: int, user: str, password: str, verify: bool = False, tls: ssl.SSLContext | None = None
) -> int:
    """connect, USER/PASS, STAT, LIST, UIDL, RETR every message, QUIT; messages read."""
    c = await connect(port, tls)
    try:
        await login(c, user, password)
        count = int((await c.ok(b"STAT\r\n")).split()[1])
        listing = await c.multi(b"LIST\r\n", keep=verify)
        uidls = await c.multi(b"UIDL\r\n", keep=verify)
        sizes = [int(x.split()[1]) for x in listing.split(b"\r\n")[:-2]] if verify else []
        for n in range(1, count + 1):
            body = await c.multi(b"RETR %d\r\n" % n, keep=verify)
            if verify and unstuffed_size(body) != sizes[n - 1]:
                raise Pop3Error(f"RETR {n} of {user}: {unstuffed_size(body)} octets, LIST said "
                                f"{sizes[n - 1]}")
        if verify and (len(sizes) != count or uidls.count(b"\r\n") != count + 1):
            raise Pop3Error(f"{user}: LIST/UIDL do not list {count} messages")
        await c.ok(b"QUIT\r\n")
        return count
    finally:
        c.close()


# ---------------------------------------------------------------- sessions


def run_sessions(
    target: Any,
    fx: Any,
    *,
    clients: int = 16,
    duration: float = 10.0,
    max_sessions: int = 200_000,
    tls: bool = False,
) -> dict[str, Any]:
    """*clients* concurrent connections loop: login, STAT, LIST, UIDL, RETR all 20, QUIT."""
    users = fx.users
    port = target.pop3s_port if tls else target.port
    ctx = client_tls_context() if tls else None
    per = [
        [u for j, u in enumerate(users) if j % clients == i] or [users[i % len(users)]]
        for i in range(clients)
    ]

    async def main() -> dict[str, Any]:
        async with asyncio.timeout(duration + 180):
            await one_session(port, users[0], fx.password(users[0]), verify=True, tls=ctx)

            async def warm(mine: list[str]) -> None:  # untimed: auth cache, indexes, page cache
                for user in mine:
                    await one_session(port, user, fx.password(user), tls=ctx)

            await asyncio.gather(*(warm(p) for p in per))
            lat: list[float] = []
            errors: list[str] = []
            ends: list[float] = []
            watch = CpuWatch(target.pid)
            watch.start()
            cpu0 = time.process_time()
            t0 = time.monotonic()
            deadline = t0 + duration
            perf = time.perf_counter

            async def client(mine: list[str]) -> None:
                i = 0
                end = t0
                while i < max_sessions and time.monotonic() < deadline and len(errors) < 20:
                    user = mine[i % len(mine)]
                    s0 = perf()
                    try:
                        await one_session(port, user, fixture_mod.password(user), tls=ctx)
                    except (OSError, Pop3Error, ValueError, IndexError) as exc:
                        errors.append(repr(exc))
                    else:
                        lat.append(perf() - s0)
                    i += 1
                    end = time.monotonic()
                ends.append(end)

            await asyncio.gather(*(client(p) for p in per))
            wall = max(max(ends, default=t0) - t0, 1e-9)
            gen_cpu = time.process_time() - cpu0
            srv_cpu, _ = watch.stop()
        return {
            "sessions/s": len(lat) / wall,
            "p50 ms": percentile(lat, 50) * 1000,
            "p99 ms": percentile(lat, 99) * 1000,
            "sessions": len(lat),
            "errors": len(errors),
            "error sample": errors[:3],
            "server cpu": srv_cpu / wall,
            "load cpu": gen_cpu / wall,
            "wall s": wall,
        }

    return _run(main)


def run_sessions_tls(target: Any, fx: Any, **params: Any) -> dict[str, Any]:
    """``sessions`` over implicit TLS (a full handshake per session)."""
    return run_sessions(target, fx, tls=True, **params)


# ---------------------------------------------------------------- pipelined


def pipeline_batch(commands: int, messages: int) -> bytes:
    """*commands* single-line commands in turn NOOP, STAT, LIST n (n cycling over the messages)."""
    out = []
    for i in range(commands):
        k = i % 3
        if k == 0:
            out.append(b"NOOP\r\n")
        elif k == 1:
            out.append(b"STAT\r\n")
        else:
            out.append(b"LIST %d\r\n" % ((i // 3) % messages + 1))
    return b"".join(out)


def run_pipelined(
    target: Any, fx: Any, *, commands: int = 10_000, rounds: int = 20, max_time: float = 60.0
) -> dict[str, Any]:
    """One connection writes *commands* commands in one write and reads the replies, *rounds* times.

    commands/s is the median round's rate; the server's CPU is over all rounds.
    """
    user = fx.users[0]

    async def main() -> dict[str, Any]:
        async with asyncio.timeout(max_time + 60):
            c = await connect(target.port)
            try:
                await login(c, user, fx.password(user))
                count = int((await c.ok(b"STAT\r\n")).split()[1])
                batch = pipeline_batch(commands, max(count, 1))
                times: list[float] = []
                bad = 0
                watch = CpuWatch(target.pid)
                watch.start()
                cpu0 = time.process_time()
                t_begin = time.monotonic()
                deadline = t_begin + max_time
                for _ in range(rounds):
                    if time.monotonic() > deadline:
                        break
                    t0 = time.perf_counter()
                    reply = await c.replies(batch, commands)
                    times.append(time.perf_counter() - t0)
                    bad += commands - reply.count(b"+OK")
                srv_cpu, _ = watch.stop()
                wall = time.monotonic() - t_begin
                gen_cpu = time.process_time() - cpu0
                await c.ok(b"QUIT\r\n")
            finally:
                c.close()
        med = statistics.median(times) if times else float("nan")
        return {
            "commands/s": commands / med,
            "round ms": med * 1000,
            "rounds": len(times),
            "commands": commands,
            "errors": bad,
            "server cpu": srv_cpu / max(wall, 1e-9),
            "server cpu s": srv_cpu,
            "load cpu": gen_cpu / max(wall, 1e-9),
        }

    return _run(main)


# ---------------------------------------------------------------- retr-large


def run_retr_large(
    target: Any,
    fx: Any,
    *,
    repeats: int = 5,
    parallel: int = 8,
    parallel_repeats: int = 2,
    max_time: float = 60.0,
) -> dict[str, Any]:
    """RETR of the 50 MB message: one client *repeats* times, then *parallel* clients at once."""

    async def main() -> dict[str, Any]:
        async with asyncio.timeout(2 * max_time + 120):
            user = fx.big_users[0]
            c = await connect(target.port)
            rates: list[float] = []
            errors = 0
            total = 0
            watch = CpuWatch(target.pid)
            try:
                await login(c, user, fx.password(user))
                size = int((await c.ok(b"LIST 1\r\n")).split()[2])
                watch.start()
                cpu0 = time.process_time()
                t_begin = time.monotonic()
                for _ in range(repeats):
                    if time.monotonic() - t_begin > max_time:
                        break
                    t0 = time.perf_counter()
                    octets = await c.drain(b"RETR 1\r\n")
                    rates.append(octets / (time.perf_counter() - t0) / 1e6)
                    errors += octets < size
                    total += octets
                single_cpu, single_share = watch.stop()
                single_load = (time.process_time() - cpu0) / max(time.monotonic() - t_begin, 1e-9)
                await c.ok(b"QUIT\r\n")
            finally:
                c.close()

            users = fx.big_users[:parallel]
            conns = [await connect(target.port) for _ in users]
            try:
                for conn, u in zip(conns, users, strict=True):
                    await login(conn, u, fx.password(u))
                octets_par = [0] * len(conns)

                async def fetch(k: int) -> None:
                    t_end = time.monotonic() + max_time
                    for _ in range(parallel_repeats):
                        if time.monotonic() > t_end:
                            break
                        octets_par[k] += await conns[k].drain(b"RETR 1\r\n")

                watch.start()
                cpu0 = time.process_time()
                t0 = time.monotonic()
                results = await asyncio.gather(
                    *(fetch(k) for k in range(len(conns))), return_exceptions=True
                )
                wall = max(time.monotonic() - t0, 1e-9)
                _, par_share = watch.stop()
                par_load = (time.process_time() - cpu0) / wall
                par_errors = [repr(r) for r in results if isinstance(r, BaseException)]
                for conn in conns:
                    if conn.error is None:
                        await conn.ok(b"QUIT\r\n")
            finally:
                for conn in conns:
                    conn.close()
        return {
            "MB/s 1 client": statistics.median(rates) if rates else float("nan"),
            f"MB/s {parallel} clients": sum(octets_par) / wall / 1e6,
            "errors": errors + len(par_errors),
            "error sample": par_errors[:3],
            "server cpu 1 client": single_share,
            "server cpu s": single_cpu,
            "octets": total,
            f"server cpu {parallel} clients": par_share,
            "load cpu": max(single_load, par_load),
        }

    return _run(main)


WORKLOADS: dict[str, Callable[..., dict[str, Any]]] = {
    "sessions": run_sessions,
    "sessions-tls": run_sessions_tls,
    "pipelined": run_pipelined,
    "retr-large": run_retr_large,
}
