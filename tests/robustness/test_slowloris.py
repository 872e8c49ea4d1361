"""5. Slowloris and floods: slow or idle clients are cut off, limits hold, others are served.

Sized for 2 cores: the load test runs the server as a subprocess (its own
GIL) with 500 concurrent full sessions from client threads while 50
connections trickle one byte a second; a probe measures how long a fresh
client waits for its greeting meanwhile.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import HOST, Raw, running
from tlsutil import TLSFiles

from pop3proto.server import Server

from .conftest import (
    Figure,
    Mail,
    body,
    fill,
    logged_in,
    server_proc,
    wait_for,
    write_passwd,
)

pytestmark = pytest.mark.slow

SESSIONS = 500
TRICKLERS = 50


def storm_mail(base: Path, n: int) -> Mail:
    root = base / "root"
    root.mkdir(parents=True)
    users = {f"u{i:04d}": f"pw-{i:04d}" for i in range(n)}
    mail = Mail(root, write_passwd(base / "users", users), users)
    for user in users:
        fill(root, user, [body(1), body(2)])
    return mail


def full_session(port: int, user: str, password: str, barrier: threading.Barrier) -> None:
    barrier.wait()
    with Raw(port, timeout=60) as c:
        assert c.login(user, password).startswith(b"+OK")
        assert c.cmd("STAT").startswith(b"+OK 2 ")
        status, listing = c.multi("LIST")
        assert status.startswith(b"+OK")
        assert listing.count(b"\r\n") == 2
        _, data = c.multi("RETR 1")
        assert data == body(1).replace(b"\n", b"\r\n")
        assert c.cmd("DELE 1").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")


#: A probe in its own process (the client threads here would skew its timing through
#: the GIL): connect, time the greeting, every 50 ms, until stdin closes.  It prints
#: CLOCK_MONOTONIC at the start of each try, which is the same clock in every process.
PROBE = r"""
import socket, sys, threading, time
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
port = int(sys.argv[1])
while not stop.is_set():
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(512)
                if not chunk:
                    break
                data += chunk
        took = time.monotonic() - t0
        print(f"{t0:.4f} {took:.4f} {data[:3].decode('ascii', 'replace')}", flush=True)
    except OSError as exc:
        print(f"{t0:.4f} error {exc!r}", flush=True)
    stop.wait(0.05)
"""


def test_500_sessions_while_50_connections_trickle(
    transport: str, tmp_path: Path, figure: Figure
) -> None:
    mail = storm_mail(tmp_path, SESSIONS)
    errors: list[str] = []

    def run(user: str, password: str, barrier: threading.Barrier) -> None:
        try:
            full_session(server.port, user, password, barrier)
        except BaseException as exc:  # collected and asserted on below
            errors.append(f"{user}: {type(exc).__name__}: {exc}")

    with server_proc(transport, mail, "--log-level", "WARNING") as server:
        tricklers = [Raw(server.port) for _ in range(TRICKLERS)]
        probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(server.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            for t in tricklers:
                t.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                t.send(b"C")  # a line that will never end
            barrier = threading.Barrier(SESSIONS, timeout=60)
            threads = [
                threading.Thread(target=run, args=(u, p, barrier), daemon=True)
                for u, p in mail.users.items()
            ]
            time.sleep(0.5)  # the probe's quiet baseline
            t0 = time.monotonic()  # CLOCK_MONOTONIC, comparable with the probe's
            for thread in threads:
                thread.start()
            next_byte = time.monotonic() + 1.0
            while any(t.is_alive() for t in threads) and time.monotonic() - t0 < 90:
                if time.monotonic() >= next_byte:  # one byte a second on each trickler
                    for t in tricklers:
                        t.send(b"A")
                    next_byte += 1.0
                time.sleep(0.05)
            storm_s = time.monotonic() - t0
            out, _ = probe.communicate("", timeout=30)
            assert not [t for t in threads if t.is_alive()], "sessions still running after 90 s"
            # The tricklers were never answered nor cut off (their timer is 60 s).
            for t in tricklers:
                t.sock.settimeout(0.01)
                with pytest.raises(TimeoutError):
                    t.sock.recv(1)
        finally:
            if probe.poll() is None:
                probe.kill()
                probe.wait(5)
            for t in tricklers:
                t.close()
        assert server.tracebacks() == []
    assert errors == []
    for user in mail.users:
        assert len(mail.on_disk(user)) == 1, user
    probes = [line.split() for line in out.splitlines()]
    assert all(p[1] != "error" and p[2] == "+OK" for p in probes), probes
    during = [float(p[1]) for p in probes if t0 <= float(p[0]) <= t0 + storm_s]
    assert during, probes
    figure("storm_500_sessions_s", round(storm_s, 2))
    figure("greeting_latency_during_storm_ms_median", round(statistics.median(during) * 1000, 1))
    figure("greeting_latency_during_storm_ms_max", round(max(during) * 1000, 1))
    figure("greeting_probes_during_storm", len(during))
    # Target ~1 s; blocking meets it, the single-threaded loops stall under this burst
    # (selectors: inline fsyncs at QUIT; anyio: the loop shares the GIL with 40 workers).
    # The bound here is "never starved".
    assert max(during) < 3.0, during


@pytest.fixture
def timed(transport: str, mail: Mail) -> Iterator[Server]:
    options = mail.options(login_timeout=1.0, idle_timeout=3.0, auth_failure_delay=0)
    with running(transport, **options) as server:
        yield server


def time_to_close(client: Raw, limit: float = 10.0) -> tuple[float, bytes | None]:
    t0 = time.monotonic()
    rest = client.closed(limit)
    return time.monotonic() - t0, rest


def test_idle_before_login_closes_at_login_timeout_after_at_idle_timeout(
    timed: Server, mail: Mail, figure: Figure
) -> None:
    port = timed.cget("port")
    results: dict[str, tuple[float, bytes | None]] = {}

    def pre_login() -> None:
        with Raw(port) as c:
            results["pre-login"] = time_to_close(c)

    def half_login() -> None:  # USER given, PASS never: still before login
        with Raw(port) as c:
            assert c.cmd("USER alice").startswith(b"+OK")
            results["after-user"] = time_to_close(c)

    def logged() -> None:
        with logged_in(port, "alice", mail.users["alice"]) as c:
            assert c.cmd("DELE 1").startswith(b"+OK")
            results["logged-in"] = time_to_close(c)

    threads = [threading.Thread(target=f) for f in (pre_login, half_login, logged)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    figure("idle_close_after_s", {k: round(v[0], 2) for k, v in results.items()})
    for name, want in (("pre-login", 1.0), ("after-user", 1.0), ("logged-in", 3.0)):
        took, rest = results[name]
        assert want - 0.05 <= took <= want + 1.0, (name, took)
        assert rest == b"-ERR Disconnected for inactivity.\r\n", (name, rest)
    assert len(mail.on_disk("alice")) == 5, "an idle timeout applied a deletion"


def test_a_trickling_client_is_cut_off_at_login_timeout(timed: Server) -> None:
    with Raw(timed.cget("port")) as c:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:
            try:
                c.send(b"A")
            except OSError:
                break
            time.sleep(0.3)
        time_to_close(c, 1.0)
        assert time.monotonic() - t0 <= 2.0


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return TLSFiles.create(tmp_path_factory.mktemp("tls"))


def test_stalled_tls_handshakes_time_out(
    transport: str, mail: Mail, tls: TLSFiles, figure: Figure
) -> None:
    options = mail.options(
        ssl_context=tls.server_context(), pop3s_port=0, handshake_timeout=1.0,
        login_timeout=30.0, cleartext_auth=True,
    )  # fmt: skip
    took: dict[str, float] = {}
    with running(transport, **options) as server:
        port, pop3s = server.cget("port"), server.cget("pop3s_port")
        silent = socket.create_connection((HOST, pop3s), timeout=10)
        partial = socket.create_connection((HOST, pop3s), timeout=10)
        after_stls = Raw(port)
        try:
            partial.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello
            assert after_stls.cmd("STLS").startswith(b"+OK")
            t0 = time.monotonic()
            # Meanwhile an ordinary client is served at once.
            with logged_in(port, "bob", mail.users["bob"]) as other:
                assert other.cmd("STAT").startswith(b"+OK 5 ")
            with tls.client_context().wrap_socket(
                socket.create_connection((HOST, pop3s), timeout=10), server_hostname=HOST
            ) as good:
                assert good.recv(100).startswith(b"+OK")
            for name, sock in (("pop3s-silent", silent), ("pop3s-partial", partial),
                               ("after-stls", after_stls.sock)):  # fmt: skip
                sock.settimeout(10)
                try:
                    while sock.recv(4096):
                        pass
                except ConnectionError:
                    pass
                took[name] = time.monotonic() - t0
        finally:
            silent.close()
            partial.close()
            after_stls.close()
    figure("stalled_handshake_closed_after_s", {k: round(v, 2) for k, v in took.items()})
    for name, t in took.items():
        assert t <= 1.0 + 1.5, (name, t)


def test_per_address_and_total_limits_answer_sys_temp(
    transport: str, mail: Mail, figure: Figure
) -> None:
    options = mail.options(max_connections_per_address=3, limit_loopback=True)
    with running(transport, **options) as server:
        port = server.cget("port")
        held = [Raw(port) for _ in range(3)]
        try:
            extra = Raw(port, greeting=False)
            with extra:
                assert extra.line() == b"-ERR [SYS/TEMP] Too many connections from your address."
                assert extra.closed(5) == b""
            held.pop().close()
            assert wait_for(lambda: len(server.connections()) <= 2, 5)
            with Raw(port) as again:
                assert again.greeting.startswith(b"+OK")
        finally:
            for c in held:
                c.close()
    options = mail.options(max_connections=5)  # loopback is not counted per address
    with running(transport, **options) as server:
        port = server.cget("port")
        held = [Raw(port) for _ in range(5)]
        try:
            t0 = time.monotonic()
            refused = []
            for _ in range(50):  # a flood: each refused at once, never queued
                with Raw(port, greeting=False) as extra:
                    refused.append(extra.line())
                    extra.closed(5)
            flood_s = time.monotonic() - t0
            assert set(refused) == {b"-ERR [SYS/TEMP] Too many connections."}
        finally:
            for c in held:
                c.close()
        assert wait_for(lambda: server.connections() == [], 5)
        with logged_in(port, "alice", mail.users["alice"]) as c:
            assert c.cmd("QUIT").startswith(b"+OK")
    figure("refused_50_connections_s", round(flood_s, 3))
