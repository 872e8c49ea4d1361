"""Maildir storage: the default ``Storage`` behind the server facade.

The maildrop of user *u* is ``ROOT/u/{cur,new,tmp}``.  What this module adds
to plain Maildir, and why:

* **Locking.**  ``flock`` on ``ROOT/u/pop3proto.lock``, opened anew for each
  ``lock`` call.  flock locks belong to the open file description, so two
  sessions of one process exclude each other as two processes do, and the
  kernel drops the lock when a process dies: there is no stale lock to clean.
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
* **Hostile files.**  Directories, FIFOs, devices and dangling symlinks in
  ``cur/``/``new/`` are skipped with a warning; files are opened with
  ``O_NONBLOCK`` and checked with ``fstat`` so a FIFO never hangs a session.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import logging
import os
import re
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from ._maildrop import MessageInfo, valid_uid
from ._writers import wire_size
from .storage import MessageGone, SafeLog, StorageError, nonblocking

__all__ = ["MaildirStorage", "valid_mailbox_name"]

_READ_MAX = 1 << 20  # the most read at once to measure a message
_CHUNK = 64 * 1024
_LOCK = "pop3proto.lock"
_CACHE = "pop3proto-cache"
_CACHE_MAGIC = "pop3proto-cache\t2"  # version 1 was JSON: ignored
_JOURNAL = "pop3proto-journal"
_UIDLIST = "dovecot-uidlist"
_STABLE_NS = 1_000_000_000  # a listing taken this long after the last change is reusable
_CACHE_MIN = 32  # messages: fewer, with every size in the names, are not worth a cache file
_MEMO_MESSAGES = 50_000  # listings kept in memory, at most this many messages in all
_MEMO_MAILBOXES = 256
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
    """One locked maildrop: its directory, lock fd (None: no maildrop existed), scan state."""

    d: str
    fd: int | None
    paths: dict[str, str] = field(default_factory=dict)  # key -> "cur/<name>"
    listing: _Listing | None = None


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


def _open_fd(path: str) -> tuple[int, os.stat_result]:
    """Open *path* for reading; MessageGone unless it is a regular file (OSError if absent).

    ``O_NONBLOCK`` keeps a FIFO from hanging the open; it is left set, as it
    changes nothing for a regular file.
    """
    fd = os.open(path, _RFLAGS)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise MessageGone(f"{path!r} is not a regular file")
    return fd, st


def _measure(path: str) -> tuple[int, os.stat_result]:
    """(wire size, fstat) of the regular file *path* (OSError, MessageGone).

    ``WireSizer``'s rule, but a chunk with no CR (most Maildir files have
    bare LF line ends) is spared the CRLF count, which takes most of the time.
    """
    fd, st = _open_fd(path)
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


def _file_id(path: str) -> _FileId:
    try:
        st = os.stat(path)
    except OSError:
        return _NO_FILE
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _stat_stamp(path: str, fields: int) -> tuple[int, ...]:
    st = os.stat(path)
    if fields == 2:
        return (st.st_mtime_ns, st.st_ino)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(
    final: str, data: bytes, *, tmp: str = "", sync: bool = True, sync_dir: bool = False
) -> None:
    """Write *data* to *tmp* (default ``final.tmp``), fsync unless not *sync*, rename to *final*.

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
            if sync:
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
    so call it only after a ``lock`` that returned True.  ``get`` is marked
    ``nonblocking`` (an open of a file in the page cache): event-loop
    transports call it directly.

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
        self._log = SafeLog(logger if logger is not None else logging.getLogger(__name__), {})
        self._mutex = threading.Lock()
        self._held: dict[str, _Held] = {}
        # Stable listings with their cache file's identity, least recently used first.
        self._memo: OrderedDict[str, tuple[_Listing, _FileId]] = OrderedDict()
        self._memo_messages = 0

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
                    self._held[mailbox] = _Held(d, fd)
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
        held.paths = {}
        held.listing = None
        if held.fd is None:
            return []
        self._finish_journal(d)
        listing = self._listing(mailbox, d)
        held.listing = listing
        held.paths = listing.paths.copy()
        return list(listing.infos)

    @nonblocking
    def get(self, mailbox: str, key: str) -> BinaryIO:
        """Open message *key* read-only (unbuffered), following a rename by another MUA.

        Raises:
            MessageGone: the message is missing, unreadable or not a regular file.
        """
        d, held = self._state(mailbox)
        rel = held.paths.get(key)
        if rel is None:
            raise MessageGone(f"no message {key!r} in this session")
        for _ in range(3):  # the listed path; a re-find if a flag rename races with the open
            try:
                fd = _open_fd(f"{d}/{rel}")[0]
            except FileNotFoundError:
                found = self._refind(d, key)
                if found is None:
                    break
                rel = held.paths[key] = found
                continue
            except OSError as e:
                raise MessageGone(f"message {key!r} is unreadable: {e.strerror or e}") from e
            try:
                return io.FileIO(fd, "r")
            except BaseException:
                os.close(fd)
                raise
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
            self._save_cache(f"{d}/{_CACHE}", _encode_cache(listing))
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
        with self._mutex:
            held = self._held.get(mailbox)
        if held is None:
            self._dir(mailbox)  # a bad name says so; a held one was checked by lock
            raise StorageError(f"maildrop {mailbox!r} is not locked")
        return held.d, held

    def _stamp(self, d: str) -> _Stamp:
        """What a listing is valid for: new/ and cur/ (mtime, inode), dovecot-uidlist's identity."""
        out: list[int] = []
        for sub in ("new", "cur"):
            try:
                out += _stat_stamp(f"{d}/{sub}", 2)
            except FileNotFoundError:
                out += (-1, -1)
            except OSError as e:
                raise StorageError(f"cannot stat {sub}/: {e.strerror or e}") from e
        try:
            out += _stat_stamp(f"{d}/{_UIDLIST}", 3)
        except OSError:
            out += (-1, -1, -1)
        return tuple(out)

    def _listing(self, mailbox: str, d: str) -> _Listing:
        """The maildrop's listing: remembered, from the cache file, or made anew.

        The memory copy is used only while the cache file is unchanged too:
        removing the file forces a rescan, as it always did.
        """
        now = time.time_ns()  # before the stats: see _Listing.stable
        stamp = self._stamp(d)
        cache = f"{d}/{_CACHE}"
        with self._mutex:
            memo = self._memo.get(mailbox)
        if memo is not None and memo[0].stamp == stamp and memo[1] == _file_id(cache):
            with self._mutex:
                if mailbox in self._memo:
                    self._memo.move_to_end(mailbox)
            return memo[0]
        raw, cached, file_id = self._read_cache(cache)
        if cached is not None and cached.stable and cached.stamp == stamp:
            try:
                listing = cached.listing()
            except ValueError as e:
                self._log.warning("ignoring unreadable %r: %s", cache, e)
            else:
                self._remember(mailbox, listing, file_id)
                return listing
        sizes: _Sizes = {}
        if cached is not None:
            with contextlib.suppress(ValueError):
                sizes = cached.sizes()
        stable = now - max(stamp[0], stamp[2]) >= _STABLE_NS
        listing = self._rescan(d, stamp, stable, sizes)
        # A small maildrop whose sizes are all in the names lists about as fast as it loads.
        if raw or listing.measured or len(listing.infos) >= _CACHE_MIN:
            data = _encode_cache(listing)
            if data != raw:
                file_id = self._save_cache(cache, data)
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

    def _rescan(self, d: str, stamp: _Stamp, stable: bool, old: _Sizes) -> _Listing:
        """List ``new/`` (moving its files to ``cur/``) and ``cur/``: sizes, UIDLs, order."""
        left, moved = self._move_new(d)
        if moved:  # our own renames changed both directories
            stamp = self._stamp(d)
            stable = False
        sizes: _Sizes = {}
        keys: list[str] = []
        rels: list[str] = []
        wire: list[int] = []
        seen: set[str] = set()
        cut = len(d) + 1
        try:
            it = os.scandir(f"{d}/cur")
        except FileNotFoundError:
            it = None
        except OSError as e:
            raise StorageError(f"cannot list cur/: {e.strerror or e}") from e
        try:
            # new/ files left there first: a duplicate of one in cur/ is skipped.
            for entry in itertools.chain(left, it or ()):
                name = entry.name
                key = name.partition(":")[0]
                if not key or name[0] == ".":
                    continue
                if key in seen:
                    self._log.warning("skipping %r: duplicate unique name", entry.path[cut:])
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
                        size = self._size(entry, key, old, sizes)
                else:
                    size = self._size(entry, key, old, sizes)
                if size is not None:
                    seen.add(key)
                    keys.append(key)
                    rels.append(entry.path[cut:])
                    wire.append(size)
        except OSError as e:
            raise StorageError(f"cannot list cur/: {e.strerror or e}") from e
        finally:
            if it is not None:
                it.close()
        order = _sort_keys(keys)
        dovecot = self._load_uidlist(d)
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

    def _move_new(self, d: str) -> tuple[list[os.DirEntry[str]], bool]:
        """Move ``new/`` files to ``cur/`` (adding ``:2,``).

        Returns:
            The regular files that could not be moved, and whether any file
            was moved (or vanished meanwhile).
        """
        left: list[os.DirEntry[str]] = []
        moved = False
        try:
            it = os.scandir(f"{d}/new")
        except FileNotFoundError:
            return left, moved
        except OSError as e:
            raise StorageError(f"cannot list new/: {e.strerror or e}") from e
        with it:
            try:
                entries = list(it)
            except OSError as e:
                raise StorageError(f"cannot list new/: {e.strerror or e}") from e
        for entry in entries:
            name = entry.name
            if name[0] == "." or not name.partition(":")[0]:
                continue
            try:
                regular = entry.is_file(follow_symlinks=False)
            except OSError as e:
                self._log.warning("skipping %r: %s", f"new/{name}", e.strerror or e)
                continue
            if not regular:
                if os.path.lexists(entry.path):  # else it vanished meanwhile
                    self._log.warning("skipping %r: not a regular file", f"new/{name}")
                continue
            target = name if ":" in name else name + ":2,"
            try:
                os.rename(entry.path, f"{d}/cur/{target}")
                moved = True  # listed from cur/
            except FileNotFoundError:
                moved = True  # taken by another MUA; cur/ will show it
            except OSError as e:
                self._log.warning("cannot move %r to cur/: %s", f"new/{name}", e.strerror or e)
                left.append(entry)
        return left, moved

    def _size(self, entry: os.DirEntry[str], key: str, old: _Sizes, new: _Sizes) -> int | None:
        """The message's CRLF size: from ``,W=``, the cache, or by reading it.

        None (with a warning) for what is not a regular file (symlinks followed).
        Only regular files are opened: a symlink is stat'ed first.
        """
        s, w = _name_sizes(key) if "," in key else (-1, -1)
        path = entry.path
        hit = None
        try:
            if w >= 0 and s < 0:  # nothing to check the trusted ,W= against
                if entry.is_file(follow_symlinks=False):  # no system call for a plain file
                    return w
                self._skip(path, "not a regular file")
                return None
            hit = old.get(key)
            if w < 0 and hit is None and entry.is_file(follow_symlinks=False):
                st = None  # a plain file to read: its fstat will do
            else:
                st = entry.stat(follow_symlinks=False)  # a symlink is skipped below
        except OSError as e:  # no permission, vanished
            self._skip(path, e.strerror or str(e))
            return None
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                self._skip(path, "not a regular file", check=False)
                return None
            if w >= 0 and st.st_size == s:
                return w
            if hit is not None and hit[1:] == (st.st_size, st.st_mtime_ns, st.st_ino):
                new[key] = hit
                return hit[0]
        try:
            size, st = _measure(path)
        except FileNotFoundError:
            self._skip(path, "vanished")  # a dangling symlink says so; else nothing to say
            return None
        except (OSError, StorageError) as e:
            self._skip(path, str(e), check=False)
            return None
        new[key] = (size, st.st_size, st.st_mtime_ns, st.st_ino)
        return size

    def _skip(self, path: str, why: str, *, check: bool = True) -> None:
        """Warn that *path* is skipped; with *check*, only if it was not removed meanwhile."""
        if not check or os.path.lexists(path):
            self._log.warning("skipping %r: %s", path, why)

    def _read_cache(self, path: str) -> tuple[bytes, _Cached | None, _FileId]:
        """The cache file's bytes (b"" if none), content (None if unusable) and identity."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            return b"", None, _NO_FILE
        except OSError as e:
            self._log.warning("ignoring unreadable %r: %s", path, e.strerror or e)
            return b"", None, _NO_FILE
        file_id = (st.st_mtime_ns, st.st_size, st.st_ino)
        try:
            return raw, _decode_cache(raw), file_id
        except ValueError as e:
            self._log.warning("ignoring unreadable %r: %s", path, e)
            return raw, None, file_id

    def _save_cache(self, path: str, data: bytes) -> _FileId:
        """Replace the cache file; its new identity."""
        # No fsync: a cache lost or cut short by a crash is detected and rebuilt.
        try:
            _write_atomic(path, data, sync=False)
        except OSError as e:
            self._log.warning("cache not saved: %s", e)
        return _file_id(path)

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
