"""Check an installed pop3proto wheel: run with the Python of the venv it is installed in.

It checks that ``pop3proto`` comes from that venv (not from a checkout), that the
console script and the pytest plugin are declared and the LICENSE is shipped, then
starts ``python -m pop3proto.transports.anyio --demo --port 0`` as a subprocess,
reads the port, user and password it prints, logs in with the stdlib ``poplib``,
retrieves message 1, stops the server with SIGTERM and expects exit status 0.
Every wait has a timeout; the server is killed if anything goes wrong.
"""

from __future__ import annotations

import importlib.metadata
import os
import poplib
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, NoReturn

STARTUP_TIMEOUT = 30.0


def fail(message: str) -> NoReturn:
    print(f"wheel smoke: FAIL: {message}", file=sys.stderr)
    raise SystemExit(1)


def check_installation(workdir: str) -> None:
    """pop3proto is imported from this venv, with its entry points and licence."""
    code = "import pop3proto; print(pop3proto.__file__, pop3proto.__version__)"
    where = subprocess.run(
        [sys.executable, "-c", code],
        cwd=workdir, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    if not Path(where[0]).resolve().is_relative_to(Path(sys.prefix).resolve()):
        fail(f"pop3proto imported from {where[0]}, not from the venv at {sys.prefix}")
    dist = importlib.metadata.distribution("pop3proto")
    if dist.version != where[1]:
        fail(f"metadata version {dist.version} != pop3proto.__version__ {where[1]}")
    eps = dist.entry_points
    if not any(ep.group == "console_scripts" and ep.name == "pop3proto" for ep in eps):
        fail("no pop3proto console script")
    if not any(ep.group == "pytest11" and ep.value == "pop3proto.testing" for ep in eps):
        fail("no pytest11 entry point for pop3proto.testing")
    if not any(f.name == "LICENSE" for f in dist.files or ()):
        fail("LICENSE is not in the wheel")
    script = Path(sys.executable).parent / "pop3proto"
    done = subprocess.run([str(script), "--help"], cwd=workdir, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    if done.returncode != 0 or "passwd" not in done.stdout:
        fail(f"pop3proto --help exited {done.returncode}: {done.stderr[-2000:]}")


def read_lines(stream: IO[str], out: queue.Queue[str | None]) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def serve_and_fetch(workdir: str) -> None:
    """Start the demo server, fetch message 1 with poplib, stop it with SIGTERM."""
    log = open(os.path.join(workdir, "server.log"), "wb")  # noqa: SIM115
    argv = [sys.executable, "-m", "pop3proto.transports.anyio", "--demo",
            "--host", "127.0.0.1", "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=workdir, stdout=subprocess.PIPE, stderr=log,
                            stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        port = password = None
        seen: list[str] = []
        while port is None or password is None:
            try:
                line = lines.get(timeout=STARTUP_TIMEOUT)
            except queue.Empty:
                fail(f"no port and password within {STARTUP_TIMEOUT} s: {seen}")
            if line is None:
                fail(f"server exited {proc.wait(10)} before serving: {seen}")
            seen.append(line)
            if m := re.search(r"listening on \S+:(\d+)", line):
                port = int(m.group(1))
            if m := re.search(r"user: demo\s+password: (\S+)", line):
                password = m.group(1)
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("demo")
        client.pass_(password)
        count, _size = client.stat()
        _resp, message, _octets = client.retr(1)
        client.quit()
        if count < 1 or not any(ln.lower().startswith(b"subject:") for ln in message):
            fail(f"unexpected maildrop: {count} messages, message 1 = {message[:5]}")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        if rc != 0:
            fail(f"server exited {rc} after SIGTERM")
        print(f"wheel smoke: ok (pop3proto {importlib.metadata.version('pop3proto')}, "
              f"{count} messages, RETR 1 gave {len(message)} lines)")  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pop3proto-wheel-") as workdir:
        check_installation(workdir)
        try:
            serve_and_fetch(workdir)
        except SystemExit:
            sys.stderr.write(Path(workdir, "server.log").read_text("utf-8", "replace")[-4000:])
            raise


if __name__ == "__main__":
    main()
