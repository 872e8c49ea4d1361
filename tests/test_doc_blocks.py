"""The code in README.md and docs/*.md runs, and the command lines in them use real flags.

Every ```python block of a page runs, in order, in one fresh interpreter (the
blocks of a page share a namespace, so a tutorial can build step by step),
with a timeout, in a temporary directory.  A block is left out only when the
line before its fence is a marker with a reason: ``<!-- not-run: reason -->``
in README.md, ``% not-run: reason`` (a MyST comment) in docs/; the skipped
blocks appear as ``test_not_run_block_has_a_reason[...]`` cases.

In ```sh blocks every ``python -m pop3proto.transports.NAME`` and
``python -m pop3proto COMMAND`` line may use only flags their parsers define.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 120.0
_MARKER = re.compile(r"^\s*(?:<!--\s*not-run:(?P<a>.*?)-->|%\s*not-run:(?P<b>.*))\s*$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    skip: str | None  # the not-run reason, or None to run it

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown page (nested fences are kept inside their parent)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        lang = m["info"].strip().split(" ")[0].lower()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(prev)
        skip = None if marker is None else (marker["a"] or marker["b"] or "").strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence[0] * max(3, len(fence)) and not (
            lines[j].strip().startswith(fence) and lines[j].strip().strip("`") == ""
        ):
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        out.append(Block(path, i + 2, lang, "\n".join(body) + "\n", skip))
        i = j + 1
    return out


ALL = [b for page in PAGES if page.exists() for b in blocks(page)]
PYTHON = [b for b in ALL if b.lang in ("python", "py")]
SHELL = [b for b in ALL if b.lang in ("sh", "bash", "shell", "console")]
RUN_PAGES = sorted({b.path for b in PYTHON if b.skip is None})

_RUNNER = """
import sys, traceback
blocks = {blocks!r}
ns = {{"__name__": "__main__"}}
for where, line, code in blocks:
    try:
        exec(compile("\\n" * (line - 1) + code, {path!r}, "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"the block at {{where}} failed", file=sys.stderr)
        sys.exit(1)
"""


def test_there_are_pages_with_code() -> None:
    assert PYTHON, "no python blocks found"


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    todo = [(b.where, b.line, b.code) for b in PYTHON if b.path == page and b.skip is None]
    script = _RUNNER.format(blocks=todo, path=str(page))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the python blocks of {page.name} did not finish within {TIMEOUT} s")
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]


@pytest.mark.parametrize("block", [b for b in PYTHON if b.skip is not None],
                         ids=lambda b: b.where)
def test_not_run_block_has_a_reason(block: Block) -> None:
    assert block.skip, f"{block.where}: a not-run marker needs a reason"


# ------------------------------------------------------------------ shell blocks


def _transport_parser(name: str) -> argparse.ArgumentParser:
    from pop3proto.transports._cli import build_parser

    return build_parser(name)


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    from pop3proto.__main__ import _parser

    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def invocations(block: Block) -> list[tuple[str, list[str]]]:
    """(module and command, words after it) for each ``python -m pop3proto...`` command."""
    text = block.code.replace("\\\n", " ")
    out: list[tuple[str, list[str]]] = []
    for line in text.split("\n"):
        for command in re.split(r"&&|\|\||[|;<>]", line):
            try:
                words = shlex.split(command, comments=True)
            except ValueError:
                continue
            out.extend(
                (words[k + 2], words[k + 3:])
                for k in range(len(words) - 2)
                if words[k].startswith("python") and words[k + 1] == "-m"
                and (words[k + 2] == "pop3proto" or words[k + 2].startswith("pop3proto."))
            )
    return out


CLI_USES = [(b, module, words) for b in SHELL for module, words in invocations(b)]


def test_shell_blocks_use_the_command_line() -> None:
    assert CLI_USES, "no python -m pop3proto command found in any sh block"


@pytest.mark.parametrize(("block", "module", "words"), CLI_USES,
                         ids=[f"{b.where}-{m}" for b, m, _ in CLI_USES])
def test_shell_flags_exist(block: Block, module: str, words: list[str]) -> None:
    if module == "pop3proto":
        commands = _command_parsers()
        assert words, f"{block.where}: python -m pop3proto without a command"
        assert words[0] in commands, f"{block.where}: no command {words[0]!r}"
        flags, words = _flags(commands[words[0]]), words[1:]
    else:
        transport = module.rsplit(".", 1)[-1]
        assert module == f"pop3proto.transports.{transport}", f"{block.where}: {module}"
        flags = _flags(_transport_parser(transport))
    used = {w.split("=", 1)[0] for w in words if w.startswith("-")}
    assert used <= flags, f"{block.where}: {module} has no {sorted(used - flags)}"
