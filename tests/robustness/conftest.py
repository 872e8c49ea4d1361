"""Fixtures for the robustness suite: transports, Maildirs, server subprocesses, figures.

* ``transport``: every test runs once per transport; one whose module does
  not import is skipped (with the import error as the reason).
* ``fill``/``write_passwd``: a Maildir written straight to ``cur/`` (no
  fsync, so hundreds of messages cost milliseconds) and a Dovecot passwd-file.
* ``ServerProc``: ``python -m pop3proto.transports.NAME`` on 127.0.0.1 port 0,
  with its RSS (``/proc/PID/status``), stopped by PID (SIGTERM, then SIGKILL).
* ``figure``: print a measured figure and record it as a JUnit property.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from clients import HOST, Proc, Raw, module_argv

from pop3proto._writers import wire_size
from pop3proto.maildir import MaildirStorage
from pop3proto.passwd import PasswdFile, hash_password

TRANSPORTS = ("blocking", "selectors", "anyio")
TIMEOUT = 10.0
#: Run the tests of known bugs (to check a fix): ``POP3PROTO_RUN_BUG_TESTS=1 pytest ...``.
RUN_BUG_TESTS = bool(os.environ.get("POP3PROTO_RUN_BUG_TESTS"))

Figure = Callable[[str, Any], None]


def bug(reason: str) -> pytest.MarkDecorator:
    """Skip a test that shows a known bug (reason ``BUG: ...``) unless POP3PROTO_RUN_BUG_TESTS."""
    return pytest.mark.skipif(not RUN_BUG_TESTS, reason=f"BUG: {reason}")


def transport_problem(name: str) -> str | None:
    """Why transport *name* cannot run (its module fails to import), else None."""
    try:
        importlib.import_module(f"pop3proto.transports.{name}")
    except Exception as exc:
        return f"pop3proto.transports.{name} does not import: {exc!r}"
    return None


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    problem = transport_problem(name)
    if problem is not None:
        pytest.skip(problem)
    return name


@pytest.fixture
def figure(request: pytest.FixtureRequest, record_property: Callable[[str, Any], None]) -> Figure:
    """``figure(name, value)``: print ``[figure] test name = value`` and record it."""

    def record(name: str, value: Any) -> None:
        record_property(name, value)
        print(f"\n[figure] {request.node.name} {name} = {value}", file=sys.stderr, flush=True)

    return record


# --------------------------------------------------------------------- Maildirs


def message_key(n: int, data: bytes, *, base: int = 1_700_000_000) -> str:
    """A Maildir unique name that sorts as message *n* and carries Dovecot's S= and W=."""
    return f"{base + n}.M{n:06d}P4242Q{n}.robust,S={len(data)},W={wire_size(data)}"


def fill(root: Path, user: str, messages: Sequence[bytes], *, first: int = 1) -> list[Path]:
    """Write *messages* into ``root/user/cur`` (numbered from *first*); their paths."""
    box = root / user
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    paths = []
    for n, data in enumerate(messages, first):
        path = box / "cur" / f"{message_key(n, data)}:2,S"
        path.write_bytes(data)
        paths.append(path)
    return paths


def write_passwd(path: Path, users: Mapping[str, str], scheme: str = "PLAIN") -> Path:
    path.write_text(
        "".join(f"{u}:{hash_password(pw, scheme)}::::::\n" for u, pw in users.items()),
        encoding="utf-8",
    )
    return path


def body(n: int, size: int = 0) -> bytes:
    """A message whose every line names it: RETR of the wrong one is easy to spot."""
    head = f"From: robust@example.org\nSubject: message {n}\nX-Number: {n}\n\n".encode()
    lines = [f"this is message {n} line {i}\n".encode() for i in range(3)]
    data = head + b"".join(lines)
    if len(data) < size:
        pad = f"message {n} padding ".encode() + b"p" * 100 + b"\n"
        data += pad * -(-(size - len(data)) // len(pad))
    return data


def maildir_messages(root: Path, user: str) -> dict[str, bytes]:
    """Unique name -> bytes of the regular files now in ``cur/`` and ``new/``."""
    out = {}
    for sub in ("cur", "new"):
        d = root / user / sub
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and not p.is_symlink():
                try:
                    out[p.name.partition(":")[0]] = p.read_bytes()
                except FileNotFoundError:  # the server deleted it since the listing
                    continue
    return out


@dataclass
class Mail:
    """A Maildir root, a PLAIN passwd-file, and what was delivered to whom."""

    root: Path
    passwd: Path
    users: dict[str, str]
    delivered: dict[str, list[bytes]] = field(default_factory=dict)

    @property
    def storage(self) -> MaildirStorage:
        return MaildirStorage(self.root)

    @property
    def auth(self) -> PasswdFile:
        return PasswdFile(self.passwd)

    def options(self, **more: Any) -> dict[str, Any]:
        return {"auth": self.auth, "storage": self.storage, **more}

    def on_disk(self, user: str) -> dict[str, bytes]:
        return maildir_messages(self.root, user)


def make_mail(
    base: Path,
    users: Mapping[str, str] | None = None,
    messages: Sequence[bytes] | None = None,
    *,
    scheme: str = "PLAIN",
) -> Mail:
    users = dict(users or {"alice": "alice-Secret-1", "bob": "bob-Secret-2"})
    messages = list(messages if messages is not None else [body(n) for n in range(1, 6)])
    root = base / "root"
    root.mkdir(parents=True)
    mail = Mail(root, write_passwd(base / "users", users, scheme), users)
    for user in users:
        fill(root, user, messages)
        mail.delivered[user] = list(messages)
    return mail


@pytest.fixture
def mail(tmp_path: Path) -> Mail:
    return make_mail(tmp_path)


def tree(path: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under *path*: relative name -> (kind, size, mtime_ns); symlinks not followed."""
    out: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            kind = (
                "dir" if stat.S_ISDIR(st.st_mode)
                else "link" if stat.S_ISLNK(st.st_mode)
                else "file" if stat.S_ISREG(st.st_mode)
                else "other"
            )  # fmt: skip
            size = st.st_size if kind == "file" else 0
            out[os.path.relpath(p, path)] = (kind, size, st.st_mtime_ns if kind != "dir" else 0)
    return out


# --------------------------------------------------------------------- server processes


def proc_status(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM), in kB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class ServerProc:
    """``python -m pop3proto.transports.NAME`` on 127.0.0.1, port 0, stopped by its PID."""

    def __init__(self, transport: str, mail: Mail, *extra: str, log_level: str = "INFO") -> None:
        self.transport = transport
        self.argv = module_argv(
            transport,
            "--host", HOST,
            "--port", "0",
            "--passwd-file", str(mail.passwd),
            "--maildir-root", str(mail.root),
            "--log-level", log_level,
            *extra,
        )  # fmt: skip
        self.proc = Proc(self.argv)
        try:
            match = self.proc.expect(r"listening on [^ ]+:(\d+)", timeout=20)
        except BaseException:
            self.proc.kill()
            raise
        self.port = int(match.group(1))

    @property
    def pid(self) -> int:
        return self.proc.p.pid

    def alive(self) -> bool:
        return self.proc.p.poll() is None

    def rss_kb(self) -> int:
        return proc_status(self.pid, "VmRSS")

    def hwm_kb(self) -> int:
        return proc_status(self.pid, "VmHWM")

    def reset_hwm(self) -> None:
        """Reset the peak-RSS counter (VmHWM) to the current RSS (Linux clear_refs 5)."""
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.kill()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in *timeout*; the exit status."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except AssertionError:
                return None
        self.proc.kill()
        return self.proc.p.returncode

    def tracebacks(self) -> list[str]:
        return [line for line in self.proc.stderr if "Traceback" in line]


@contextlib.contextmanager
def server_proc(transport: str, mail: Mail, *extra: str, **kw: Any) -> Iterator[ServerProc]:
    server = ServerProc(transport, mail, *extra, **kw)
    try:
        yield server
    finally:
        server.stop()


def greeted(port: int, timeout: float = TIMEOUT) -> Raw:
    return Raw(port, timeout=timeout)


def logged_in(port: int, user: str, password: str, timeout: float = TIMEOUT) -> Raw:
    """A Raw client after USER/PASS (closed and AssertionError if the login fails)."""
    client = Raw(port, timeout=timeout)
    try:
        reply = client.login(user, password)
        assert reply.startswith(b"+OK"), reply
    except BaseException:
        client.close()
        raise
    return client


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)
    return True
