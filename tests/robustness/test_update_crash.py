"""8. A crash during UPDATE: all the marked messages go, or none; never an unmarked one.

A maildrop of 400 messages, 300 marked with DELE, then QUIT, then SIGKILL
of the server process 0-30 ms later.  After a restart (whose first lock
replays a committed deletion journal) a login must find either all 300
marked messages gone or all present, and every unmarked message intact.
Each delay uses its own user, so one restarted server checks the last
crash and suffers the next.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

from clients import Raw

from .conftest import (
    Figure,
    Mail,
    ServerProc,
    body,
    fill,
    logged_in,
    maildir_messages,
    message_key,
    write_passwd,
)

TOTAL = 400
DELAYS_MS = [0, 1, 2, 3, 5, 7, 10, 15, 20, 30]
MARKED = [n for n in range(1, TOTAL + 1) if n % 4]  # 300 messages
KEPT = [n for n in range(1, TOTAL + 1) if n % 4 == 0]  # 100 messages
MESSAGES = [body(n) for n in range(1, TOTAL + 1)]


def crash_mail(base: Path) -> Mail:
    root = base / "root"
    root.mkdir(parents=True)
    users = {f"crash{d:02d}": f"pw-{d:02d}" for d in DELAYS_MS}
    mail = Mail(root, write_passwd(base / "users", users), users)
    for user in users:
        fill(root, user, MESSAGES)
    return mail


def mark_and_quit(server: ServerProc, user: str, password: str, delay_ms: int) -> bytes:
    """Log in, DELE the marked ones (one write), QUIT, SIGKILL *delay_ms* later."""
    c = logged_in(server.port, user, password, timeout=30)
    try:
        assert c.cmd("STAT").startswith(b"+OK %d " % TOTAL)
        c.send(b"".join(b"DELE %d\r\n" % n for n in MARKED))
        replies = [c.line() for _ in MARKED]
        assert replies == [b"+OK Marked to be deleted."] * len(MARKED)
        c.send(b"QUIT\r\n")
        if delay_ms:
            time.sleep(delay_ms / 1000)
        os.kill(server.pid, signal.SIGKILL)
        c.sock.settimeout(5)
        try:
            return c.line()
        except (EOFError, OSError):
            return b"<none>"
    finally:
        c.close()
        server.proc.kill()  # reap it


def test_sigkill_during_update_is_all_or_nothing(
    transport: str, tmp_path: Path, figure: Figure
) -> None:
    mail = crash_mail(tmp_path)
    keys = {n: message_key(n, MESSAGES[n - 1]) for n in range(1, TOTAL + 1)}
    outcomes: collections.Counter[str] = collections.Counter()
    per_delay: dict[int, str] = {}
    server = ServerProc(transport, mail, "--log-level", "WARNING")
    try:
        for delay in DELAYS_MS:
            user = f"crash{delay:02d}"
            reply = mark_and_quit(server, user, mail.users[user], delay)
            journal = (mail.root / user / "pop3proto-journal").exists()
            before = maildir_messages(mail.root, user)
            unlinked_at_crash = sum(keys[n] not in before for n in MARKED)
            server = ServerProc(transport, mail, "--log-level", "WARNING")
            with logged_in(server.port, user, mail.users[user], timeout=30) as c:
                stat = c.cmd("STAT")
                assert c.cmd("QUIT").startswith(b"+OK")
            on_disk = maildir_messages(mail.root, user)
            assert not (mail.root / user / "pop3proto-journal").exists(), "journal not replayed"
            for n in KEPT:  # never an unmarked message gone or changed
                assert on_disk.get(keys[n]) == MESSAGES[n - 1], (delay, n)
            present = sum(keys[n] in on_disk for n in MARKED)
            assert present in (0, len(MARKED)), f"{delay} ms: {present} of 300 marked left"
            assert stat.startswith(b"+OK %d " % len(on_disk)), (stat, len(on_disk))
            outcome = "all-gone" if present == 0 else "all-present"
            if reply.startswith(b"+OK"):
                assert outcome == "all-gone", "QUIT said +OK but the messages are back"
            outcomes[outcome] += 1
            per_delay[delay] = (
                f"{outcome} (QUIT reply {'+OK' if reply.startswith(b'+OK') else 'none'}, "
                f"journal left: {journal}, unlinked at the crash: {unlinked_at_crash}/300)"
            )
    finally:
        server.stop()
    figure("update_crash_outcomes", dict(outcomes))
    figure("update_crash_by_delay_ms", per_delay)
    assert sum(outcomes.values()) == len(DELAYS_MS)


def test_a_clean_quit_of_300_marks_after_a_crash_still_works(
    transport: str, tmp_path: Path
) -> None:
    """The replay leaves a maildrop the next session can use and delete from normally."""
    mail = crash_mail(tmp_path)
    user = "crash00"
    server = ServerProc(transport, mail, "--log-level", "WARNING")
    mark_and_quit(server, user, mail.users[user], 10)
    server = ServerProc(transport, mail, "--log-level", "WARNING")
    try:
        with logged_in(server.port, user, mail.users[user], timeout=30) as c:
            count = int(c.cmd("STAT").split()[1])
            c.send(b"".join(b"DELE %d\r\n" % n for n in range(1, count + 1)))
            assert all(c.line().startswith(b"+OK") for _ in range(count))
            assert c.cmd("QUIT").startswith(b"+OK")
        with Raw(server.port) as c:
            assert c.login(user, mail.users[user]).startswith(b"+OK")
            assert c.cmd("STAT") == b"+OK 0 0"
    finally:
        server.stop()
