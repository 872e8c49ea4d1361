"""MemoryStorage beyond the storage contract (tests/test_storage_contract.py): its UIDLs."""

from __future__ import annotations

import pytest

from pop3proto.memstore import MemoryStorage


def test_uid_is_the_key_unless_given() -> None:
    store = MemoryStorage()
    key = store.add("alice", b"x\n")
    custom = store.add("alice", b"y\n", uid="my-uid")
    assert store.lock("alice")
    assert [(m.key, m.uid) for m in store.scan("alice")] == [(key, key), (custom, "my-uid")]


def test_invalid_uid_refused() -> None:
    store = MemoryStorage()
    for uid in ("", "has space", "x" * 71, "é"):
        with pytest.raises(ValueError, match="UIDL"):
            store.add("alice", b"x\n", uid=uid)
    assert store.messages("alice") == []
