"""Issue 15, finding 5: long passwords do not freeze the server.

Pure-Python SHA-crypt costs grow with the password's length, and selectors
used to verify on its only thread: 6 KB passwords from a crowd pushed
another client's NOOP to a 10 s median.  Now passwords are bounded and
verified off the event loop.  Here 20 clients send 6 KB passwords in a loop
(no failed-login delay, so nothing but the server's own work slows them)
while a logged-in victim sends NOOPs: every NOOP is answered, each within a
generous 5 s, on every transport.  ``bench/security_figures.py`` prints the
victim's latency figures.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from clients import Raw

from .conftest import Mail, logged_in, make_mail
from .round2 import KINDS, read_line, serving

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
LONG = "x" * 6000  # "PASS " + 6000 + CRLF fits max_line_length=8192
FLOODERS = 20


def flood(port: int, stop: threading.Event, answers: list[bytes]) -> None:
    """Send long wrong passwords on fresh connections until *stop* is set."""
    while not stop.is_set():
        try:
            with Raw(port, timeout=10) as c:
                while not stop.is_set():
                    assert c.cmd("USER alice") == b"+OK"
                    answers.append(c.cmd(f"PASS {LONG}"))
        except (OSError, EOFError):  # closed after 3 failures: connect again
            continue


@pytest.fixture
def hashed(tmp_path: Path) -> Mail:
    return make_mail(tmp_path, USERS, scheme="SHA512-CRYPT")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_long_password_flood_does_not_starve_a_logged_in_client(
    kind: str, hashed: Mail
) -> None:
    options = hashed.options(auth_failure_delay=0, max_line_length=8192,
                             max_connections_per_address=0)
    with serving(kind, **options) as server:
        port = server.cget("port")
        victim = logged_in(port, "bob", USERS["bob"])
        stop = threading.Event()
        answers: list[bytes] = []
        threads = [threading.Thread(target=flood, args=(port, stop, answers), daemon=True)
                   for _ in range(FLOODERS)]
        try:
            for t in threads:
                t.start()
            deadline = time.monotonic() + 5
            while len(answers) < FLOODERS and time.monotonic() < deadline:
                time.sleep(0.01)  # the flood is under way
            for i in range(20):
                victim.send(b"NOOP\r\n")
                reply = read_line(victim.sock, 5.0)
                assert reply is not None, f"NOOP {i} unanswered for 5 s during the flood"
                assert reply == b"+OK", reply
                time.sleep(0.02)
        finally:
            stop.set()
            for t in threads:
                t.join(15)
        assert answers, "the flood got no answers"
        assert set(answers) == {b"-ERR [AUTH] Authentication failed."}, set(answers)
        assert victim.cmd("QUIT").startswith(b"+OK")
        victim.close()
