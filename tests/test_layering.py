"""The sans-I/O promise, enforced: the core imports no I/O, clock, randomness or logging.

Every ``pop3proto/_*.py`` module and ``pop3proto/auth.py`` is parsed with
``ast`` (nothing is imported or run); any import of a forbidden module, at
any depth (``import os.path``, ``from asyncio import x``, an import inside a
function), fails the test.  Relative imports must stay inside the core too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pop3proto"
CORE = sorted([*PACKAGE.glob("_*.py"), PACKAGE / "auth.py", PACKAGE / "sasl.py"])
CORE = [path for path in CORE if path.name != "__init__.py" and path.name != "__main__.py"]
FORBIDDEN = frozenset(
    {
        "socket",
        "selectors",
        "select",
        "ssl",
        "threading",
        "asyncio",
        "anyio",
        "trio",
        "time",
        "os",
        "random",
        "logging",
        "subprocess",
        # Ways around the list above: dynamic imports, processes, clocks, randomness.
        "importlib",
        "multiprocessing",
        "concurrent",
        "datetime",
        "secrets",
    }
)
CORE_NAMES = frozenset(path.stem for path in CORE)


def imports(path: Path) -> list[tuple[str, int, int]]:
    """(module, level, line) for every import statement in *path*."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level and not module:  # from . import x, y
                found += [(alias.name, node.level, node.lineno) for alias in node.names]
            else:
                found.append((module, node.level, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.append(("__import__", 0, node.lineno))
    return found


def test_the_core_is_found() -> None:
    names = {path.name for path in CORE}
    assert {"_connection.py", "_state.py", "_receivebuffer.py", "auth.py"} <= names
    assert "__init__.py" not in names


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_module_does_no_io(path: Path) -> None:
    bad = []
    for module, level, line in imports(path):
        top = module.split(".")[0]
        if level == 0 and (top in FORBIDDEN or top == "__import__"):
            bad.append(f"{path.name}:{line} imports {module}")
        if level == 1 and top not in CORE_NAMES:
            bad.append(f"{path.name}:{line} imports .{module}, which is not a core module")
        if level > 1:
            bad.append(f"{path.name}:{line} imports from outside the package")
        if level == 0 and top == "pop3proto":
            bad.append(f"{path.name}:{line} imports {module} absolutely")
    assert not bad


def test_the_checker_catches_violations(tmp_path: Path) -> None:
    sample = tmp_path / "_sample.py"
    sample.write_text(
        "import os.path\n"
        "from asyncio import sleep\n"
        "from . import server\n"
        "from .transports import anyio\n"
        "def f():\n"
        "    import time\n"
        "    return __import__('socket')\n"
    )
    found = {(module, level) for module, level, _ in imports(sample)}
    assert found == {
        ("os.path", 0),
        ("asyncio", 0),
        ("server", 1),
        ("transports", 1),
        ("time", 0),
        ("__import__", 0),
    }


# The session driver and the policy it runs are held to the same rule: no I/O, no
# clock, no randomness, no logging of their own.  Besides the core they may use
# the storage contracts (exceptions, the inline-call rule) and each other.
DRIVER = [PACKAGE / "driver.py", PACKAGE / "policy.py", PACKAGE / "limits.py"]
DRIVER_NAMES = CORE_NAMES | {"driver", "policy", "limits", "storage"}


@pytest.mark.parametrize("path", DRIVER, ids=lambda p: p.name)
def test_driver_module_does_no_io(path: Path) -> None:
    bad = []
    for module, level, line in imports(path):
        top = module.split(".")[0]
        if level == 0 and (top in FORBIDDEN or top == "__import__"):
            bad.append(f"{path.name}:{line} imports {module}")
        if level == 1 and top not in DRIVER_NAMES:
            bad.append(f"{path.name}:{line} imports .{module}, outside the driver's world")
        if level > 1 or (level == 0 and top == "pop3proto"):
            bad.append(f"{path.name}:{line} imports {module} from outside")
    assert not bad
