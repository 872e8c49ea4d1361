"""4. Brute force: growing per-address delays, a close after 3 failures, no user enumeration.

The passwd-file holds ``{SHA512-CRYPT}`` entries, so a real check costs a
hash (about 20 ms here) and the dummy check for an unknown user must cost
the same.  Delays are measured from sending PASS to reading the -ERR.
"""

from __future__ import annotations

import base64
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import Raw, running

from pop3proto.server import Server

from .conftest import Figure, Mail, make_mail

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}


@pytest.fixture
def hashed(tmp_path: Path) -> Mail:
    return make_mail(tmp_path, USERS, scheme="SHA512-CRYPT")


@pytest.fixture
def delayed(transport: str, hashed: Mail) -> Iterator[Server]:
    options = hashed.options(auth_failure_delay=0.2, auth_failure_delay_max=15.0)
    with running(transport, **options) as server:
        yield server


@pytest.fixture
def undelayed(transport: str, hashed: Mail) -> Iterator[Server]:
    with running(transport, **hashed.options(auth_failure_delay=0)) as server:
        yield server


def timed_pass(client: Raw, user: str, password: str) -> tuple[bytes, float]:
    assert client.cmd(f"USER {user}").startswith(b"+OK")
    t0 = time.perf_counter()
    reply = client.cmd(f"PASS {password}")
    return reply, time.perf_counter() - t0


def test_failed_logins_are_delayed_doubling_per_address_and_close_after_3(
    delayed: Server, figure: Figure
) -> None:
    port = delayed.cget("port")
    delays = []
    with Raw(port) as c:
        for _ in range(3):
            reply, took = timed_pass(c, "alice", "wrong")
            assert reply == b"-ERR [AUTH] Authentication failed."
            delays.append(took)
        assert c.closed(5) == b"", "not closed after the third failure"
    # A new connection from the same address goes on from the same count.
    with Raw(port) as c:
        reply, took = timed_pass(c, "nobody", "wrong")
        assert reply == b"-ERR [AUTH] Authentication failed."
        delays.append(took)
        # A success does not reset the count (issue 15, finding 8): an attacker who
        # owns one account must not guess faster; penalties decay with time only.
        reply, _ = timed_pass(c, "alice", USERS["alice"])
        assert reply.startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")
    with Raw(port) as c:
        reply, took = timed_pass(c, "alice", "wrong")
        delays.append(took)
    figure("failed_login_delays_s", [round(d, 3) for d in delays])
    for got, want in zip(delays, [0.2, 0.4, 0.8, 1.6, 3.2], strict=True):
        assert want - 0.01 <= got <= want + 0.3, delays


def test_the_delay_is_capped(transport: str, hashed: Mail, figure: Figure) -> None:
    options = hashed.options(auth_failure_delay=0.1, auth_failure_delay_max=0.3)
    with running(transport, **options) as server, Raw(server.cget("port")) as c:
        delays = [timed_pass(c, "alice", "wrong")[1] for _ in range(3)]
    figure("capped_delays_s", [round(d, 3) for d in delays])
    for got, want in zip(delays, [0.1, 0.2, 0.3], strict=True):
        assert want - 0.01 <= got <= want + 0.3, delays


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_unknown_user_and_wrong_password_get_the_same_replies(undelayed: Server) -> None:
    port = undelayed.cget("port")
    seen: dict[str, list[bytes]] = {}
    for label, user in (("wrong-password", "alice"), ("unknown", "mallory"), ("bad", "../x")):
        replies = []
        with Raw(port) as c:
            replies.append(c.cmd(f"USER {user}"))
            replies.append(c.cmd("PASS not-the-password"))
        with Raw(port) as c:
            replies.append(c.cmd(f"AUTH PLAIN {b64(chr(0) + user + chr(0) + 'not-it')}"))
        with Raw(port) as c:
            assert c.cmd("AUTH LOGIN").startswith(b"+ ")
            assert c.cmd(b64(user)).startswith(b"+ ")
            replies.append(c.cmd(b64("not-the-password")))
        seen[label] = replies
    assert seen["wrong-password"] == seen["unknown"], seen
    assert seen["unknown"][1:] == seen["bad"][1:], seen  # USER refuses "../x" itself
    assert seen["unknown"] == [b"+OK", *[b"-ERR [AUTH] Authentication failed."] * 3]


def test_unknown_users_take_as_long_as_wrong_passwords(undelayed: Server, figure: Figure) -> None:
    port = undelayed.cget("port")
    times: dict[str, list[float]] = {"wrong-password": [], "unknown": [], "invalid-name": []}
    users = {"wrong-password": "alice", "unknown": "mallory", "invalid-name": "a/../b"}
    for _ in range(9):
        for label, user in users.items():  # interleaved, so load affects all alike
            with Raw(port) as c:
                if label == "invalid-name":
                    # USER refuses the name at once; AUTH PLAIN reaches the facade.
                    t0 = time.perf_counter()
                    reply = c.cmd(f"AUTH PLAIN {b64(chr(0) + user + chr(0) + 'nope')}")
                    took = time.perf_counter() - t0
                else:
                    reply, took = timed_pass(c, user, "nope")
                assert reply.startswith(b"-ERR [AUTH]")
                times[label].append(took)
    medians = {k: statistics.median(v) for k, v in times.items()}
    figure("login_failure_median_ms", {k: round(v * 1000, 2) for k, v in medians.items()})
    wrong = medians["wrong-password"]
    assert wrong > 0.001, "a SHA512-CRYPT check should take milliseconds"
    for label in ("unknown", "invalid-name"):
        assert 0.6 * wrong <= medians[label] <= 1.6 * wrong, medians


def guess(port: int, password: str, patience: float) -> bytes | None:
    """One guess on a fresh connection; None if no reply came within *patience* seconds."""
    with Raw(port) as c:
        assert c.cmd("USER alice").startswith(b"+OK")
        c.send(f"PASS {password}\r\n".encode())
        c.sock.settimeout(patience)
        try:
            return c.line()
        except TimeoutError:
            return None  # a delayed reply means a failure: hang up, guess again


def test_failures_from_an_address_delay_its_next_attempt(transport: str, hashed: Mail) -> None:
    options = hashed.options(auth_failure_delay=1.0, auth_failure_delay_max=15.0)
    with running(transport, **options) as server:
        port = server.cget("port")
        for i in range(5):
            guess(port, f"guess-{i}", patience=0.15)
        # The sixth attempt, even with the right password, waits out the penalty.
        t0 = time.monotonic()
        reply = guess(port, USERS["alice"], patience=30)
        assert reply is not None
        assert time.monotonic() - t0 >= 1.0
