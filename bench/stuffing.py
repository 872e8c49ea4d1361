"""Throughput of the streaming dot-stuffer (``DotStuffer``) against copying the data once.

The message is the encoder's worst case: 50 MB in 72-octet lines, every
other line starting with ".", so half the lines are stuffed.  It is fed in
chunks of 1 MiB down to 1 KiB, as a RETR stream would be, once with LF line
ends (as Maildir stores them: every line end becomes CRLF) and once with CRLF.

The reference is the cheapest thing a RETR path must do anyway: copy each
chunk once, in the same chunking (``bytes(memoryview(chunk))``, one allocation
and one memcpy per chunk, with the same per-chunk loop overhead).  Reported:

* MB/s of both, and stuffer time / copy time;
* the stuffer's cost per byte at each chunk size relative to its cost with
  1 MiB chunks (small chunks should stay within 3x).

Each figure is the best of several runs (``time.perf_counter``).  Run from the
repository root::

    python bench/stuffing.py [--size-mb 50] [--runs 5]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

try:
    from pop3proto import DotStuffer
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pop3proto import DotStuffer

CHUNK_SIZES = [(1 << 20, "1 MiB"), (64 << 10, "64 KiB"), (16 << 10, "16 KiB"),
               (4 << 10, "4 KiB"), (1 << 10, "1 KiB")]
LINE_BODY = b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghijklmnopqrstuvwxyz"


def make_message(size: int, line_end: bytes) -> bytes:
    """About *size* octets of 72-octet lines, every other one starting with '.'."""
    body = LINE_BODY[: 72 - len(line_end) - 1]
    pair = b"." + body + line_end + b"x" + body + line_end
    return (pair * (size // len(pair) + 1))[:size]


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def stuff(chunks: list[bytes]) -> int:
    stuffer = DotStuffer()
    total = 0
    for chunk in chunks:
        total += len(stuffer.feed(chunk))
    return total + len(stuffer.end())


def copy_once(chunks: list[bytes]) -> int:
    total = 0
    for chunk in chunks:
        total += len(bytes(memoryview(chunk)))
    return total


def best_of(runs: int, func: Callable[[list[bytes]], int], chunks: list[bytes]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        func(chunks)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=50.0, help="message size (MB)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (best is kept)")
    args = parser.parse_args()
    size = int(args.size_mb * 1_000_000)

    print(f"DotStuffer vs one copy per chunk: {size / 1e6:.0f} MB, every other line starts "
          f"with '.', best of {args.runs}")
    print(f"Python {platform.python_version()} on {platform.machine()}, {platform.system()}")
    print()
    header = ("input", "chunk", "stuffer MB/s", "copy MB/s", "stuffer/copy",
              "per-byte vs 1 MiB")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, line_end in (("LF", b"\n"), ("CRLF", b"\r\n")):
        data = make_message(size, line_end)
        base = None
        for chunk_size, label in CHUNK_SIZES:
            chunks = chunked(data, chunk_size)
            t_stuff = best_of(args.runs, stuff, chunks)
            t_copy = best_of(args.runs, copy_once, chunks)
            base = t_stuff if base is None else base
            row = (name, label, f"{size / t_stuff / 1e6:.0f}", f"{size / t_copy / 1e6:.0f}",
                   f"{t_stuff / t_copy:.1f}x", f"{t_stuff / base:.2f}x")
            print("| " + " | ".join(row) + " |", flush=True)
            del chunks
        del data


if __name__ == "__main__":
    main()
