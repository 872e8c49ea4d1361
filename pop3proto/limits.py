"""Per-address connection counts and failed-login penalties, I/O-free (time is an argument).

Clients are grouped by address: an IPv4 address (an IPv4-mapped IPv6 one
counts as IPv4) is its own group, an IPv6 address counts as its network of a
configurable prefix length, so one /64 cannot get a fresh penalty or a fresh
connection budget for every address it owns.

Penalties only grow with failures and decay with time: each failure adds
its delay to the group's ``until`` (parallel guesses queue up behind each
other instead of overwriting one another), a login that succeeds changes
nothing (an attacker with one account guesses no faster), and the failure
count halves for every ``half_life`` seconds without a failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import math
import mmap
import os
import secrets
import struct
import tempfile
import threading
import time
import weakref
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["AddressCounter", "PenaltyTable", "Penalties", "SharedPenalties", "address_group"]


def address_group(host: str, ipv6_prefix: int) -> str:
    """The key *host* is counted under: the address, or its IPv6 network of *ipv6_prefix*."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an IP address (a Unix socket peer, say): itself
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        if ipv6_prefix < 128:
            net = ipaddress.IPv6Network((int(addr) >> (128 - ipv6_prefix) << (128 - ipv6_prefix),
                                         ipv6_prefix))
            return str(net)
    return str(addr)


class AddressCounter:
    """Live connections per address group."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def count(self, key: str) -> int:
        """Connections now counted under *key*."""
        return self._counts.get(key, 0)

    def add(self, key: str) -> None:
        """Count one more connection under *key*."""
        self._counts[key] = self._counts.get(key, 0) + 1

    def remove(self, key: str) -> None:
        """Count one connection fewer under *key*."""
        left = self._counts.get(key, 1) - 1
        if left > 0:
            self._counts[key] = left
        else:
            self._counts.pop(key, None)


class PenaltyTable(Protocol):
    """What the server asks of a failed-login penalty table (``Penalties``, ``SharedPenalties``)."""

    base: float
    cap: float

    def wait(self, key: str, now: float) -> float:
        """Seconds a new attempt from *key* waits before it is checked; reserves its turn."""

    def failed(self, key: str, now: float) -> float:
        """Count a failed login from *key*; the delay to serve before answering it."""


class Penalties:
    """Failed-login delays per address group: base doubling to a cap, queued, decaying.

    Args:
        base: the first delay in seconds (0 turns penalties off).
        cap: the longest delay.
        half_life: seconds without a failure after which the failure count halves.
        max_entries: groups remembered; the stalest are forgotten beyond it.
    """

    def __init__(
        self, base: float, cap: float, *, half_life: float = 60.0, max_entries: int = 100_000
    ) -> None:
        self.base, self.cap, self.half_life, self.max_entries = base, cap, half_life, max_entries
        # key -> [failure count (decaying), when the count was last updated, end of the queue]
        self._table: dict[str, list[float]] = {}

    def _delay(self, failures: float) -> float:
        if self.base <= 0 or failures <= 0:
            return 0.0
        return float(min(self.base * 2 ** min(math.ceil(failures) - 1, 16), self.cap))

    def _entry(self, key: str, now: float) -> list[float] | None:
        entry = self._table.get(key)
        if entry is not None and self.half_life > 0 and now > entry[1]:
            entry[0] *= 0.5 ** ((now - entry[1]) / self.half_life)
            entry[1] = now
        return entry

    def wait(self, key: str, now: float) -> float:
        """Seconds a new attempt from *key* waits before it is checked; reserves its turn.

        While earlier failures' delays are not yet served, the attempt queues
        behind them and pushes the queue's end on by one more delay.
        """
        entry = self._entry(key, now)
        if entry is None or entry[2] <= now:
            return 0.0
        wait = entry[2] - now
        entry[2] += self._delay(entry[0])
        return wait

    def failed(self, key: str, now: float) -> float:
        """Count a failed login from *key*; the delay to serve before answering it."""
        entry = self._entry(key, now)
        if entry is None:
            if len(self._table) >= self.max_entries:
                stalest = sorted(self._table, key=lambda k: self._table[k][1])
                for k in stalest[: self.max_entries // 2]:
                    del self._table[k]
            entry = self._table[key] = [0.0, now, now]
        entry[0] += 1
        entry[1] = now
        delay = self._delay(entry[0])
        entry[2] = max(entry[2], now) + delay
        return delay

    def failures(self, key: str, now: float) -> float:
        """The (decayed) failure count of *key*, for logs and tests."""
        entry = self._entry(key, now)
        return entry[0] if entry is not None else 0.0


def _delay(base: float, cap: float, failures: float) -> float:
    """The delay a group with *failures* (decayed) failures serves: base doubling to cap."""
    if base <= 0 or failures <= 0:
        return 0.0
    return float(min(base * 2 ** min(math.ceil(failures) - 1, 16), cap))


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
