"""Issue 15, finding 1: a symlinked maildrop directory never leads out of the maildrop.

Mallory can write into his own Maildir, so he can replace ``cur/``, ``new/``,
``tmp/`` (or, where ROOT is writable, his maildrop itself) by a symlink: to a
directory outside ROOT holding a "secret" named like a message, or to another
user's ``cur/``.  Every such maildrop is refused at login with ``-ERR
[SYS/PERM]`` and a log line naming the mailbox; nothing outside Mallory's real
maildrop is read, moved or deleted, whatever he sends next (DELE, QUIT).  A
link that appears after login (the race) is never followed either: the
message answers ``-ERR`` and the link's target is untouched.
"""

from __future__ import annotations

import logging
import os
import poplib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from clients import HOST, running

from pop3proto.maildir import MaildirStorage
from pop3proto.passwd import PasswdFile
from pop3proto.storage import MailboxRefused, MessageGone, StorageError

from .conftest import body, fill, tree, write_passwd

SECRET = b"root-only secret\n"
SECRET_NAME = "1700000001.M1P1Q1.secret:2,S"
USERS = {"mallory": "mallory-Secret-1", "victim": "victim-Secret-2"}
TIMEOUT = 10.0


class Layout:
    """tmp/root (ROOT: mallory, victim) and tmp/outside (a secret named like a message)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.outside = base / "outside"
        self.outside.mkdir()
        (self.outside / SECRET_NAME).write_bytes(SECRET)
        (self.outside / "1700000002.M2P1Q2.secret").write_bytes(SECRET)  # a new/ file
        fill(self.root, "mallory", [body(1)])
        fill(self.root, "victim", [body(10), body(11)])
        self.mallory = self.root / "mallory"
        self.passwd = write_passwd(base / "users", USERS)

    def link(self, name: str, target: str | Path) -> None:
        """Replace mallory's *name* ("" for the maildrop itself) by a symlink to *target*."""
        path = self.mallory / name if name else self.mallory
        shutil.rmtree(path)
        os.symlink(target, path)

    def snapshot(self) -> dict[str, tuple[str, int, int]]:
        """Everything under tmp but the shared lock file (created by the first lock)."""
        return {k: v for k, v in tree(self.base).items() if ".pop3proto-locks" not in k}


def cur_outside(lay: Layout) -> str:
    lay.link("cur", lay.outside)
    return "cur"


def cur_victim(lay: Layout) -> str:
    lay.link("cur", "../victim/cur")
    return "cur"


def new_outside(lay: Layout) -> str:
    lay.link("new", lay.outside)
    return "new"


def tmp_outside(lay: Layout) -> str:
    lay.link("tmp", lay.outside)
    return "tmp"


def root_victim(lay: Layout) -> str:
    lay.link("", "victim")
    return "maildrop"


ATTACKS: list[Callable[[Layout], str]] = [
    cur_outside,
    cur_victim,
    new_outside,
    tmp_outside,
    root_victim,
]


@pytest.fixture(params=ATTACKS, ids=lambda f: f.__name__)
def attacked(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Layout, str]:
    lay = Layout(tmp_path)
    return lay, request.param(lay)


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if "refusing maildrop" in r.getMessage() and "mallory" in r.getMessage()
    ]


def test_storage_refuses_a_linked_maildrop(
    attacked: tuple[Layout, str], caplog: pytest.LogCaptureFixture
) -> None:
    lay, what = attacked
    before = lay.snapshot()
    store = MaildirStorage(lay.root)
    with caplog.at_level(logging.WARNING), pytest.raises(MailboxRefused):
        store.lock("mallory")
    # Not held: every later call is refused as unlocked, and touches nothing.
    for call in (
        lambda: store.scan("mallory"),
        lambda: store.get("mallory", SECRET_NAME.partition(":")[0]),
        lambda: store.dele("mallory", [SECRET_NAME.partition(":")[0]]),
    ):
        with pytest.raises(StorageError):
            call()
    store.unlock("mallory")
    assert lay.snapshot() == before
    lines = refusals(caplog)
    assert len(lines) == 1, lines
    assert what in lines[0]
    assert "victim" in lines[0] or str(lay.outside) in lines[0]
    # The victim's own maildrop still works.
    assert store.lock("victim")
    assert len(store.scan("victim")) == 2
    store.unlock("victim")
    store.close()


def test_create_never_follows_a_link(attacked: tuple[Layout, str]) -> None:
    lay, _ = attacked
    before = lay.snapshot()
    store = MaildirStorage(lay.root, create=True)
    with pytest.raises(MailboxRefused):
        store.lock("mallory")
    with pytest.raises(MailboxRefused):
        store.deliver("mallory", b"Subject: mail\n\nhello\n")
    assert lay.snapshot() == before
    store.close()


def test_login_refused_end_to_end(
    transport: str, attacked: tuple[Layout, str], caplog: pytest.LogCaptureFixture
) -> None:
    lay, what = attacked
    before = lay.snapshot()
    options = {
        "auth": PasswdFile(lay.passwd),
        "storage": MaildirStorage(lay.root),
        "auth_failure_delay": 0,
    }
    with caplog.at_level(logging.WARNING), running(transport, **options) as server:
        client = poplib.POP3(HOST, server.cget("port"), timeout=TIMEOUT)
        try:
            client.user("mallory")
            with pytest.raises(poplib.error_proto) as refused:
                client.pass_(USERS["mallory"])
            assert refused.value.args[0].startswith(b"-ERR [SYS/PERM]")
            for command in ("STAT", "RETR 1", "DELE 1", "QUIT"):  # -ERR, or closed
                try:
                    reply = client._shortcmd(command)  # type: ignore[attr-defined]
                except poplib.error_proto:
                    continue
                except (OSError, EOFError):
                    break
                assert command == "QUIT", reply
        finally:
            client.close()
        other = poplib.POP3(HOST, server.cget("port"), timeout=TIMEOUT)
        try:  # the victim is served as usual
            other.user("victim")
            other.pass_(USERS["victim"])
            assert other.stat()[0] == 2
            other.quit()
        finally:
            other.close()
    after = lay.snapshot()
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    # The victim's session rewrote only its own listing cache (if anything).
    assert changed <= {"root/victim/pop3proto-cache"}, changed
    assert (lay.outside / SECRET_NAME).read_bytes() == SECRET
    assert any(what in line for line in refusals(caplog))


# -- links made after login: the race --------------------------------------------


def answer(command: Callable[[], bytes]) -> bytes:
    """The reply to a poplib command, +OK or -ERR."""
    try:
        return command()
    except poplib.error_proto as exc:
        return bytes(exc.args[0])


def swap_cur_for_link(lay: Layout, target: Path | str) -> None:
    os.rename(lay.mallory / "cur", lay.mallory / "cur.real")
    os.symlink(target, lay.mallory / "cur")


@pytest.mark.parametrize("target", ["outside", "victim"])
def test_cur_linked_after_lock_is_never_followed(tmp_path: Path, target: str) -> None:
    lay = Layout(tmp_path)
    store = MaildirStorage(lay.root)
    assert store.lock("mallory")
    infos = store.scan("mallory")
    assert len(infos) == 1
    # The secret and the victim's first message have the same name as Mallory's.
    key = infos[0].key
    shutil.copy(lay.outside / SECRET_NAME, lay.outside / f"{key}:2,S")
    victim_cur = lay.root / "victim" / "cur"
    victim_files = sorted(os.listdir(victim_cur))
    shutil.copy(victim_cur / victim_files[0], victim_cur / f"{key}:2,S")
    before = lay.snapshot()
    swap_cur_for_link(lay, lay.outside if target == "outside" else "../victim/cur")
    before = {k: v for k, v in lay.snapshot().items() if "mallory" not in k}
    with pytest.raises(MessageGone):
        store.get("mallory", key)
    with pytest.raises(StorageError):
        store.dele("mallory", [key])
    with pytest.raises(MessageGone):
        store.path("mallory", key)
    store.unlock("mallory")
    after = {k: v for k, v in lay.snapshot().items() if "mallory" not in k}
    assert after == before
    assert (lay.outside / f"{key}:2,S").read_bytes() == SECRET
    store.close()


def test_maildrop_replaced_after_lock_is_never_followed(tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    store = MaildirStorage(lay.root)
    assert store.lock("mallory")
    key = store.scan("mallory")[0].key
    os.rename(lay.mallory, lay.root / "mallory.old")
    os.symlink("victim", lay.mallory)
    with pytest.raises(MessageGone):
        store.get("mallory", key)
    os.unlink(lay.mallory)
    shutil.copytree(lay.root / "mallory.old", lay.mallory)  # a real directory, but another one
    with pytest.raises(MessageGone):
        store.get("mallory", key)
    before = lay.snapshot()
    with pytest.raises(StorageError):
        store.dele("mallory", [key])
    assert lay.snapshot() == before
    store.unlock("mallory")
    store.close()


def test_race_end_to_end(transport: str, tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    options = {"auth": PasswdFile(lay.passwd), "storage": MaildirStorage(lay.root)}
    with running(transport, **options) as server:
        client = poplib.POP3(HOST, server.cget("port"), timeout=TIMEOUT)
        try:
            client.user("mallory")
            client.pass_(USERS["mallory"])
            assert client.stat()[0] == 1
            name = os.listdir(lay.mallory / "cur")[0]
            shutil.copy(lay.outside / SECRET_NAME, lay.outside / name)
            swap_cur_for_link(lay, lay.outside)
            before = {k: v for k, v in lay.snapshot().items() if "mallory" not in k}
            with pytest.raises(poplib.error_proto) as gone:
                client.retr(1)
            assert gone.value.args[0].startswith(b"-ERR")
            client.dele(1)
            answer(client.quit)  # the deletion fails (-ERR); the link target is untouched
        finally:
            client.close()
    after = {k: v for k, v in lay.snapshot().items() if "mallory" not in k}
    assert after == before
    assert (lay.outside / name).read_bytes() == SECRET
    assert (lay.mallory / "cur.real" / name).is_file()
