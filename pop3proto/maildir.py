"""Maildir storage: the default ``Storage`` behind the server facade.

The maildrop of user *u* is ``ROOT/u/{cur,new,tmp}``.  What this module adds
to plain Maildir, and why:

* **Containment.**  No path is ever resolved through a symlink: ROOT is
  opened once, and each operation opens the maildrop under it, then ``cur``,
  ``new`` and ``tmp`` under that, each with ``O_DIRECTORY|O_NOFOLLOW``, and
  names every file, cache and journal relative to those descriptors
  (``dir_fd=``, ``os.scandir(fd)``).  A maildrop that is a link, or whose
  ``cur``/``new``/``tmp`` is one (or not a directory), is refused with
  ``MailboxRefused`` and a warning; one swapped after ``lock`` (another
  inode) fails the operation.  Nothing is kept open between operations.
* **Locking.**  One byte per maildrop (at a 62-bit hash of its name) of one
  shared file, ``ROOT/.pop3proto-locks``, locked with an open-file-description
  lock (``F_OFD_SETLK``).  The file is opened once per process (again in a
  forked child), so an idle session holds no descriptor; two sessions of one
  process exclude each other through an in-process table and through two
  instances' separate open files, two processes through the kernel, which
  drops the locks of a process that dies: there is no stale lock to clean.
  Where OFD locks are missing (not 64-bit Linux) or the shared file cannot
  be opened, ``flock`` on ``ROOT/u/pop3proto.lock``, held open for the
  session, as before.  The two schemes do not see each other: run one
  version of pop3proto per root.
* **Sizes.**  POP3 lists CRLF sizes (``_writers.wire_size`` is the rule).
  Dovecot's ``,W=`` name field is trusted (unless a ``,S=`` beside it
  contradicts the file size); otherwise the size is measured once and
  remembered in ``ROOT/u/pop3proto-cache`` keyed by unique name and checked
  against (file size, mtime, inode).
* **The listing cache.**  ``pop3proto-cache`` also holds the whole listing
  (paths, sizes, UIDLs in delivery order) with the mtimes of ``new/`` and
  ``cur/`` and the identity of ``dovecot-uidlist``, as Dovecot's index does:
  while neither directory changed, a login reuses it without listing them
  (the process also keeps recent listings in memory).  It is trusted only if
  it was taken at least a second after the directories' last change, so a
  change within one timestamp tick of the listing is never missed.  Like
  Dovecot, this takes Maildir files to be immutable: a message rewritten in
  place (no rename, no new file) keeps its listed size until the directory
  changes.
* **UIDLs.**  Stable across sessions, flag renames and restarts: Dovecot's
  ``%08X%08X`` of (IMAP UID, UIDVALIDITY) when ``dovecot-uidlist`` knows the
  message (clients moving from Dovecot keep their state), else the unique name
  when it is a valid UIDL, else its MD5.
* **Deletion.**  A roll-forward journal: the paths are made durable before
  the first unlink, and a journal left by a crash is finished at the next
  ``lock``/``scan``.  Only messages listed by ``scan`` can be deleted.
* **LOGIN-DELAY and EXPIRE** (RFC 2449).  ``ROOT/u/pop3proto-last-login``
  holds the time of the user's last login (rewritten at each login, not
  synced: a record lost to a crash only lets one login in early), so the
  delay holds across restarts and worker processes.
  ``ROOT/u/pop3proto-retrieved`` holds each listed message's first RETR
  time; it is merged and rewritten atomically (synced) at UPDATE, after the
  deletions, and records of messages that are gone are dropped then.  A
  session that never reaches UPDATE leaves both files as they were.
* **Hostile files.**  Directories, FIFOs, devices and dangling symlinks in
  ``cur/``/``new/`` are skipped with a warning; files are opened with
  ``O_NONBLOCK`` and checked with ``fstat`` so a FIFO never hangs a session.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import itertools
import logging
import os
import re
import socket
import stat
import struct
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from ._maildrop import MessageInfo, valid_uid
from ._writers import WireSizer
from .storage import MailboxRefused, MessageGone, SafeLog, StorageError, nonblocking

__all__ = ["MaildirStorage", "MessageTooBig", "valid_mailbox_name"]

_READ_MAX = 1 << 20  # the most read at once to measure a message
_CHUNK = 64 * 1024
_COPY_CHUNK = 256 * 1024  # what deliver copies at once
_LOCK = "pop3proto.lock"  # per maildrop, where OFD locks are not available
_LOCKS = ".pop3proto-locks"  # one per storage root: a byte per maildrop
_CACHE = "pop3proto-cache"
_CACHE_MAGIC = "pop3proto-cache\t2"  # version 1 was JSON: ignored
_JOURNAL = "pop3proto-journal"
_LAST_LOGIN = "pop3proto-last-login"
_RETRIEVED = "pop3proto-retrieved"
_RETRIEVED_MAGIC = b"pop3proto-retrieved 1"
_UIDLIST = "dovecot-uidlist"
_STABLE_NS = 1_000_000_000  # a listing taken this long after the last change is reusable
_CACHE_MIN = 32  # messages: fewer, with every size in the names, are not worth a cache file
_MEMO_MESSAGES = 50_000  # listings kept in memory, at most this many messages in all
_MEMO_MAILBOXES = 256
_SHARED_DIRS = 64  # locked maildrops whose directory and cur/ stay open for get (2 fds each)
_LAST = 1 << 64  # sorts names that carry no delivery time last
_DIGITS = "0123456789"
# One match per line of "\n".join(keys): (seconds, microseconds) as _order finds them, or "".
_ORDER_RE = re.compile(r"^(?:(\d+)\.(?:[^.\n]*?M(\d+))?)?.*$", re.MULTILINE | re.ASCII)
_Stamp = tuple[int, ...]  # new/ and cur/ (mtime_ns, ino), dovecot-uidlist (mtime_ns, size, ino)
_Sizes = dict[str, tuple[int, int, int, int]]  # key -> (wire size, st_size, st_mtime_ns, st_ino)
_FileId = tuple[int, int, int]  # st_mtime_ns, st_size, st_ino
_NO_FILE: _FileId = (-1, -1, -1)
_WFLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
# O_NOFOLLOW: a symlink in a maildrop is never a message (the server may run as
# root; a link to /etc/shadow must not be served).
_RFLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
_DFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Open-file-description locks (Linux): owned by the open file, not the process,
# so one file descriptor per process can hold a byte lock per maildrop.
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: type, whence, start, len, pid
if sys.platform != "linux" or struct.calcsize("P") != 8:
    _OFD_SETLK = None
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


@dataclass(slots=True, eq=False)
class _Listing:
    """One maildrop listing: what ``scan`` returns and ``pop3proto-cache`` holds.

    Never changed once built (sessions may share it): ``dele`` makes a new one.
    """

    stamp: _Stamp  # new/, cur/ and dovecot-uidlist as they were before the listing
    stable: bool  # reusable while the stamp holds: taken >= _STABLE_NS after the last change
    infos: list[MessageInfo]  # in delivery order
    rels: list[str]  # "cur/<name>" of each message
    measured: _Sizes | None  # the measured sizes (names without a trusted ,W=); None: in source
    source: _Cached | None = None  # the cache file it was loaded from
    paths: dict[str, str] = field(init=False)  # key -> rel

    def __post_init__(self) -> None:
        self.paths = dict(zip([m.key for m in self.infos], self.rels, strict=True))

    def sizes(self) -> _Sizes:
        """The measured sizes, decoded from the cache file on first use."""
        if self.measured is None:
            try:
                self.measured = self.source.sizes() if self.source is not None else {}
            except ValueError:
                self.measured = {}  # measured again at the next rescan
        return self.measured


@dataclass(slots=True)
class _Held:
    """One locked maildrop: how it is locked, what it is, the scan state."""

    ident: tuple[int, int] | None = None  # the maildrop's (st_dev, st_ino); None: none existed
    offset: int = -1  # the byte held in the shared lock file; -1: none
    fd: int = -1  # a per-maildrop lock file (no OFD locks); -1: none
    ready: bool = False  # False while lock() is still taking it
    paths: dict[str, str] = field(default_factory=dict)  # key -> "cur/<name>"
    listing: _Listing | None = None


class _Shared:
    """A locked maildrop's directory and ``cur/`` descriptors, kept open for ``get``.

    Shared by the instance's threads: ``refs`` counts the uses under way, and
    a dropped entry is closed by the last of them.
    """

    __slots__ = ("cur", "cur_ident", "dropped", "fd", "ident", "refs")

    def __init__(self, fd: int, cur: int, ident: tuple[int, int],
                 cur_ident: tuple[int, int]) -> None:
        self.fd, self.cur, self.ident, self.cur_ident = fd, cur, ident, cur_ident
        self.refs = 1
        self.dropped = False

    def close(self) -> None:
        for fd in (self.cur, self.fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _close_shared(shared: dict[str, _Shared]) -> None:
    """Close every entry nobody uses (for close, a finalizer, a forked child)."""
    entries = list(shared.values())
    shared.clear()
    for e in entries:
        e.dropped = True
        if e.refs == 0:
            e.close()


def _order(key: str) -> tuple[int, int, str]:
    """Sort key: delivery seconds, microseconds (``M<usec>``), then the name."""
    sec, dot, rest = key.partition(".")
    if not dot or not sec.isdigit() or not sec.isascii():
        return (_LAST, 0, key)
    part = rest.partition(".")[0]
    i = part.find("M")
    while i >= 0:  # the first "M" followed by digits
        tail = part[i + 1 :]
        n = len(tail) - len(tail.lstrip(_DIGITS))
        if n:
            return (int(sec), int(tail[:n]), key)
        i = part.find("M", i + 1)
    return (int(sec), 0, key)


def _sort_keys(keys: list[str]) -> list[tuple[int, int, str]]:
    """``_order`` of each key; one regex pass over them all (a third faster)."""
    found = _ORDER_RE.findall("\n".join(keys))
    if len(found) != len(keys):  # a name holding a LF
        return [_order(k) for k in keys]
    return [
        (int(s) if s else _LAST, int(u) if u else 0, k)
        for (s, u), k in zip(found, keys, strict=True)
    ]


def _name_sizes(key: str) -> tuple[int, int]:
    """The numbers of the first well-formed ``,S=`` and ``,W=`` fields of *key*; -1 if none."""
    s = w = -1
    for part in key.split(",")[1:]:
        tag = part[:2]
        if tag == "W=" or tag == "S=":
            value = part[2:]
            if value.isdigit() and value.isascii():
                if tag == "W=":
                    w = int(value) if w < 0 else w
                elif s < 0:
                    s = int(value)
    return s, w


def _uid_from_key(key: str) -> str:
    """The UIDL of a message Dovecot does not know: its unique name, or that name's MD5."""
    if valid_uid(key):
        return key
    return hashlib.md5(key.encode("utf-8", "surrogateescape")).hexdigest()


def _open_fd(name: str, dir_fd: int) -> tuple[int, os.stat_result]:
    """Open *name* in the directory *dir_fd* for reading; MessageGone unless a regular file.

    OSError if absent.  ``O_NONBLOCK`` keeps a FIFO from hanging the open; it
    is left set, as it changes nothing for a regular file.
    """
    fd = os.open(name, _RFLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise MessageGone(f"{name!r} is not a regular file")
    return fd, st


def _read_file(name: str, dir_fd: int) -> tuple[bytes, os.stat_result]:
    """The bytes and fstat of the regular file *name* in *dir_fd* (OSError, MessageGone)."""
    fd, st = _open_fd(name, dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, max(_CHUNK, st.st_size + 1)):
            chunks.append(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def _measure(name: str, dir_fd: int) -> tuple[int, os.stat_result]:
    """(wire size, fstat) of the regular file *name* in *dir_fd* (OSError, MessageGone).

    ``WireSizer``'s rule, but a chunk with no CR (most Maildir files have
    bare LF line ends) is spared the CRLF count, which takes most of the time.
    """
    fd, st = _open_fd(name, dir_fd)
    try:
        total = 0
        last = -1  # the last byte read
        want = min(st.st_size + 1, _READ_MAX)  # mostly one read, then the empty one
        while chunk := os.read(fd, want):
            total += len(chunk) + chunk.count(b"\n")
            if b"\r" in chunk:
                total -= chunk.count(b"\r\n")
            if last == 13 and chunk[0] == 10:
                total -= 1  # CR|LF split across reads: that LF needs no CR
            last = chunk[-1]
            want = _READ_MAX if len(chunk) == want else _CHUNK  # a short read: likely EOF
    finally:
        os.close(fd)
    if last == 13:
        total += 1  # the encoder completes a final bare CR to CRLF
    elif last not in (-1, 10):
        total += 2  # and adds a CRLF after a last line with no line end
    return total, st


def _lexists(name: str, dir_fd: int) -> bool:
    """Whether *name* exists in *dir_fd* (a symlink counts; it is not followed)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _file_id(name: str, dir_fd: int) -> _FileId:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return _NO_FILE
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_atomic(name: str, data: bytes, dir_fd: int, *, sync: bool = True) -> None:
    """Write *data* to ``name.tmp`` in *dir_fd*, fsync unless not *sync*, rename it to *name*.

    With *sync* the directory is fsynced too.

    Raises:
        OSError: nothing is at *name* and the temporary file has been removed.
    """
    tmp = name + ".tmp"
    try:
        fd = os.open(tmp, _WFLAGS, 0o600, dir_fd=dir_fd)
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if sync:
            os.fsync(dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _describe(name: str, dir_fd: int) -> str:
    """What stands at *name* instead of a directory, for the refusal's log line."""
    try:
        return f"a link to {os.readlink(name, dir_fd=dir_fd)!r}"
    except OSError:
        return "not a directory"


def _open_dir(name: str, dir_fd: int, *, create: bool = False) -> int:
    """Open the directory *name* in *dir_fd* without following a link; -1 if absent.

    With *create*, a missing one is made (mode 0700).

    Raises:
        _NotADir: *name* is a symlink or not a directory.
        OSError: any other failure.
    """
    for _ in range(3):
        try:
            return os.open(name, _DFLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                return -1
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _NotADir(name, _describe(name, dir_fd)) from e
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
    raise OSError(errno.ENOENT, f"{name} keeps vanishing")


class _NotADir(Exception):
    """A maildrop directory is a symlink or not a directory: the maildrop is refused."""

    def __init__(self, name: str, what: str) -> None:
        super().__init__(f"{name} is {what}")
        self.name = name
        self.what = what


def _lock_offset(mailbox: str) -> int:
    """The byte of the shared lock file that stands for *mailbox*: a 62-bit hash."""
    digest = hashlib.blake2b(
        mailbox.encode("utf-8", "surrogateescape"), digest_size=8, person=b"pop3proto-lock"
    ).digest()
    return int.from_bytes(digest, "big") >> 2


def _ofd_lock(fd: int, offset: int, kind: int) -> bool:
    """Set (F_WRLCK) or clear (F_UNLCK) an OFD lock on one byte; False if another holds it."""
    assert _OFD_SETLK is not None
    arg = struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, _OFD_SETLK, arg)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class _Dirs:
    """A maildrop opened for one operation: its directory fd, and cur/new/tmp on demand.

    Each is opened with ``O_DIRECTORY|O_NOFOLLOW`` relative to the one above,
    and every file is named relative to them, so no path is ever resolved
    through a symlink.  Nothing is kept open between operations.
    """

    __slots__ = ("create", "fd", "mailbox", "storage", "subs")

    def __init__(self, fd: int, mailbox: str, storage: MaildirStorage, create: bool) -> None:
        self.fd = fd
        self.mailbox = mailbox
        self.storage = storage
        self.create = create
        self.subs: dict[str, int] = {}

    def sub(self, name: str) -> int:
        """The fd of ``cur``, ``new`` or ``tmp``; -1 if it does not exist.

        Raises:
            MailboxRefused: it is a symlink or not a directory (logged).
            StorageError: it cannot be opened.
        """
        fd = self.subs.get(name)
        if fd is None:
            try:
                fd = _open_dir(name, self.fd, create=self.create)
            except _NotADir as e:
                raise self.storage._refuse(self.mailbox, f"{name}/", e.what) from e
            except OSError as e:
                raise StorageError(f"cannot open {name}/: {e.strerror or e}") from e
            self.subs[name] = fd
        return fd

    def close(self) -> None:
        """Close every descriptor opened (idempotent)."""
        fds, self.subs = [self.fd, *self.subs.values()], {}
        self.fd = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> _Dirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode_cache(listing: _Listing) -> bytes:
    """``pop3proto-cache`` version 2: text in columns, one item a line (loads fast).

    A header line ``pop3proto-cache TAB 2 TAB <stable 0/1> TAB <n> TAB <m>
    TAB <stamp, 7 numbers>``; the *n* messages' keys, one a line, then their
    paths, a line of their sizes, their UIDLs (empty: the key); then the *m*
    measured sizes: keys, and lines of wire sizes, st_size, st_mtime_ns and
    st_ino.  A name holding a LF is left out, and the listing marked unstable.
    """
    stable = listing.stable
    infos = listing.infos
    rels = listing.rels
    if any("\n" in rel for rel in rels):
        keep = [i for i, rel in enumerate(rels) if "\n" not in rel]
        infos, rels, stable = [infos[i] for i in keep], [rels[i] for i in keep], False
    keys = [m.key for m in infos]
    measured = [(k, v) for k, v in listing.sizes().items() if "\n" not in k]
    stamp = "\t".join(map(str, listing.stamp))
    lines = [f"{_CACHE_MAGIC}\t{int(stable)}\t{len(keys)}\t{len(measured)}\t{stamp}"]
    lines += keys
    lines += rels
    lines.append(" ".join([str(m.size) for m in infos]))
    lines += ["" if m.uid == m.key else m.uid for m in infos]
    lines += [k for k, _ in measured]
    for i in range(4):
        lines.append(" ".join([str(v[i]) for _, v in measured]))
    lines.append("")
    return "\n".join(lines).encode("utf-8", "surrogateescape")


@dataclass(slots=True)
class _Cached:
    """A decoded ``pop3proto-cache``: the header and the column lines."""

    stamp: _Stamp
    stable: bool
    n: int  # messages
    m: int  # measured sizes
    lines: list[str]  # all the lines after the header

    def sizes(self) -> _Sizes:
        """The measured sizes.

        Raises:
            ValueError: a damaged column.
        """
        n, m, lines = self.n, self.m, self.lines
        at = 3 * n + 1
        keys = lines[at : at + m]
        cols = [list(map(int, lines[at + m + i].split())) for i in range(4)]
        if any(len(c) != m for c in cols):
            raise ValueError("bad size columns")
        return dict(zip(keys, zip(*cols, strict=True), strict=True))

    def listing(self) -> _Listing:
        """The listing recorded, marked stable (call it only for a stable one).

        Raises:
            ValueError: a damaged column (MessageInfo checks sizes and UIDLs).
        """
        n, lines = self.n, self.lines
        keys = lines[:n]
        rels = lines[n : 2 * n]
        blob = "\n" + "\n".join(rels)  # each "cur/<name>" or "new/<name>", no other "/"
        if blob.count("/") != n or blob.count("\ncur/") + blob.count("\nnew/") != n:
            raise ValueError("bad paths")
        sizes = list(map(int, lines[2 * n].split()))
        if len(sizes) != n:
            raise ValueError("bad sizes")
        infos = [
            MessageInfo(key=k, size=s, uid=u or k)
            for k, s, u in zip(keys, sizes, lines[2 * n + 1 : 3 * n + 1], strict=True)
        ]
        # The sizes are decoded if dele needs them; keep only their lines for that.
        rest = _Cached(self.stamp, self.stable, 0, self.m, lines[3 * n :])
        return _Listing(self.stamp, True, infos, rels, None, rest)


def _decode_cache(raw: bytes) -> _Cached | None:
    """A version 2 cache's content; None if it is another version.

    Raises:
        ValueError: a damaged cache.
    """
    if not raw.startswith(_CACHE_MAGIC.encode() + b"\t"):
        return None
    lines = raw.decode("utf-8", "surrogateescape").split("\n")
    _, _, stable, n, m, *stamp = lines[0].split("\t")
    count = 3 * int(n) + int(m) + 5
    if lines.pop() != "" or len(lines) != count + 1 or len(stamp) != 7:
        raise ValueError("truncated")
    del lines[0]
    return _Cached(tuple(map(int, stamp)), stable == "1", int(n), int(m), lines)


class MaildirStorage:
    """``Storage`` over ``ROOT/<user>/{cur,new,tmp}``; the mailbox reference is the user name.

    Methods are synchronous and thread-safe.  The lock is per maildrop, not per
    caller: ``unlock`` releases whatever this instance holds for the mailbox,
    so call it only after a ``lock`` that returned True.  ``get``, ``lock``
    and ``unlock`` are marked ``nonblocking`` (opens in the page cache, a lock
    that never waits): event-loop transports call them directly; ``scan``
    (a cold listing stats every file) and ``dele`` (fsync) run in a thread.

    A locked, idle session holds no file descriptor of its own (see the
    module docstring): each operation opens the maildrop's directories and
    closes them before it returns, except that ``get`` keeps the directory
    and ``cur/`` of the 64 maildrops it served last open (two descriptors
    each, however many sessions; checked by two ``stat`` calls per use,
    dropped at ``unlock``).  The instance keeps one descriptor on ROOT and,
    per process, one on the shared lock file; ``close`` releases them all.

    Args:
        root: directory holding one maildrop per user.
        create: make a missing ``cur``/``new``/``tmp`` at ``lock``; without
            it a missing maildrop is simply empty.
        logger: where skipped files, refused maildrops and cache problems
            are reported.
    """

    #: Reads of an opened message are page-cache reads: fine on an event loop.
    nonblocking_reads = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        create: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.create = create
        self._log = SafeLog(logger if logger is not None else logging.getLogger(__name__), {})
        self._mutex = threading.Lock()
        self._held: dict[str, _Held] = {}
        # Stable listings with their cache file's identity, least recently used first.
        self._memo: OrderedDict[str, tuple[_Listing, _FileId]] = OrderedDict()
        self._memo_messages = 0
        # [ROOT fd, shared lock file fd, the pid that opened the lock file]; -1: not open.
        self._fds = [-1, -1, -1]
        # Locked maildrops' directory and cur/ fds for get, least recently used first:
        # a RETR then costs two stats instead of opening and closing both.
        self._shared: OrderedDict[str, _Shared] = OrderedDict()
        self._warned_locks = False
        weakref.finalize(self, _close_fds, self._fds)
        weakref.finalize(self, _close_shared, self._shared)
        _instances.add(self)

    def close(self) -> None:
        """Release every lock this instance holds and close its descriptors."""
        with self._mutex:
            held, self._held = list(self._held.values()), {}
        for h in held:
            if h.fd >= 0:
                os.close(h.fd)
        with self._mutex:
            _close_shared(self._shared)
        _close_fds(self._fds)

    # -- the Storage protocol ------------------------------------------------

    @nonblocking  # an OFD lock that never waits, and opens of directories
    def lock(self, mailbox: str) -> bool:
        """Take the exclusive lock on *mailbox*; False if another session holds it.

        Also checks the maildrop's directories and finishes a deletion journal
        left by a crash.

        Raises:
            MailboxRefused: the maildrop, ``cur``, ``new`` or ``tmp`` is a
                symlink or not a directory (logged; never followed).
            StorageError: a bad name, or the lock/journal cannot be handled
                (the lock is then not held).
        """
        self._check(mailbox)
        with self._mutex:
            if mailbox in self._held:
                return False
            held = self._held[mailbox] = _Held()  # a reservation: other threads see it taken
        ok = False
        dirs: _Dirs | None = None
        try:
            dirs = self._open(mailbox, create=self.create)
            if dirs is not None:
                st = os.fstat(dirs.fd)
                held.ident = (st.st_dev, st.st_ino)
                for sub in ("cur", "new", "tmp"):
                    dirs.sub(sub)  # a link is refused here, before anything is read
            if not self._take(mailbox, held, dirs):
                return False
            if dirs is not None:
                self._finish_journal(dirs)
            held.ready = ok = True
            return True
        except OSError as e:
            raise StorageError(f"cannot lock {mailbox!r}: {e.strerror or e}") from e
        finally:
            if dirs is not None:
                dirs.close()
            if not ok:
                self._release(held)
                with self._mutex:
                    if self._held.get(mailbox) is held:
                        del self._held[mailbox]

    @nonblocking
    def unlock(self, mailbox: str) -> None:
        """Release the lock this instance holds on *mailbox*; a no-op if none."""
        self._check(mailbox)
        with self._mutex:
            held = self._held.get(mailbox)
            if held is None or not held.ready:
                return
            del self._held[mailbox]
            shared = self._shared.pop(mailbox, None)
            if shared is not None:
                shared.dropped = True
        if shared is not None and shared.refs == 0:
            shared.close()
        self._release(held)

    def scan(self, mailbox: str) -> list[MessageInfo]:
        """Move ``new/`` into ``cur/`` and list the maildrop in delivery order.

        Raises:
            MailboxRefused: a directory became a symlink (logged).
            StorageError: a bad name, the mailbox is not locked, or ``cur/``
                cannot be listed.
        """
        held = self._state(mailbox)
        held.paths = {}
        held.listing = None
        if held.ident is None:
            return []
        with self._dirs(mailbox, held) as dirs:
            self._finish_journal(dirs)
            listing = self._listing(mailbox, dirs)
        held.listing = listing
        held.paths = listing.paths.copy()
        return list(listing.infos)

    @nonblocking
    def get(self, mailbox: str, key: str) -> BinaryIO:
        """Open message *key* read-only (unbuffered), following a rename by another MUA.

        Raises:
            MessageGone: the message is missing, unreadable or not a regular
                file, or its directory is no longer the one locked.
        """
        held = self._state(mailbox)
        rel = held.paths.get(key)
        if rel is None:
            raise MessageGone(f"no message {key!r} in this session")
        if rel.startswith("cur/"):
            shared = self._share(mailbox, held)
            if shared is not None:
                try:
                    fd = _open_fd(rel[4:], shared.cur)[0]
                except FileNotFoundError:
                    fd = -1  # renamed by another MUA: the path below finds it again
                except OSError as e:
                    why = e.strerror or e
                    raise MessageGone(f"message {key!r} is unreadable: {why}") from e
                finally:
                    self._unshare(shared)
                if fd >= 0:
                    try:
                        return io.FileIO(fd, "r")
                    except BaseException:
                        os.close(fd)
                        raise
        try:
            with self._dirs(mailbox, held) as dirs:
                for _ in range(3):  # the listed path; a re-find if a flag rename races the open
                    sub, _, name = rel.partition("/")
                    try:
                        fd = _open_fd(name, dirs.sub(sub))[0]
                    except FileNotFoundError:
                        found = self._refind(dirs, key)
                        if found is None:
                            break
                        rel = held.paths[key] = found
                        continue
                    except OSError as e:
                        why = e.strerror or e
                        raise MessageGone(f"message {key!r} is unreadable: {why}") from e
                    try:
                        return io.FileIO(fd, "r")
                    except BaseException:
                        os.close(fd)
                        raise
        except MessageGone:
            raise
        except StorageError as e:
            raise MessageGone(f"message {key!r} is unreadable: {e}") from e
        raise MessageGone(f"message {key!r} is gone")

    def path(self, mailbox: str, key: str) -> str:
        """The current path of message *key*, for information (logs, tools).

        The file was found through the maildrop's directory descriptors
        without following a link, but the string returned is resolved anew by
        whoever opens it: read messages with ``get``, which never follows one.

        Raises:
            MessageGone: no file with that unique name is left.
        """
        held = self._state(mailbox)
        rel = None
        if held.ident is not None:
            try:
                with self._dirs(mailbox, held) as dirs:
                    rel = self._current(dirs, held, key)
            except MessageGone:
                raise
            except StorageError as e:
                raise MessageGone(f"message {key!r} is unreadable: {e}") from e
        elif key not in held.paths:
            raise MessageGone(f"no message {key!r} in this session")
        if rel is None:
            raise MessageGone(f"message {key!r} is gone")
        return os.path.join(self.root, mailbox, rel)

    def dele(self, mailbox: str, keys: Sequence[str]) -> None:
        """Delete the listed messages, crash-safely (see the module docstring).

        Raises:
            StorageError: a key was not listed by ``scan`` or the journal cannot
                be written (nothing deleted), or some unlinks failed (the rest
                are deleted).
        """
        held = self._state(mailbox)
        unknown = [k for k in keys if k not in held.paths]
        if unknown:
            raise StorageError(f"keys not listed by scan: {unknown[:3]!r}")
        if not keys:
            return
        with self._dirs(mailbox, held) as dirs:
            rels = [r for r in (self._current(dirs, held, k) for k in keys) if r is not None]
            failed = 0
            if rels:
                try:
                    data = b"".join(os.fsencode(rel) + b"\0" for rel in rels)
                    _write_atomic(_JOURNAL, data, dirs.fd)
                except OSError as e:
                    raise StorageError(
                        f"cannot write the deletion journal: {e.strerror or e}"
                    ) from e
                failed = self._unlink_all(dirs, rels)
                try:
                    os.unlink(_JOURNAL, dir_fd=dirs.fd)
                except OSError as e:  # the next lock retries; replaying it is harmless
                    self._log.warning("cannot remove %r: %s", _JOURNAL, e.strerror or e)
            for key in keys:
                held.paths.pop(key, None)
            listing = held.listing
            if listing is not None and any(k in listing.paths for k in keys):
                gone = set(keys)
                keep = [i for i, m in enumerate(listing.infos) if m.key not in gone]
                held.listing = listing = _Listing(
                    listing.stamp,
                    False,  # cur/ has changed
                    [listing.infos[i] for i in keep],
                    [listing.rels[i] for i in keep],
                    {k: v for k, v in listing.sizes().items() if k not in gone},
                )
                self._remember(mailbox, listing)  # forgets the old one
                self._save_cache(dirs, _encode_cache(listing))
        if failed:
            raise StorageError(f"{failed} of {len(rels)} messages could not be deleted")

    # -- LOGIN-DELAY and EXPIRE (optional capabilities) ------------------------

    def last_login(self, mailbox: str) -> float | None:
        """When ``logged_in`` last recorded a login to *mailbox*; None if never (or unreadable).

        Raises:
            MailboxRefused: the maildrop is a symlink (logged).
            StorageError: a bad name, or the maildrop cannot be opened.
        """
        self._check(mailbox)
        try:
            dirs = self._open(mailbox, create=False)
        except OSError as e:
            raise StorageError(f"cannot open maildrop {mailbox!r}: {e.strerror or e}") from e
        if dirs is None:
            return None
        with dirs:
            try:
                raw = _read_file(_LAST_LOGIN, dirs.fd)[0]
            except FileNotFoundError:
                return None
            except (OSError, MessageGone) as e:
                self._log.warning("%s: ignoring unreadable %r: %s", mailbox, _LAST_LOGIN, e)
                return None
        try:
            return float(raw.decode("ascii"))
        except (UnicodeError, ValueError):
            self._log.warning("%s: ignoring malformed %r", mailbox, _LAST_LOGIN)
            return None

    def logged_in(self, mailbox: str, when: float) -> None:
        """Record a login to the locked *mailbox* at Unix time *when*.

        Raises:
            StorageError: the mailbox is not locked, or the record cannot be written.
        """
        held = self._state(mailbox)
        if held.ident is None:
            return  # no maildrop directory to keep it in
        with self._dirs(mailbox, held) as dirs:
            try:  # not synced: a record lost to a crash lets one login in early
                _write_atomic(_LAST_LOGIN, f"{when:.3f}\n".encode(), dirs.fd, sync=False)
            except OSError as e:
                raise StorageError(f"cannot record the login: {e.strerror or e}") from e

    def retrieved(self, mailbox: str, times: Mapping[str, float]) -> None:
        """Merge first-RETR times into ``pop3proto-retrieved`` (older times win), crash-safely.

        Only keys this session's ``scan`` listed and ``dele`` has not deleted
        are kept (the records of messages that are gone are dropped).  The
        file is replaced atomically and synced, so a crash leaves either the
        old records or the new.

        Raises:
            StorageError: the mailbox is not locked, or the file cannot be written.
        """
        held = self._state(mailbox)
        if held.ident is None:
            return
        with self._dirs(mailbox, held) as dirs:
            old = self._read_retrieved(dirs)
            merged = {k: t for k, t in old.items() if k in held.paths}
            for key, when in times.items():
                if key in held.paths:
                    merged[key] = min(int(when), merged.get(key, int(when)))
            if merged == old:
                return
            data = b"".join(
                [_RETRIEVED_MAGIC + b"\0"]
                + [b"%d %s\0" % (t, os.fsencode(k)) for k, t in merged.items()]
            )
            try:
                _write_atomic(_RETRIEVED, data, dirs.fd)
            except OSError as e:
                raise StorageError(f"cannot record retrievals: {e.strerror or e}") from e

    def expired(self, mailbox: str, days: int, now: float) -> list[str]:
        """Keys listed by this session's ``scan`` first retrieved at least *days* days before *now*.

        Raises:
            StorageError: the mailbox is not locked.
        """
        held = self._state(mailbox)
        if held.ident is None:
            return []
        with self._dirs(mailbox, held) as dirs:
            records = self._read_retrieved(dirs)
        limit = now - days * 86400
        return [k for k in held.paths if k in records and records[k] <= limit]

    def _read_retrieved(self, dirs: _Dirs) -> dict[str, int]:
        """``pop3proto-retrieved`` as key -> time; empty if absent or unreadable (logged)."""
        try:
            raw = _read_file(_RETRIEVED, dirs.fd)[0]
        except FileNotFoundError:
            return {}
        except (OSError, MessageGone) as e:
            self._log.warning("%s: ignoring unreadable %r: %s", dirs.mailbox, _RETRIEVED, e)
            return {}
        entries = raw.split(b"\0")
        if entries[0] != _RETRIEVED_MAGIC or entries[-1] != b"":
            self._log.warning("%s: ignoring malformed %r", dirs.mailbox, _RETRIEVED)
            return {}
        out: dict[str, int] = {}
        for entry in entries[1:-1]:
            stamp, _, key = entry.partition(b" ")
            if stamp.isdigit() and key:
                out[os.fsdecode(key)] = int(stamp)
        return out

    # -- delivery ------------------------------------------------------------

    def deliver(self, mailbox: str, data: bytes | BinaryIO, *, max_size: int | None = None) -> str:
        """Deliver a message the Maildir way (``tmp/`` then ``new/``); return its unique name.

        *data* is the message's bytes or a binary stream, copied in chunks (memory
        stays flat whatever its size).  Creates the maildrop directories if
        missing.  The name carries Dovecot's ``,S=`` (file size) and ``,W=``
        (``wire_size``) fields.

        Raises:
            MessageTooBig: more than *max_size* bytes (nothing is delivered).
            MailboxRefused: a maildrop directory is a symlink (logged).
            StorageError: a bad name or a write failure (nothing is delivered).
        """
        self._check(mailbox)
        with _counter_lock:
            q = next(_counter)
        sec, usec = divmod(time.time_ns() // 1000, 1_000_000)
        host = socket.gethostname()
        for c, esc in (("/", r"\057"), (":", r"\072"), (",", r"\054")):
            host = host.replace(c, esc)
        base = f"{sec}.M{usec}P{os.getpid()}Q{q}.{host}"
        try:
            dirs = self._open(mailbox, create=True)
            assert dirs is not None
            with dirs:
                tmp, new = dirs.sub("tmp"), dirs.sub("new")
                dirs.sub("cur")
                fd = os.open(base, _WFLAGS | os.O_EXCL, 0o600, dir_fd=tmp)
                try:
                    try:
                        size, wire = _copy_in(fd, data, max_size)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    name = f"{base},S={size},W={wire}"
                    os.rename(base, name, src_dir_fd=tmp, dst_dir_fd=new)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(base, dir_fd=tmp)
                    raise
                os.fsync(new)
        except OSError as e:
            raise StorageError(f"cannot deliver to {mailbox!r}: {e.strerror or e}") from e
        return name

    # -- internals -------------------------------------------------------------

    def _check(self, mailbox: str) -> None:
        if not valid_mailbox_name(mailbox):
            raise StorageError(f"invalid mailbox name {mailbox!r}")

    def _state(self, mailbox: str) -> _Held:
        with self._mutex:
            held = self._held.get(mailbox)
        if held is None or not held.ready:
            self._check(mailbox)  # a bad name says so; a held one was checked by lock
            raise StorageError(f"maildrop {mailbox!r} is not locked")
        return held

    def _refuse(self, mailbox: str, what: str, why: str) -> MailboxRefused:
        """Log a refused maildrop and return the exception to raise."""
        self._log.warning("refusing maildrop %r: %s is %s", mailbox, what, why)
        return MailboxRefused(f"maildrop {mailbox!r}: {what} is {why}")

    def _root_fd(self, create: bool) -> int:
        """The descriptor on ROOT (opened once, following a link: ROOT is configuration).

        -1 if ROOT does not exist and not *create*.
        """
        fds = self._fds
        if fds[0] >= 0:
            return fds[0]
        if create:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if create:
                raise
            return -1
        with self._mutex:
            if fds[0] < 0:
                fds[0], fd = fd, -1
        if fd >= 0:
            os.close(fd)  # another thread was first
        return fds[0]

    def _open(self, mailbox: str, *, create: bool) -> _Dirs | None:
        """Open the maildrop's directory under ROOT without following a link; None if absent.

        Raises:
            MailboxRefused: it is a symlink or not a directory (logged).
            OSError: it cannot be opened.
        """
        root = self._root_fd(create)
        if root < 0:
            return None
        try:
            fd = _open_dir(mailbox, root, create=create)
        except _NotADir as e:
            raise self._refuse(mailbox, "the maildrop", e.what) from e
        return None if fd < 0 else _Dirs(fd, mailbox, self, create)

    def _dirs(self, mailbox: str, held: _Held) -> _Dirs:
        """The locked maildrop's directories for one operation (close them after).

        Raises:
            MailboxRefused: the maildrop became a symlink (logged).
            StorageError: it is gone or was replaced by another directory.
        """
        try:
            dirs = self._open(mailbox, create=False)
            if dirs is not None:
                st = os.fstat(dirs.fd)
                if (st.st_dev, st.st_ino) == held.ident:
                    return dirs
                dirs.close()
        except OSError as e:
            raise StorageError(f"cannot open maildrop {mailbox!r}: {e.strerror or e}") from e
        raise StorageError(f"maildrop {mailbox!r} was removed or replaced")

    def _share(self, mailbox: str, held: _Held) -> _Shared | None:
        """The locked maildrop's shared directory and cur/ fds, still the ones locked.

        None when anything is unusual (no ROOT, a replaced or missing
        directory, an error): the caller then takes the path that opens and
        checks everything anew, and reports what it finds.
        """
        root = self._fds[0]
        if root < 0 or held.ident is None:
            return None
        try:  # the path still names the directory that was locked, and is no link
            st = os.stat(mailbox, dir_fd=root, follow_symlinks=False)
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != held.ident or not stat.S_ISDIR(st.st_mode):
            return None
        with self._mutex:
            e = self._shared.get(mailbox)
            if e is not None and e.ident == held.ident:
                e.refs += 1
                self._shared.move_to_end(mailbox)
            else:
                e = None
        if e is not None:
            try:  # cur/ is still the directory opened (an fd stays on it: no inode reuse)
                cst = os.stat("cur", dir_fd=e.fd, follow_symlinks=False)
                if (cst.st_dev, cst.st_ino) == e.cur_ident:
                    return e
            except OSError:
                pass
            self._unshare(e)
            return None
        try:
            dirs = self._open(mailbox, create=False)
        except (OSError, StorageError):
            return None
        if dirs is None:
            return None
        cur_ident: tuple[int, int] | None = None
        try:
            st = os.fstat(dirs.fd)
            cur = dirs.sub("cur") if (st.st_dev, st.st_ino) == held.ident else -1
            if cur >= 0:
                st = os.fstat(cur)
                cur_ident = (st.st_dev, st.st_ino)
        except (OSError, StorageError):
            pass
        if cur_ident is None:
            dirs.close()
            return None
        e = _Shared(dirs.fd, cur, held.ident, cur_ident)
        dirs.fd, dirs.subs = -1, {}
        dirs.close()  # tmp/ or new/, had they been opened
        evicted: list[_Shared] = []
        with self._mutex:
            if self._held.get(mailbox) is not held:  # unlocked meanwhile: not kept
                e.dropped = True
            else:
                old = self._shared.pop(mailbox, None)
                if old is not None:
                    evicted.append(old)
                self._shared[mailbox] = e
                while len(self._shared) > _SHARED_DIRS:
                    evicted.append(self._shared.popitem(last=False)[1])
            for old in evicted:
                old.dropped = True
            evicted = [old for old in evicted if old.refs == 0]
        for old in evicted:
            old.close()
        return e

    def _unshare(self, e: _Shared) -> None:
        """One use of *e* is over (the last use of a dropped entry closes it)."""
        with self._mutex:
            e.refs -= 1
            last = e.dropped and e.refs == 0
        if last:
            e.close()

    def _lock_file(self) -> int:
        """This process's descriptor on ROOT's shared lock file; -1 if it cannot be had."""
        fds = self._fds
        if fds[1] >= 0 and fds[2] == os.getpid():
            return fds[1]
        if fds[1] >= 0:  # inherited over fork: its locks are the parent's
            _close_fds(fds, root=False)
        root = self._root_fd(False)
        if root < 0:
            return -1
        try:
            fd = os.open(_LOCKS, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600, dir_fd=root)  # fmt: skip
        except OSError as e:
            if not self._warned_locks:
                self._warned_locks = True
                self._log.warning("cannot open %r (%s): one lock file per maildrop instead",
                                  os.path.join(self.root, _LOCKS), e.strerror or e)  # fmt: skip
            return -1
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return -1
        with self._mutex:
            if fds[1] < 0:
                fds[1], fds[2], fd = fd, os.getpid(), -1
        if fd >= 0:
            os.close(fd)
        return fds[1]

    def _take(self, mailbox: str, held: _Held, dirs: _Dirs | None) -> bool:
        """Take the cross-process lock for *held*; False if another session has it.

        A byte of ROOT's shared lock file (an OFD lock: no descriptor per
        maildrop); else, or without OFD locks, ``flock`` on the maildrop's own
        lock file, held open for the session.  With neither ROOT nor a
        maildrop there is nothing to lock.
        """
        lock_fd = self._lock_file() if _OFD_SETLK is not None else -1
        if lock_fd >= 0:
            offset = _lock_offset(mailbox)
            if not _ofd_lock(lock_fd, offset, fcntl.F_WRLCK):
                return False
            held.offset = offset
            return True
        if dirs is None:
            return True
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        held.fd = os.open(_LOCK, flags, 0o600, dir_fd=dirs.fd)
        try:
            fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _release(self, held: _Held) -> None:
        """Drop the cross-process lock of *held* (idempotent)."""
        if held.offset >= 0:
            offset, held.offset = held.offset, -1
            fds = self._fds
            if fds[1] >= 0 and fds[2] == os.getpid():
                try:
                    _ofd_lock(fds[1], offset, fcntl.F_UNLCK)
                except OSError as e:  # cannot happen; closing the file frees all
                    self._log.warning("cannot unlock: %s", e.strerror or e)
        if held.fd >= 0:
            fd, held.fd = held.fd, -1
            os.close(fd)

    def _after_fork(self) -> None:
        """In a forked child: the parent's sessions and lock file are not ours."""
        self._mutex = threading.Lock()
        self._held = {}
        for e in self._shared.values():  # the child's copies; nobody uses them here
            e.refs = 0
        _close_shared(self._shared)
        _close_fds(self._fds, root=False)

    def _stamp(self, dirs: _Dirs) -> _Stamp:
        """What a listing is valid for: new/ and cur/ (mtime, inode), dovecot-uidlist's identity."""
        out: list[int] = []
        for sub in ("new", "cur"):
            fd = dirs.sub(sub)
            if fd < 0:
                out += (-1, -1)
                continue
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise StorageError(f"cannot stat {sub}/: {e.strerror or e}") from e
            out += (st.st_mtime_ns, st.st_ino)
        try:
            st = os.stat(_UIDLIST, dir_fd=dirs.fd, follow_symlinks=False)
            out += (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            out += (-1, -1, -1)
        return tuple(out)

    def _listing(self, mailbox: str, dirs: _Dirs) -> _Listing:
        """The maildrop's listing: remembered, from the cache file, or made anew.

        The memory copy is used only while the cache file is unchanged too:
        removing the file forces a rescan, as it always did.
        """
        now = time.time_ns()  # before the stats: see _Listing.stable
        stamp = self._stamp(dirs)
        with self._mutex:
            memo = self._memo.get(mailbox)
        if memo is not None and memo[0].stamp == stamp and memo[1] == _file_id(_CACHE, dirs.fd):
            with self._mutex:
                if mailbox in self._memo:
                    self._memo.move_to_end(mailbox)
            return memo[0]
        raw, cached, file_id = self._read_cache(dirs)
        if cached is not None and cached.stable and cached.stamp == stamp:
            try:
                listing = cached.listing()
            except ValueError as e:
                self._log.warning("%s: ignoring unreadable %r: %s", mailbox, _CACHE, e)
            else:
                self._remember(mailbox, listing, file_id)
                return listing
        sizes: _Sizes = {}
        if cached is not None:
            with contextlib.suppress(ValueError):
                sizes = cached.sizes()
        stable = now - max(stamp[0], stamp[2]) >= _STABLE_NS
        listing = self._rescan(dirs, stamp, stable, sizes)
        # A small maildrop whose sizes are all in the names lists about as fast as it loads.
        if raw or listing.measured or len(listing.infos) >= _CACHE_MIN:
            data = _encode_cache(listing)
            if data != raw:
                file_id = self._save_cache(dirs, data)
        self._remember(mailbox, listing, file_id)
        return listing

    def _remember(self, mailbox: str, listing: _Listing, file_id: _FileId = _NO_FILE) -> None:
        """Keep a stable listing in memory (least recently used ones go); forget an unstable one.

        *file_id* is the cache file's that goes with it.
        """
        with self._mutex:
            old = self._memo.pop(mailbox, None)
            if old is not None:
                self._memo_messages -= len(old[0].infos)
            if not listing.stable or len(listing.infos) > _MEMO_MESSAGES:
                return
            self._memo[mailbox] = (listing, file_id)
            self._memo_messages += len(listing.infos)
            while self._memo_messages > _MEMO_MESSAGES or len(self._memo) > _MEMO_MAILBOXES:
                self._memo_messages -= len(self._memo.popitem(last=False)[1][0].infos)

    def _rescan(self, dirs: _Dirs, stamp: _Stamp, stable: bool, old: _Sizes) -> _Listing:
        """List ``new/`` (moving its files to ``cur/``) and ``cur/``: sizes, UIDLs, order."""
        left, moved = self._move_new(dirs)
        if moved:  # our own renames changed both directories
            stamp = self._stamp(dirs)
            stable = False
        sizes: _Sizes = {}
        keys: list[str] = []
        rels: list[str] = []
        wire: list[int] = []
        seen: set[str] = set()
        cur = dirs.sub("cur")
        try:
            it = os.scandir(cur) if cur >= 0 else None
        except OSError as e:
            raise StorageError(f"cannot list cur/: {e.strerror or e}") from e
        listed = itertools.chain(
            (("new", dirs.sub("new"), e) for e in left),
            (("cur", cur, e) for e in it or ()),
        )
        try:
            # new/ files left there first: a duplicate of one in cur/ is skipped.
            for sub, fd, entry in listed:
                name = entry.name
                key = name.partition(":")[0]
                if not key or name[0] == ".":
                    continue
                rel = f"{sub}/{name}"
                if key in seen:
                    self._log.warning("%s: skipping %r: duplicate unique name", dirs.mailbox, rel)
                    continue
                # Inline, the commonest case: Dovecot's ",S=<size>,W=<wire size>" to check.
                fields = key.partition(",")[2]
                s, comma, w = fields[2:].partition(",W=")
                if fields[:2] == "S=" and comma and s.isdigit() and w.isdigit() and key.isascii():
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        st = None
                    if st is not None and st.st_size == int(s) and stat.S_ISREG(st.st_mode):
                        size: int | None = int(w)
                    else:
                        size = self._size(dirs, entry, rel, fd, key, old, sizes)
                else:
                    size = self._size(dirs, entry, rel, fd, key, old, sizes)
                if size is not None:
                    seen.add(key)
                    keys.append(key)
                    rels.append(rel)
                    wire.append(size)
        except OSError as e:
            raise StorageError(f"cannot list cur/: {e.strerror or e}") from e
        finally:
            if it is not None:
                it.close()
        order = _sort_keys(keys)
        dovecot = self._load_uidlist(dirs)
        ranks = sorted(range(len(keys)), key=order.__getitem__)
        infos = []
        for i in ranks:
            key = keys[i]
            try:  # MessageInfo checks the UIDL
                info = MessageInfo(key=key, size=wire[i], uid=dovecot.get(key) or key)
            except ValueError:  # not a valid UIDL: its MD5
                info = MessageInfo(key=key, size=wire[i], uid=_uid_from_key(key))
            infos.append(info)
        return _Listing(stamp, stable, infos, [rels[i] for i in ranks], sizes)

    def _move_new(self, dirs: _Dirs) -> tuple[list[os.DirEntry[str]], bool]:
        """Move ``new/`` files to ``cur/`` (adding ``:2,``).

        Returns:
            The regular files that could not be moved, and whether any file
            was moved (or vanished meanwhile).
        """
        left: list[os.DirEntry[str]] = []
        moved = False
        new = dirs.sub("new")
        if new < 0:
            return left, moved
        try:
            with os.scandir(new) as it:
                entries = list(it)
        except OSError as e:
            raise StorageError(f"cannot list new/: {e.strerror or e}") from e
        cur = dirs.sub("cur") if entries else -1
        for entry in entries:
            name = entry.name
            if name[0] == "." or not name.partition(":")[0]:
                continue
            try:
                regular = entry.is_file(follow_symlinks=False)
            except OSError as e:
                self._log.warning("%s: skipping %r: %s", dirs.mailbox, f"new/{name}",
                                  e.strerror or e)  # fmt: skip
                continue
            if not regular:
                if _lexists(name, new):  # else it vanished meanwhile
                    self._log.warning("%s: skipping %r: not a regular file", dirs.mailbox,
                                      f"new/{name}")  # fmt: skip
                continue
            target = name if ":" in name else name + ":2,"
            try:
                if cur < 0:
                    raise FileNotFoundError(errno.ENOENT, "no cur/ directory")
                os.rename(name, target, src_dir_fd=new, dst_dir_fd=cur)
                moved = True  # listed from cur/
            except OSError as e:
                if not _lexists(name, new):
                    moved = True  # taken by another MUA; cur/ will show it
                    continue
                self._log.warning("%s: cannot move %r to cur/: %s", dirs.mailbox, f"new/{name}",
                                  e.strerror or e)  # fmt: skip
                left.append(entry)
        return left, moved

    def _size(
        self,
        dirs: _Dirs,
        entry: os.DirEntry[str],
        rel: str,
        fd: int,
        key: str,
        old: _Sizes,
        new: _Sizes,
    ) -> int | None:
        """The message's CRLF size: from ``,W=``, the cache, or by reading it.

        None (with a warning) for what is not a regular file; a symlink is
        never followed (it is stat'ed, not opened).
        """
        s, w = _name_sizes(key) if "," in key else (-1, -1)
        name = entry.name
        hit = None
        try:
            if w >= 0 and s < 0:  # nothing to check the trusted ,W= against
                if entry.is_file(follow_symlinks=False):  # no system call for a plain file
                    return w
                self._skip(dirs, rel, fd, "not a regular file")
                return None
            hit = old.get(key)
            if w < 0 and hit is None and entry.is_file(follow_symlinks=False):
                st = None  # a plain file to read: its fstat will do
            else:
                st = entry.stat(follow_symlinks=False)  # a symlink is skipped below
        except OSError as e:  # no permission, vanished
            self._skip(dirs, rel, fd, e.strerror or str(e))
            return None
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                self._skip(dirs, rel, -1, "not a regular file")
                return None
            if w >= 0 and st.st_size == s:
                return w
            if hit is not None and hit[1:] == (st.st_size, st.st_mtime_ns, st.st_ino):
                new[key] = hit
                return hit[0]
        try:
            size, st = _measure(name, fd)
        except FileNotFoundError:
            self._skip(dirs, rel, fd, "vanished")  # a dangling symlink says so; else nothing
            return None
        except (OSError, StorageError) as e:
            self._skip(dirs, rel, -1, str(e))
            return None
        new[key] = (size, st.st_size, st.st_mtime_ns, st.st_ino)
        return size

    def _skip(self, dirs: _Dirs, rel: str, fd: int, why: str) -> None:
        """Warn that *rel* is skipped; if *fd* >= 0, only if it is still there."""
        if fd < 0 or _lexists(rel.partition("/")[2], fd):
            self._log.warning("%s: skipping %r: %s", dirs.mailbox, rel, why)

    def _read_cache(self, dirs: _Dirs) -> tuple[bytes, _Cached | None, _FileId]:
        """The cache file's bytes (b"" if none), content (None if unusable) and identity."""
        try:
            raw, st = _read_file(_CACHE, dirs.fd)
        except FileNotFoundError:
            return b"", None, _NO_FILE
        except (OSError, StorageError) as e:
            self._log.warning("%s: ignoring unreadable %r: %s", dirs.mailbox, _CACHE, e)
            return b"", None, _NO_FILE
        file_id = (st.st_mtime_ns, st.st_size, st.st_ino)
        try:
            return raw, _decode_cache(raw), file_id
        except ValueError as e:
            self._log.warning("%s: ignoring unreadable %r: %s", dirs.mailbox, _CACHE, e)
            return raw, None, file_id

    def _save_cache(self, dirs: _Dirs, data: bytes) -> _FileId:
        """Replace the cache file; its new identity."""
        # No fsync: a cache lost or cut short by a crash is detected and rebuilt.
        try:
            _write_atomic(_CACHE, data, dirs.fd, sync=False)
        except OSError as e:
            self._log.warning("%s: cache not saved: %s", dirs.mailbox, e)
        return _file_id(_CACHE, dirs.fd)

    def _load_uidlist(self, dirs: _Dirs) -> dict[str, str]:
        """Dovecot's ``dovecot-uidlist`` as unique name -> the UIDL Dovecot's POP3 sends."""
        try:
            lines = _read_file(_UIDLIST, dirs.fd)[0].split(b"\n")
            head = lines[0].split()
            # "3 V<uidvalidity> N<nextuid> G<guid> ..."; versions 1 and 2: "1 <uidv> <next>"
            v3 = head[0] == b"3"
            validity = next(int(t[1:]) for t in head if t[:1] == b"V") if v3 else int(head[1])
        except FileNotFoundError:
            return {}
        except (OSError, StorageError, IndexError, ValueError, StopIteration) as e:
            self._log.warning("%s: ignoring unreadable %r: %r", dirs.mailbox, _UIDLIST, e)
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

    def _refind(self, dirs: _Dirs, key: str) -> str | None:
        """Where message *key* is now (another MUA may have renamed it)."""
        for sub in ("cur", "new"):
            fd = dirs.sub(sub)
            if fd < 0:
                continue
            try:
                names = os.listdir(fd)
            except OSError:
                continue
            for name in names:
                if name == key or name.startswith(key + ":"):
                    return f"{sub}/{name}"
        return None

    def _current(self, dirs: _Dirs, held: _Held, key: str) -> str | None:
        """The listed message's present rel path, or None if no such file is left.

        Raises:
            MessageGone: *key* was not listed by this session's ``scan``.
        """
        rel = held.paths.get(key)
        if rel is None:
            raise MessageGone(f"no message {key!r} in this session")
        sub, _, name = rel.partition("/")
        fd = dirs.sub(sub)
        if fd >= 0 and _lexists(name, fd):
            return rel
        found = self._refind(dirs, key)
        if found is not None:
            held.paths[key] = found
        return found

    def _unlink_all(self, dirs: _Dirs, rels: Sequence[str]) -> int:
        """Unlink ``cur/``/``new/`` entries (absent ones are fine); the number that failed."""
        failed = 0
        touched = set()
        for rel in rels:
            sub, _, name = rel.partition("/")
            if sub not in ("cur", "new") or name in ("", ".", "..") or "/" in name:
                self._log.warning("%s: ignoring journal entry %r", dirs.mailbox, rel)
                continue
            fd = dirs.sub(sub)
            if fd < 0:
                continue
            try:
                os.unlink(name, dir_fd=fd)
                touched.add(sub)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EISDIR:  # a directory is no message of ours
                    failed += 1
                self._log.warning("%s: cannot delete %r: %s", dirs.mailbox, rel, e.strerror or e)
        for sub in touched:
            try:
                os.fsync(dirs.sub(sub))
            except OSError as e:
                self._log.warning("cannot fsync %s/: %s", sub, e.strerror or e)
        return failed

    def _finish_journal(self, dirs: _Dirs) -> None:
        """Complete a deletion interrupted by a crash; drop an uncommitted one."""
        with contextlib.suppress(OSError):
            os.unlink(_JOURNAL + ".tmp", dir_fd=dirs.fd)  # never renamed: never began
        try:
            raw = _read_file(_JOURNAL, dirs.fd)[0]
        except FileNotFoundError:
            return
        except (OSError, MessageGone) as e:
            raise StorageError(f"cannot read {_JOURNAL}: {e}") from e
        self._unlink_all(dirs, [os.fsdecode(p) for p in raw.split(b"\0") if p])
        try:
            os.unlink(_JOURNAL, dir_fd=dirs.fd)
        except OSError as e:
            raise StorageError(f"cannot remove {_JOURNAL}: {e.strerror or e}") from e


class MessageTooBig(StorageError):
    """A message to deliver is over the size cap: nothing was delivered."""


def _copy_in(fd: int, data: bytes | BinaryIO, max_size: int | None) -> tuple[int, int]:
    """Write *data* (bytes or a stream, in chunks) to *fd*; (size, wire size).

    Raises:
        MessageTooBig: over *max_size* bytes (part may have been written).
    """
    sizer = WireSizer()
    size = 0
    if isinstance(data, bytes | bytearray | memoryview):
        chunks: Iterator[bytes] = iter([bytes(data)])
    else:
        chunks = iter(functools.partial(data.read, _COPY_CHUNK), b"")
    for chunk in chunks:
        size += len(chunk)
        if max_size is not None and size > max_size:
            raise MessageTooBig(f"message over {max_size} bytes: not delivered")
        sizer.feed(chunk)
        _write_all(fd, chunk)
    return size, sizer.total()


def _close_fds(fds: list[int], *, root: bool = True) -> None:
    """Close a storage's lock file descriptor (and its ROOT one with *root*)."""
    for i in (0, 1) if root else (1,):
        fd, fds[i] = fds[i], -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
    fds[2] = -1


_instances: weakref.WeakSet[MaildirStorage] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for storage in list(_instances):
        storage._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
