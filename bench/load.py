"""The load generator: a small raw-socket POP3 client and the five workloads.

Each workload is ``run_<name>(target, fixture, **params) -> dict`` where
``target`` has ``port`` and ``pid`` (the server's main PID, for /proc).  The
result holds the headline figures plus what the server and the generator
spent in CPU, so a run shows whether the generator could have been the
bottleneck (its CPU share near 100% while the server's is not).

The client is written for speed, not generality: blocking sockets with
TCP_NODELAY, responses found with ``bytes.find`` on a ``bytearray`` (never
line by line), a 50 MB RETR streamed through ``recv_into`` with only its last
five bytes inspected.  Parallel clients are forked processes (pinned like the
parent), started together at a barrier; the 10,000 idle connections are
opened from one process by a non-blocking ``selectors`` state machine.

Every loop is bounded both in count and in time.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing as mp
import os
import resource
import selectors
import socket
import ssl
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import fixture as fixture_mod
import procstat

__all__ = ["WORKLOADS", "Client", "Pop3Error", "raise_nofile"]

HOST = "127.0.0.1"
_MP = mp.get_context("fork")


class Pop3Error(Exception):
    """A -ERR (or anything but +OK) where +OK was expected."""


# ---------------------------------------------------------------- the client


class Client:
    """One POP3 connection, blocking, with just what the workloads need."""

    __slots__ = ("buf", "sock")

    def __init__(self, port: int, timeout: float = 30.0, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((HOST, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def line(self) -> bytes:
        """The next response line, without CRLF."""
        buf = self.buf
        start = 0
        while True:
            i = buf.find(b"\r\n", start)
            if i >= 0:
                line = bytes(buf[:i])
                del buf[: i + 2]
                return line
            start = max(0, len(buf) - 1)
            self._fill()

    def ok(self, command: bytes) -> bytes:
        """Send *command* (with CRLF) and return its +OK line."""
        self.sock.sendall(command)
        line = self.line()
        if not line.startswith(b"+OK"):
            raise Pop3Error(f"{command.strip()!r}: {line!r}")
        return line

    def rest(self, keep: bool = False) -> tuple[int, bytes]:
        """Read a multi-line body after its status line: (octets incl. terminator, body)."""
        buf = self.buf
        start = 0
        while True:
            if start == 0 and buf[:3] == b".\r\n":
                end = 3
                break
            i = buf.find(b"\r\n.\r\n", start)
            if i >= 0:
                end = i + 5
                break
            start = max(0, len(buf) - 4)
            self._fill()
        body = bytes(buf[:end]) if keep else b""
        del buf[:end]
        return end, body

    def multi(self, command: bytes, keep: bool = False) -> tuple[int, bytes]:
        self.ok(command)
        return self.rest(keep)

    def drain(self, command: bytes, chunk: int = 1 << 20) -> int:
        """A multi-line command whose body is only counted (for a 50 MB RETR): its octets."""
        self.ok(command)
        total = len(self.buf)
        tail = bytes(self.buf[-5:])
        self.buf.clear()
        if (total >= 3 and tail.endswith(b"\r\n.\r\n")) or (total == 3 and tail == b".\r\n"):
            return total
        view = memoryview(bytearray(chunk))
        recv_into = self.sock.recv_into
        while True:
            n = recv_into(view)
            if not n:
                raise ConnectionError("server closed the connection mid-message")
            total += n
            tail = (tail + bytes(view[max(0, n - 5) : n]))[-5:]
            if tail == b"\r\n.\r\n" or (total == 3 and tail == b".\r\n"):
                return total

    def login(self, user: str, password: str) -> None:
        greeting = self.line()
        if not greeting.startswith(b"+OK"):
            raise Pop3Error(f"greeting {greeting!r}")
        self.ok(b"USER %s\r\n" % user.encode())
        self.ok(b"PASS %s\r\n" % password.encode())


def unstuffed_size(body: bytes) -> int:
    """The POP3 size of a multi-line body (terminator and dot-stuffing removed)."""
    data = body[:-3]  # the ".\r\n" of the terminator (its CRLF ends the last line)
    return len(data) - data.count(b"\r\n..") - (1 if data.startswith(b"..") else 0)


def client_tls_context() -> ssl.SSLContext:
    """TLS for the benchmark client: the servers' certificate is self-signed, so no checks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def one_session(
    port: int, user: str, password: str, verify: bool = False, tls: ssl.SSLContext | None = None
) -> int:
    """connect, USER/PASS, STAT, LIST, UIDL, RETR every message, QUIT; messages read."""
    c = Client(port, tls=tls)
    try:
        c.login(user, password)
        count = int(c.ok(b"STAT\r\n").split()[1])
        _, listing = c.multi(b"LIST\r\n", keep=verify)
        _, uidls = c.multi(b"UIDL\r\n", keep=verify)
        sizes = [int(x.split()[1]) for x in listing.split(b"\r\n")[:-2]] if verify else []
        for n in range(1, count + 1):
            _, body = c.multi(b"RETR %d\r\n" % n, keep=verify)
            if verify and unstuffed_size(body) != sizes[n - 1]:
                raise Pop3Error(
                    f"RETR {n} of {user}: {unstuffed_size(body)} octets, LIST said {sizes[n - 1]}"
                )
        if verify and (len(sizes) != count or uidls.count(b"\r\n") != count + 1):
            raise Pop3Error(f"{user}: LIST/UIDL do not list {count} messages")
        c.ok(b"QUIT\r\n")
        return count
    finally:
        c.close()


# ---------------------------------------------------------------- helpers


def raise_nofile(want: int | None = None) -> int:
    """Raise this process's soft RLIMIT_NOFILE toward *want* (default: the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None or hard == resource.RLIM_INFINITY else min(want, hard)
    if target != resource.RLIM_INFINITY and target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of *values*."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


class CpuWatch:
    """Server tree CPU over a window: ``start()``, ``stop()`` -> (seconds, share of wall)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.c0 = self.t0 = 0.0

    def start(self) -> None:
        self.c0, self.t0 = procstat.cpu_seconds(self.pid), time.monotonic()

    def stop(self) -> tuple[float, float]:
        cpu = procstat.cpu_seconds(self.pid) - self.c0
        wall = time.monotonic() - self.t0
        return cpu, cpu / wall if wall > 0 else 0.0


def _run_workers(
    target: Callable[..., None],
    args_list: list[tuple[Any, ...]],
    timeout: float,
    on_start: Callable[[], None] | None = None,
) -> tuple[float, list[Any]]:
    """Fork one process per args tuple; release them together; (start time, their results).

    Each worker is called as ``target(barrier, queue, *args)``, waits on the
    barrier when ready, and puts one result on the queue.
    """
    barrier = _MP.Barrier(len(args_list) + 1)
    queue = _MP.Queue()
    procs = [_MP.Process(target=target, args=(barrier, queue, *a), daemon=True) for a in args_list]
    for p in procs:
        p.start()
    results: list[Any] = []
    t_start = float("nan")
    try:
        barrier.wait(timeout=120)
        t_start = time.monotonic()
        if on_start is not None:
            on_start()
        deadline = t_start + timeout
        while len(results) < len(procs):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                results.append(queue.get(timeout=min(left, 1.0)))
            except Exception:  # queue.Empty
                if not any(p.is_alive() for p in procs) and queue.empty():
                    break
    except threading.BrokenBarrierError:
        pass
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return t_start, results


# ---------------------------------------------------------------- sessions


def _sessions_worker(
    barrier: Any,
    queue: Any,
    port: int,
    users: list[str],
    duration: float,
    max_sessions: int,
    tls: bool = False,
) -> None:
    ctx = client_tls_context() if tls else None
    errors: list[str] = []
    lat: list[float] = []
    end = 0.0
    try:
        for user in users:  # warm-up, untimed: auth cache, indexes, page cache
            one_session(port, user, fixture_mod.password(user), tls=ctx)
    except Exception as exc:
        errors.append(f"warm-up: {exc!r}")
    barrier.wait(timeout=120)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    deadline = t0 + duration
    i = 0
    perf = time.perf_counter
    while i < max_sessions and time.monotonic() < deadline and len(errors) < 20:
        user = users[i % len(users)]
        s0 = perf()
        try:
            one_session(port, user, fixture_mod.password(user), tls=ctx)
        except Exception as exc:
            errors.append(repr(exc))
        else:
            lat.append(perf() - s0)
        i += 1
        end = time.monotonic()
    queue.put({"lat": lat, "errors": errors, "end": end, "cpu": time.process_time() - cpu0})


def run_sessions(
    target: Any,
    fx: Any,
    *,
    clients: int = 16,
    duration: float = 10.0,
    max_sessions: int = 200_000,
    tls: bool = False,
) -> dict[str, Any]:
    """16 clients loop: connect, USER/PASS, STAT, LIST, UIDL, RETR all 20, QUIT.

    With *tls*, over implicit TLS to ``target.pop3s_port`` (a full handshake per session).
    """
    users = fx.users
    port = target.pop3s_port if tls else target.port
    ctx = client_tls_context() if tls else None
    one_session(port, users[0], fx.password(users[0]), verify=True, tls=ctx)
    per = [
        [u for j, u in enumerate(users) if j % clients == i] or [users[i % len(users)]]
        for i in range(clients)
    ]
    watch = CpuWatch(target.pid)
    t_start, results = _run_workers(
        _sessions_worker,
        [(port, per[i], duration, max_sessions, tls) for i in range(clients)],
        timeout=duration + 120,
        on_start=watch.start,
    )
    _, srv_share = watch.stop()
    lat = [x for r in results for x in r["lat"]]
    errors = [e for r in results for e in r["errors"]]
    end = max((r["end"] for r in results), default=t_start)
    wall = max(end - t_start, 1e-9)
    gen_cpu = sum(r["cpu"] for r in results)
    return {
        "sessions/s": len(lat) / wall,
        "p50 ms": percentile(lat, 50) * 1000,
        "p99 ms": percentile(lat, 99) * 1000,
        "sessions": len(lat),
        "errors": len(errors) + (clients - len(results)),
        "error sample": errors[:3],
        "server cpu": srv_share,
        "load cpu": gen_cpu / wall,
        "wall s": wall,
    }


# ---------------------------------------------------------------- pipelined

_PIPE_CMDS = (b"NOOP\r\n", b"STAT\r\n", b"LIST 1\r\n", b"UIDL 1\r\n")


def run_pipelined(
    target: Any, fx: Any, *, commands: int = 10_000, rounds: int = 5, max_time: float = 60.0
) -> dict[str, Any]:
    """One connection; *commands* single-line commands in one write, *rounds* times."""
    user = fx.users[0]
    c = Client(target.port, timeout=60)
    c.login(user, fx.password(user))
    c.ok(b"STAT\r\n")
    batch = b"".join(_PIPE_CMDS[i % len(_PIPE_CMDS)] for i in range(commands))
    times: list[float] = []
    bad = 0
    watch = CpuWatch(target.pid)
    watch.start()
    deadline = time.monotonic() + max_time
    try:
        for _ in range(rounds):
            if time.monotonic() > deadline:
                break
            chunks: list[bytes] = []
            lines = 0
            t0 = time.perf_counter()
            sender = threading.Thread(target=c.sock.sendall, args=(batch,), daemon=True)
            sender.start()
            while lines < commands:
                data = c.sock.recv(262144)
                if not data:
                    raise ConnectionError("server closed the connection")
                chunks.append(data)
                lines += data.count(b"\n")
            times.append(time.perf_counter() - t0)
            sender.join(30)
            reply = b"".join(chunks)
            bad += commands - reply.count(b"+OK")
        c.ok(b"QUIT\r\n")
    finally:
        c.close()
    srv_cpu, srv_share = watch.stop()
    med = statistics.median(times) if times else float("nan")
    return {
        "commands/s": commands / med,
        "round ms": med * 1000,
        "rounds": len(times),
        "commands": commands,
        "errors": bad,
        "server cpu": srv_share,
        "server cpu s": srv_cpu,
    }


# ---------------------------------------------------------------- retr-large


def _retr_worker(
    barrier: Any, queue: Any, port: int, user: str, repeats: int, max_time: float
) -> None:
    c = Client(port, timeout=120)
    try:
        c.login(user, fixture_mod.password(user))
        barrier.wait(timeout=120)
        t0 = time.monotonic()
        octets = 0
        done = 0
        while done < repeats and time.monotonic() - t0 < max_time:
            octets += c.drain(b"RETR 1\r\n")
            done += 1
        end = time.monotonic()
        c.ok(b"QUIT\r\n")
        queue.put({"octets": octets, "end": end, "done": done, "error": None})
    except Exception as exc:
        with contextlib.suppress(Exception):
            barrier.abort()
        queue.put({"octets": 0, "end": time.monotonic(), "done": 0, "error": repr(exc)})
    finally:
        c.close()


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
    user = fx.big_users[0]
    c = Client(target.port, timeout=120)
    rates: list[float] = []
    errors = 0
    total = 0
    watch = CpuWatch(target.pid)
    try:
        c.login(user, fx.password(user))
        size = int(c.ok(b"LIST 1\r\n").split()[2])
        watch.start()
        t_end = time.monotonic() + max_time
        for _ in range(repeats):
            if time.monotonic() > t_end:
                break
            t0 = time.perf_counter()
            octets = c.drain(b"RETR 1\r\n")
            rates.append(octets / (time.perf_counter() - t0) / 1e6)
            errors += octets < size
            total += octets
        c.ok(b"QUIT\r\n")
    finally:
        c.close()
    single_cpu, single_share = watch.stop()
    users = fx.big_users[:parallel]
    t_start, results = _run_workers(
        _retr_worker,
        [(target.port, u, parallel_repeats, max_time) for u in users],
        timeout=max_time + 120,
        on_start=watch.start,
    )
    _, par_share = watch.stop()
    octets = sum(r["octets"] for r in results)
    end = max((r["end"] for r in results), default=t_start)
    errors += sum(1 for r in results if r["error"]) + (len(users) - len(results))
    return {
        "MB/s 1 client": statistics.median(rates) if rates else float("nan"),
        f"MB/s {parallel} clients": octets / max(end - t_start, 1e-9) / 1e6,
        "errors": errors,
        "error sample": [r["error"] for r in results if r["error"]][:3],
        "server cpu 1 client": single_share,
        "server cpu s": single_cpu,
        "octets": total,
        f"server cpu {parallel} clients": par_share,
    }


# ---------------------------------------------------------------- idle


class _IdleOpener:
    """Opens authenticated connections (greeting, USER, PASS, STAT) without blocking."""

    def __init__(self, port: int, window: int = 200) -> None:
        self.port = port
        self.window = window
        self.sel = selectors.DefaultSelector()
        self.open: list[socket.socket] = []
        self.errors: list[str] = []

    def add(self, users: list[str], timeout: float) -> None:
        pending = list(reversed(users))
        inflight = 0
        deadline = time.monotonic() + timeout
        sel = self.sel
        while (pending or inflight) and time.monotonic() < deadline and len(self.errors) < 50:
            while pending and inflight < self.window:
                user = pending.pop()
                s = socket.socket()
                s.setblocking(False)
                err = s.connect_ex((HOST, self.port))
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                    self.errors.append(f"connect: {os.strerror(err)}")
                    continue
                pw = fixture_mod.password(user).encode()
                script = [b"USER %s\r\n" % user.encode(), b"PASS %s\r\n" % pw, b"STAT\r\n"]
                sel.register(s, selectors.EVENT_READ, [script, bytearray()])
                inflight += 1
            for key, _ in sel.select(timeout=1.0):
                s = key.fileobj
                script, buf = key.data
                try:
                    data = s.recv(4096)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data = b""
                    self.errors.append(repr(exc))
                if not data:
                    sel.unregister(s)
                    s.close()  # type: ignore[union-attr]
                    inflight -= 1
                    if not self.errors or "closed" not in self.errors[-1]:
                        self.errors.append("server closed an idle connection")
                    continue
                buf += data
                if b"\r\n" not in buf:
                    continue
                line = bytes(buf.split(b"\r\n", 1)[0])
                buf.clear()
                if not line.startswith(b"+OK"):
                    self.errors.append(f"{line!r}")
                    sel.unregister(s)
                    s.close()  # type: ignore[union-attr]
                    inflight -= 1
                    continue
                if script:
                    s.send(script.pop(0))  # type: ignore[union-attr]
                else:
                    sel.unregister(s)
                    self.open.append(s)  # type: ignore[arg-type]
                    inflight -= 1
        for key in list(sel.get_map().values()):  # timed out
            sel.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
            self.errors.append("timed out opening")

    def close_all(self) -> None:
        for s in self.open:
            with contextlib.suppress(OSError):
                s.close()
        self.open.clear()
        self.sel.close()


def greeting_times(port: int, samples: int, timeout: float = 10.0) -> list[float]:
    """Seconds from connect() to the greeting line, *samples* fresh connections in turn."""
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        try:
            c = Client(port, timeout=timeout)
            try:
                line = c.line()
                out.append(time.perf_counter() - t0)
                if line.startswith(b"+OK"):
                    c.sock.sendall(b"QUIT\r\n")
            finally:
                c.close()
        except OSError:
            out.append(float("inf"))
    return out


def run_idle(
    target: Any,
    fx: Any,
    *,
    levels: tuple[int, ...] = (1000, 5000, 10_000),
    greet_samples: int = 20,
    settle: float = 2.0,
    max_time: float = 300.0,
) -> dict[str, Any]:
    """Authenticated idle connections at each level: server memory per connection, greeting wait."""
    mine = raise_nofile()
    theirs = procstat.fd_limit(target.pid) or mine
    cap = min(mine, theirs) - 200
    levels = tuple(n for n in levels if n <= min(cap, len(fx.idle_users)))
    out: dict[str, Any] = {"fd limit": min(mine, theirs)}
    opener = _IdleOpener(target.port)
    time.sleep(settle)
    rss0, pss0 = procstat.rss_kb(target.pid), procstat.pss_kb(target.pid)
    fds0 = procstat.fds(target.pid)
    g0 = greeting_times(target.port, greet_samples)
    out["greeting ms at 0"] = statistics.median(g0) * 1000
    deadline = time.monotonic() + max_time
    try:
        for level in levels:
            have = len(opener.open)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            t0 = time.monotonic()
            opener.add(fx.idle_users[have:level], timeout=left)
            open_s = time.monotonic() - t0
            time.sleep(settle)
            n = len(opener.open)
            rss, pss = procstat.rss_kb(target.pid), procstat.pss_kb(target.pid)
            g = greeting_times(target.port, greet_samples)
            out[f"KB/conn RSS at {level}"] = (rss - rss0) / max(n, 1)
            out[f"KB/conn PSS at {level}"] = (pss - pss0) / max(n, 1)
            out[f"greeting ms at {level}"] = statistics.median(g) * 1000
            out[f"greeting max ms at {level}"] = max(g) * 1000
            out[f"open conn/s at {level}"] = (n - have) / max(open_s, 1e-9)
            out[f"open at {level}"] = n
            out[f"server fds per conn at {level}"] = (procstat.fds(target.pid) - fds0) / max(n, 1)
            out[f"server threads at {level}"] = procstat.threads(target.pid)
            out[f"server procs at {level}"] = len(procstat.tree(target.pid))
            if n < level:
                break
    finally:
        out["errors"] = len(opener.errors)
        out["error sample"] = opener.errors[:3]
        opener.close_all()
    out["levels"] = list(levels)
    return out


# ---------------------------------------------------------------- login


def _login_once(port: int, user: str, password: str) -> dict[str, float]:
    c = Client(port, timeout=120)
    try:
        greeting = c.line()
        if not greeting.startswith(b"+OK"):
            raise Pop3Error(f"greeting {greeting!r}")
        c.ok(b"USER %s\r\n" % user.encode())
        perf = time.perf_counter
        t0 = perf()
        c.ok(b"PASS %s\r\n" % password.encode())
        t_pass = perf()
        c.ok(b"LIST\r\n")
        t_list = perf()
        c.rest()
        t_end = perf()
        c.ok(b"QUIT\r\n")
    finally:
        c.close()
    return {"pass": t_pass - t0, "list": t_list - t0, "end": t_end - t0}


def run_login(
    target: Any,
    fx: Any,
    *,
    users: tuple[str, ...] = (fixture_mod.MANY, fixture_mod.MANY_NOSIZE),
    repeats: int = 3,
    max_time: float = 120.0,
) -> dict[str, Any]:
    """PASS -> +OK of the first LIST for a 10,000-message user: cold (caches removed), warm."""
    out: dict[str, Any] = {}
    deadline = time.monotonic() + max_time
    for user in users:
        cold: list[dict[str, float]] = []
        warm: list[dict[str, float]] = []
        for _ in range(repeats):
            if time.monotonic() > deadline:
                break
            fixture_mod.clear_caches(fx, user)
            cold.append(_login_once(target.port, user, fx.password(user)))
            warm.append(_login_once(target.port, user, fx.password(user)))
        for label, runs in (("cold", cold), ("warm", warm)):
            if runs:
                out[f"{user} {label} ms"] = statistics.median(r["list"] for r in runs) * 1000
                out[f"{user} {label} PASS ms"] = statistics.median(r["pass"] for r in runs) * 1000
                out[f"{user} {label} LIST end ms"] = (
                    statistics.median(r["end"] for r in runs) * 1000
                )
    return out


def run_sessions_tls(target: Any, fx: Any, **params: Any) -> dict[str, Any]:
    """``sessions`` over implicit TLS (the server must have been started with a certificate)."""
    return run_sessions(target, fx, tls=True, **params)


#: Workloads that need the server started with a TLS certificate.
NEEDS_TLS = frozenset({"sessions-tls"})

WORKLOADS: dict[str, Callable[..., dict[str, Any]]] = {
    "sessions": run_sessions,
    "sessions-tls": run_sessions_tls,
    "pipelined": run_pipelined,
    "retr-large": run_retr_large,
    "login": run_login,
    "idle": run_idle,
}
