"""What a server process tree uses, read from /proc: CPU time, RSS, PSS, threads, fd limit.

A server is its main PID plus every live descendant (Dovecot's master, login,
auth and pop3 processes; pop3proto is one process).  CPU time also counts
children that have exited and were reaped (``cutime``/``cstime`` of their parent).
"""

from __future__ import annotations

import os

__all__ = ["cpu_seconds", "descendants", "fd_limit", "rss_kb", "pss_kb", "threads", "tree"]

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """Every live descendant of *pid*."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(_stat_fields(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue
    children: dict[int, list[int]] = {}
    for c, p in parent.items():
        children.setdefault(p, []).append(c)
    out: list[int] = []
    frontier = [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        out += kids
        frontier += kids
    return out


def tree(pid: int) -> list[int]:
    """*pid* and its live descendants."""
    return [pid, *descendants(pid)]


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of the tree, reaped children included."""
    total = 0
    for p in tree(pid):
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        # fields after ")": state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / _TICK


def _status_kb(pid: int, key: bytes) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kb(pid: int) -> int:
    """Sum of VmRSS over the tree (shared pages counted once per process)."""
    return sum(_status_kb(p, b"VmRSS:") for p in tree(pid))


def pss_kb(pid: int) -> int:
    """Sum of Pss over the tree (shared pages split between their users)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def threads(pid: int) -> int:
    """Threads over the tree."""
    return sum(_status_kb(p, b"Threads:") for p in tree(pid))


def fd_limit(pid: int) -> int | None:
    """The soft RLIMIT_NOFILE of *pid*."""
    try:
        with open(f"/proc/{pid}/limits", encoding="ascii") as f:
            for line in f:
                if line.startswith("Max open files"):
                    value = line.split()[3]
                    return None if value == "unlimited" else int(value)
    except OSError:
        pass
    return None


def fds(pid: int) -> int:
    """Open file descriptors of *pid*'s process tree (entries of /proc/PID/fd)."""
    total = 0
    for p in tree(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return total
