"""MaildirStorage on a tmp_path Maildir: moves, sizes, cache, UIDLs, locking, deletion.

The storage contract that every store keeps runs in tests/test_storage_contract.py;
these are the cases only a Maildir has (files placed by other programs, flag renames,
the size cache, Dovecot's UID list, locks across processes, the deletion journal).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import pop3proto
from pop3proto import contract
from pop3proto._maildrop import MessageInfo
from pop3proto._writers import wire_size
from pop3proto.maildir import MaildirStorage, MessageTooBig, valid_mailbox_name
from pop3proto.storage import MessageGone, StorageError

T0 = 1700000000


@pytest.fixture
def store(tmp_path: Path) -> MaildirStorage:
    return MaildirStorage(tmp_path, create=True)


def put(root: Path, name: str, data: bytes, *, user: str = "alice", sub: str = "cur") -> Path:
    """Place a message file directly, as another MDA or MUA would."""
    d = root / user
    for s in ("cur", "new", "tmp"):
        (d / s).mkdir(parents=True, exist_ok=True)
    path = d / sub / name
    path.write_bytes(data)
    return path


def session(store: MaildirStorage, user: str = "alice") -> list[MessageInfo]:
    assert store.lock(user)
    return store.scan(user)


def files(root: Path, sub: str, user: str = "alice") -> list[str]:
    return sorted(os.listdir(root / user / sub))


class Hung(BaseException):
    """Raised by ``deadline`` when time runs out."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened in blocking mode would hang)."""

    def boom(signum: int, frame: Any) -> None:
        raise Hung  # not an OSError, so no handler in the code under test can swallow it

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def full_path(path: Any, dir_fd: int | None = None) -> str:
    """The path *path* names: a descriptor or a name relative to *dir_fd* made whole."""
    if isinstance(path, int):
        return os.readlink(f"/proc/self/fd/{path}")
    p = os.fspath(path)
    if dir_fd is not None:
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
    return str(p)


@contextmanager
def count_opens(root: Path) -> Iterator[list[str]]:
    """Record every os.open of a file under a cur/ or new/ directory of *root*."""
    seen: list[str] = []
    real = os.open

    def spy(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        p = full_path(path, kwargs.get("dir_fd"))
        if p.startswith(str(root)) and ("/cur/" in p or "/new/" in p):
            seen.append(p)
        return real(path, flags, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(os, "open", spy)
    try:
        yield seen
    finally:
        mp.undo()


# -- names -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "bob.smith", "a_b-c+d@example.org", "é", "x" * 255])
def test_valid_mailbox_names(name: str) -> None:
    assert valid_mailbox_name(name)


HOSTILE = ["", ".", "..", "../x", "a/../b", "a/b", "/etc", "a\\b", ".hidden", "a..b", "a\0b",
           "a\nb", "a\tb", "a\x7fb", "a\x85b", "x" * 256, "é" * 200]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_refused_without_touching_disk(tmp_path: Path, name: str) -> None:
    assert not valid_mailbox_name(name)
    root = tmp_path / "root"
    store = MaildirStorage(root, create=True)
    calls: list[Callable[[], object]] = [
        lambda: store.lock(name),
        lambda: store.unlock(name),
        lambda: store.scan(name),
        lambda: store.get(name, "k"),
        lambda: store.path(name, "k"),
        lambda: store.dele(name, ["k"]),
        lambda: store.deliver(name, b"x\n"),
    ]
    for call in calls:
        with pytest.raises(StorageError, match="invalid mailbox name"):
            call()
    assert list(tmp_path.iterdir()) == []


# -- scan: moves, order, sizes -------------------------------------------------


def test_deliver_then_scan_moves_new_to_cur(tmp_path: Path, store: MaildirStorage) -> None:
    k1 = store.deliver("alice", b"Subject: one\n\nbody\n")
    k2 = store.deliver("alice", b"Subject: two\n\nbody\n")
    assert files(tmp_path, "new") == sorted([k1, k2])
    infos = session(store)
    assert [m.key for m in infos] == [k1, k2]
    assert files(tmp_path, "new") == []
    assert files(tmp_path, "cur") == sorted([k1 + ":2,", k2 + ":2,"])
    assert files(tmp_path, "tmp") == []


def test_new_file_vanishing_during_move_is_tolerated(
    tmp_path: Path, store: MaildirStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(tmp_path, f"{T0}.M1P1.h", b"a\n", sub="new")
    put(tmp_path, f"{T0}.M2P1.h", b"b\n", sub="new")
    real = os.rename

    def racing_rename(src: Any, dst: Any, **kwargs: Any) -> None:
        if str(src).endswith("M1P1.h"):
            os.unlink(src, dir_fd=kwargs.get("src_dir_fd"))  # another MUA took it first
            raise FileNotFoundError(errno.ENOENT, "gone", src)
        real(src, dst, **kwargs)

    monkeypatch.setattr(os, "rename", racing_rename)
    assert [m.key for m in session(store)] == [f"{T0}.M2P1.h"]


def test_order_is_delivery_time_not_name(tmp_path: Path, store: MaildirStorage) -> None:
    # Each pair sorts the other way as plain strings.
    expected = [
        "999999999.M5P1.h",
        f"{T0}.P7.h",
        f"{T0 + 1}.M20P1.h",
        f"{T0 + 1}.M100P1.h",
        f"{T0 + 1}.R3aM900000P1.h",
        f"{T0 + 2}.M5P1.h",
        "oddname",
    ]
    for n in reversed(expected):
        put(tmp_path, n + ":2,S", b"x\n")
    assert [m.key for m in session(store)] == expected


BODIES = {
    **contract.BODIES,  # the messages every store holds, and some only files on disk meet
    "mixed": b"a\r\nb\nc\r\r\nd\r",
    "big-lf": b"0123456789abcdef\n" * 20000,
}


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_size_is_wire_size(tmp_path: Path, store: MaildirStorage, kind: str) -> None:
    data = BODIES[kind]
    put(tmp_path, f"{T0}.M1P1.h:2,", data)
    put(tmp_path, f"{T0}.M2P1.h", data, sub="new")
    sizes = [m.size for m in session(store)]
    assert sizes == [wire_size(data)] * 2
    with store.get("alice", f"{T0}.M1P1.h") as f:
        assert f.read() == data


def test_delivered_names_carry_s_and_w(tmp_path: Path, store: MaildirStorage) -> None:
    data = b"a\nb\n"
    key = store.deliver("alice", data)
    assert key.endswith(f",S={len(data)},W={wire_size(data)}")
    assert ":" not in key
    assert "/" not in key
    with count_opens(tmp_path) as opened:
        assert [m.size for m in session(store)] == [wire_size(data)]
    assert opened == []  # the size came from the name


def test_w_field_trusted_unless_s_contradicts(tmp_path: Path, store: MaildirStorage) -> None:
    put(tmp_path, f"{T0}.M1P1.h,S=6,W=999:2,S", b"hello\n")
    put(tmp_path, f"{T0}.M2P1.h,W=777:2,", b"hello\n")
    put(tmp_path, f"{T0}.M3P1.h,S=60,W=999:2,", b"hello\n")  # S= is wrong: the file changed
    assert [m.size for m in session(store)] == [999, 777, 7]


def test_cache_spares_rereading_on_next_login(tmp_path: Path) -> None:
    for i in range(50):
        put(tmp_path, f"{T0 + i}.M{i}P1.h:2,", b"line\n" * (i + 1))
    first = MaildirStorage(tmp_path)
    with count_opens(tmp_path) as opened:
        sizes = [m.size for m in session(first)]
    assert len(opened) == 50
    assert sizes == [6 * (i + 1) for i in range(50)]
    first.unlock("alice")
    assert (tmp_path / "alice" / "pop3proto-cache").is_file()
    cache_mtime = (tmp_path / "alice" / "pop3proto-cache").stat().st_mtime_ns

    second = MaildirStorage(tmp_path)  # a restart: nothing in memory
    with count_opens(tmp_path) as opened:
        assert [m.size for m in session(second)] == sizes
    assert opened == []
    assert (tmp_path / "alice" / "pop3proto-cache").stat().st_mtime_ns == cache_mtime  # unchanged
    second.unlock("alice")

    # A rewritten message is measured again.
    put(tmp_path, f"{T0}.M0P1.h:2,", b"rewritten, longer\n" * 3)
    third = MaildirStorage(tmp_path)
    with count_opens(tmp_path) as opened:
        assert session(third)[0].size == wire_size(b"rewritten, longer\n" * 3)
    assert len(opened) == 1


def test_corrupt_cache_is_ignored(tmp_path: Path, store: MaildirStorage) -> None:
    put(tmp_path, f"{T0}.M1P1.h:2,", b"abc\n")
    (tmp_path / "alice" / "pop3proto-cache").write_bytes(b"{not json")
    assert [m.size for m in session(store)] == [5]


def test_non_regular_files_skipped_with_warning(
    tmp_path: Path, store: MaildirStorage, caplog: pytest.LogCaptureFixture
) -> None:
    put(tmp_path, f"{T0}.M1P1.h:2,", b"good\n")
    cur, new = tmp_path / "alice" / "cur", tmp_path / "alice" / "new"
    (cur / f"{T0}.M2P1.h:2,").mkdir()
    os.mkfifo(cur / f"{T0}.M3P1.h:2,")
    os.mkfifo(new / f"{T0}.M4P1.h")
    os.symlink(tmp_path / "nowhere", cur / f"{T0}.M5P1.h:2,")
    os.symlink(tmp_path / "nowhere", new / f"{T0}.M6P1.h")
    target = put(tmp_path, "elsewhere", b"linked\n", user="outside")
    os.symlink(target, cur / f"{T0}.M7P1.h:2,")  # a symlink is never a message (no escape)
    (cur / ".hidden").write_bytes(b"x\n")
    with caplog.at_level(logging.WARNING, logger="pop3proto.maildir"), deadline(5):
        infos = session(store)
    assert [m.key for m in infos] == [f"{T0}.M1P1.h"]
    assert len([r for r in caplog.records if "skipping" in r.getMessage()]) == 6


def test_missing_maildrop_is_empty_and_not_created(tmp_path: Path) -> None:
    store = MaildirStorage(tmp_path)
    assert store.lock("nobody")
    assert store.scan("nobody") == []
    assert not store.lock("nobody")
    store.unlock("nobody")
    assert not (tmp_path / "nobody").exists()


def test_create_makes_the_maildrop(tmp_path: Path) -> None:
    store = MaildirStorage(tmp_path / "root", create=True)
    assert session(store, "carol") == []
    assert files(tmp_path / "root", "", "carol") == ["cur", "new", "tmp"]
    assert sorted(os.listdir(tmp_path / "root")) == [".pop3proto-locks", "carol"]


# -- UIDLs ---------------------------------------------------------------------


def test_uids_stable_across_scans_renames_and_restarts(tmp_path: Path) -> None:
    store = MaildirStorage(tmp_path, create=True)
    keys = [store.deliver("alice", b"m%d\n" % i) for i in range(3)]
    long_name = f"{T0 + 9}.M1P1." + "h" * 80
    put(tmp_path, long_name, b"long\n", sub="new")
    first = session(store)
    uids = [m.uid for m in first]
    assert [m.key for m in first] == [long_name, *keys]  # T0 is older than the deliveries
    assert uids[1:] == keys
    assert uids[0] == hashlib.md5(long_name.encode()).hexdigest()
    store.unlock("alice")
    assert [m.uid for m in session(store)] == uids
    store.unlock("alice")

    cur = tmp_path / "alice" / "cur"
    os.rename(cur / (keys[0] + ":2,"), cur / (keys[0] + ":2,FS"))  # another MUA sets flags
    again = session(MaildirStorage(tmp_path))  # and the server restarts
    assert [(m.key, m.uid, m.size) for m in again] == [(m.key, m.uid, m.size) for m in first]


def test_dovecot_uidlist_v3(tmp_path: Path, store: MaildirStorage) -> None:
    a = f"{T0}.M364837P9451.kurkku,S=6,W=7"
    b = f"{T0 + 1}.M242911P3632.kurkku"
    c = f"{T0 + 2}.M1P1.kurkku"
    d = f"{T0 + 3}.M1P1.kurkku"
    put(tmp_path, a + ":2,S", b"hello\n")
    put(tmp_path, b + ":2,FS", b"hello\n")  # flags changed since Dovecot wrote the list
    put(tmp_path, c, b"hello\n", sub="new")
    put(tmp_path, d + ":2,", b"hello\n")
    (tmp_path / "alice" / "dovecot-uidlist").write_bytes(
        b"3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1\n"
        b"25006 :" + a.encode() + b":2,\n"
        b"25017 W2481 :" + b.encode() + b":2,F\n"
        b"25018 P+old-server-uidl G0123 :" + c.encode() + b"\n"
        b"garbage line\n"
    )
    uids = {m.key: m.uid for m in session(store)}
    assert uids == {
        a: "000061AE4C0907B0",  # Dovecot's %08Xu%08Xv
        b: f"{25017:08X}{1275660208:08X}",
        c: "+old-server-uidl",  # a UIDL Dovecot kept from an earlier server
        d: d,  # unknown to Dovecot
    }


def test_dovecot_uidlist_v1(tmp_path: Path, store: MaildirStorage) -> None:
    put(tmp_path, f"{T0}.P1.host:2,S", b"x\n")
    (tmp_path / "alice" / "dovecot-uidlist").write_bytes(
        b"1 77 3\n2 " + f"{T0}.P1.host:2,".encode() + b"\n"
    )
    assert [m.uid for m in session(store)] == [f"{2:08X}{77:08X}"]


def test_unreadable_uidlist_is_ignored(tmp_path: Path, store: MaildirStorage) -> None:
    put(tmp_path, f"{T0}.P1.host:2,S", b"x\n")
    (tmp_path / "alice" / "dovecot-uidlist").write_bytes(b"3 N5\n1 :x\n")  # no V field
    assert [m.uid for m in session(store)] == [f"{T0}.P1.host"]


# -- locking -------------------------------------------------------------------


CHILD = """
import sys, time
from pop3proto.maildir import MaildirStorage
store = MaildirStorage(sys.argv[1])
assert store.lock("alice")
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_across_processes_and_freed_by_sigkill(tmp_path: Path, store: MaildirStorage) -> None:
    store.deliver("alice", b"x\n")
    env = dict(os.environ, PYTHONPATH=str(Path(pop3proto.__file__).parent.parent))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"locked\n"
        assert not store.lock("alice")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert store.lock("alice")  # the kernel dropped the dead process's lock
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


# -- get and path ----------------------------------------------------------------


def test_get_follows_a_flag_rename(tmp_path: Path, store: MaildirStorage) -> None:
    key = store.deliver("alice", b"hello\n")
    session(store)
    cur = tmp_path / "alice" / "cur"
    os.rename(cur / (key + ":2,"), cur / (key + ":2,RS"))
    with store.get("alice", key) as f:
        assert f.read() == b"hello\n"
    assert store.path("alice", key) == str(cur / (key + ":2,RS"))


def replace_with_dir(p: Path) -> None:
    p.mkdir()


def replace_with_fifo(p: Path) -> None:
    os.mkfifo(p)


def replace_with_dangling_symlink(p: Path) -> None:
    os.symlink(p.parent / "nowhere", p)


def replace_with_nothing(p: Path) -> None:
    pass


@pytest.mark.parametrize(
    "replace",
    [replace_with_nothing, replace_with_dir, replace_with_fifo, replace_with_dangling_symlink],
)
def test_get_message_gone(
    tmp_path: Path, store: MaildirStorage, replace: Callable[[Path], None]
) -> None:
    key = store.deliver("alice", b"hello\n")
    keep = store.deliver("alice", b"other\n")
    session(store)
    path = tmp_path / "alice" / "cur" / (key + ":2,")
    path.unlink()
    replace(path)
    with deadline(5), pytest.raises(MessageGone):
        store.get("alice", key)
    with store.get("alice", keep) as f:  # the rest of the session goes on
        assert f.read() == b"other\n"
    if replace is replace_with_nothing:
        with pytest.raises(MessageGone):
            store.path("alice", key)


# -- dele ------------------------------------------------------------------------


def test_dele_removes_only_listed_keys(tmp_path: Path, store: MaildirStorage) -> None:
    k1, k2, k3 = (store.deliver("alice", b"m%d\n" % i) for i in range(3))
    session(store)
    late = store.deliver("alice", b"arrived during the session\n")
    cur = tmp_path / "alice" / "cur"
    os.rename(cur / (k3 + ":2,"), cur / (k3 + ":2,S"))  # renamed meanwhile: still deleted
    store.dele("alice", [k1, k3])
    assert files(tmp_path, "cur") == [k2 + ":2,"]
    assert files(tmp_path, "new") == [late]
    assert not (tmp_path / "alice" / "pop3proto-journal").exists()
    store.unlock("alice")
    assert [m.key for m in session(store)] == [k2, late]


def test_dele_drops_deleted_entries_from_cache(tmp_path: Path, store: MaildirStorage) -> None:
    put(tmp_path, f"{T0}.M1P1.h:2,", b"one\n")
    put(tmp_path, f"{T0}.M2P1.h:2,", b"two\n")
    session(store)
    cache = tmp_path / "alice" / "pop3proto-cache"
    assert f"{T0}.M1P1.h" in cache.read_text()
    store.dele("alice", [f"{T0}.M1P1.h"])
    assert f"{T0}.M1P1.h" not in cache.read_text()
    assert f"{T0}.M2P1.h" in cache.read_text()


def test_dele_unknown_key_deletes_nothing(tmp_path: Path, store: MaildirStorage) -> None:
    k1 = store.deliver("alice", b"m\n")
    session(store)
    with pytest.raises(StorageError):
        store.dele("alice", [k1, "../../etc/passwd"])
    assert files(tmp_path, "cur") == [k1 + ":2,"]


def test_dele_enospc_deletes_nothing(
    tmp_path: Path, store: MaildirStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [store.deliver("alice", b"m%d\n" % i) for i in range(3)]
    session(store)

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match="journal"):
        store.dele("alice", keys)
    monkeypatch.undo()
    assert files(tmp_path, "cur") == sorted(k + ":2," for k in keys)
    leftovers = {"pop3proto-journal", "pop3proto-journal.tmp"} & set(files(tmp_path, ""))
    assert leftovers == set()


class Crash(BaseException):
    """Stands for the process dying mid-deletion."""


def test_crash_mid_deletion_is_rolled_forward(
    tmp_path: Path, store: MaildirStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [store.deliver("alice", b"m%d\n" % i) for i in range(4)]
    session(store)
    real = os.unlink
    done: list[str] = []

    def dying_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if "/cur/" in full_path(path, kwargs.get("dir_fd")) and done:
            raise Crash
        done.append(str(path))
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", dying_unlink)
    with pytest.raises(Crash):
        store.dele("alice", keys[:3])
    monkeypatch.undo()
    assert len(files(tmp_path, "cur")) == 3  # one deleted before the "crash"
    assert (tmp_path / "alice" / "pop3proto-journal").exists()
    store.unlock("alice")  # the kernel would do this for a dead process

    fresh = MaildirStorage(tmp_path)
    assert [m.key for m in session(fresh)] == [keys[3]]
    assert not (tmp_path / "alice" / "pop3proto-journal").exists()


def test_leftover_journal_finished_on_next_scan(tmp_path: Path) -> None:
    put(tmp_path, f"{T0}.M1P1.h:2,S", b"one\n")
    put(tmp_path, f"{T0}.M2P1.h:2,", b"two\n")
    put(tmp_path, "victim", b"not a message of alice\n", user="bob", sub="cur")
    journal = tmp_path / "alice" / "pop3proto-journal"
    journal.write_bytes(
        f"cur/{T0}.M1P1.h:2,S\0cur/already-gone:2,\0../bob/cur/victim\0tmp/x\0cur/../x\0".encode()
    )
    (tmp_path / "alice" / "pop3proto-journal.tmp").write_bytes(f"cur/{T0}.M2P1.h:2,\0".encode())
    store = MaildirStorage(tmp_path)
    assert [m.key for m in session(store)] == [f"{T0}.M2P1.h"]  # the .tmp was never committed
    assert not journal.exists()
    assert not (tmp_path / "alice" / "pop3proto-journal.tmp").exists()
    assert (tmp_path / "bob" / "cur" / "victim").exists()


def test_leftover_journal_written_after_lock_is_finished_by_scan(tmp_path: Path) -> None:
    put(tmp_path, f"{T0}.M1P1.h:2,S", b"one\n")
    store = MaildirStorage(tmp_path)
    assert store.lock("alice")
    (tmp_path / "alice" / "pop3proto-journal").write_bytes(f"cur/{T0}.M1P1.h:2,S\0".encode())
    assert store.scan("alice") == []


# -- the listing cache -------------------------------------------------------------


def age(root: Path, user: str = "alice", seconds: int = 10) -> None:
    """Set the mtimes of new/ and cur/ back: a listing taken now is then reusable."""
    for sub in ("new", "cur"):
        p = root / user / sub
        t = p.stat().st_mtime_ns - seconds * 1_000_000_000
        os.utime(p, ns=(t, t))


@contextmanager
def count_lists(root: Path) -> Iterator[list[str]]:
    """Record every os.scandir/os.listdir of a directory under *root*."""
    seen: list[str] = []
    mp = pytest.MonkeyPatch()
    for name in ("scandir", "listdir"):
        real = getattr(os, name)

        def spy(path: Any = ".", *, _real: Any = real) -> Any:
            if full_path(path).startswith(str(root)):
                seen.append(full_path(path))
            return _real(path)

        mp.setattr(os, name, spy)
    try:
        yield seen
    finally:
        mp.undo()


def fill(root: Path, store: MaildirStorage, n: int = 40) -> None:
    """Half with Dovecot's ,S=/,W= fields (delivered), half bare names (to be measured)."""
    for i in range(n // 2):
        store.deliver("alice", b"delivered %d\n" % i)
        put(root, f"{T0 + i}.M{i}P1.h:2,", b"bare\n" * (i + 1))


def test_stable_listing_is_reused_without_listing(tmp_path: Path, store: MaildirStorage) -> None:
    fill(tmp_path, store)
    expected = [(m.key, m.size, m.uid) for m in session(store)]  # moves new/ to cur/
    store.unlock("alice")
    age(tmp_path)
    restarted = MaildirStorage(tmp_path)
    assert [(m.key, m.size, m.uid) for m in session(restarted)] == expected  # a stable listing
    restarted.unlock("alice")
    cache = tmp_path / "alice" / "pop3proto-cache"
    stamp = cache.stat().st_mtime_ns
    for _ in range(2):  # a restart (the cache file), then the same instance (memory)
        fresh = MaildirStorage(tmp_path)
        with count_lists(tmp_path) as listed, count_opens(tmp_path) as opened:
            assert [(m.key, m.size, m.uid) for m in session(fresh)] == expected
            fresh.unlock("alice")
            assert [(m.key, m.size, m.uid) for m in session(fresh)] == expected
        assert listed == []
        assert opened == []
        fresh.unlock("alice")
    assert cache.stat().st_mtime_ns == stamp
    session(fresh)
    for key, size, _ in expected:
        with fresh.get("alice", key) as f:
            assert wire_size(f.read()) == size


def test_listing_taken_within_a_second_of_a_change_is_not_reused(
    tmp_path: Path, store: MaildirStorage
) -> None:
    fill(tmp_path, store)
    session(store)
    store.unlock("alice")
    future = (tmp_path / "alice" / "cur").stat().st_mtime_ns + 60 * 1_000_000_000
    os.utime(tmp_path / "alice" / "cur", ns=(future, future))  # "just changed", for a minute
    first = [(m.key, m.size) for m in session(store)]
    store.unlock("alice")
    for fresh in (store, MaildirStorage(tmp_path)):
        with count_lists(tmp_path) as listed, count_opens(tmp_path) as opened:
            assert [(m.key, m.size) for m in session(fresh)] == first
        fresh.unlock("alice")
        assert any(p.endswith("cur") for p in listed)
        assert opened == []  # the sizes still come from the cache


def test_changes_invalidate_a_stable_listing(tmp_path: Path, store: MaildirStorage) -> None:
    fill(tmp_path, store, 4)
    session(store)
    store.unlock("alice")
    age(tmp_path)
    keys = [m.key for m in session(store)]
    store.unlock("alice")

    late = store.deliver("alice", b"late\n")  # new/ changes
    assert [m.key for m in session(store)][-1] == late
    store.unlock("alice")
    age(tmp_path)
    session(store)
    store.unlock("alice")

    cur = tmp_path / "alice" / "cur"
    bare = next(k for k in keys if ",W=" not in k)
    os.rename(cur / (bare + ":2,"), cur / (bare + ":2,S"))  # cur/ changes
    session(store)
    assert store.path("alice", bare) == str(cur / (bare + ":2,S"))
    store.unlock("alice")
    age(tmp_path)
    session(store)
    store.unlock("alice")

    (tmp_path / "alice" / "dovecot-uidlist").write_bytes(  # only the UID list changes
        b"3 V77 N9\n8 :" + bare.encode() + b":2,S\n"
    )
    restarted = MaildirStorage(tmp_path)
    uids = {m.key: m.uid for m in session(restarted)}
    restarted.unlock("alice")
    assert uids[bare] == f"{8:08X}{77:08X}"
    uids = {m.key: m.uid for m in session(store)}  # the memory copy is refused too
    assert uids[bare] == f"{8:08X}{77:08X}"


def test_removing_the_cache_file_forces_a_rescan(tmp_path: Path, store: MaildirStorage) -> None:
    fill(tmp_path, store)
    session(store)
    store.unlock("alice")
    age(tmp_path)
    session(store)
    store.unlock("alice")
    (tmp_path / "alice" / "pop3proto-cache").unlink()
    with count_lists(tmp_path) as listed, count_opens(tmp_path) as opened:
        session(store)
    assert any(p.endswith("cur") for p in listed)
    assert len(opened) == 20


def test_memory_copy_follows_the_cache_file(tmp_path: Path, store: MaildirStorage) -> None:
    fill(tmp_path, store)
    session(store)
    store.unlock("alice")
    age(tmp_path)
    expected = [(m.key, m.size) for m in session(store)]
    store.unlock("alice")
    cache = tmp_path / "alice" / "pop3proto-cache"
    st = cache.stat()
    with open(cache, "r+b") as f:  # same size, inode and mtime: the memory copy is used
        f.write(b"x" * st.st_size)
    os.utime(cache, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [(m.key, m.size) for m in session(store)] == expected
    store.unlock("alice")
    assert [(m.key, m.size) for m in session(MaildirStorage(tmp_path))] == expected


def damage_first_path(data: bytes) -> bytes:
    lines = data.split(b"\n")
    n = int(lines[0].split(b"\t")[3])
    lines[1 + n] = b"cur/../../outside/cur/elsewhere"
    return b"\n".join(lines)


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b.replace(b"\t1\t", b"\t1\tx", 1), damage_first_path],
    ids=["truncated", "bad-header", "path-outside"],
)
def test_damaged_cache_is_ignored_with_a_warning(
    tmp_path: Path,
    store: MaildirStorage,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[bytes], bytes],
) -> None:
    fill(tmp_path, store)
    session(store)
    store.unlock("alice")
    age(tmp_path)
    expected = [(m.key, m.size, m.uid) for m in session(store)]
    store.unlock("alice")
    put(tmp_path, "elsewhere", b"not alice's\n", user="outside")
    cache = tmp_path / "alice" / "pop3proto-cache"
    cache.write_bytes(damage(cache.read_bytes()))
    fresh = MaildirStorage(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pop3proto.maildir"):
        assert [(m.key, m.size, m.uid) for m in session(fresh)] == expected
    assert any("pop3proto-cache" in r.getMessage() for r in caplog.records)
    assert all(fresh.path("alice", k).startswith(str(tmp_path / "alice")) for k, _, _ in expected)


def test_version_1_cache_is_replaced_silently(
    tmp_path: Path, store: MaildirStorage, caplog: pytest.LogCaptureFixture
) -> None:
    path = put(tmp_path, f"{T0}.M1P1.h:2,", b"abc\n")
    st = path.stat()
    entry = [999, st.st_size, st.st_mtime_ns, st.st_ino]
    (tmp_path / "alice" / "pop3proto-cache").write_text(
        json.dumps({"version": 1, "entries": {f"{T0}.M1P1.h": entry}})
    )
    with caplog.at_level(logging.WARNING, logger="pop3proto.maildir"):
        assert [m.size for m in session(store)] == [5]
    assert caplog.records == []
    assert (tmp_path / "alice" / "pop3proto-cache").read_bytes().startswith(b"pop3proto-cache\t2")


def test_name_with_a_newline(tmp_path: Path, store: MaildirStorage) -> None:
    fill(tmp_path, store)
    odd = f"{T0 + 99}.M1P1.line\nbreak"
    put(tmp_path, odd + ":2,", b"odd\n")
    for _ in range(3):
        infos = {m.key: m for m in session(store)}
        store.unlock("alice")
        age(tmp_path)
        assert len(infos) == 41
        assert infos[odd].size == 5
        assert infos[odd].uid == hashlib.md5(odd.encode()).hexdigest()
    with count_lists(tmp_path) as listed:  # such a listing is never reused
        session(MaildirStorage(tmp_path))
    assert listed != []


def test_s_field_alone_is_not_a_size(tmp_path: Path, store: MaildirStorage) -> None:
    put(tmp_path, f"{T0}.M1P1.h,S=6:2,", b"hello\n")
    put(tmp_path, f"{T0}.M2P1.h,S=6,W=oops,W=9:2,", b"hello\n")
    put(tmp_path, f"{T0}.M3P1.h,S=\u00b2,W=5:2,", b"hello\n")  # not a decimal digit: no S=
    assert [m.size for m in session(store)] == [7, 9, 5]


@pytest.mark.parametrize("read", [1, 2, 7, 4096])
def test_measuring_in_small_reads(
    tmp_path: Path, store: MaildirStorage, monkeypatch: pytest.MonkeyPatch, read: int
) -> None:
    monkeypatch.setattr("pop3proto.maildir._READ_MAX", read)
    monkeypatch.setattr("pop3proto.maildir._CHUNK", read)
    for i, kind in enumerate(sorted(BODIES)):
        put(tmp_path, f"{T0 + i}.M1P1.h:2,", BODIES[kind])
    assert [m.size for m in session(store)] == [wire_size(BODIES[k]) for k in sorted(BODIES)]
    store.unlock("alice")


def test_get_is_unbuffered_nonblocking_and_opens_directly(
    tmp_path: Path, store: MaildirStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = store.deliver("alice", b"hello\n")
    session(store)
    assert getattr(MaildirStorage.get, "nonblocking", False) is True
    assert getattr(store.get, "nonblocking", False) is True
    monkeypatch.setattr(os.path, "lexists", lambda p: pytest.fail("lexists called"))
    with count_lists(tmp_path) as listed, store.get("alice", key) as f:
        assert type(f) is io.FileIO
        assert f.read(65536) == b"hello\n"
    assert listed == []



def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_lock_and_unlock_run_on_the_loop(store: MaildirStorage) -> None:
    from pop3proto.storage import runs_inline

    assert runs_inline(store.lock)
    assert runs_inline(store.unlock)
    assert runs_inline(store.get)
    assert not runs_inline(store.scan)
    assert not runs_inline(store.dele)


def test_gets_share_descriptors_and_unlock_closes_them(store: MaildirStorage) -> None:
    keys = [store.deliver(u, b"m\n") for u in ("alice", "bob") for _ in range(3)]
    store.lock("alice"), store.lock("bob")  # ROOT and the lock file are open from here
    store.scan("alice"), store.scan("bob")
    before = open_fds()
    for key in keys[:3]:
        with store.get("alice", key) as f:
            assert f.read() == b"m\n"
    with store.get("bob", keys[3]) as f:
        assert f.read() == b"m\n"
    assert len(open_fds() - before) == 4  # alice's and bob's maildrop and cur/, once each
    store.unlock("alice")
    assert len(open_fds() - before) == 2
    store.close()
    assert open_fds() <= before


def test_get_after_the_maildrop_is_replaced(tmp_path: Path, store: MaildirStorage) -> None:
    key = store.deliver("alice", b"first\n")
    session(store)
    with store.get("alice", key) as f:
        assert f.read() == b"first\n"
    os.rename(tmp_path / "alice", tmp_path / "old")
    put(tmp_path, key + ":2,", b"impostor\n")  # a new maildrop with the same name
    with pytest.raises(MessageGone):
        store.get("alice", key)


def test_get_after_cur_is_replaced(tmp_path: Path, store: MaildirStorage) -> None:
    key = store.deliver("alice", b"first\n")
    other = store.deliver("alice", b"second\n")
    session(store)
    with store.get("alice", key) as f:
        assert f.read() == b"first\n"
    cur = tmp_path / "alice" / "cur"
    os.rename(cur, tmp_path / "alice" / "cur.old")
    cur.mkdir()
    (cur / (other + ":2,")).write_bytes(b"moved\n")
    with pytest.raises(MessageGone):
        store.get("alice", key)  # not in the cur/ that is there now
    with store.get("alice", other) as f:
        assert f.read() == b"moved\n"


# -- deliver: streamed, capped ----------------------------------------------------

DELIVER = """
import sys
from pop3proto.__main__ import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    hwm = [line.split()[1] for line in f if line.startswith("VmHWM:")][0]
print("VmHWM", hwm, file=sys.stderr)
sys.exit(code)
"""


def deliver_cli(stdin: Any, *args: str) -> tuple[int, bytes, bytes, int]:
    """``python -m pop3proto deliver ARGS`` with *stdin*: (status, stdout, stderr, VmHWM kB)."""
    env = dict(os.environ, PYTHONPATH=str(Path(pop3proto.__file__).parent.parent))
    run = subprocess.run(
        [sys.executable, "-c", DELIVER, "deliver", *args],
        stdin=stdin,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    *err, hwm = run.stderr.splitlines()
    return run.returncode, run.stdout, b"\n".join(err), int(hwm.split()[1])


def test_deliver_stream_is_byte_exact(tmp_path: Path) -> None:
    data = b"Subject: streamed\r\n\r\n.dot\nbare\rcr\x00\xff\n" + os.urandom(700_000)
    store = MaildirStorage(tmp_path)
    key = store.deliver("alice", io.BytesIO(data), max_size=len(data))
    (name,) = files(tmp_path, "new")
    assert name == key
    assert key.endswith(f",S={len(data)},W={wire_size(data)}")
    assert (tmp_path / "alice" / "new" / key).read_bytes() == data
    assert files(tmp_path, "tmp") == []


def test_deliver_over_the_cap_stores_nothing(tmp_path: Path) -> None:
    store = MaildirStorage(tmp_path)
    with pytest.raises(MessageTooBig):
        store.deliver("alice", io.BytesIO(b"x" * 1001), max_size=1000)
    with pytest.raises(MessageTooBig):
        store.deliver("alice", b"x" * 1001, max_size=1000)
    assert files(tmp_path, "new") == files(tmp_path, "tmp") == files(tmp_path, "cur") == []


def test_deliver_command_streams_with_a_cap(tmp_path: Path) -> None:
    root = tmp_path / "root"
    big = tmp_path / "big"
    line = b"0123456789" * 9 + b"abcdefghi\n"
    size = 64 * 1024 * 1024
    with open(big, "wb") as f:
        for _ in range(size // (len(line) * 1024)):
            f.write(line * 1024)
    size = big.stat().st_size
    with open(big, "rb") as f:  # over the cap: nothing delivered, one line, status 2
        status, out, err, _ = deliver_cli(f, "--maildir", str(root), "--max-size", "1000", "bob")
    assert status == 2
    assert len(err.splitlines()) == 1
    assert b"over 1000 bytes" in err
    assert files(root, "new", "bob") == files(root, "tmp", "bob") == []
    with open(big, "rb") as f:  # under it: delivered byte-exact, memory flat
        status, out, err, hwm = deliver_cli(f, "--maildir", str(root), "bob")
    assert status == 0, err
    name = out.decode().strip()
    assert files(root, "new", "bob") == [name]
    assert name.endswith(f",S={size},W={size + size // len(line)}")
    with open(root / "bob" / "new" / name, "rb") as f, open(big, "rb") as g:
        while chunk := f.read(1 << 20):
            assert chunk == g.read(1 << 20)
    print(f"\n[figure] deliver of {size >> 20} MiB: VmHWM {hwm >> 10} MiB", file=sys.stderr)
    assert hwm < 48 * 1024  # kB: the message (64 MiB) was never held whole
