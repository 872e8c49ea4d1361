"""The servers under test: pop3proto with one transport, or Dovecot (``dovecot.py``).

Each has ``name``, ``start()``, ``stop()``, ``pid``, ``port`` (and ``pop3s_port``
when started with TLS) and ``log_path``.  pop3proto runs as
``python -m pop3proto.transports.NAME`` with the fixture's passwd-file and
Maildir root, listening on 127.0.0.1 only, with limits raised for the idle
workload (``--max-connections 20000``, long timeouts) and its INFO log (one
line per session, as Dovecot's info log has) written to a file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from dovecot import Dovecot, DovecotMissing, _spawn, free_port, wait_greeting

__all__ = ["TRANSPORTS", "Pop3proto", "available", "make_server", "make_tls_cert"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSPORTS = ("blocking", "selectors", "anyio")


def transport_missing(transport: str) -> str | None:
    """Why ``pop3proto.transports.<transport>`` cannot run here, or None."""
    here = os.path.join(REPO, "pop3proto", "transports", f"{transport}.py")
    if not os.path.exists(here):
        return f"pop3proto/transports/{transport}.py does not exist"
    if transport == "anyio" and importlib.util.find_spec("anyio") is None:
        return "the anyio package is not installed"
    return None


def available(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """(servers that can run, {skipped server: why})."""
    ok, skipped = [], {}
    for name in names:
        if name == "dovecot":
            try:
                from dovecot import dovecot_binary

                dovecot_binary()
                ok.append(name)
            except DovecotMissing as exc:
                skipped[name] = str(exc)
            continue
        why = transport_missing(split_workers(name)[0])
        if why:
            skipped[name] = why
        else:
            ok.append(name)
    return ok, skipped


class Pop3proto:
    """``python -m pop3proto.transports.<transport>`` on the fixture, as a child process."""

    def __init__(
        self,
        fixture: Any,
        transport: str,
        *,
        cpus: set[int] | None = None,
        tls: tuple[str, str] | None = None,
        log_level: str = "INFO",
        extra_args: list[str] | None = None,
    ) -> None:
        self.fixture = fixture
        self.transport = transport
        self.name = transport
        self.cpus = cpus
        self.tls = tls
        self.log_level = log_level
        self.extra_args = extra_args or []
        self.port = free_port()
        self.pop3s_port: int | None = free_port() if tls else None
        self.tmp = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> str:
        return os.path.join(self.tmp, "server.log")

    def argv(self) -> list[str]:
        fx = self.fixture
        argv = [
            sys.executable,
            "-m",
            f"pop3proto.transports.{self.transport}",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--passwd-file",
            fx.passwd,
            "--maildir-root",
            fx.mail,
            "--max-connections",
            "20000",
            "--max-connections-per-address",
            "20000",
            "--idle-timeout",
            "900",
            "--login-timeout",
            "900",
            "--log-level",
            self.log_level,
        ]
        if self.tls:
            argv += [
                "--tls-cert",
                self.tls[0],
                "--tls-key",
                self.tls[1],
                "--pop3s-port",
                str(self.pop3s_port),
            ]
        return argv + self.extra_args

    def start(self, timeout: float = 30.0) -> Pop3proto:
        self.tmp = tempfile.mkdtemp(prefix=f"pop3proto-bench-{self.transport}-")
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("PYTHONSTARTUP", None)
        with open(self.log_path, "wb") as out:
            self.proc = _spawn(
                self.argv(), self.cpus, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
            )
        try:
            wait_greeting("127.0.0.1", self.port, timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM by PID (the command closes every session), SIGKILL after *timeout*."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def cleanup(self) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def make_server(
    name: str,
    fixture: Any,
    *,
    cpus: set[int] | None = None,
    tls: tuple[str, str] | None = None,
    log_level: str = "INFO",
) -> Any:
    if name == "dovecot":
        return Dovecot(fixture, cpus=cpus, tls=tls)
    transport, workers = split_workers(name)
    extra = ["--workers", str(workers)] if workers > 1 else []
    server = Pop3proto(fixture, transport, cpus=cpus, tls=tls, log_level=log_level,
                       extra_args=extra)
    server.name = name
    return server


def split_workers(name: str) -> tuple[str, int]:
    """``selectors-w2`` -> ("selectors", 2): a transport run with ``--workers N``."""
    transport, sep, count = name.rpartition("-w")
    if sep and count.isdigit() and int(count) > 0:
        return transport, int(count)
    return name, 1


def make_tls_cert(directory: str) -> tuple[str, str]:
    """A self-signed RSA-2048 certificate for 127.0.0.1/localhost (openssl), (cert, key)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    if not (os.path.exists(cert) and os.path.exists(key)):
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "30",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
                key,
                "-out",
                cert,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        os.chmod(key, 0o644)  # Dovecot reads it as root; the fixture is not secret
    return cert, key


def wait_port_free(port: int, timeout: float = 10.0) -> None:
    """Wait until nothing accepts on 127.0.0.1:*port* (after a stop)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return
        time.sleep(0.1)
