"""How long a fresh login takes while the server processes many closes at once.

Issue 15, finding 13 (blocking part): "when 5,000 idle connections close at once a
new login takes 8 s (cleanup convoy)".  For each transport this script

1. builds a Maildir of N users (one small message each) and a ``{PLAIN}``
   passwd-file in a temporary directory, and starts
   ``python -m pop3proto.transports.T --port 0`` on it (INFO log to a file, as an
   admin runs it: one line per login and per logout);
2. opens N sessions and logs each in (USER/PASS), then leaves them idle;
3. measures a probe login (connect to ``+OK Logged in``) with the N sessions idle;
4. closes all N client sockets at once (a plain close: the server reads EOF), then
   probes again at once, and keeps probing one after another until the server has
   logged N session ends; it reports the first probe, the slowest, and how long the
   server took to log all N ends ("drain").

The soft RLIMIT_NOFILE is raised to the hard limit (the server inherits it).  Every
probe logs in as its own user, so no probe waits for another's maildrop lock.
Run as::

    python bench/close_convoy.py [--sessions 2000] [--transports blocking,selectors,anyio]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "secret"
MESSAGE = b"From: a@example.org\nSubject: idle\n\nbody\n"
PROBES = 200  # probe users (probe0..): more than any run needs
END_LINE = re.compile(rb"Disconnected|Logged out")
TIMEOUT = 120.0  # the most one socket operation or one drain may take
PACKAGE = REPO  # the checkout whose pop3proto is measured (--checkout)


def build(top: str, sessions: int) -> tuple[str, str]:
    """(maildir root, passwd-file) with users idle0..idle{N-1} and probe0..probe{PROBES-1}."""
    mail = os.path.join(top, "mail")
    names = [f"idle{i}" for i in range(sessions)] + [f"probe{i}" for i in range(PROBES)]
    for name in names:
        base = os.path.join(mail, name)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(base, sub))
        with open(
            os.path.join(base, "cur", f"1700000000.M1P1.bench,S={len(MESSAGE)}:2,"), "wb"
        ) as f:
            f.write(MESSAGE)
    passwd = os.path.join(top, "passwd")
    with open(passwd, "w", encoding="utf-8") as f:
        f.writelines(f"{name}:{{PLAIN}}{PASSWORD}::::::\n" for name in names)
    return mail, passwd


def read_line(sock: socket.socket) -> bytes:
    """One reply line (the replies here are single lines)."""
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            raise ConnectionError(f"EOF after {buf!r}")
        buf += chunk
        if len(buf) > 4096:
            raise ConnectionError(f"no line end in {buf[:80]!r}")
    return buf


def login(port: int, user: str) -> socket.socket:
    """A socket logged in as *user* (raises if any reply is not +OK)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        for send in (None, f"USER {user}\r\n", f"PASS {PASSWORD}\r\n"):
            if send is not None:
                sock.sendall(send.encode())
            line = read_line(sock)
            if not line.startswith(b"+OK"):
                raise ConnectionError(f"{user}: {line!r}")
    except BaseException:
        sock.close()
        raise
    return sock


class Probe:
    """Logins as probe0, probe1, ... each timed from connect to ``+OK Logged in``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.n = 0

    def __call__(self) -> float:
        user = f"probe{self.n % PROBES}"
        self.n += 1
        t0 = time.perf_counter()
        sock = login(self.port, user)
        took = time.perf_counter() - t0
        with contextlib.suppress(OSError):
            sock.sendall(b"QUIT\r\n")
            read_line(sock)
        sock.close()
        return took


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process *pid* (all its threads) so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ends_logged(log: str) -> int:
    """Session-end lines in the server's log so far."""
    with open(log, "rb") as f:
        return len(END_LINE.findall(f.read()))


def start_server(
    transport: str, mail: str, passwd: str, log: str, level: str
) -> tuple[subprocess.Popen[bytes], int]:
    """The server as a child process (its own session) and the port it listens on."""
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE + os.pathsep + env.get("PYTHONPATH", "")
    argv = [
        sys.executable, "-m", f"pop3proto.transports.{transport}",
        "--host", "127.0.0.1", "--port", "0",
        "--passwd-file", passwd, "--maildir-root", mail,
        "--max-connections", "0", "--max-connections-per-address", "0",
        "--idle-timeout", "900", "--login-timeout", "900",
        "--log-level", level,
    ]  # fmt: skip
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err, cwd=REPO, env=env, start_new_session=True
        )
    assert proc.stdout is not None
    first = proc.stdout.readline().decode()
    m = re.search(r":(\d+)\s*$", first)
    if m is None:
        stop_server(proc)
        raise RuntimeError(f"{transport} did not say where it listens: {first!r}")
    return proc, int(m.group(1))


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, SIGKILL after 60 s."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def run_one(
    transport: str, mail: str, passwd: str, top: str, args: argparse.Namespace
) -> dict[str, float]:
    """One transport's figures (seconds)."""
    sessions, counted = args.sessions, args.log_level in ("INFO", "DEBUG")
    log = os.path.join(top, f"{transport}.log")
    proc, port = start_server(transport, mail, passwd, log, args.log_level)
    socks: list[socket.socket] = []
    try:
        probe = Probe(port)
        quiet = statistics.median(probe() for _ in range(5))
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            socks = list(pool.map(lambda i: login(port, f"idle{i}"), range(sessions)))
        opened = time.perf_counter() - t0
        time.sleep(args.hold)  # let the server settle with N idle sessions
        idle = statistics.median(probe() for _ in range(5))
        before = ends_logged(log)
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        for s in socks:
            s.close()
        socks = []
        closed = time.perf_counter() - t0
        first = probe()
        probes = [first]
        drained = None
        cpu = float("nan")
        while time.perf_counter() - t0 < (TIMEOUT if counted else args.watch):
            if counted and ends_logged(log) - before >= sessions:
                drained = time.perf_counter() - t0
                cpu = cpu_seconds(proc.pid) - cpu0
                break
            probes.append(probe())
        return {
            "quiet": quiet, "opened": opened, "idle": idle, "closed": closed,
            "first": first, "max": max(probes), "median": statistics.median(probes),
            "probes": len(probes), "drain": drained if drained is not None else float("nan"),
            "cpu": cpu,
        }  # fmt: skip
    finally:
        for s in socks:
            s.close()
        stop_server(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=2000, help="idle sessions closed at once")
    ap.add_argument("--transports", default="blocking,selectors,anyio")
    ap.add_argument("--hold", type=float, default=2.0, help="seconds idle before the close")
    ap.add_argument(
        "--log-level",
        default="INFO",
        help="the server's; above INFO no end lines are logged, so the drain is not "
        "measured and probes run for --watch seconds",
    )
    ap.add_argument("--watch", type=float, default=3.0)
    ap.add_argument("--reps", type=int, default=1, help="runs per transport, interleaved")
    ap.add_argument(
        "--checkout", default=REPO, help="a checkout whose pop3proto to measure (default: this one)"
    )
    args = ap.parse_args()
    global PACKAGE
    PACKAGE = os.path.abspath(args.checkout)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    need = 2 * args.sessions + 200
    if want < need:
        print(f"RLIMIT_NOFILE {want} < {need} needed (client and server on one machine)")
        return 2
    top = tempfile.mkdtemp(prefix="pop3proto-close-convoy-")
    try:
        mail, passwd = build(top, args.sessions)
        head = subprocess.run(
            ["git", "-C", PACKAGE, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        print(
            f"pop3proto at {head or PACKAGE}; {args.sessions} idle logged-in sessions closed at "
            f"once by the client; server log level {args.log_level}; times in ms; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        print(
            "| transport | probe quiet | probe N idle | first probe after close | "
            "slowest probe | probes | drain (all N ends logged) | server CPU in drain |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for transport in args.transports.split(",") * args.reps:
            r = run_one(transport, mail, passwd, top, args)
            print(
                f"| {transport} | {r['quiet'] * 1e3:.1f} | {r['idle'] * 1e3:.1f} | "
                f"{r['first'] * 1e3:.0f} | {r['max'] * 1e3:.0f} | {r['probes']:.0f} | "
                f"{r['drain'] * 1e3:.0f} | {r['cpu'] * 1e3:.0f} |",
                flush=True,
            )
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
