"""A/B: one transport from two checkouts, taking turns on the same workload, server CPU compared.

    python bench/ab.py --a ../main --b . --transport anyio --workload sessions --rounds 5

Both servers run at once, pinned to CPU 0 (the uvloop load generator on CPU 1),
and take turns, so both see the same load from other jobs on the machine.  Each
turn prints the server CPU per unit of work (ms per session, µs per command);
the medians are the figures to compare.  Shared machines make sessions/s noisy;
CPU per unit is what moves with the code.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import aload
import fixture
import servers


class _Checkout(servers.Pop3proto):
    """A pop3proto server run from another checkout (its directory first on sys.path)."""

    def __init__(self, repo: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.repo = os.path.abspath(repo)

    def start(self, timeout: float = 30.0) -> _Checkout:
        old = servers.REPO
        servers.REPO = self.repo
        try:
            super().start(timeout)
        finally:
            servers.REPO = old
        return self


def _unit(workload: str, r: dict[str, Any]) -> tuple[str, float]:
    if workload == "sessions":
        return "server CPU ms/session", 1000 * r["server cpu"] * r["wall s"] / max(r["sessions"], 1)
    return "server CPU us/command", r["server CPU us/command"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="checkout A (a directory holding pop3proto/)")
    p.add_argument("--b", required=True, help="checkout B")
    p.add_argument("--transport", default="anyio")
    p.add_argument("--workload", choices=("sessions", "pipelined"), default="sessions")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--fixture", default="/tmp/pop3proto-bench-fixture")
    p.add_argument("--env-b", default="", help="NAME=VALUE for B only (e.g. POP3PROTO_UVLOOP=0)")
    args = p.parse_args(argv)
    fx = fixture.ensure(args.fixture)
    os.sched_setaffinity(0, {1})
    env_b = dict([args.env_b.split("=", 1)]) if args.env_b else {}
    a = _Checkout(args.a, fx, args.transport, cpus={0}, log_level="INFO")
    a.start()
    saved = dict(os.environ)
    os.environ.update(env_b)
    try:
        b = _Checkout(args.b, fx, args.transport, cpus={0}, log_level="INFO")
        b.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    figures: dict[str, list[float]] = {"A": [], "B": []}
    unit = ""
    try:
        for i in range(args.rounds):
            for name, srv in (("A", a), ("B", b)) if i % 2 == 0 else (("B", b), ("A", a)):
                if args.workload == "sessions":
                    r = aload.run_sessions(srv, fx, duration=args.duration)
                else:
                    r = aload.run_pipelined(srv, fx)
                    r["server CPU us/command"] = (
                        1e6 * r["server cpu s"] / (r["rounds"] * r["commands"])
                    )
                unit, v = _unit(args.workload, r)
                figures[name].append(v)
                print(f"round {i + 1} {name}: {unit}={v:.3f} server cpu={r['server cpu']:.2f}",
                      flush=True)
    finally:
        a.stop()
        b.stop()
    ma, mb = statistics.median(figures["A"]), statistics.median(figures["B"])
    print(f"{args.transport} {args.workload} median {unit}: A {ma:.3f}  B {mb:.3f}  "
          f"B/A {mb / ma:.2f}x  (load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
