"""10. Concurrency: one maildrop is held once; deliveries and other MUAs never lose mail.

* A second login gets ``-ERR [IN-USE]``, in the same server process or in
  another one serving the same Maildir root.
* Mail delivered (``MaildirStorage.deliver``) during a session is not in its
  listing and survives its QUIT even with every listed message marked.
* Two clients race to log in, delete one message and quit, over and over:
  every message one of them deleted is gone, exactly once, and nothing else.
* QUITs of two maildrops at the same instant both complete.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import Raw, running

from pop3proto.maildir import MaildirStorage
from pop3proto.server import Server

from .conftest import Figure, Mail, body, logged_in, make_mail, server_proc

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}


@pytest.fixture
def served(transport: str, mail: Mail) -> Iterator[Server]:
    with running(transport, **mail.options(auth_failure_delay=0)) as server:
        yield server


def test_a_second_session_on_one_maildrop_gets_in_use(served: Server, mail: Mail) -> None:
    port = served.cget("port")
    with logged_in(port, "alice", mail.users["alice"]) as first:
        with Raw(port) as second:
            assert second.login("alice", mail.users["alice"]).startswith(b"-ERR [IN-USE]")
            assert second.cmd("STAT").startswith(b"-ERR")  # still not logged in
        assert first.cmd("DELE 1").startswith(b"+OK")
        assert first.cmd("QUIT").startswith(b"+OK")
    with logged_in(port, "alice", mail.users["alice"]) as third:
        assert third.cmd("STAT").startswith(b"+OK 4 ")


def test_the_lock_holds_across_server_processes(transport: str, served: Server, mail: Mail) -> None:
    with server_proc(transport, mail, "--auth-failure-delay", "0") as other:
        with logged_in(served.cget("port"), "alice", mail.users["alice"]) as held:
            with Raw(other.port) as c:
                assert c.login("alice", mail.users["alice"]).startswith(b"-ERR [IN-USE]")
            assert held.cmd("QUIT").startswith(b"+OK")
        with logged_in(other.port, "alice", mail.users["alice"]) as held:
            with Raw(served.cget("port")) as c:
                assert c.login("alice", mail.users["alice"]).startswith(b"-ERR [IN-USE]")
            assert held.cmd("QUIT").startswith(b"+OK")


def test_mail_delivered_during_a_session_survives_its_quit(served: Server, mail: Mail) -> None:
    storage = MaildirStorage(mail.root)
    with logged_in(served.cget("port"), "alice", mail.users["alice"]) as c:
        assert c.cmd("STAT").startswith(b"+OK 5 ")
        new = storage.deliver("alice", body(99))
        assert c.cmd("STAT").startswith(b"+OK 5 ")  # not seen until the next session
        assert c.cmd("RETR 6") == b"-ERR No such message."
        _, listing = c.multi("UIDL")
        assert new.encode() not in listing
        for n in range(1, 6):
            assert c.cmd(f"DELE {n}").startswith(b"+OK")
        late = storage.deliver("alice", body(100))  # arrives between the marks and QUIT
        assert c.cmd("QUIT").startswith(b"+OK")
    left = mail.on_disk("alice")
    assert sorted(left) == sorted([new, late])
    with logged_in(served.cget("port"), "alice", mail.users["alice"]) as c:
        assert c.cmd("STAT").startswith(b"+OK 2 ")


def test_another_mua_renaming_or_deleting_listed_files(served: Server, mail: Mail) -> None:
    """A flag rename (``:2,S`` to ``:2,ST``) is followed; a file deleted meanwhile is no error."""
    cur = mail.root / "alice" / "cur"
    with logged_in(served.cget("port"), "alice", mail.users["alice"]) as c:
        files = sorted(cur.iterdir())
        files[0].rename(files[0].with_name(files[0].name + "T"))
        files[1].unlink()
        assert c.cmd("RETR 1").startswith(b"+OK")
        assert c.block() == body(1).replace(b"\n", b"\r\n")
        assert c.cmd("RETR 2").startswith(b"-ERR [SYS/TEMP]")
        assert c.cmd("DELE 1").startswith(b"+OK")
        assert c.cmd("DELE 2").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")
    assert len(mail.on_disk("alice")) == 3


def test_two_clients_racing_login_dele_quit_lose_nothing(
    transport: str, tmp_path: Path, figure: Figure
) -> None:
    total = 40
    mail = make_mail(tmp_path, {"alice": USERS["alice"]}, [body(n) for n in range(1, total + 1)])
    initial = mail.on_disk("alice")
    deleted: list[tuple[str, bytes]] = []
    counts: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    stop = time.monotonic() + 4.0

    def client(name: str) -> None:
        try:
            while time.monotonic() < stop and counts[f"{name}-quit"] < 12:
                with Raw(port) as c:
                    reply = c.login("alice", USERS["alice"])
                    if b"[IN-USE]" in reply:
                        counts["in-use"] += 1
                        continue
                    assert reply.startswith(b"+OK"), reply
                    uid = c.cmd("UIDL 1").split()[2]
                    assert c.multi("RETR 1")[0].startswith(b"+OK")
                    assert c.cmd("DELE 1").startswith(b"+OK")
                    assert c.cmd("QUIT").startswith(b"+OK")
                    deleted.append((name, uid))
                    counts[f"{name}-quit"] += 1
        except BaseException as exc:  # collected below
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    with running(transport, **mail.options(auth_failure_delay=0)) as server:
        port = server.cget("port")
        threads = [threading.Thread(target=client, args=(n,)) for n in ("one", "two")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert errors == []
    uids = [uid for _, uid in deleted]
    assert len(uids) == len(set(uids)), "a message was deleted by both clients"
    left = mail.on_disk("alice")
    gone = {k.encode() for k in initial} - {k.encode() for k in left}
    assert gone == set(uids), "deleted set differs from what the clients deleted"
    assert all(left[k] == initial[k] for k in left)
    figure("race_counts", dict(counts))
    assert counts["one-quit"] + counts["two-quit"] == len(uids) > 4


def test_quits_of_two_maildrops_at_the_same_instant(served: Server, mail: Mail) -> None:
    port = served.cget("port")
    barrier = threading.Barrier(2, timeout=10)
    replies: dict[str, bytes] = {}

    def session(user: str) -> None:
        with logged_in(port, user, mail.users[user]) as c:
            c.send(b"".join(b"DELE %d\r\n" % n for n in (1, 3, 5)))
            for _ in range(3):
                assert c.line().startswith(b"+OK")
            barrier.wait()
            replies[user] = c.cmd("QUIT")

    threads = [threading.Thread(target=session, args=(u,)) for u in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert len(replies) == 2
    assert all(r.startswith(b"+OK") for r in replies.values())
    for user in ("alice", "bob"):
        assert sorted(mail.on_disk(user).values()) == sorted([body(2), body(4)])
