"""Started the way systemd starts it: listening sockets passed as fds 3.., readiness by datagram.

A ``python -c`` wrapper moves the test's listening sockets to descriptors 3
and 4, sets ``LISTEN_FDS``/``LISTEN_PID`` (its own pid, which ``execv``
keeps) and ``LISTEN_FDNAMES``, and execs the command; the test waits for
``READY=1`` on its own ``NOTIFY_SOCKET`` and then fetches mail with poplib.
"""

from __future__ import annotations

import os
import poplib
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from clients import HOST, MESSAGES, REPO, MailEnv, make_env
from tlsutil import TLSFiles

from pop3proto.ops import systemd

WRAPPER = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)
for fd in moved + [fd for fd in fds if fd not in range(3, 3 + len(fds))]:
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()),
                  LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


def _listener() -> socket.socket:
    sock = socket.create_server((HOST, 0))
    return sock


def _recv(notify: socket.socket) -> str:
    try:
        return notify.recv(4096).decode()
    except TimeoutError:
        raise AssertionError("no sd_notify datagram within the timeout") from None


@pytest.mark.parametrize("names", ["pop3:pop3s", ""])
def test_socket_activation_and_readiness(tmp_path: Path, names: str) -> None:
    env: MailEnv = make_env(tmp_path)
    tls = TLSFiles.create(tmp_path)
    plain, secure = _listener(), _listener()
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    log = open(tmp_path / "stderr", "wb")  # noqa: SIM115 - closed in finally
    argv = [sys.executable, "-c", WRAPPER, f"{plain.fileno()},{secure.fileno()}", names,
            "-m", "pop3proto.transports.blocking",
            "--host", "192.0.2.1", "--port", "1",  # ignored: the sockets come from systemd
            "--maildir-root", str(env.root), "--passwd-file", str(env.passwd),
            "--tls-cert", str(tls.cert_pem), "--tls-key", str(tls.key_pem)]
    proc = subprocess.Popen(
        argv, pass_fds=(plain.fileno(), secure.fileno()), stdin=subprocess.DEVNULL,
        stdout=log, stderr=log, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": notify_path},
    )
    try:
        ready = _recv(notify)
        assert "READY=1" in ready.split("\n"), ready
        assert f"MAINPID={proc.pid}" in ready.split("\n")
        client = poplib.POP3(HOST, plain.getsockname()[1], timeout=10)
        client.user("alice")
        client.pass_("alice-Secret-1")
        assert client.stat()[0] == len(MESSAGES)
        client.quit()
        secured = poplib.POP3_SSL(HOST, secure.getsockname()[1], timeout=10,
                                  context=tls.client_context())
        secured.user("bob")
        secured.pass_("bob-Secret-2")
        assert secured.stat()[0] == len(MESSAGES)
        secured.quit()
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _recv(notify).split("\n")
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()
        notify.close()
        plain.close()
        secure.close()
    err = (tmp_path / "stderr").read_text()
    assert "socket activation: 2 socket(s)" in err
    assert "Traceback" not in err


def test_listen_sockets_ignores_another_process_and_unsets_the_variables() -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "pop3"}
    assert systemd.listen_sockets(env) is None
    assert env == {}
    assert systemd.listen_sockets({}) is None
    with pytest.raises(ValueError, match="integers"):
        systemd.listen_sockets({"LISTEN_FDS": "x", "LISTEN_PID": "1"})


def test_notify_without_a_socket_is_a_no_op(tmp_path: Path) -> None:
    assert systemd.notify("READY=1", {}) is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "none")}) is False
