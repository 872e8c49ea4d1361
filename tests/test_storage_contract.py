"""The storage contract (``pop3proto.contract``) over the memory, Maildir and PostgreSQL stores.

An in-memory store with coroutine methods runs it too (the contract awaits them).

The PostgreSQL cases run against a throwaway cluster (``pgserver``) and skip
when psycopg or the server binaries are missing.  The last test runs the
example of docs/backends.md as a test module of its own, as a user would.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pgserver
import pytest

from pop3proto import MessageInfo
from pop3proto.contract import StorageContract
from pop3proto.maildir import MaildirStorage
from pop3proto.memstore import MemoryStorage

REPO = Path(__file__).resolve().parent.parent
_names = itertools.count(1)


class TestMemoryStorage(StorageContract):
    @pytest.fixture
    def store(self) -> MemoryStorage:
        return MemoryStorage()

    def deliver(self, store: MemoryStorage, mailbox: str, data: bytes) -> None:
        store.add(mailbox, data)

    def vanish(self, store: MemoryStorage, mailbox: str, key: str) -> None:
        store.remove(mailbox, key)


class TestMaildirStorage(StorageContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> MaildirStorage:
        return MaildirStorage(tmp_path, create=True)

    def deliver(self, store: MaildirStorage, mailbox: str, data: bytes) -> None:
        store.deliver(mailbox, data)

    def vanish(self, store: MaildirStorage, mailbox: str, key: str) -> None:
        os.unlink(store.path(mailbox, key))

    @contextmanager
    def another(self, store: MaildirStorage) -> Iterator[MaildirStorage]:
        yield MaildirStorage(store.root)


class AsyncMemoryStorage:
    """MemoryStorage behind coroutine methods: the contract awaits them."""

    def __init__(self) -> None:
        self.inner = MemoryStorage()

    async def lock(self, mailbox: str) -> bool:
        return self.inner.lock(mailbox)

    async def unlock(self, mailbox: str) -> None:
        self.inner.unlock(mailbox)

    async def scan(self, mailbox: str) -> list[MessageInfo]:
        return self.inner.scan(mailbox)

    async def get(self, mailbox: str, key: str) -> BinaryIO:
        return self.inner.get(mailbox, key)

    async def dele(self, mailbox: str, keys: Sequence[str]) -> None:
        self.inner.dele(mailbox, keys)


class TestAsyncStorage(StorageContract):
    @pytest.fixture
    def store(self) -> AsyncMemoryStorage:
        return AsyncMemoryStorage()

    def deliver(self, store: AsyncMemoryStorage, mailbox: str, data: bytes) -> None:
        store.inner.add(mailbox, data)

    def vanish(self, store: AsyncMemoryStorage, mailbox: str, key: str) -> None:
        store.inner.remove(mailbox, key)


@pytest.fixture(scope="module")
def cluster() -> Iterator[pgserver.PgCluster]:
    yield from pgserver.running_or_skip()


class TestPgStore(StorageContract):
    @pytest.fixture
    def store(self, cluster: pgserver.PgCluster) -> Iterator[Any]:
        from pop3proto.pgstore import PgStore, migrate

        db = cluster.createdb(f"contract{os.getpid()}_{next(_names)}")
        migrate(db)
        with PgStore(db) as store:
            yield store

    def deliver(self, store: Any, mailbox: str, data: bytes) -> None:
        store.deliver(mailbox, data)

    def vanish(self, store: Any, mailbox: str, key: str) -> None:
        with store.pool.connection() as conn:
            conn.execute("DELETE FROM messages WHERE mailbox = %s AND id = %s", (mailbox, int(key)))

    @contextmanager
    def another(self, store: Any) -> Iterator[Any]:
        from pop3proto.pgstore import PgStore

        with PgStore(store.pool) as second:  # shares the pool: a second front end's locks
            yield second


def test_the_example_in_the_docs_passes_the_contract(tmp_path: Path) -> None:
    page = (REPO / "docs" / "backends.md").read_text(encoding="utf-8")
    section = page.split("## Testing your backend against the contract", 1)[1]
    found = re.search(r"^```python\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    assert found is not None, "no python block in the contract section"
    (tmp_path / "test_example_contract.py").write_text(textwrap.dedent(found.group(1)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "no:pop3proto", "test_example_contract.py"], cwd=tmp_path,
                         env=env, capture_output=True, timeout=120, check=False)  # fmt: skip
    out = run.stdout.decode(errors="replace")
    assert run.returncode == 0, out[-4000:] + run.stderr.decode(errors="replace")[-2000:]
    assert re.search(r"\b\d+ passed\b", out), out[-2000:]
    assert "failed" not in out
