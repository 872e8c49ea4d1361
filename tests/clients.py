"""Helpers for the socket tests: servers on 127.0.0.1:0, a Maildir + passwd-file, real clients.

Everything here waits with a timeout and cleans up after itself:

* ``running(transport, **options)`` brings a ``Server`` up on 127.0.0.1
  port 0 and always destroys it (``kill``) on the way out;
* ``make_env(tmp_path)`` builds a Maildir root and a passwd-file holding the
  ``MESSAGES`` corpus for the users it is given;
* ``Raw`` is a line client over a plain socket that counts bytes and can
  read a multi-line block as the exact bytes the server sent;
* ``login``/``pop3_session`` drive stdlib ``poplib``;
* ``curl``/``mpop`` run the real clients with timeouts; ``Proc`` runs a
  command and collects its output lines in background threads;
* ``tcllib_pop3`` runs Tcllib's ``pop3`` client in tclsh (plain or over
  ``tls::socket``) and ``tcl_text``/``tcl_top`` say what it must return.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import poplib
import queue
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pop3proto.maildir import MaildirStorage
from pop3proto.passwd import PasswdFile, hash_password
from pop3proto.server import Server

HOST = "127.0.0.1"
TIMEOUT = 10.0
CRLF = b"\r\n"
REPO = Path(__file__).resolve().parent.parent

#: Every transport the package ships (or is about to).
TRANSPORTS = ("blocking", "selectors", "anyio")

#: A corpus that exercises dot-stuffing and line-end normalisation.
MESSAGES: tuple[bytes, ...] = (
    # LF line ends, body lines starting with '.', a line that is just '.'
    b"From: Alice <alice@example.org>\nTo: bob@example.org\nSubject: dots\n\n"
    b".hidden line\n..two dots\n.\nlast line\n",
    # no final newline
    b"From: Carol <carol@example.org>\nSubject: no final newline\n\nfirst\nsecond\nthird",
    # CRLF line ends, dot lines, more body lines than any TOP below asks for
    b"From: Dave <dave@example.org>\r\nSubject: crlf\r\n\r\nbody 1\r\n.body 2\r\n"
    b"body 3\r\n.\r\nbody 5\r\n",
    # mixed CRLF and LF
    b"From: Eve <eve@example.org>\nSubject: mixed\r\n\nline a\r\n.line b\nline c\r\n",
    # several chunks long, with dot lines everywhere (chunk boundaries included)
    b"From: Frank <frank@example.org>\nSubject: big\n\n"
    + b"".join(
        (b"." if i % 7 == 0 else b"") + b"line %06d " % i + b"x" * (i % 97) + b"\n"
        for i in range(3000)
    ),
)


# --------------------------------------------------------------------- bytes


def wire(data: bytes) -> bytes:
    """What RETR must deliver (after un-stuffing): CRLF line ends, ending in CRLF."""
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def top(data: bytes, lines: int) -> bytes:
    """What ``TOP n lines`` must deliver: the headers, the blank line, *lines* body lines."""
    msg = wire(data)
    head, sep, body = msg.partition(b"\r\n\r\n")
    if not sep:
        return msg
    body_lines = body.split(b"\r\n")[:-1]
    return head + sep + b"".join(line + CRLF for line in body_lines[:lines])


def stuff(data: bytes) -> bytes:
    """The multi-line block the server must put on the wire for *data* (before the '.')."""
    return b"".join(
        (b"." + line if line.startswith(b".") else line) + CRLF
        for line in wire(data).split(CRLF)[:-1]
    )


# --------------------------------------------------------------------- transports


def transport_missing(name: str) -> str | None:
    """Why transport *name* cannot run here (its module is not written yet), else None.

    Only a missing module (or the missing ``anyio`` package) counts: a module
    that exists but fails to import is a bug the tests must show.
    """
    module = f"pop3proto.transports.{name}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name in (module, "anyio", "trio"):
            return f"{module} is not available: {exc}"
        raise
    return None


def require_transport(name: str) -> None:
    """Skip the calling test when transport *name* does not exist yet."""
    reason = transport_missing(name)
    if reason is not None:
        pytest.skip(reason)


@contextlib.contextmanager
def running(transport: str = "blocking", **options: Any) -> Iterator[Server]:
    """A Server up on 127.0.0.1:0 for the duration of the block; always destroyed."""
    require_transport(transport)
    server = Server(**{"host": HOST, "port": 0, "transport": transport, **options})
    server.up()
    try:
        yield server
    finally:
        destroy(server)


def destroy(server: Server, mode: str = "kill", timeout: float = TIMEOUT) -> None:
    """``server.destroy(mode)`` that fails the test instead of hanging it."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.destroy(mode, timeout=timeout)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True, name="test-destroy")
    thread.start()
    thread.join(timeout + 5)
    if thread.is_alive():
        raise AssertionError(
            f"Server.destroy({mode!r}) hung for {timeout + 5}s (state {server.state})"
        )
    if errors:
        raise errors[0]


def port_of(server: Server) -> int:
    port = server.cget("port")
    assert isinstance(port, int)
    assert port != 0
    return port


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll *predicate* until it is true or *timeout* passes; its last truth value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


# --------------------------------------------------------------------- mail fixtures


@dataclass
class MailEnv:
    """A Maildir root with messages, and a passwd-file for the same users."""

    root: Path
    passwd: Path
    users: dict[str, str]
    storage: MaildirStorage
    auth: PasswdFile
    #: user -> the bytes delivered, in delivery (= message number) order
    messages: dict[str, list[bytes]] = field(default_factory=dict)

    def options(self, **more: Any) -> dict[str, Any]:
        return {"auth": self.auth, "storage": self.storage, **more}

    def on_disk(self, user: str) -> list[bytes]:
        """The message files of *user* now in cur/ and new/, in delivery order."""
        return maildir_files(self.root, user)


def maildir_files(root: Path, user: str) -> list[bytes]:
    names: list[tuple[str, Path]] = []
    for sub in ("new", "cur"):
        d = root / user / sub
        if d.is_dir():
            names += [(p.name, p) for p in d.iterdir() if p.is_file()]
    out = []
    for _, path in sorted(names, key=lambda np: _maildir_order(np[0])):
        try:
            out.append(path.read_bytes())
        except FileNotFoundError:  # deleted (or renamed) between the listing and the read
            continue
    return out


def _maildir_order(name: str) -> tuple[int, int, int, str]:
    m = re.match(r"(\d+)\.M(\d+)P\d+Q(\d+)", name)
    if m is None:
        return (0, 0, 0, name)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), name)


def make_env(
    tmp_path: Path,
    users: Mapping[str, str] | None = None,
    messages: Sequence[bytes] = MESSAGES,
    *,
    scheme: str = "PLAIN",
) -> MailEnv:
    """A Maildir root under *tmp_path* with *messages* for every user, plus a passwd-file."""
    users = dict(users or {"alice": "alice-Secret-1", "bob": "bob-Secret-2"})
    root = tmp_path / "mail"
    root.mkdir()
    passwd = tmp_path / "users"
    passwd.write_text(
        "".join(f"{u}:{hash_password(pw, scheme)}::::::\n" for u, pw in users.items()),
        encoding="utf-8",
    )
    storage = MaildirStorage(root)
    env = MailEnv(root, passwd, users, storage, PasswdFile(passwd))
    for user in users:
        for data in messages:
            storage.deliver(user, data)
        env.messages[user] = list(messages)
    return env


# --------------------------------------------------------------------- clients


class Raw:
    """A POP3 line client over a plain socket; counts the bytes both ways."""

    def __init__(
        self,
        port: int,
        *,
        host: str = HOST,
        timeout: float = TIMEOUT,
        source: str | None = None,
        greeting: bool = True,
    ) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.buf = bytearray()
        self.sent = 0
        self.received = 0
        self.greeting = self.line() if greeting else b""

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def local_port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise EOFError(f"server closed the connection; unread: {bytes(self.buf[:200])!r}")
        self.buf += chunk
        self.received += len(chunk)

    def line(self) -> bytes:
        """The next line, without its CRLF (EOFError if the server closes first)."""
        start = 0
        while True:
            i = self.buf.find(CRLF, start)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return out
            start = max(0, len(self.buf) - 1)
            self._fill()

    def cmd(self, text: str | bytes) -> bytes:
        """Send one command line and return the status line."""
        self.send((text.encode() if isinstance(text, str) else text) + CRLF)
        return self.line()

    def raw_block(self) -> bytes:
        """The rest of a multi-line block exactly as sent, without the final '.' line."""
        start = 0
        while True:
            if self.buf.startswith(b".\r\n"):
                del self.buf[:3]
                return b""
            i = self.buf.find(b"\r\n.\r\n", start)
            if i >= 0:
                out = bytes(self.buf[: i + 2])
                del self.buf[: i + 5]
                return out
            start = max(0, len(self.buf) - 4)
            self._fill()

    def block(self) -> bytes:
        """The rest of a multi-line block, un-stuffed: CRLF-terminated lines."""
        data = self.raw_block()
        return b"".join(
            (line[1:] if line.startswith(b".") else line) + CRLF for line in data.split(CRLF)[:-1]
        )

    def multi(self, text: str) -> tuple[bytes, bytes]:
        """A multi-line command: (status line, un-stuffed block or b"" after -ERR)."""
        status = self.cmd(text)
        if not status.startswith(b"+OK"):
            return status, b""
        return status, self.block()

    def login(self, user: str, password: str) -> bytes:
        status = self.cmd(f"USER {user}")
        assert status.startswith(b"+OK"), status
        return self.cmd(f"PASS {password}")

    def closed(self, timeout: float = 5.0) -> bytes | None:
        """Wait for the server to close; everything it sent first, or None on timeout."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    out = bytes(self.buf)
                    self.buf.clear()
                    return out
                self.buf += chunk
                self.received += len(chunk)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return bytes(self.buf)
        return None

    def abort(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a crashing client would."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def not_served(port: int) -> bool:
    """Whether a new connection to *port* is refused, or closed without a greeting."""
    try:
        sock = socket.create_connection((HOST, port), timeout=5)
    except ConnectionRefusedError:
        return True
    with sock:
        try:
            return sock.recv(100) == b""
        except ConnectionResetError:
            return True


def login(port: int, user: str, password: str, *, timeout: float = TIMEOUT) -> poplib.POP3:
    """A poplib client logged in with USER/PASS (closed again if the login fails)."""
    client = poplib.POP3(HOST, port, timeout=timeout)
    try:
        client.user(user)
        client.pass_(password)
    except BaseException:
        client.close()
        raise
    return client


def retr(client: poplib.POP3, n: int) -> tuple[bytes, bytes]:
    """(status line, the message as CRLF lines) from poplib's RETR."""
    status, lines, _ = client.retr(n)
    return status, b"".join(line + CRLF for line in lines)


def top_of(client: poplib.POP3, n: int, count: int) -> bytes:
    _, lines, _ = client.top(n, count)
    return b"".join(line + CRLF for line in lines)


@contextlib.contextmanager
def pop_error(prefix: bytes) -> Iterator[None]:
    """Expect ``poplib.error_proto`` whose reply starts with *prefix* (bytes: ``-bb`` safe)."""
    with pytest.raises(poplib.error_proto) as info:
        yield
    reply = info.value.args[0]
    assert isinstance(reply, bytes)
    assert reply.startswith(prefix), reply


def try_login(port: int, user: str, password: str, timeout: float = 5.0) -> poplib.POP3:
    """Log in, retrying while the maildrop is still locked by a dying session."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return login(port, user, password)
        except poplib.error_proto as exc:
            if b"[IN-USE]" not in exc.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --------------------------------------------------------------------- external programs


def need_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def curl(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[bytes]:
    """Run curl quietly with a 10 s transfer limit (and a hard subprocess timeout)."""
    exe = need_program("curl")
    return subprocess.run(
        [exe, "-s", "-S", "--max-time", "10", *args],
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def mpop(
    port: int,
    user: str,
    password: str,
    maildir: Path,
    uidls: Path,
    *extra: str,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[bytes]:
    """Fetch with mpop into *maildir* (command-line settings only: ``--host`` ignores configs)."""
    exe = need_program("mpop")
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [
            exe,
            f"--host={HOST}",
            f"--port={port}",
            "--auth=user",
            f"--user={user}",
            f"--passwordeval=echo {password}",
            "--tls=off",
            "--timeout=10",
            "--received-header=off",
            f"--delivery=maildir,{maildir}",
            f"--uidls-file={uidls}",
            *extra,
        ],
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(uidls.parent)},
        check=False,
    )


def fetched(maildir: Path) -> list[bytes]:
    """The messages mpop delivered into *maildir*, in delivery order."""
    files = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir() if p.is_file()]
    files.sort(key=lambda p: _mpop_order(p.name))
    return [p.read_bytes() for p in files]


def _mpop_order(name: str) -> tuple[int, int, str]:
    m = re.match(r"(\d+)\.[^.]*?(\d+)", name)
    return (int(m.group(1)), int(m.group(2)), name) if m else (0, 0, name)


class Proc:
    """A subprocess whose stdout and stderr lines are collected by background threads."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.p = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, **(env or {}), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        assert self.p.stdout is not None
        assert self.p.stderr is not None
        self._threads = [
            threading.Thread(
                target=self._pump, args=(self.p.stdout, self.stdout, True), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(self.p.stderr, self.stderr, False), daemon=True
            ),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, into: list[str], notify: bool) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                into.append(line)
                if notify:
                    self._lines.put(line)

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """Wait for a stdout line matching *pattern*."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no stdout line matching {pattern!r} within {timeout}s; "
                    f"stdout={self.stdout!r} stderr={self.stderr!r}"
                )
            try:
                line = self._lines.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if self.p.poll() is not None and self._lines.empty():
                    self._join()
                    if self._lines.empty():
                        raise AssertionError(
                            f"process exited ({self.p.returncode}) before {pattern!r}; "
                            f"stdout={self.stdout!r} stderr={self.stderr!r}"
                        ) from None
                continue
            m = re.search(pattern, line)
            if m:
                return m

    def _join(self) -> None:
        for t in self._threads:
            t.join(5)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """The exit status (kills the process and fails if it takes longer than *timeout*)."""
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.argv} still running after {timeout}s") from None
        self._join()
        return code

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.p.wait(5)
        self._join()


def module_argv(transport: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"pop3proto.transports.{transport}", *args]


def run_module(
    transport: str, *args: str, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run the transport's command to completion (for start-up failures)."""
    return subprocess.run(
        module_argv(transport, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )


# --------------------------------------------------------------------- Tcllib's pop3 client

#: The Tcl side of ``tcllib_pop3``: opens a session with Tcllib's ``pop3::open``
#: (over ``tls::socket`` when a CA file is given), runs each step as
#: ``pop3::<command> $chan <args>`` and prints one line per step,
#: ``<command> ok|err <microseconds> <hex>...``: the result's bytes in hex (one
#: hex word per message for ``retrieve``, which returns a list), or the error text.
#: The channel is binary on input, so every byte reaches the hex as it came.
TCLLIB_SCRIPT = r"""
package require pop3
fconfigure stdout -translation lf -buffering line
proc hex {s} { return [binary encode hex $s] }
lassign $argv host port user password cafile
set opts {}
if {$cafile ne ""} {
    package require tls
    set opts [list -socketcmd [list tls::socket -cafile $cafile -request 1 -require 1]]
}
set t [clock microseconds]
if {[catch {pop3::open {*}$opts $host $user $password $port} chan]} {
    puts "open err [expr {[clock microseconds] - $t}] [hex $chan]"
    exit 2
}
puts "open ok [expr {[clock microseconds] - $t}] [hex $chan]"
foreach step [lrange $argv 5 end] {
    set command [lindex $step 0]
    set t [clock microseconds]
    set failed [catch {pop3::$command $chan {*}[lrange $step 1 end]} result]
    set us [expr {[clock microseconds] - $t}]
    if {$failed} {
        puts "$command err $us [hex $result]"
    } elseif {$command eq "retrieve"} {
        set words {}
        foreach message $result { lappend words [hex $message] }
        puts "$command ok $us [join $words]"
    } else {
        puts "$command ok $us [hex $result]"
    }
}
exit 0
"""


def tcllib_missing(*, tls: bool = False) -> str | None:
    """Why Tcllib's ``pop3`` (and, with *tls*, the Tcl ``tls`` package) cannot run here."""
    tclsh = shutil.which("tclsh")
    if tclsh is None:
        return "tclsh is not installed (Debian: tcl)"
    packages = ["pop3"] + (["tls"] if tls else [])
    for name in packages:
        try:
            probe = subprocess.run(
                [tclsh],
                input=f"package require {name}\nputs ok\n".encode(),
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"tclsh did not answer 'package require {name}' within {TIMEOUT}s"
        if probe.stdout.strip() != b"ok":
            debian = "tcllib" if name == "pop3" else "tcl-tls"
            return f"Tcl package {name} is missing (Debian: {debian}): {probe.stderr!r}"
    return None


def need_tcllib(*, tls: bool = False) -> str:
    """The path of tclsh; skips the calling test when Tcllib (or Tcl ``tls``) is missing."""
    reason = tcllib_missing(tls=tls)
    if reason is not None:
        pytest.skip(reason)
    path = shutil.which("tclsh")
    assert path is not None
    return path


@dataclass(frozen=True)
class TclStep:
    """One ``pop3::`` call of a ``tcllib_pop3`` run: its result bytes or error text."""

    command: str
    ok: bool
    seconds: float
    #: ``retrieve``: one item per message; anything else, or an error: one item
    values: tuple[bytes, ...]

    @property
    def value(self) -> bytes:
        """The result of a command that returns one string, or the error text of any."""
        assert self.command != "retrieve" or not self.ok, "retrieve returns a list: use .values"
        return self.values[0] if self.values else b""


@dataclass(frozen=True)
class TclRun:
    """A finished ``tcllib_pop3`` run: exit status, the login step, the steps, stderr."""

    returncode: int
    opened: TclStep
    steps: tuple[TclStep, ...]
    stderr: bytes

    def __getitem__(self, i: int) -> TclStep:
        return self.steps[i]


def tcllib_pop3(
    port: int,
    user: str,
    password: str,
    steps: Sequence[str],
    *,
    cafile: Path | None = None,
    host: str = HOST,
    timeout: float = 60.0,
) -> TclRun:
    """Run Tcllib's ``pop3`` client in tclsh: ``pop3::open``, then each step, in one session.

    A step is a Tcl word list such as ``"retrieve 1 end"``, ``"top 2 0"``,
    ``"delete 3"``, ``"status"``, ``"list"`` or ``"close"`` (QUIT).  With
    *cafile* the client connects with ``tls::socket`` and requires a
    certificate chain to that CA (implicit TLS).  The subprocess is killed
    after *timeout* seconds (Tcllib's client has no timeouts of its own).
    """
    exe = need_tcllib(tls=cafile is not None)
    argv = [exe, "/dev/stdin", host, str(port), user, password, str(cafile or ""), *steps]
    proc = subprocess.run(
        argv,
        input=TCLLIB_SCRIPT.encode(),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    parsed: list[TclStep] = []
    for line in proc.stdout.decode("ascii").splitlines():
        command, status, micros, *words = line.split(" ")
        values = tuple(bytes.fromhex(w) for w in words if w)
        if (command != "retrieve" or status != "ok") and not values:
            values = (b"",)
        parsed.append(TclStep(command, status == "ok", int(micros) / 1e6, values))
    if not parsed or parsed[0].command != "open":
        raise AssertionError(f"tclsh printed no open line: {proc.stdout!r} {proc.stderr!r}")
    return TclRun(proc.returncode, parsed[0], tuple(parsed[1:]), proc.stderr)


def tcl_text(data: bytes) -> bytes:
    """What Tcllib's ``pop3::retrieve`` returns for a message stored as *data*.

    The message as the server sends it (CRLF lines, an empty message as one
    empty line), un-stuffed, with every CRLF turned into LF (Tcllib's
    ``RetrFast`` maps CRLF and CR to LF).
    """
    return (wire(data) or CRLF).replace(CRLF, b"\n")


def tcl_top(data: bytes, lines: int) -> bytes:
    """What Tcllib's ``pop3::top`` returns for ``TOP n lines`` of *data* (LF lines)."""
    return (top(data, lines) or CRLF).replace(CRLF, b"\n")
