"""Where an idle authenticated connection's memory goes, per transport (tracemalloc).

    python bench/idle_memory.py --transport anyio --connections 2000

Runs a pop3proto ``Server`` in this process on the benchmark fixture, opens
*connections* authenticated idle sessions (greeting, USER, PASS, STAT) from a
forked client process, and compares a tracemalloc snapshot and the RSS taken
before and after.  Prints the allocation sites that grew, per connection; the
RSS growth not traced by tracemalloc is memory outside Python's allocator
(thread stacks, C library arenas, the TLS library).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import time
import tracemalloc

import fixture
import load

_MP = mp.get_context("fork")


def _rss_kb() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def _client(conn: object, users: list[str]) -> None:
    tracemalloc.stop()
    port = conn.recv()  # type: ignore[attr-defined]
    opener = load._IdleOpener(port)
    opener.add(users, timeout=300)
    conn.send((len(opener.open), opener.errors[:3]))  # type: ignore[attr-defined]
    conn.recv()  # type: ignore[attr-defined]
    opener.close_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", default="selectors")
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--frames", type=int, default=12, help="traceback depth kept")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--fixture", default="/tmp/pop3proto-bench-fixture")
    args = p.parse_args(argv)
    load.raise_nofile()
    fx = fixture.ensure(args.fixture)
    users = fx.idle_users[: args.connections]
    parent, child = _MP.Pipe()
    proc = _MP.Process(target=_client, args=(child, users), daemon=True)
    proc.start()  # forked before any server thread exists

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pop3proto.maildir import MaildirStorage
    from pop3proto.passwd import PasswdFile
    from pop3proto.server import Server

    tracemalloc.start(args.frames)
    server = Server(
        transport=args.transport,
        host="127.0.0.1",
        port=0,
        storage=MaildirStorage(fx.mail),
        auth=PasswdFile(fx.passwd),
        max_connections=20000,
        idle_timeout=900,
        login_timeout=900,
    )
    server.up()
    try:
        time.sleep(0.5)
        gc.collect()
        before, rss0 = tracemalloc.take_snapshot(), _rss_kb()
        tm0 = tracemalloc.get_tracemalloc_memory()
        parent.send(server.cget("port"))
        opened, errors = parent.recv()
        time.sleep(1.0)
        gc.collect()
        after, rss1 = tracemalloc.take_snapshot(), _rss_kb()
        rss1 -= (tracemalloc.get_tracemalloc_memory() - tm0) // 1024  # its own bookkeeping
        n = max(opened, 1)
        stats = after.compare_to(before, "traceback")
        traced = sum(s.size_diff for s in stats)
        print(f"{args.transport}: {opened} idle connections open (errors {errors})")
        print(f"  RSS growth     {(rss1 - rss0) / n:8.1f} KB/connection (less tracemalloc's own)")
        print(f"  traced growth  {traced / n / 1024:8.1f} KB/connection (Python allocations)")
        print(f"  untraced       {((rss1 - rss0) * 1024 - traced) / n / 1024:8.1f} KB/connection")
        print(f"\n  top {args.top} allocation sites by growth (bytes and blocks per connection):")
        for s in stats[: args.top]:
            frames = [f for f in s.traceback if "tracemalloc" not in f.filename]
            own = [f for f in frames if "pop3proto" in f.filename] or frames
            where = own[-1] if own else s.traceback[-1]
            leaf = s.traceback[-1] if len(s.traceback) else where
            name = os.path.relpath(where.filename, os.path.dirname(where.filename) + "/../..")
            lname = os.path.basename(leaf.filename)
            print(
                f"  {s.size_diff / n:8.0f} B {s.count_diff / n:6.1f} blk  "
                f"{name}:{where.lineno}  (allocated in {lname}:{leaf.lineno})"
            )
    finally:
        parent.send("close")
        proc.join(30)
        server.destroy("kill", timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
