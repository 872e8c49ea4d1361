"""Maildir storage: the default ``Storage`` behind the server facade.

The maildrop of user *u* is ``ROOT/u/{cur,new,tmp}``.  What this module adds
to plain Maildir, and why:

* **Locking.**  ``flock`` on ``ROOT/u/pop3proto.lock``, opened anew for each
  ``lock`` call.  flock locks belong to the open file description, so two
  sessions of one process exclude each other as two processes do, and the
  kernel drops the lock when a process dies: there is no stale lock to clean.
* **Sizes.**  POP3 lists CRLF sizes (``_writers.wire_size`` is the rule).
  Dovecot's ``,W=`` name field is trusted; otherwise the size is measured once
  and remembered in ``ROOT/u/pop3proto-cache`` keyed by unique name and
  checked against (file size, mtime, inode), so a repeated login only stats.
* **UIDLs.**  Stable across sessions, flag renames and restarts: Dovecot's
  ``%08X%08X`` of (IMAP UID, UIDVALIDITY) when ``dovecot-uidlist`` knows the
  message (clients moving from Dovecot keep their state), else the unique name
  when it is a valid UIDL, else its MD5.
* **Deletion.**  A roll-forward journal: the paths are made durable before
  the first unlink, and a journal left by a crash is finished at the next
  ``lock``/``scan``.  Only messages listed by ``scan`` can be deleted.
* **Hostile files.**  Directories, FIFOs, devices and dangling symlinks in
  ``cur/``/``new/`` are skipped with a warning; files are opened with
  ``O_NONBLOCK`` and checked with ``fstat`` so a FIFO never hangs a session.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from ._maildrop import MessageInfo, valid_uid
from ._writers import WireSizer, wire_size
from .storage import MessageGone, StorageError

__all__ = ["MaildirStorage", "valid_mailbox_name"]

_CHUNK = 64 * 1024
_LOCK = "pop3proto.lock"
_CACHE = "pop3proto-cache"
_JOURNAL = "pop3proto-journal"
_UIDLIST = "dovecot-uidlist"
_ORDER_RE = re.compile(r"(\d+)\.(?:[^.]*?M(\d+))?")
_S_RE = re.compile(r",S=(\d+)(?=,|$)")
_W_RE = re.compile(r",W=(\d+)(?=,|$)")
_Cache = dict[str, list[int]]  # unique name -> [wire size, st_size, st_mtime_ns, st_ino]
_WFLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
_counter = itertools.count(1)
_counter_lock = threading.Lock()


def valid_mailbox_name(name: str) -> bool:
    """Whether *name* may name a maildrop directory directly under ROOT.

    Refused: empty, over 255 characters or bytes, a leading ``.``, ``..``
    anywhere, ``/``, ``\\``, and control characters (C0, DEL, C1).
    """
    if not name or len(name) > 255 or name[0] == "." or ".." in name:
        return False
    if any(c in "/\\" or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        return False
    try:
        return len(os.fsencode(name)) <= 255
    except UnicodeError:
        return False


@dataclass(slots=True)
class _Held:
    """One locked maildrop: its lock fd (None: no maildrop existed) and scan state."""

    fd: int | None
    paths: dict[str, str] = field(default_factory=dict)  # key -> "cur/<name>"
    cache: _Cache = field(default_factory=dict)


def _order(key: str) -> tuple[int, int, str]:
    """Sort key: delivery seconds, microseconds (``M<usec>``), then the name."""
    m = _ORDER_RE.match(key)
    if m is None:
        return (1 << 64, 0, key)
    return (int(m.group(1)), int(m.group(2) or 0), key)


def _uid_from_key(key: str) -> str:
    """The UIDL of a message Dovecot does not know: its unique name, or that name's MD5."""
    if valid_uid(key):
        return key
    return hashlib.md5(key.encode("utf-8", "surrogateescape")).hexdigest()


def _open_regular(path: str) -> tuple[BinaryIO, os.stat_result]:
    """Open *path* for reading; MessageGone unless it is a regular file (OSError if absent)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MessageGone(f"{path!r} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(final: str, data: bytes, *, tmp: str = "", sync_dir: bool = False) -> None:
    """Write *data* to *tmp* (default ``final.tmp``), fsync, rename it to *final*.

    Raises:
        OSError: nothing is at *final* and *tmp* has been removed.
    """
    tmp = tmp or final + ".tmp"
    try:
        fd = os.open(tmp, _WFLAGS, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        if sync_dir:
            _fsync_dir(os.path.dirname(final))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class MaildirStorage:
    """``Storage`` over ``ROOT/<user>/{cur,new,tmp}``; the mailbox reference is the user name.

    Methods are synchronous and thread-safe.  The lock is per maildrop, not per
    caller: ``unlock`` releases whatever this instance holds for the mailbox,
    so call it only after a ``lock`` that returned True.

    Args:
        root: directory holding one maildrop per user.
        create: make a missing ``cur``/``new``/``tmp`` at ``lock``; without
            it a missing maildrop is simply empty.
        logger: where skipped files and cache problems are reported.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        create: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.create = create
        self._log = logger if logger is not None else logging.getLogger(__name__)
        self._mutex = threading.Lock()
        self._held: dict[str, _Held] = {}

    # -- the Storage protocol ------------------------------------------------

    def lock(self, mailbox: str) -> bool:
        """Take the exclusive lock on *mailbox*; False if another session holds it.

        Also finishes a deletion journal left by a crash.

        Raises:
            StorageError: a bad name, or the lock/journal cannot be handled
                (the lock is then not held).
        """
        d = self._dir(mailbox)
        try:
            if self.create:
                for sub in ("cur", "new", "tmp"):
                    os.makedirs(os.path.join(d, sub), mode=0o700, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            fd: int | None = os.open(os.path.join(d, _LOCK), flags, 0o600)
        except FileNotFoundError:
            fd = None  # no maildrop directory: an empty maildrop
        except OSError as e:
            raise StorageError(f"cannot lock {mailbox!r}: {e.strerror or e}") from e
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._finish_journal(d)
            with self._mutex:
                if mailbox not in self._held:
                    self._held[mailbox] = _Held(fd)
                    return True
        except BlockingIOError:
            pass
        except BaseException as e:
            if fd is not None:
                os.close(fd)
            if isinstance(e, OSError):
                raise StorageError(f"cannot lock {mailbox!r}: {e.strerror or e}") from e
            raise
        if fd is not None:
            os.close(fd)
        return False

    def unlock(self, mailbox: str) -> None:
        """Release the lock this instance holds on *mailbox*; a no-op if none."""
        self._dir(mailbox)
        with self._mutex:
            held = self._held.pop(mailbox, None)
        if held is not None and held.fd is not None:
            os.close(held.fd)

    def scan(self, mailbox: str) -> list[MessageInfo]:
        """Move ``new/`` into ``cur/`` and list the maildrop in delivery order.

        Raises:
            StorageError: a bad name, the mailbox is not locked, or ``cur/``
                cannot be listed.
        """
        d, held = self._state(mailbox)
        held.paths.clear()
        if held.fd is None:
            return []
        self._finish_journal(d)
        found = self._list(d)
        cache = self._load_cache(d)
        dovecot = self._load_uidlist(d)
        new_cache: _Cache = {}
        infos: list[MessageInfo] = []
        for key in sorted(found, key=_order):
            rel, st = found[key]
            size = self._size(os.path.join(d, rel), key, st, cache, new_cache)
            if size is not None:
                held.paths[key] = rel
                uid = dovecot.get(key) or _uid_from_key(key)
                infos.append(MessageInfo(key=key, size=size, uid=uid))
        held.cache = new_cache
        if new_cache != cache:
            self._save_cache(d, new_cache)
        return infos

    def get(self, mailbox: str, key: str) -> BinaryIO:
        """Open message *key* read-only, following a rename by another MUA.

        Raises:
            MessageGone: the message is missing, unreadable or not a regular file.
        """
        d, held = self._state(mailbox)
        for _ in range(2):  # a second try if a flag rename races with the open
            rel = self._current(d, held, key)
            if rel is None:
                break
            try:
                return _open_regular(os.path.join(d, rel))[0]
            except FileNotFoundError:
                continue
            except OSError as e:
                raise MessageGone(f"message {key!r} is unreadable: {e.strerror or e}") from e
        raise MessageGone(f"message {key!r} is gone")

    def path(self, mailbox: str, key: str) -> str:
        """The current file path of message *key* (for zero-copy sending).

        Raises:
            MessageGone: no file with that unique name is left.
        """
        d, held = self._state(mailbox)
        rel = self._current(d, held, key)
        if rel is None:
            raise MessageGone(f"message {key!r} is gone")
        return os.path.join(d, rel)

    def dele(self, mailbox: str, keys: Sequence[str]) -> None:
        """Delete the listed messages, crash-safely (see the module docstring).

        Raises:
            StorageError: a key was not listed by ``scan`` or the journal cannot
                be written (nothing deleted), or some unlinks failed (the rest
                are deleted).
        """
        d, held = self._state(mailbox)
        unknown = [k for k in keys if k not in held.paths]
        if unknown:
            raise StorageError(f"keys not listed by scan: {unknown[:3]!r}")
        rels = [rel for rel in (self._current(d, held, k) for k in keys) if rel is not None]
        failed = 0
        if rels:
            journal = os.path.join(d, _JOURNAL)
            try:
                data = b"".join(os.fsencode(rel) + b"\0" for rel in rels)
                _write_atomic(journal, data, sync_dir=True)
            except OSError as e:
                raise StorageError(f"cannot write the deletion journal: {e.strerror or e}") from e
            failed = self._unlink_all(d, rels)
            try:
                os.unlink(journal)
            except OSError as e:  # the next lock retries; replaying it is harmless
                self._log.warning("cannot remove %r: %s", journal, e.strerror or e)
        before = len(held.cache)
        for key in keys:
            held.paths.pop(key, None)
            held.cache.pop(key, None)
        if len(held.cache) != before:
            self._save_cache(d, held.cache)
        if failed:
            raise StorageError(f"{failed} of {len(rels)} messages could not be deleted")

    # -- delivery ------------------------------------------------------------

    def deliver(self, mailbox: str, data: bytes) -> str:
        """Deliver *data* the Maildir way (``tmp/`` then ``new/``); return its unique name.

        Creates the maildrop directories if missing.  The name carries Dovecot's
        ``,S=`` (file size) and ``,W=`` (``wire_size``) fields.

        Raises:
            StorageError: a bad name or a write failure (nothing is delivered).
        """
        d = self._dir(mailbox)
        with _counter_lock:
            q = next(_counter)
        sec, usec = divmod(time.time_ns() // 1000, 1_000_000)
        host = socket.gethostname()
        for c, esc in (("/", r"\057"), (":", r"\072"), (",", r"\054")):
            host = host.replace(c, esc)
        name = f"{sec}.M{usec}P{os.getpid()}Q{q}.{host},S={len(data)},W={wire_size(data)}"
        try:
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(d, sub), mode=0o700, exist_ok=True)
            tmp = os.path.join(d, "tmp", name)
            _write_atomic(os.path.join(d, "new", name), data, tmp=tmp, sync_dir=True)
        except OSError as e:
            raise StorageError(f"cannot deliver to {mailbox!r}: {e.strerror or e}") from e
        return name

    # -- internals -------------------------------------------------------------

    def _dir(self, mailbox: str) -> str:
        if not valid_mailbox_name(mailbox):
            raise StorageError(f"invalid mailbox name {mailbox!r}")
        return os.path.join(self.root, mailbox)

    def _state(self, mailbox: str) -> tuple[str, _Held]:
        d = self._dir(mailbox)
        with self._mutex:
            held = self._held.get(mailbox)
        if held is None:
            raise StorageError(f"maildrop {mailbox!r} is not locked")
        return d, held

    def _regular(self, path: str) -> os.stat_result | None:
        """stat(*path*) if it is a regular file (symlinks followed); else warn, None."""
        try:
            st = os.stat(path)
        except OSError as e:
            if os.path.lexists(path):  # a dangling symlink, a loop, no permission
                self._log.warning("skipping %r: %s", path, e.strerror or e)
            return None  # otherwise it vanished meanwhile: nothing to say
        if not stat.S_ISREG(st.st_mode):
            self._log.warning("skipping %r: not a regular file", path)
            return None
        return st

    def _list(self, d: str) -> dict[str, tuple[str, os.stat_result]]:
        """Move ``new/`` files to ``cur/`` (adding ``:2,``); key -> (rel path, stat)."""
        found: dict[str, tuple[str, os.stat_result]] = {}
        for sub in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(d, sub))
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StorageError(f"cannot list {sub}/: {e.strerror or e}") from e
            for name in names:
                key = name.partition(":")[0]
                if name[0] == "." or not key:
                    continue
                st = self._regular(os.path.join(d, sub, name))
                if st is None:
                    continue
                rel = f"{sub}/{name}"
                if sub == "new":
                    target = name if ":" in name else name + ":2,"
                    try:
                        os.rename(os.path.join(d, rel), os.path.join(d, "cur", target))
                        continue  # listed from cur/ below
                    except FileNotFoundError:
                        continue  # taken by another MUA; cur/ will show it
                    except OSError as e:
                        self._log.warning("cannot move %r to cur/: %s", rel, e.strerror or e)
                if key in found:
                    self._log.warning("skipping %r: duplicate unique name", rel)
                else:
                    found[key] = (rel, st)
        return found

    def _size(
        self, path: str, key: str, st: os.stat_result, old: _Cache, new: _Cache
    ) -> int | None:
        """The message's CRLF size: from ``,W=``, the cache, or by reading it."""
        w = _W_RE.search(key)
        s = _S_RE.search(key)
        if w is not None and (s is None or int(s.group(1)) == st.st_size):
            return int(w.group(1))
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = old.get(key)
        if hit is not None and hit[1:] == stamp:
            new[key] = hit
            return hit[0]
        try:
            f, st = _open_regular(path)
            with f:
                sizer = WireSizer()
                while chunk := f.read(_CHUNK):
                    sizer.feed(chunk)
        except (OSError, StorageError) as e:
            self._log.warning("skipping %r: %s", path, e)
            return None
        new[key] = [sizer.total(), st.st_size, st.st_mtime_ns, st.st_ino]
        return sizer.total()

    def _load_cache(self, d: str) -> _Cache:
        try:
            with open(os.path.join(d, _CACHE), "rb") as f:
                raw = json.load(f)
            entries = raw["entries"] if raw.get("version") == 1 else {}
            ok = [k for k, v in entries.items() if len(v) == 4 and all(type(x) is int for x in v)]
            return {k: entries[k] for k in ok}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
            self._log.warning("ignoring unreadable %r: %s", os.path.join(d, _CACHE), e)
            return {}

    def _save_cache(self, d: str, cache: _Cache) -> None:
        data = json.dumps({"version": 1, "entries": cache}, separators=(",", ":")).encode()
        try:
            _write_atomic(os.path.join(d, _CACHE), data)
        except OSError as e:
            self._log.warning("size cache not saved: %s", e)

    def _load_uidlist(self, d: str) -> dict[str, str]:
        """Dovecot's ``dovecot-uidlist`` as unique name -> the UIDL Dovecot's POP3 sends."""
        try:
            with open(os.path.join(d, _UIDLIST), "rb") as f:
                lines = f.read().split(b"\n")
            head = lines[0].split()
            # "3 V<uidvalidity> N<nextuid> G<guid> ..."; versions 1 and 2: "1 <uidv> <next>"
            v3 = head[0] == b"3"
            validity = next(int(t[1:]) for t in head if t[:1] == b"V") if v3 else int(head[1])
        except FileNotFoundError:
            return {}
        except (OSError, IndexError, ValueError, StopIteration) as e:
            self._log.warning("ignoring unreadable %r: %r", os.path.join(d, _UIDLIST), e)
            return {}
        out: dict[str, str] = {}
        for line in lines[1:]:
            if v3:  # "<uid> [<key><value> ...] :<filename>"
                meta, _, fname = line.partition(b" :")
                fields = meta.split()
            else:  # "<uid> <filename>"; version 2 has "<flags>" between
                fields = line.split()
                fname = fields.pop() if len(fields) >= 2 else b""
            if not fname or not fields[0].isdigit():
                continue
            # A "P" field is a UIDL Dovecot kept from an earlier server; else %08Xu%08Xv.
            saved = [f[1:] for f in fields[1:] if v3 and f[:1] == b"P"]
            uidl = saved[0].decode("ascii", "replace") if saved else ""
            if not valid_uid(uidl):
                uidl = f"{int(fields[0]):08X}{validity:08X}"
            out[os.fsdecode(fname.split(b":", 1)[0])] = uidl
        return out

    def _refind(self, d: str, key: str) -> str | None:
        """Where message *key* is now (another MUA may have renamed it)."""
        for sub in ("cur", "new"):
            try:
                names = os.listdir(os.path.join(d, sub))
            except OSError:
                continue
            for name in names:
                if name == key or name.startswith(key + ":"):
                    return f"{sub}/{name}"
        return None

    def _current(self, d: str, held: _Held, key: str) -> str | None:
        """The listed message's present rel path, or None if no such file is left.

        Raises:
            MessageGone: *key* was not listed by this session's ``scan``.
        """
        rel = held.paths.get(key)
        if rel is None:
            raise MessageGone(f"no message {key!r} in this session")
        if os.path.lexists(os.path.join(d, rel)):
            return rel
        found = self._refind(d, key)
        if found is not None:
            held.paths[key] = found
        return found

    def _unlink_all(self, d: str, rels: Sequence[str]) -> int:
        """Unlink ``cur/``/``new/`` entries (absent ones are fine); the number that failed."""
        failed = 0
        touched = set()
        for rel in rels:
            sub, _, name = rel.partition("/")
            if sub not in ("cur", "new") or name in ("", ".", "..") or "/" in name:
                self._log.warning("ignoring journal entry %r", rel)
                continue
            try:
                os.unlink(os.path.join(d, rel))
                touched.add(sub)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EISDIR:  # a directory is no message of ours
                    failed += 1
                self._log.warning("cannot delete %r: %s", rel, e.strerror or e)
        for sub in touched:
            try:
                _fsync_dir(os.path.join(d, sub))
            except OSError as e:
                self._log.warning("cannot fsync %s/: %s", sub, e.strerror or e)
        return failed

    def _finish_journal(self, d: str) -> None:
        """Complete a deletion interrupted by a crash; drop an uncommitted one."""
        journal = os.path.join(d, _JOURNAL)
        with contextlib.suppress(OSError):
            os.unlink(journal + ".tmp")  # never renamed: its deletion never began
        try:
            with open(journal, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        except OSError as e:
            raise StorageError(f"cannot read {_JOURNAL}: {e.strerror or e}") from e
        self._unlink_all(d, [os.fsdecode(p) for p in raw.split(b"\0") if p])
        try:
            os.unlink(journal)
        except OSError as e:
            raise StorageError(f"cannot remove {_JOURNAL}: {e.strerror or e}") from e
