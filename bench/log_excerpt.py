"""Log lines of one scripted POP3 session on pop3proto and on Dovecot, for comparison.

Issue 13 asks for "a log excerpt of a session with a failed and a successful login,
RETR, TOP and DELE, next to the same session on Dovecot".  This script builds a
throwaway Maildir (user ``alice``, two messages) and a passwd-file in a temporary
directory, starts

* pop3proto: ``python -m pop3proto.transports.anyio --port 0`` (log on stderr,
  into a file), and
* Dovecot 2.3 (``dovecot.py``'s configuration, unprivileged on 127.0.0.1, with
  ``auth_verbose = yes``, ``auth_verbose_passwords = no`` and
  ``verbose_proctitle = yes``, logging to a file),

drives the same session against each with stdlib ``poplib`` (USER/PASS with a wrong
password, QUIT; a new connection with the right one, RETR 1, TOP 2 0, DELE 1, QUIT),
and prints each server's log lines for that session, labelled, one after the other.
Both servers keep their default failed-login delay (2 s).  Every process started is
stopped by PID.  Run as root (Dovecot's mail processes run as the ``mail`` user)::

    python bench/log_excerpt.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import poplib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable

from dovecot import Dovecot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = "alice"
SECRET = "correct horse"
MESSAGES = (
    b"From: bob@example.org\nTo: alice@example.org\nSubject: first\n\nHello Alice.\n",
    b"From: carol@example.org\nTo: alice@example.org\nSubject: second\n\n"
    b"Two lines\n.and a dot line\n",
)
# The lines each server writes when a session ends (the excerpt waits for both).
POP3PROTO_END = re.compile(r"Disconnected|Logged out|Connection closed")
DOVECOT_END = re.compile(r"Disconnected|Logged out|Aborted login")


def make_tree(top: str) -> types.SimpleNamespace:
    """A Maildir root with USER's two messages, a passwd-file, and Dovecot's index dir."""
    os.chmod(top, 0o755)  # Dovecot's mail processes (user mail) must traverse it
    mail = os.path.join(top, "mail")
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(mail, USER, sub))
    for i, body in enumerate(MESSAGES, 1):
        name = f"170000000{i}.M{i}P1.bench,S={len(body)}:2,"
        with open(os.path.join(mail, USER, "cur", name), "wb") as f:
            f.write(body)
    passwd = os.path.join(top, "passwd")
    with open(passwd, "w", encoding="utf-8") as f:
        f.write(f"{USER}:{{PLAIN}}{SECRET}::::::\n")
    os.chmod(passwd, 0o644)
    return types.SimpleNamespace(mail=mail, passwd=passwd, dovecot_dir=os.path.join(top, "dovecot"))


def scripted_session(port: int) -> list[str]:
    """The session of the excerpt, with poplib; returns the client's side of it."""
    seen: list[str] = []
    c = poplib.POP3("127.0.0.1", port, timeout=30)
    seen.append(f"S: {c.getwelcome().decode()}")
    seen.append(f"C: USER {USER} -> {c.user(USER).decode()}")
    try:
        c.pass_("wrong password")
        seen.append("C: PASS (wrong) -> +OK ?!")
    except poplib.error_proto as exc:
        reply = exc.args[0]
        seen.append(f"C: PASS (wrong) -> {reply.decode() if isinstance(reply, bytes) else reply}")
    seen.append(f"C: QUIT -> {c.quit().decode()}")
    c = poplib.POP3("127.0.0.1", port, timeout=30)
    seen.append(f"S: {c.getwelcome().decode()}")
    seen.append(f"C: USER {USER} -> {c.user(USER).decode()}")
    seen.append(f"C: PASS (right) -> {c.pass_(SECRET).decode()}")
    resp, lines, octets = c.retr(1)
    seen.append(f"C: RETR 1 -> {resp.decode()} ({len(lines)} lines, {octets} octets read)")
    resp, lines, octets = c.top(2, 0)
    seen.append(f"C: TOP 2 0 -> {resp.decode()} ({len(lines)} lines, {octets} octets read)")
    seen.append(f"C: DELE 1 -> {c.dele(1).decode()}")
    seen.append(f"C: QUIT -> {c.quit().decode()}")
    return seen


def read_from(path: str, offset: int) -> list[str]:
    """The lines of *path* after byte *offset*."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace").splitlines()


def wait_lines(
    path: str, offset: int, done: Callable[[list[str]], bool], timeout: float
) -> list[str]:
    """The lines after *offset* once *done* accepts them (or whatever is there at *timeout*)."""
    deadline = time.monotonic() + timeout
    lines = read_from(path, offset)
    while not done(lines) and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = read_from(path, offset)
    return lines


def two_ends(pattern: re.Pattern[str]) -> Callable[[list[str]], bool]:
    """True once two session-end lines (one per connection of the script) are logged."""
    return lambda lines: sum(1 for line in lines if pattern.search(line)) >= 2


def run_pop3proto(
    tree: types.SimpleNamespace, tmp: str, transport: str
) -> tuple[list[str], list[str]]:
    """Start pop3proto, run the session, stop it; (client lines, log lines)."""
    log = os.path.join(tmp, "pop3proto.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    argv = [
        sys.executable,
        "-m",
        f"pop3proto.transports.{transport}",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--passwd-file",
        tree.passwd,
        "--maildir-root",
        tree.mail,
    ]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err, cwd=REPO, env=env, start_new_session=True
        )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()  # "pop3proto (anyio) listening on 127.0.0.1:N"
        m = re.search(r":(\d+)\s*$", first)
        if m is None:
            raise RuntimeError(f"pop3proto did not say where it listens: {first!r}")
        offset = os.path.getsize(log)
        client = scripted_session(int(m.group(1)))
        lines = wait_lines(log, offset, two_ends(POP3PROTO_END), 10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
    return client, lines


class VerboseDovecot(Dovecot):
    """``dovecot.py``'s Dovecot with the logging an admin turns on to read logins."""

    def write_config(self) -> str:
        conf = super().write_config()
        with open(conf, encoding="utf-8") as f:
            text = f.read()
        text = text.replace("verbose_proctitle = no", "verbose_proctitle = yes")
        text += "auth_verbose = yes\nauth_verbose_passwords = no\n"
        with open(conf, "w", encoding="utf-8") as f:
            f.write(text)
        return conf


def run_dovecot(tree: types.SimpleNamespace) -> tuple[list[str], list[str], str]:
    """Start Dovecot, run the session, stop it; (client lines, log lines, version)."""
    dc = VerboseDovecot(tree)
    dc.start()
    try:
        offset = os.path.getsize(dc.log_path)
        client = scripted_session(dc.port)
        lines = wait_lines(dc.log_path, offset, two_ends(DOVECOT_END), 10)
    finally:
        dc.stop()
        dc.cleanup()
    return client, lines, dc.version


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", default="anyio", choices=("anyio", "blocking", "selectors"))
    args = ap.parse_args()
    top = tempfile.mkdtemp(prefix="pop3proto-log-excerpt-")
    os.chmod(top, 0o755)
    try:
        # One tree each: pop3proto's DELE+QUIT removes message 1 before Dovecot sees it.
        p_client, p_lines = run_pop3proto(make_tree_in(top, "p"), top, args.transport)
        d_client, d_lines, version = run_dovecot(make_tree_in(top, "d"))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print("== The session as poplib saw it: pop3proto | Dovecot ==")
    width = max(len(line) for line in p_client)
    for mine, theirs in zip(p_client, d_client, strict=True):
        print(f"{mine:<{width}} | {theirs}")
    print()
    print(f"== pop3proto ({args.transport} transport), stderr ==")
    for line in p_lines:
        print(line)
    print()
    print(f"== Dovecot {version.split()[0]}, log_path ==")
    for line in d_lines:
        print(line)
    return 0


def make_tree_in(top: str, name: str) -> types.SimpleNamespace:
    """``make_tree`` in a fresh subdirectory *name* of *top*."""
    path = os.path.join(top, name)
    os.mkdir(path)
    return make_tree(path)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
