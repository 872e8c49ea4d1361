"""The benchmark driver: pop3proto (each transport) against Dovecot on one fixture.

    python bench/run.py                      # everything, 3 repetitions (about 25 minutes)
    python bench/run.py --quick              # one short repetition (about 5 minutes)
    python bench/run.py --workloads sessions,login --servers selectors,dovecot

Each workload runs on a freshly started server (so idle memory is not
measured on a heap grown by earlier workloads), which is stopped by PID
right after.  Within a repetition the servers take turns on each workload
(sessions, pipelined, retr-large, login, idle), and their order rotates
between repetitions, so drift in the machine's state (caches, other
engineers' load) does not favour one server.  The throughput workloads are driven by
one uvloop process (``aload.py``; ``pip install uvloop``), or with ``--load blocking``
by the old forked blocking clients; ``--nice`` gives every server and the load one
niceness.  With two or more CPUs the server
runs on the first allowed CPU and this driver and its load processes on the
second.  The table shows each figure's median over the repetitions and its
ratio to Dovecot's, then the issue's targets with PASS/FAIL.  Raw results go
to ``--json`` (default ``/tmp/pop3proto-bench-results.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any

import aload
import fixture
import load
import procstat
import servers
import splitwrite
from dovecot import get_nice, set_nice

WORKLOAD_ORDER = (
    "sessions",
    "sessions-tls",
    "pipelined",
    "retr-large",
    "splitwrite",
    "login",
    "idle",
)
#: Workloads that need the server started with a TLS certificate.
NEEDS_TLS = load.NEEDS_TLS | {"splitwrite"}
SERVER_ORDER = ("blocking", "selectors", "anyio", "dovecot")

FULL: dict[str, dict[str, Any]] = {
    "sessions": {"clients": 16, "duration": 10.0},
    "sessions-tls": {"clients": 16, "duration": 10.0},
    "pipelined": {"commands": 10_000, "rounds": 20},
    "retr-large": {"repeats": 5, "parallel": 8, "parallel_repeats": 2},
    "splitwrite": {"count": 20},
    "login": {"repeats": 3},
    "idle": {"levels": (1000, 5000, 10_000), "greet_samples": 20},
}
QUICK: dict[str, dict[str, Any]] = {
    "sessions": {"clients": 16, "duration": 3.0},
    "sessions-tls": {"clients": 16, "duration": 3.0},
    "pipelined": {"commands": 10_000, "rounds": 10},
    "retr-large": {"repeats": 2, "parallel": 8, "parallel_repeats": 1},
    "splitwrite": {"count": 20},
    "login": {"repeats": 1},
    "idle": {"levels": (1000,), "greet_samples": 10},
}

# (workload, metric, unit, higher is better); the table's rows in order.
ROWS: list[tuple[str, str, str, bool]] = [
    ("sessions", "sessions/s", "", True),
    ("sessions", "p50 ms", "ms", False),
    ("sessions", "p99 ms", "ms", False),
    ("sessions", "server CPU ms/session", "ms", False),
    ("sessions-tls", "sessions/s", "", True),
    ("sessions-tls", "p99 ms", "ms", False),
    ("sessions-tls", "server CPU ms/session", "ms", False),
    ("pipelined", "commands/s", "", True),
    ("pipelined", "server CPU us/command", "us", False),
    ("retr-large", "MB/s 1 client", "", True),
    ("retr-large", "MB/s 8 clients", "", True),
    ("retr-large", "server CPU s/GB", "s", False),
    ("splitwrite", "split NOOP p50 ms", "ms", False),
    ("splitwrite", "split NOOP p90 ms", "ms", False),
    ("splitwrite", "split NOOP TLS p50 ms", "ms", False),
    ("splitwrite", "split NOOP TLS p90 ms", "ms", False),
    ("login", "many cold ms", "ms", False),
    ("login", "many warm ms", "ms", False),
    ("login", "many-nosize cold ms", "ms", False),
    ("login", "many-nosize warm ms", "ms", False),
    ("idle", "KB/conn RSS at 1000", "KB", False),
    ("idle", "KB/conn RSS at 5000", "KB", False),
    ("idle", "KB/conn RSS at 10000", "KB", False),
    ("idle", "KB/conn PSS at 10000", "KB", False),
    ("idle", "greeting ms at 1000", "ms", False),
    ("idle", "greeting ms at 10000", "ms", False),
    ("idle", "greeting max ms at 10000", "ms", False),
    ("idle", "open at 10000", "", True),
]


def derive(workload: str, r: dict[str, Any]) -> dict[str, Any]:
    """Add cost figures (server CPU per unit of work) to one workload result."""
    r = dict(r)
    if workload in ("sessions", "sessions-tls") and r.get("sessions"):
        r["server CPU ms/session"] = r["server cpu"] * r["wall s"] / r["sessions"] * 1000
    if workload == "pipelined" and r.get("rounds"):
        r["server CPU us/command"] = r["server cpu s"] / (r["rounds"] * r["commands"]) * 1e6
    if workload == "retr-large" and r.get("octets"):
        r["server CPU s/GB"] = r["server cpu s"] / (r["octets"] / 1e9)
    return r


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    try:
        head = subprocess.run(
            ["git", "-C", servers.REPO, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", servers.REPO, "status", "--porcelain", "pop3proto"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        head, dirty = "?", ""
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pop3proto": head + ("+uncommitted" if dirty else ""),
        "loadavg": os.getloadavg(),
    }


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


def median_of(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return statistics.median(nums) if nums else None


def table(results: dict[str, dict[str, list[dict[str, Any]]]], names: list[str]) -> str:
    """The results table (markdown): medians per server, then ratios to Dovecot."""
    pop = [n for n in names if n != "dovecot"]
    ref = "dovecot" if "dovecot" in names else None
    head = ["workload", "metric", *names] + [f"{n}/dovecot" for n in pop if ref]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for workload, metric, _unit, better_high in ROWS:
        meds = {
            n: median_of([r.get(metric) for r in results.get(n, {}).get(workload, [])])
            for n in names
        }
        if all(v is None for v in meds.values()):
            continue
        arrow = " (higher better)" if better_high else ""
        row = [workload, metric + arrow, *(fmt(meds[n]) for n in names)]
        if ref:
            base = meds[ref]
            for n in pop:
                v = meds[n]
                row.append("-" if v is None or not base else f"{v / base:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def targets(results: dict[str, dict[str, list[dict[str, Any]]]], names: list[str]) -> str:
    """The targets of performance round two, one line each per pop3proto transport."""

    def med(name: str, workload: str, metric: str) -> float | None:
        return median_of([r.get(metric) for r in results.get(name, {}).get(workload, [])])

    out = []

    def check(label: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        out.append(f"  {verdict}  {label}: {detail}")

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    for n in [x for x in names if x != "dovecot"]:
        out.append(f"{n}:")
        anyio = n.split("-w")[0] == "anyio"
        want = 1.0 if anyio else 1.3
        r = ratio(med(n, "sessions", "sessions/s"), med("dovecot", "sessions", "sessions/s"))
        check(f"sessions/s >= {want:g}x Dovecot", None if r is None else r >= want, f"{fmt(r)}x")
        r = ratio(med(n, "pipelined", "commands/s"), med("dovecot", "pipelined", "commands/s"))
        check("pipelined >= 0.5x Dovecot", None if r is None else r >= 0.5, f"{fmt(r)}x")
        if anyio:
            r = ratio(
                med(n, "retr-large", "MB/s 1 client"),
                med("dovecot", "retr-large", "MB/s 1 client"),
            )
            check("50 MB RETR >= 1.5x Dovecot", None if r is None else r >= 1.5, f"{fmt(r)}x")
        for label in ("", " TLS"):
            v = med(n, "splitwrite", f"split NOOP{label} p50 ms")
            check(f"split-write NOOP{label} < 5 ms", None if v is None else v < 5, f"{fmt(v)} ms")
        kb = med(n, "idle", "KB/conn RSS at 10000")
        check("idle < 16 KB/connection at 10k", None if kb is None else kb < 16, f"{fmt(kb)} KB")
        g = med(n, "idle", "greeting ms at 10000")
        check("greeting < 50 ms with 10k idle", None if g is None else g < 50, f"{fmt(g)} ms")
    return "\n".join(out)


LOAD_SATURATED = 0.9


def workload_runners(kind: str) -> dict[str, Any]:
    """Workload name -> runner: load.py's, with aload.py's for the throughput ones under uvloop."""
    runners: dict[str, Any] = dict(load.WORKLOADS)
    if kind == "uvloop":
        runners.update(aload.WORKLOADS)
    runners["splitwrite"] = splitwrite.run_splitwrite
    return runners


def pinned(pid: int, cpus: set[int] | None) -> int:
    """1 when every process of the server's tree is confined to *cpus* (or no pinning), else 0."""
    if not cpus:
        return 1
    for p in procstat.tree(pid):
        with contextlib.suppress(OSError):
            if os.sched_getaffinity(p) != cpus:
                return 0
    return 1


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="one short repetition")
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOAD_ORDER),
        help=f"comma-separated, from {', '.join(WORKLOAD_ORDER)}",
    )
    p.add_argument(
        "--servers",
        default=",".join(SERVER_ORDER),
        help="comma-separated, from blocking, selectors, anyio, dovecot; NAME-wN runs a "
        "transport with --workers N (e.g. selectors-w2)",
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    p.add_argument("--duration", type=float, default=None, help="seconds of the sessions loop")
    p.add_argument("--idle-levels", default=None, help="e.g. 1000,5000,10000")
    p.add_argument(
        "--fixture",
        default="/tmp/pop3proto-bench-fixture",
        help="fixture directory (built if missing or different)",
    )
    p.add_argument("--users", type=int, default=32, help="20-message users in the fixture")
    p.add_argument("--json", default="/tmp/pop3proto-bench-results.json")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and load to CPUs")
    p.add_argument(
        "--load",
        choices=("uvloop", "blocking"),
        default="uvloop",
        help="load generator for sessions, pipelined and retr-large: uvloop (default, "
        "bench/aload.py) or the old forked blocking-socket clients (bench/load.py), "
        "kept for comparison",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="one niceness for every server and the load generator alike (their "
        "autogroups' if the kernel has them; default 0, unchanged)",
    )
    p.add_argument("--server-log-level", default="INFO", help="pop3proto --log-level")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.load == "uvloop":
        aload.require_uvloop()  # SystemExit with the install command when missing
    runners = workload_runners(args.load)
    unknown = [w for w in workloads if w not in runners]
    if unknown:
        p.error(f"unknown workloads {unknown}")
    workloads = [w for w in WORKLOAD_ORDER if w in workloads]
    names, skipped = servers.available([s.strip() for s in args.servers.split(",") if s.strip()])
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    if not names:
        print("no server to run", file=sys.stderr)
        return 2
    params = {w: dict(v) for w, v in (QUICK if args.quick else FULL).items()}
    if args.duration:
        params["sessions"]["duration"] = args.duration
        params["sessions-tls"]["duration"] = args.duration
    if args.idle_levels:
        params["idle"]["levels"] = tuple(int(x) for x in args.idle_levels.split(","))
    reps = args.reps or (1 if args.quick else 3)

    allowed = sorted(os.sched_getaffinity(0))
    server_cpus = load_cpus = None
    if not args.no_pin and len(allowed) >= 2:
        server_cpus, load_cpus = {allowed[0]}, {allowed[1]}
        os.sched_setaffinity(0, load_cpus)  # this driver and every load process
    nice_how = ""
    nice_before = get_nice(os.getpid())
    if args.nice:
        # With autogroups this is the driver's (and load processes') group, and each
        # server's own group is set after it starts; else a nice servers inherit.
        nice_how = set_nice(os.getpid(), args.nice)
    nofile = load.raise_nofile()  # servers inherit it too

    fx = fixture.ensure(args.fixture, users=args.users)
    cert = None
    if NEEDS_TLS & set(workloads):
        cert = servers.make_tls_cert(fx.path)
    info = machine()
    info.update(
        {
            "servers": names,
            "workloads": workloads,
            "reps": reps,
            "params": params,
            "server_cpus": sorted(server_cpus or []),
            "load_cpus": sorted(load_cpus or []),
            "nice": f"{args.nice} ({nice_how or 'unchanged'})",
            "load": args.load,
            "nofile": nofile,
            "fixture": fx.path,
        }
    )
    print(
        f"# {info['cpu']} x{info['cpus']}, Linux {info['kernel']}, Python {info['python']}, "
        f"pop3proto {info['pop3proto']}; server CPUs {info['server_cpus'] or 'any'}, "
        f"load CPUs {info['load_cpus'] or 'any'} ({args.load} load generator); nice "
        f"{args.nice} for all; load average {' '.join(f'{x:.2f}' for x in info['loadavg'])}",
        flush=True,
    )
    if "dovecot" in names:
        from dovecot import dovecot_version

        info["dovecot"] = dovecot_version()[2]
        print(f"# Dovecot {info['dovecot']}", flush=True)

    results: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in names}
    failures: list[str] = []
    running: Any = None
    t_begin = time.monotonic()
    try:
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for workload in workloads:
                for name in order:
                    tag = f"[rep {rep + 1}/{reps}] {name} {workload}"
                    running = servers.make_server(
                        name,
                        fx,
                        cpus=server_cpus,
                        log_level=args.server_log_level,
                        tls=cert if workload in NEEDS_TLS else None,
                    )
                    ok = False
                    t0 = time.monotonic()
                    try:
                        running.start()
                        if nice_how == "autogroup":
                            set_nice(running.pid, args.nice)
                        raw = runners[workload](running, fx, **params[workload])
                        if running.proc is None or running.proc.poll() is not None:
                            raise RuntimeError("the server exited during the workload")
                        raw["pinned"] = pinned(running.pid, server_cpus)
                        ok = True
                    except Exception as exc:
                        failures.append(f"{tag}: {exc!r}")
                        traceback.print_exc()
                    finally:
                        running.stop()
                        if ok:
                            running.cleanup()
                        else:
                            print(f"  server log kept: {running.log_path}", flush=True)
                        running = None
                    if not ok:
                        continue
                    res = derive(workload, raw)
                    res["loadavg"] = os.getloadavg()[0]
                    results[name].setdefault(workload, []).append(res)
                    if res.get("load cpu", 0) >= LOAD_SATURATED:
                        print(f"  WARNING: the load generator used {res['load cpu']:.0%} of its "
                              "CPU: it may have been the limit", flush=True)
                    if not res.get("pinned", 1):
                        print("  WARNING: a server process ran off its CPU", flush=True)
                    brief = ", ".join(
                        f"{k}={fmt(v)}" for k, v in res.items() if isinstance(v, (int, float))
                    )
                    print(f"{tag} ({time.monotonic() - t0:.0f}s): {brief}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: stopping the server", file=sys.stderr)
        failures.append("interrupted")
    finally:
        if running is not None:
            running.stop()
        if nice_how:  # an autogroup outlives us: it is our caller's session too
            with contextlib.suppress(OSError):
                set_nice(os.getpid(), nice_before)
    info["minutes"] = round((time.monotonic() - t_begin) / 60, 1)
    info["loadavg_end"] = os.getloadavg()
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(
            {"machine": info, "results": results, "failures": failures}, f, indent=1, default=str
        )
    print()
    print(
        f"Medians of {reps} repetition(s); {info['minutes']} minutes; load average "
        f"{' '.join(f'{x:.2f}' for x in info['loadavg'])} at start, "
        f"{' '.join(f'{x:.2f}' for x in info['loadavg_end'])} at end."
    )
    print(table(results, names))
    print()
    print(targets(results, names))
    if failures:
        print("\nfailures:\n  " + "\n  ".join(failures))
    print(f"\nraw results: {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
