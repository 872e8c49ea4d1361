"""Packaging: what a user installing pop3proto relies on, checked without building anything.

The wheel and sdist themselves are built, checked and installed by ``.ci/run``
(``.ci/wheel_smoke.py``); here: one version, the licence, the entry points, the
extras, the sdist's contents rule, and the missing-extra messages of the CLI.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path
from pkgutil import resolve_name
from typing import Any

import pytest
from packaging.requirements import Requirement

import pop3proto
from pop3proto import __main__ as cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
PROJECT: dict[str, Any] = PYPROJECT["project"]


def extra(name: str) -> dict[str, Requirement]:
    """The requirements of one extra, by project name."""
    reqs = [Requirement(r) for r in PROJECT["optional-dependencies"][name]]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def test_the_version_is_written_once_and_matches_the_installed_metadata() -> None:
    assert "version" not in PROJECT
    assert "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "pop3proto.__version__"
    }
    assert importlib.metadata.version("pop3proto") == pop3proto.__version__


def test_the_mit_license_is_there_and_shipped() -> None:
    text = (REPO / "LICENSE").read_text("utf-8")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the pop3proto authors" in text
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]


def test_the_console_script_resolves_to_the_cli() -> None:
    target = PROJECT["scripts"]["pop3proto"]
    assert target == "pop3proto.__main__:main"
    assert resolve_name(target) is cli.main


def test_the_pytest_plugin_is_declared() -> None:
    assert PROJECT["entry-points"]["pytest11"] == {"pop3proto": "pop3proto.testing"}


def test_this_repository_does_not_autoload_its_own_plugin() -> None:
    """Else the plugin imports the core before coverage starts and the 100 % gate fails."""
    addopts = PYPROJECT["tool"]["pytest"]["ini_options"]["addopts"]
    assert addopts[addopts.index("no:pop3proto") - 1] == "-p"


def test_metadata_a_user_reads_on_the_index() -> None:
    classifiers = PROJECT["classifiers"]
    for version in ("3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    for wanted in ("Topic :: Communications :: Email :: Post-Office :: POP3",
                   "Typing :: Typed", "Framework :: AnyIO", "Framework :: Pytest"):  # fmt: skip
        assert wanted in classifiers
    assert PROJECT["requires-python"] == ">=3.10"
    assert set(PROJECT["urls"]) >= {"Documentation", "Source", "Issues", "Changelog"}
    assert (REPO / "pop3proto" / "py.typed").exists()


def test_extras_hold_only_what_their_name_says() -> None:
    assert PROJECT["dependencies"] == []
    assert set(extra("anyio")) == {"anyio"}
    assert set(extra("hashes")) == {"argon2-cffi", "bcrypt"}
    assert set(extra("postgres")) == {"psycopg", "psycopg-pool"}
    assert extra("postgres")["psycopg"].extras == {"binary"}
    assert set(extra("metrics")) == {"prometheus-client"}
    assert set(extra("docs")) == {"sphinx", "myst-parser"}
    assert set(extra("lint")) == {"ruff", "mypy"}
    assert set(extra("fuzz")) == {"atheris"}
    test = extra("test")
    assert "atheris" not in test
    assert {"pytest", "pytest-cov", "hypothesis", "trustme", "trio"} <= set(test)
    # The test extra covers every runtime extra the tests import.
    for name in ("anyio", "hashes", "postgres", "metrics", "uvloop", "config"):
        assert set(extra(name)) <= set(test), name


@pytest.mark.parametrize(
    ("name", "env", "wanted"),
    [
        ("fuzz", {"sys_platform": "linux", "platform_machine": "x86_64"}, True),
        ("fuzz", {"sys_platform": "linux", "platform_machine": "aarch64"}, False),
        ("fuzz", {"sys_platform": "darwin", "platform_machine": "x86_64"}, False),
        ("uvloop", {"sys_platform": "linux"}, True),
        ("uvloop", {"sys_platform": "darwin"}, True),
        ("uvloop", {"sys_platform": "win32"}, False),
        ("config", {"python_version": "3.10"}, True),
        ("config", {"python_version": "3.11"}, False),
    ],
)
def test_platform_markers(name: str, env: dict[str, str], wanted: bool) -> None:
    (req,) = extra(name).values()
    assert req.marker is not None
    assert req.marker.evaluate(env) is wanted


def test_the_sdist_ships_no_test_tree() -> None:
    """A test tree in the sdist must run or be absent: it is absent (tests need the repo)."""
    rules = (REPO / "MANIFEST.in").read_text("utf-8").split("\n")
    for tree in ("tests", "fuzz", "bench", "examples"):
        assert f"prune {tree}" in rules


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text("utf-8")
    ci = (REPO / ".ci" / "run").read_text("utf-8")
    found = re.search(r"&& (python -m pytest [^\n`]*)", readme)
    assert found, "no test command in the README"
    command = found.group(1).strip()
    assert command.replace("python ", "python3 ", 1) in ci.split("\n")


def test_a_hash_scheme_without_its_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before any password prompt, one line saying what to install; no traceback."""
    monkeypatch.setitem(sys.modules, "argon2", None)  # import argon2 -> ImportError

    def no_prompt(prompt: str = "") -> str:
        raise AssertionError("asked for a password first")

    monkeypatch.setattr("pop3proto.__main__.getpass.getpass", no_prompt)
    assert cli.main(["passwd", "-s", "argon2id", "-u", "bob"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("python -m pop3proto passwd: {ARGON2ID} needs argon2-cffi: "
                   "pip install 'pop3proto[hashes]'\n")  # fmt: skip


def test_a_postgres_command_without_psycopg_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "pop3proto.pgstore", raising=False)
    monkeypatch.delattr(pop3proto, "pgstore", raising=False)
    assert cli.main(["pg-migrate", "dbname=mail"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "pip install 'pop3proto[postgres]'" in err
    assert err.count("\n") == 1
