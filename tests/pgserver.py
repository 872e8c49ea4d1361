"""A throwaway PostgreSQL cluster for tests and benchmarks.

``PgCluster.start()`` runs ``initdb`` into a fresh temporary directory and
starts ``postgres`` on 127.0.0.1 at a free port (trust authentication, no
fsync), with its Unix socket in that directory; ``stop()`` shuts it down by
PID (SIGINT, the fast shutdown, then SIGKILL) and removes the directory.

PostgreSQL refuses to run as root, so as root both programs run as the
``postgres`` system user (created with ``useradd`` if missing) through
``subprocess.Popen(user=..., group=...)``: the child is then postgres
itself, with no ``su``/``runuser`` process in between, so the PID we hold is
the postmaster's.  ``find_bindir()`` is None when the server binaries are
not installed; tests skip then.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["PgCluster", "PgUnavailable", "find_bindir", "running_or_skip"]

_RUN_AS = "postgres"


class PgUnavailable(RuntimeError):
    """The cluster could not be created or started (the message says why)."""


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None if not installed."""
    for name in ("initdb", "postgres"):
        found = shutil.which(name)
        if found and os.access(Path(found).parent / "initdb", os.X_OK):
            return Path(found).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates += ["/usr/local/pgsql/bin", "/opt/homebrew/bin", "/usr/local/bin"]
    for d in candidates:
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(
            os.path.join(d, "postgres"), os.X_OK
        ):
            return Path(d)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(_RUN_AS)
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _RUN_AS]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise PgUnavailable(f"cannot create the {_RUN_AS} user: {result.stderr.strip()}")
    return pwd.getpwnam(_RUN_AS)


class PgCluster:
    """One temporary cluster.  Use ``with PgCluster.start() as pg:`` or call ``stop()``."""

    def __init__(self, bindir: Path, base: Path, user: pwd.struct_passwd | None) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.log = base / "postgres.log"
        self.host = "127.0.0.1"
        self.port = 0
        self._user = user
        self._proc: subprocess.Popen[bytes] | None = None

    # -- life cycle ----------------------------------------------------------

    @classmethod
    def start(cls, *, bindir: Path | None = None, settings: dict[str, str] | None = None,
              timeout: float = 60.0) -> PgCluster:  # fmt: skip
        """initdb into a new temporary directory and start the server.

        Raises:
            PgUnavailable: no binaries, initdb failed, or the server did not
                come up (the directory is removed then).
        """
        bindir = bindir or find_bindir()
        if bindir is None:
            raise PgUnavailable("PostgreSQL server binaries (initdb, postgres) are not installed")
        user = _ensure_user() if os.geteuid() == 0 else None
        # Not under pytest's basetemp: its parents are 0700 root, which postgres cannot enter.
        base = Path(tempfile.mkdtemp(prefix="pop3proto-pg-"))
        cluster = cls(bindir, base, user)
        try:
            if user is not None:
                os.chown(base, user.pw_uid, user.pw_gid)
            cluster._initdb()
            cluster._run(settings or {}, timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _popen_args(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        cmd = [str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
               "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                cwd=self.base, timeout=300, **self._popen_args())  # fmt: skip
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise PgUnavailable(f"initdb failed: {' | '.join(tail)}")

    def _run(self, settings: dict[str, str], timeout: float) -> None:
        options = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.base),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            **settings,
        }
        for _attempt in range(5):
            self.port = _free_port()
            cmd = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
            for key, value in options.items():
                cmd += ["-c", f"{key}={value}"]
            with open(self.log, "ab") as log:
                if self._user is not None:
                    os.chown(self.log, self._user.pw_uid, self._user.pw_gid)
                self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, cwd=self.base,
                                              **self._popen_args())  # fmt: skip
            if self._wait_ready(timeout):
                return
            if self._proc.poll() is None:
                break  # running but never answering: not a port race
            self._proc = None
            if "could not bind" not in self.log.read_text(errors="replace"):
                break
        tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
        raise PgUnavailable(f"postgres did not start: {' | '.join(tail)}")

    def _wait_ready(self, timeout: float) -> bool:
        import psycopg

        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                psycopg.connect(self.conninfo("postgres"), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        return None if self._proc is None else self._proc.pid

    def stop(self) -> None:
        """Stop the server by its PID and remove the directory.  Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # fast shutdown: disconnect clients, then exit
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases -------------------------------------------------------------

    def conninfo(self, dbname: str = "postgres") -> str:
        """A libpq connection string for *dbname* as the superuser ``postgres``."""
        return f"host={self.host} port={self.port} user=postgres dbname={dbname}"

    def createdb(self, name: str) -> str:
        """Create an empty database; its conninfo."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.conninfo(name)


def running_or_skip() -> Iterator[PgCluster]:
    """The body of a pytest fixture: a started cluster, stopped afterwards.

    Use as ``yield from pgserver.running_or_skip()``.  The calling test skips
    when psycopg, psycopg_pool or the server binaries are missing, or when
    the cluster cannot start (the reason is in the skip message).
    """
    import pytest

    pytest.importorskip("psycopg")
    pytest.importorskip("psycopg_pool")
    try:
        cluster = PgCluster.start()
    except PgUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()
