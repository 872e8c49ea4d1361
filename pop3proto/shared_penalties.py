"""Failed-login penalties in shared memory, for worker processes (``workers`` > 1).

``SharedPenalties`` has the interface and rules of ``pop3proto.limits.Penalties``
over an anonymous shared ``mmap`` made before the workers fork, so N workers
allow no more guesses than one.  (This is I/O: it lives apart from the pure
``limits`` module.)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import os
import secrets
import struct
import tempfile
import threading
import time
import weakref
from typing import TYPE_CHECKING

from .limits import Penalties
from .limits import penalty_delay as _delay

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["SharedPenalties"]


#: One slot: keyed hash of the group (0: empty), failure count, last update, end of the queue.
_SLOT = struct.Struct("=Qddd")
#: Slots looked at for one key (linear probing); a full window evicts its stalest entry.
_WINDOW = 32


class SharedPenalties:
    """``Penalties`` in shared memory: one table for every process forked after it is made.

    The same interface and rules as ``Penalties`` (growth-only, queued,
    halving every *half_life* seconds without a failure).  The table is an
    anonymous shared ``mmap`` of fixed size (an open-addressing hash table of
    *max_entries* slots, rounded up to a power of two); a group that finds
    its window of slots full takes the place of the window's stalest group.
    Group names are hashed with a secret key made here, so a client cannot
    pick addresses whose entries collide with another's.  A POSIX record lock
    on an unlinked temporary file serialises processes (the kernel drops it
    when a holder dies), a thread lock the threads of one process.

    Make it in the parent before forking and call ``after_fork()`` first
    thing in each child.  Times must be comparable across the processes:
    with *clock* (``time.monotonic``, system-wide on Linux) the table reads
    that clock and ignores the *now* it is given, so hosts whose own clocks
    differ (trio's has a random offset per run) still agree.

    Args:
        base: the first delay in seconds (0 turns penalties off).
        cap: the longest delay.
        half_life: seconds without a failure after which the failure count halves.
        max_entries: groups remembered (the table's size is fixed when it is made).
        clock: read for the current time instead of the *now* arguments.
        lock_timeout: seconds to wait for another process's lock; past it
            (a worker stopped while holding it) this process counts alone
            in a private table rather than wait longer.
    """

    def __init__(
        self,
        base: float,
        cap: float,
        *,
        half_life: float = 60.0,
        max_entries: int = 65_536,
        clock: Callable[[], float] | None = None,
        lock_timeout: float = 1.0,
    ) -> None:
        self.base, self.cap, self.half_life = base, cap, half_life
        self.clock, self.lock_timeout = clock, lock_timeout
        self.slots = 1 << max(_WINDOW - 1, max_entries - 1).bit_length()
        self._map = mmap.mmap(-1, self.slots * _SLOT.size)
        self._secret = secrets.token_bytes(16)
        fd, path = tempfile.mkstemp(prefix="pop3proto-penalties-")
        os.unlink(path)  # an unlinked file, only for its record lock
        self._fd = fd
        self._release = weakref.finalize(self, os.close, fd)
        self._thread_lock = threading.Lock()
        self._pid = os.getpid()
        self._private = Penalties(base, cap, half_life=half_life, max_entries=max_entries)

    def after_fork(self) -> None:
        """Call first thing in a forked child: a fresh thread lock (the old one may be held)."""
        self._thread_lock = threading.Lock()
        self._pid = os.getpid()

    def close(self) -> None:
        """Release the shared memory and the lock file (in the process that is done with it)."""
        self._map.close()
        self._release()

    # -- locking

    def _now(self, now: float) -> float:
        return self.clock() if self.clock is not None else now

    @contextlib.contextmanager
    def _locked(self) -> Iterator[bool]:
        """Hold both locks; yields False (nothing held) when another process kept its lock."""
        import fcntl  # POSIX only, like fork

        if os.getpid() != self._pid:
            self.after_fork()  # forked without after_fork(): at least never inherit a held lock
        with self._thread_lock:
            fd = self._fd
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        yield False
                        return
                    time.sleep(0.001)
            try:
                yield True
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)

    # -- slots

    def _hash(self, key: str) -> int:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8,
                                 key=self._secret).digest()
        return int.from_bytes(digest, "little") or 1

    def _find(self, h: int, create: bool) -> int | None:
        """The slot holding hash *h*; with *create*, else an empty one or the window's stalest."""
        start = h & (self.slots - 1)
        stalest, stalest_time = -1, math.inf
        for i in range(_WINDOW):
            slot = (start + i) & (self.slots - 1)
            other, _count, updated, _until = _SLOT.unpack_from(self._map, slot * _SLOT.size)
            if other == h:
                return slot
            if other == 0:  # slots are never emptied: the key is not further on
                stalest = slot
                break
            if updated < stalest_time:
                stalest, stalest_time = slot, updated
        if not create:
            return None
        return stalest

    def _read(self, slot: int, now: float) -> list[float]:
        """The slot's [count, updated, until], its count decayed to *now*."""
        _h, count, updated, until = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        entry = [count, updated, until]
        if self.half_life > 0 and now > updated:
            entry[0] *= 0.5 ** ((now - updated) / self.half_life)
            entry[1] = now
        return entry

    def _write(self, slot: int, h: int, entry: list[float]) -> None:
        _SLOT.pack_into(self._map, slot * _SLOT.size, h, *entry)

    # -- the Penalties interface

    def wait(self, key: str, now: float) -> float:
        """Seconds a new attempt from *key* waits before it is checked; reserves its turn."""
        now = self._now(now)
        with self._locked() as held:
            if not held:
                return self._alone().wait(key, now)
            h = self._hash(key)
            slot = self._find(h, create=False)
            if slot is None:
                return 0.0
            entry = self._read(slot, now)
            if entry[2] <= now:
                self._write(slot, h, entry)
                return 0.0
            wait = entry[2] - now
            entry[2] += _delay(self.base, self.cap, entry[0])
            self._write(slot, h, entry)
            return wait

    def failed(self, key: str, now: float) -> float:
        """Count a failed login from *key*; the delay to serve before answering it."""
        now = self._now(now)
        with self._locked() as held:
            if not held:
                return self._alone().failed(key, now)
            h = self._hash(key)
            slot = self._find(h, create=True)
            assert slot is not None
            held_by, *_rest = _SLOT.unpack_from(self._map, slot * _SLOT.size)
            entry = self._read(slot, now) if held_by == h else [0.0, now, now]
            entry[0] += 1
            entry[1] = now
            delay = _delay(self.base, self.cap, entry[0])
            entry[2] = max(entry[2], now) + delay
            self._write(slot, h, entry)
            return delay

    def failures(self, key: str, now: float) -> float:
        """The (decayed) failure count of *key*, for logs and tests."""
        now = self._now(now)
        with self._locked() as held:
            if not held:
                return self._alone().failures(key, now)
            slot = self._find(self._hash(key), create=False)
            return self._read(slot, now)[0] if slot is not None else 0.0

    def _alone(self) -> Penalties:
        """The private table used while another process keeps the lock too long."""
        self._private.base, self._private.cap = self.base, self.cap
        return self._private
