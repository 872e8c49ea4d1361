"""Coverage-guided fuzzing of the core parser, the SASL decoders and the session logic.

Each target of ``fuzz/atheris_targets.py`` runs under atheris (libFuzzer) in
its own subprocess for ``POP3PROTO_FUZZ_SECONDS`` seconds (default 20; the
targets run side by side), starting from the seeds in ``fuzz/corpus/<target>``
and writing what it learns to a temporary directory.  A crash (an uncaught
exception, a timeout, a memory blow-up) fails the test and shows the input
that caused it; turn it into a regular test in ``tests/robustness/``.

Without atheris (``pip install atheris``; or with ``POP3PROTO_FUZZ_NO_ATHERIS=1``)
the same targets get inputs from hypothesis instead: random and seed-derived
bytes, *not* coverage-guided.
The seed corpus is always replayed once as a quick regression check.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "atheris_targets.py"
REPO = HERE.parent
TARGETS = ["connection", "sasl", "session"]
SECONDS = int(os.environ.get("POP3PROTO_FUZZ_SECONDS", "20"))


def have_atheris() -> bool:
    if os.environ.get("POP3PROTO_FUZZ_NO_ATHERIS"):
        return False
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def env(**more: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0", **more}


@dataclass
class Campaign:
    target: str
    proc: subprocess.Popen[bytes]
    log: Path
    artifacts: Path
    started: float

    def finish(self) -> tuple[int, str]:
        try:
            rc = self.proc.wait(SECONDS + 120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            rc = -9
        text = self.log.read_text("utf-8", "replace")
        return rc, "\n".join(ln for ln in text.splitlines() if not ln.startswith("INFO: Instr"))


@pytest.fixture(scope="module")
def campaigns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Campaign]]:
    """Start every target at once (atheris, or the hypothesis fallback); stop them at the end."""
    base = tmp_path_factory.mktemp("fuzz")
    out: dict[str, Campaign] = {}
    for target in TARGETS:
        work, artifacts = base / f"{target}-corpus", base / f"{target}-artifacts"
        work.mkdir()
        artifacts.mkdir()
        if have_atheris():
            argv = [
                sys.executable, str(SCRIPT), target,
                f"-max_total_time={SECONDS}", "-timeout=10", "-rss_limit_mb=2048",
                "-print_final_stats=1", f"-artifact_prefix={artifacts}/",
                str(work), str(HERE / "corpus" / target),
            ]  # fmt: skip
        else:
            argv = [sys.executable, str(SCRIPT), "--hypothesis", target, str(SECONDS)]
        log = base / f"{target}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO, env=env(),
            )  # fmt: skip
        out[target] = Campaign(target, proc, log, artifacts, time.monotonic())
    try:
        yield out
    finally:
        for c in out.values():
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_target_survives_fuzzing(
    campaigns: dict[str, Campaign], target: str, record_property: object
) -> None:
    campaign = campaigns[target]
    rc, log = campaign.finish()
    engine = "atheris" if have_atheris() else "hypothesis (not coverage-guided)"
    done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", log)
    runs = re.findall(r"hypothesis: (\d+) inputs", log)
    summary = (
        f"{done[-1][0]} runs, cov {done[-1][1]}, ft {done[-1][2]}, corpus {done[-1][3]}"
        if done else f"{runs[-1] if runs else '?'} inputs"
    )  # fmt: skip
    print(f"\n[figure] fuzz {target} ({engine}, {SECONDS} s): {summary}", file=sys.stderr)
    if callable(record_property):
        record_property(f"fuzz_{target}", summary)
    crashes = sorted(campaign.artifacts.iterdir())
    detail = "".join(
        f"\n{p.name}: {p.read_bytes()[:2000]!r}" for p in crashes
    )  # the input to turn into a regression test
    assert not crashes, f"{target} crashed (exit {rc}):{detail}\n{log[-6000:]}"
    assert rc == 0, f"{target} exited {rc}:\n{log[-6000:]}"
    assert done or runs, f"no statistics from the {target} run:\n{log[-3000:]}"


@pytest.mark.parametrize("target", TARGETS)
def test_seed_corpus_replays_cleanly(target: str) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--replay", target, str(HERE / "corpus" / target)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=env(POP3PROTO_FUZZ_NO_ATHERIS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"replayed {target}: ok" in result.stdout
    assert len(list((HERE / "corpus" / target).iterdir())) >= 5
