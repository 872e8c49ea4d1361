"""An in-memory ``Storage``: for tests, demos and examples.

It keeps the contract the way ``MaildirStorage`` does (one lock per mailbox,
``scan``/``get``/``dele`` only while locked, sizes by ``wire_size``, keys
stable until deleted) so code tested against it behaves the same on disk.
"""

from __future__ import annotations

import io
import itertools
import threading
from collections.abc import Mapping, Sequence

from ._maildrop import MessageInfo, valid_uid
from ._writers import wire_size
from .storage import MessageGone, StorageError

__all__ = ["MemoryStorage"]


class MemoryStorage:
    """Maildrops held in a dict; thread-safe.

    ``add`` puts a message in (any mailbox, locked or not, as a delivery
    would); ``remove`` takes one away behind a session's back, so a test can
    make ``get`` raise ``MessageGone``; ``messages`` shows what is left.
    """

    #: Every method is a dict operation: safe to run on an event loop.
    nonblocking = True
    #: Streams from ``get`` are in memory.
    nonblocking_reads = True

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._boxes: dict[str, dict[str, tuple[bytes, str]]] = {}  # key -> (data, uid)
        self._locked: set[str] = set()
        self._issued: set[str] = set()
        self._next = itertools.count(1)
        self._logins: dict[str, float] = {}
        self._retrieved: dict[str, dict[str, float]] = {}  # mailbox -> key -> first RETR

    def add(self, mailbox: str, data: bytes, uid: str | None = None) -> str:
        """Deliver *data* to *mailbox*; return its key.

        Args:
            uid: the UIDL to list; by default the key (``m1``, ``m2``, ...).

        Raises:
            ValueError: *uid* is not 1-70 characters in 0x21-0x7E.
        """
        if uid is not None and not valid_uid(uid):
            raise ValueError(f"invalid UIDL {uid!r}")
        with self._mutex:
            key = f"m{next(self._next)}"
            self._issued.add(key)
            self._boxes.setdefault(mailbox, {})[key] = (bytes(data), uid or key)
        return key

    def remove(self, mailbox: str, key: str) -> None:
        """Make message *key* vanish, as another program deleting the file would."""
        with self._mutex:
            self._boxes.get(mailbox, {}).pop(key, None)

    def messages(self, mailbox: str) -> list[bytes]:
        """The messages now in *mailbox*, in delivery order (for assertions)."""
        with self._mutex:
            return [data for data, _ in self._boxes.get(mailbox, {}).values()]

    def lock(self, mailbox: str) -> bool:
        """Take the mailbox lock; False if it is held."""
        with self._mutex:
            if mailbox in self._locked:
                return False
            self._locked.add(mailbox)
            return True

    def unlock(self, mailbox: str) -> None:
        """Release the lock; a no-op if it is not held."""
        with self._mutex:
            self._locked.discard(mailbox)

    def scan(self, mailbox: str) -> list[MessageInfo]:
        """Keys, wire sizes and UIDLs in delivery order.

        Raises:
            StorageError: the mailbox is not locked.
        """
        with self._mutex:
            box = self._box(mailbox)
            return [
                MessageInfo(key=k, size=wire_size(data), uid=uid) for k, (data, uid) in box.items()
            ]

    def get(self, mailbox: str, key: str) -> io.BytesIO:
        """The message's stored bytes as a stream.

        Raises:
            StorageError: the mailbox is not locked.
            MessageGone: no such message (never added, deleted or removed).
        """
        with self._mutex:
            entry = self._box(mailbox).get(key)
        if entry is None:
            raise MessageGone(f"no message {key!r} in {mailbox!r}")
        return io.BytesIO(entry[0])

    def dele(self, mailbox: str, keys: Sequence[str]) -> None:
        """Delete the messages *keys*; ones already gone are skipped.

        Raises:
            StorageError: the mailbox is not locked, or a key was never issued
                by ``add`` (nothing is deleted then).
        """
        with self._mutex:
            box = self._box(mailbox)
            unknown = [k for k in keys if k not in self._issued]
            if unknown:
                raise StorageError(f"unknown message keys {unknown[:3]!r}")
            for key in keys:
                box.pop(key, None)

    def last_login(self, mailbox: str) -> float | None:
        """The time ``logged_in`` last recorded for *mailbox* (LOGIN-DELAY); None if none."""
        with self._mutex:
            return self._logins.get(mailbox)

    def logged_in(self, mailbox: str, when: float) -> None:
        """Record a login to *mailbox* at Unix time *when*."""
        with self._mutex:
            self._logins[mailbox] = when

    def retrieved(self, mailbox: str, times: Mapping[str, float]) -> None:
        """Record first-retrieval times (EXPIRE); records of deleted messages are dropped.

        Raises:
            StorageError: the mailbox is not locked.
        """
        with self._mutex:
            box = self._box(mailbox)
            old = self._retrieved.get(mailbox, {})
            merged = {k: t for k, t in old.items() if k in box}
            for key, when in times.items():
                if key in box:
                    merged[key] = min(when, merged.get(key, when))
            self._retrieved[mailbox] = merged

    def retrievals(self, mailbox: str) -> dict[str, float]:
        """The recorded first-retrieval times of *mailbox* (for tests and tools)."""
        with self._mutex:
            return dict(self._retrieved.get(mailbox, {}))

    def set_retrieval(self, mailbox: str, key: str, when: float) -> None:
        """Set a recorded retrieval time, as an older session would have left it."""
        with self._mutex:
            self._retrieved.setdefault(mailbox, {})[key] = when

    def expired(self, mailbox: str, days: int, now: float) -> list[str]:
        """Keys in *mailbox* first retrieved at least *days* days before *now*.

        Raises:
            StorageError: the mailbox is not locked.
        """
        limit = now - days * 86400
        with self._mutex:
            box = self._box(mailbox)
            times = self._retrieved.get(mailbox, {})
            return [k for k in box if k in times and times[k] <= limit]

    def _box(self, mailbox: str) -> dict[str, tuple[bytes, str]]:
        if mailbox not in self._locked:
            raise StorageError(f"mailbox {mailbox!r} is not locked")
        return self._boxes.setdefault(mailbox, {})
