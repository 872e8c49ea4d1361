"""Issue 15, finding 8: penalties only grow with failures and decay with time.

A success does not reset an address's count (an attacker with one account
guesses no faster), and parallel guesses queue behind each other instead of
overwriting one queue end.  The penalty each failure earns is read from the
``login_failed`` log event's ``delay`` field; the parallel-guess figure is
the number of checked guesses (``login_failed`` events) in a fixed window.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import pytest
from clients import Raw

from .conftest import Figure, Mail, make_mail
from .round2 import KINDS, captured, read_line, serving

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}


def fail(port: int) -> None:
    with Raw(port) as c:
        assert c.login("alice", "wrong").startswith(b"-ERR [AUTH]")


@pytest.mark.parametrize("kind", KINDS)
def test_a_success_does_not_reset_the_penalty(kind: str, mail: Mail) -> None:
    base = 0.05
    options = mail.options(auth_failure_delay=base, auth_failure_delay_max=5.0)
    with captured() as log, serving(kind, **options) as server:
        port = server.cget("port")
        fail(port)
        fail(port)
        with Raw(port) as c:
            assert c.login("bob", USERS["bob"]).startswith(b"+OK")
            assert c.cmd("QUIT").startswith(b"+OK")
        fail(port)
    delays = [e["delay"] for e in log.of("login_failed")]
    assert delays == [base, 2 * base, 4 * base], delays


def guesser(port: int, stop: float, replies: list[bytes]) -> None:
    """Guess alice's password on fresh connections until *stop* (monotonic)."""
    n = 0
    while time.monotonic() < stop:
        try:
            with Raw(port, timeout=5) as c:
                while time.monotonic() < stop:
                    c.send(f"USER alice\r\nPASS guess-{n}\r\n".encode())
                    n += 1
                    assert c.line() == b"+OK"
                    line = read_line(c.sock, max(0.05, stop - time.monotonic()))
                    if line is None:  # still queued at the end of the window
                        return
                    replies.append(line)
                    if not line.startswith(b"-ERR [AUTH]"):
                        return
        except (OSError, EOFError):  # closed after 3 failures: connect again
            continue


def checked_guesses(kind: str, mail: Mail, parallel: int, window: float,
                    base: float, cap: float) -> tuple[int, int]:
    """(guesses checked, replies received) by *parallel* guessers in *window* seconds."""
    options = mail.options(auth_failure_delay=base, auth_failure_delay_max=cap,
                           max_connections_per_address=0)
    with captured() as log, serving(kind, **options) as server:
        port = server.cget("port")
        replies: list[bytes] = []
        stop = time.monotonic() + window
        threads = [threading.Thread(target=guesser, args=(port, stop, replies), daemon=True)
                   for _ in range(parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(window + 10)
        checked = len(log.of("login_failed"))
    return checked, len(replies)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_parallel_guessers_queue(kind: str, tmp_path: Path, figure: Figure) -> None:
    mail = make_mail(tmp_path, USERS)
    parallel, window, base, cap = 10, 3.0, 0.2, 1.0
    checked, answered = checked_guesses(kind, mail, parallel, window, base, cap)
    figure("checked_guesses", checked)
    # Before the first failure is counted, every guesser may have one guess checked at
    # once; after that each check waits for the queue, which every failure (and every
    # queued guess) pushes on by at least `base`.  (With one queue end overwritten by
    # each failure, every waiting guesser was released together: ~parallel per delay.)
    bound = parallel + math.ceil(window / base) + 1
    assert 1 <= checked <= bound, (checked, bound)
    assert answered <= checked
