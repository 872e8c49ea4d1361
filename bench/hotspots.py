"""Profile a pop3proto server under one workload with py-spy, and summarise the hotspots.

    pip install py-spy
    python bench/hotspots.py --server selectors --workload sessions
    python bench/hotspots.py --server blocking --workload login --top 25

The server is started as in ``run.py`` (pinned, on the same fixture),
``py-spy record --function --format raw`` samples it while the workload runs,
and the collapsed stacks are summarised as the functions with the most
samples on top of the stack ("self") and anywhere in it ("total"), as a
share of all samples.  Only threads that are running are sampled (py-spy's
default), so the shares are of CPU time, not of waiting; ``--idle`` samples
waiting threads too.  The raw stacks stay in ``--out`` for a flame graph
(``flamegraph.pl`` or speedscope.app read them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import fixture
import load
import run
import servers

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("/pop3proto/", "/lib/python3", "site-packages/"):
        i = path.find(marker)
        if i >= 0:
            path = path[i + 1 :] if marker == "/pop3proto/" else path[i + len(marker) :]
            break
    path = re.sub(r"^\.?\d+/", "", path)
    line = f":{m.group('line')}" if m.group("line") else ""
    return f"{m.group('func')} ({path}{line})"


# Leaf functions that are a thread waiting, not working (the command's main thread
# sits in Event.wait(0.5); py-spy does not always see that as idle).
_WAITS = {"Condition.wait", "Event.wait", "sleep", "Lock.acquire"}


_AREAS = (
    ("_writers.py", "dot-stuffing / writers"),
    ("maildir.py", "Maildir storage"),
    ("passwd.py", "passwd-file auth"),
    ("_connection.py", "protocol core (Connection)"),
    ("_receivebuffer.py", "protocol core (Connection)"),
    ("_readers.py", "protocol core (Connection)"),
    ("_maildrop.py", "protocol core (Connection)"),
    ("server.py", "session logic (server.py)"),
    ("transports/", "transport"),
    ("anyio/", "anyio / asyncio / threads"),
    ("asyncio/", "anyio / asyncio / threads"),
    ("threading.py", "anyio / asyncio / threads"),
    ("queue.py", "anyio / asyncio / threads"),
    ("sniffio", "anyio / asyncio / threads"),
    ("selectors.py", "transport"),
    ("socket.py", "transport"),
    ("ssl.py", "TLS"),
    ("logging/", "logging"),
    ("posixpath", "Maildir storage"),
    ("<frozen os>", "Maildir storage"),
    ("json/", "Maildir storage"),
)


def _category(frame: str) -> str:
    for marker, area in _AREAS:
        if marker in frame:
            return area
    return "other (stdlib, dataclass __init__, ...)"


def summarise(raw_path: str, top: int = 20, waits: bool = True) -> str:
    """Self and total sample shares per function from py-spy's raw (collapsed) output."""
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    n = 0
    with open(raw_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            k = int(count)
            frames = [_short(x) for x in stack.split(";") if "(" in x]
            if not frames or (waits and frames[-1].split(" (")[0] in _WAITS):
                continue
            n += k
            self_c[frames[-1]] += k
            for fr in set(frames):
                total_c[fr] += k
    if not n:
        return "no samples"
    cats: Counter[str] = Counter()
    for fr, c in self_c.items():
        cats[_category(fr)] += c
    out = [f"{n} samples", "", "self time by area:"]
    out += [f"  {c / n:6.1%}  {cat}" for cat, c in cats.most_common()]
    out += ["", f"top {top} by self time:"]
    out += [f"  {c / n:6.1%}  {fr}" for fr, c in self_c.most_common(top)]
    out += ["", f"top {top} by total time (function and what it calls):"]
    out += [f"  {c / n:6.1%}  {fr}" for fr, c in total_c.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="selectors", help="blocking, selectors or anyio")
    p.add_argument("--workload", default="sessions", choices=sorted(load.WORKLOADS))
    p.add_argument("--quick", action="store_true", help="the --quick workload parameters")
    p.add_argument("--rate", type=int, default=250, help="samples per second")
    p.add_argument("--idle", action="store_true", help="also sample waiting threads")
    p.add_argument(
        "--gil",
        action="store_true",
        help="only sample the thread holding the GIL (for the thread-per-connection transport, "
        "whose threads parked in recv() py-spy may count as running)",
    )
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--fixture", default="/tmp/pop3proto-bench-fixture")
    p.add_argument("--out", default="/tmp/pop3proto-bench-profiles")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    allowed = sorted(os.sched_getaffinity(0))
    server_cpus = {allowed[0]} if len(allowed) >= 2 else None
    if server_cpus:
        os.sched_setaffinity(0, {allowed[1]})
    load.raise_nofile()
    fx = fixture.ensure(args.fixture)
    os.makedirs(args.out, exist_ok=True)
    raw = os.path.join(args.out, f"{args.server}-{args.workload}.txt")
    params = (run.QUICK if args.quick else run.FULL)[args.workload]
    srv = servers.make_server(args.server, fx, cpus=server_cpus)
    srv.start()
    recorder = None
    try:
        cmd = [spy, "record", "--pid", str(srv.pid), "--rate", str(args.rate), "--function",
               "--format", "raw", "--output", raw]  # fmt: skip
        if args.idle:
            cmd.append("--idle")
        if args.gil:
            cmd.append("--gil")
        recorder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # let py-spy attach
        result = load.WORKLOADS[args.workload](srv, fx, **params)
    finally:
        if recorder is not None and recorder.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(recorder.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                recorder.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(recorder.pid, signal.SIGKILL)
                recorder.wait(10)
        srv.stop()
        srv.cleanup()
    brief = {k: run.fmt(v) for k, v in result.items() if isinstance(v, (int, float))}
    print(f"{args.server} {args.workload}: {brief}")
    print(summarise(raw, args.top, waits=not args.idle))
    print(f"\nraw stacks: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
