"""``python -m pop3proto.transports.NAME``: the demo, clean shutdown, start-up errors, logs.

Every command runs as a subprocess on 127.0.0.1 port 0 with a timeout and is
killed in a ``finally`` if a test fails before it exits.
"""

from __future__ import annotations

import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import (
    HOST,
    MESSAGES,
    TRANSPORTS,
    MailEnv,
    Proc,
    Raw,
    make_env,
    module_argv,
    need_program,
    require_transport,
    run_module,
    wire,
)

from pop3proto.transports._cli import DEMO_MESSAGES

ALICE_PW = "alice-Secret-1"
LISTENING = r"listening on 127\.0\.0\.1:(\d+)"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    require_transport(name)
    return name


@pytest.fixture
def env(tmp_path: Path) -> MailEnv:
    return make_env(tmp_path)


def start(transport: str, *args: str) -> Proc:
    return Proc(module_argv(transport, *args))


@pytest.fixture
def served(transport: str, env: MailEnv) -> Iterator[tuple[Proc, int]]:
    """The command serving *env* (passwd-file + Maildir root) on a free port."""
    proc = start(
        transport,
        "--port", "0",
        "--maildir-root", str(env.root),
        "--passwd-file", str(env.passwd),
        "--auth-failure-delay", "0",
    )  # fmt: skip
    try:
        port = int(proc.expect(LISTENING).group(1))
        yield proc, port
    finally:
        proc.kill()


def stop(proc: Proc, timeout: float = 5.0) -> tuple[int, float]:
    """SIGTERM; the exit status and how long it took (fails after *timeout*)."""
    t0 = time.monotonic()
    proc.p.send_signal(signal.SIGTERM)
    code = proc.wait(timeout)
    return code, time.monotonic() - t0


# --------------------------------------------------------------------- the demo


@pytest.mark.clients
def test_demo_prints_credentials_and_a_curl_line_that_works(transport: str) -> None:
    need_program("curl")
    proc = start(transport, "--demo", "--port", "0")
    try:
        port = int(proc.expect(LISTENING).group(1))
        assert port != 0
        creds = proc.expect(r"user: (\S+)\s+password: (\S+)")
        user, password = creds.group(1), creds.group(2)
        line = proc.expect(r"(curl pop3://\S+)").group(1)
        assert line == f"curl pop3://{user}:{password}@{HOST}:{port}/1"
        got = subprocess.run(
            shlex.split(line), capture_output=True, timeout=20, stdin=subprocess.DEVNULL,
            check=False,
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
        assert got.stdout == wire(DEMO_MESSAGES[0])
        code, took = stop(proc)
        assert code == 0
        assert took < 5
        assert not any("Traceback" in line for line in proc.stderr)
    finally:
        proc.kill()


def test_help_exits_0(transport: str) -> None:
    done = run_module(transport, "--help")
    assert done.returncode == 0
    assert "--maildir-root" in done.stdout


# --------------------------------------------------------------------- shutdown


def test_sigterm_exits_0_and_ends_live_sessions_without_update(
    served: tuple[Proc, int], env: MailEnv
) -> None:
    proc, port = served
    with Raw(port) as c, Raw(port) as idle, Raw(port) as hog:
        assert c.login("alice", ALICE_PW).startswith(b"+OK")
        assert c.cmd("DELE 1").startswith(b"+OK")
        assert hog.login("bob", "bob-Secret-2").startswith(b"+OK")
        hog.send(b"RETR 5\r\n" * 200)  # ~40 MB of replies it never reads: a blocked writer
        time.sleep(0.3)
        code, took = stop(proc)
        assert code == 0
        assert took < 5
        assert c.closed() is not None
        assert idle.closed() is not None
    assert env.on_disk("alice") == list(MESSAGES)
    assert not any("Traceback" in line for line in proc.stderr)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=5).close()


def test_sigint_exits_0(served: tuple[Proc, int]) -> None:
    proc, _ = served
    proc.p.send_signal(signal.SIGINT)
    assert proc.wait(5) == 0


# --------------------------------------------------------------------- start-up errors


def _busy_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    "case",
    [
        "bad flag",
        "bad port number",
        "port out of range",
        "missing passwd file",
        "missing maildir root",
        "maildir root is a file",
        "no maildir root",
        "port in use",
    ],
)
def test_startup_problems_are_one_line_and_exit_2(
    transport: str, env: MailEnv, tmp_path: Path, case: str
) -> None:
    good = ["--maildir-root", str(env.root), "--passwd-file", str(env.passwd)]
    busy = _busy_port()
    try:
        args = {
            "bad flag": ["--bogus", *good],
            "bad port number": ["--port", "abc", *good],
            "port out of range": ["--port", "99999", *good],
            "missing passwd file": [
                "--port", "0", "--maildir-root", str(env.root),
                "--passwd-file", str(tmp_path / "no-such-users"),
            ],
            "missing maildir root": [
                "--port", "0", "--maildir-root", str(tmp_path / "no-such-dir"),
                "--passwd-file", str(env.passwd),
            ],
            "maildir root is a file": [
                "--port", "0", "--maildir-root", str(env.passwd),
                "--passwd-file", str(env.passwd),
            ],
            "no maildir root": ["--port", "0", "--passwd-file", str(env.passwd)],
            "port in use": ["--port", str(busy.getsockname()[1]), *good],
        }[case]  # fmt: skip
        done = run_module(transport, *args)
    finally:
        busy.close()
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "error" in lines[0]
    assert "listening" not in done.stdout


# --------------------------------------------------------------------- logging


def test_log_lines_per_session_name_peer_user_and_never_a_password(
    served: tuple[Proc, int],
) -> None:
    proc, port = served
    wrong = "Wr0ng-Guess-pw"
    with Raw(port) as ok:
        assert ok.login("alice", ALICE_PW).startswith(b"+OK")
        assert ok.multi("RETR 1")[1] == wire(MESSAGES[0])
        assert ok.cmd("QUIT").startswith(b"+OK")
        ok_port = ok.local_port
        assert ok.closed() == b""
    with Raw(port) as bad:
        assert bad.login("bob", wrong).startswith(b"-ERR [AUTH]")
        assert bad.cmd("QUIT").startswith(b"+OK")
        bad_port = bad.local_port
        assert bad.closed() == b""
    with Raw(port) as dropped:
        assert dropped.login("bob", "bob-Secret-2").startswith(b"+OK")
        dropped_port = dropped.local_port
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
        f"rport={dropped_port}," in line and "Disconnected" in line for line in proc.stderr
    ):
        time.sleep(0.05)
    code, _ = stop(proc)
    assert code == 0
    log = proc.stderr
    expected = {
        ok_port: ["Login: user=<alice>, method=USER", "Logged out: user=<alice>, top=0/0, retr=1/"],
        bad_port: ["Login failed (password mismatch): user=<bob>, method=USER",
                   "Disconnected (auth failed, 1 attempts: Logged out): user=<bob>"],
        dropped_port: ["Login: user=<bob>, method=USER", "Disconnected (Connection closed"],
    }
    for client_port, starts in expected.items():
        mine = [line for line in log if f"rip=127.0.0.1, rport={client_port}," in line]
        assert len(mine) == len(starts), (client_port, log)
        for line, start in zip(mine, starts, strict=True):
            assert " INFO " in line
            assert start in line, (start, line)
            assert re.search(r"session=<\d+-\d+>", line)
    everything = "\n".join(log + proc.stdout)
    for secret in (ALICE_PW, wrong, "bob-Secret-2"):
        assert secret not in everything
