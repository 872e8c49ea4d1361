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

import ipaddress
import math
from typing import Protocol

__all__ = ["AddressCounter", "PenaltyTable", "Penalties", "address_group", "penalty_delay"]


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
        return penalty_delay(self.base, self.cap, failures)

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


def penalty_delay(base: float, cap: float, failures: float) -> float:
    """The delay a group with *failures* (decayed) failures serves: base doubling to cap."""
    if base <= 0 or failures <= 0:
        return 0.0
    return float(min(base * 2 ** min(math.ceil(failures) - 1, 16), cap))
