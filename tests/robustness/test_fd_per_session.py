"""Issue 14: a logged-in, idle Maildir session holds no file descriptor of its own.

The cross-process lock is a one-byte OFD lock per maildrop on one shared file
per storage root (``ROOT/.pop3proto-locks``, opened once per process), and
each operation opens the maildrop's directories and closes them again.  So N
idle sessions cost the storage no descriptor each; the lock still excludes
a second session in this process, in another process, and in a forked
child, and a SIGKILLed holder leaves no stale lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pop3proto
from pop3proto import maildir
from pop3proto.maildir import MaildirStorage

from .conftest import body, fill

N = 200


def open_fds(under: Path) -> int:
    """Descriptors of this process open on *under* or below it (the storage's own).

    Counting every descriptor would count sockets that other tests left to the
    garbage collector, which closes them whenever it runs.
    """
    prefix = str(under.resolve())
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor, say)
            continue
        count += target == prefix or target.startswith(prefix + os.sep)
    return count


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for i in range(N):
        fill(tmp_path / "root", f"user{i}", [body(1), body(2)])
    return tmp_path / "root"


def sessions(store: MaildirStorage, n: int) -> int:
    """Lock and scan *n* maildrops, RETR one message each; the descriptors they keep open."""
    store.lock("user0")  # the instance's own: ROOT and the shared lock file
    store.unlock("user0")
    root = Path(store.root)
    before = open_fds(root)
    for i in range(n):
        assert store.lock(f"user{i}")
        infos = store.scan(f"user{i}")
        with store.get(f"user{i}", infos[0].key) as f:
            assert f.read() == body(1)
    held = open_fds(root) - before
    for i in range(n):
        store.unlock(f"user{i}")
    assert open_fds(root) == before
    return held


def test_idle_sessions_hold_no_descriptor(root: Path) -> None:
    store = MaildirStorage(root)
    held = sessions(store, N)
    print(f"\n[figure] storage descriptors per idle session = {held / N:g}", file=sys.stderr)
    # No descriptor per session: only the bounded cache of the directories of the
    # maildrops served last (two each), shared by their sessions, whatever N is.
    assert N > maildir._SHARED_DIRS
    assert held <= 2 * maildir._SHARED_DIRS
    store.close()


def test_without_ofd_locks_one_descriptor_per_session(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maildir, "_OFD_SETLK", None)  # the per-maildrop flock fallback
    store = MaildirStorage(root)
    assert N <= sessions(store, N) <= N + 2 * maildir._SHARED_DIRS
    other = MaildirStorage(root)
    assert store.lock("user1")
    assert not other.lock("user1")
    store.unlock("user1")
    assert other.lock("user1")
    other.close()
    store.close()


def test_two_sessions_of_one_process_exclude_each_other(root: Path) -> None:
    one, two = MaildirStorage(root), MaildirStorage(root)
    assert one.lock("user1")
    assert not one.lock("user1")  # the same instance
    assert not two.lock("user1")  # another instance: another open file, same byte
    assert two.lock("user2")
    one.unlock("user1")
    assert two.lock("user1")
    assert not one.lock("user1")
    one.close()
    two.close()


HOLDER = """
import sys, time
from pop3proto.maildir import MaildirStorage
store = MaildirStorage(sys.argv[1])
assert store.lock("user1")
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_across_processes_and_after_sigkill(root: Path) -> None:
    store = MaildirStorage(root)
    env = dict(os.environ, PYTHONPATH=str(Path(pop3proto.__file__).parent.parent))
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"locked\n"
        assert not store.lock("user1")
        assert store.lock("user2")  # another maildrop: another byte
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert store.lock("user1")  # the kernel dropped the dead process's lock
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    store.close()


def test_forked_child_neither_inherits_nor_shares_the_parents_locks(root: Path) -> None:
    store = MaildirStorage(root)
    assert store.lock("user1")  # the parent's session: opens the shared lock file
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(to_child_w)
            os.close(to_parent_r)
            # The parent's session is not this process's: refused, not "already ours".
            ok = not store.lock("user1") and store.lock("user2")
            os.write(to_parent_w, b"ok\n" if ok else b"bad\n")
            os.read(to_child_r, 1)  # hold user2 until the parent says so
            code = 0
        finally:
            os._exit(code)
    os.close(to_child_r)
    os.close(to_parent_w)
    try:
        with os.fdopen(to_parent_r, "rb") as report:
            assert report.readline() == b"ok\n"
            assert not store.lock("user2")  # held by the child's own open file
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert store.lock("user2")  # the child died: its lock went with it
    finally:
        os.close(to_child_w)
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    store.close()
