"""MemoryStorage: the in-memory Storage keeps the same contract as MaildirStorage."""

from __future__ import annotations

import threading

import pytest

from pop3proto._writers import wire_size
from pop3proto.memstore import MemoryStorage
from pop3proto.storage import MessageGone, Storage, StorageError


def test_is_a_storage() -> None:
    assert isinstance(MemoryStorage(), Storage)


def test_scan_lists_keys_wire_sizes_and_uids_in_order() -> None:
    store = MemoryStorage()
    bodies = [b"a\nb\n", b"crlf\r\n", b"no newline", b".dot\n"]
    keys = [store.add("alice", data) for data in bodies]
    custom = store.add("alice", b"x\n", uid="my-uid")
    store.add("bob", b"not alice's\n")
    assert store.lock("alice")
    infos = store.scan("alice")
    assert [m.key for m in infos] == [*keys, custom]
    assert [m.size for m in infos] == [wire_size(b) for b in bodies] + [3]
    assert [m.uid for m in infos] == [*keys, "my-uid"]
    assert len(set(keys)) == len(keys)


def test_get_returns_the_stored_bytes() -> None:
    store = MemoryStorage()
    key = store.add("alice", b"Subject: x\n\nbody\n")
    assert store.lock("alice")
    with store.get("alice", key) as f:
        assert f.read() == b"Subject: x\n\nbody\n"


def test_invalid_uid_refused() -> None:
    store = MemoryStorage()
    for uid in ("", "has space", "x" * 71, "é"):
        with pytest.raises(ValueError, match="UIDL"):
            store.add("alice", b"x\n", uid=uid)
    assert store.messages("alice") == []


def test_lock_is_exclusive_and_unlock_idempotent() -> None:
    store = MemoryStorage()
    assert store.lock("alice")
    assert not store.lock("alice")
    assert store.lock("bob")
    store.unlock("alice")
    store.unlock("alice")
    assert store.lock("alice")


def test_lock_is_thread_safe() -> None:
    store = MemoryStorage()
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def grab() -> None:
        barrier.wait()
        results.append(store.lock("alice"))

    threads = [threading.Thread(target=grab) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 15 + [True]


def test_methods_need_the_lock() -> None:
    store = MemoryStorage()
    key = store.add("alice", b"x\n")
    with pytest.raises(StorageError, match="not locked"):
        store.scan("alice")
    with pytest.raises(StorageError, match="not locked"):
        store.get("alice", key)
    with pytest.raises(StorageError, match="not locked"):
        store.dele("alice", [key])
    assert store.messages("alice") == [b"x\n"]


def test_empty_mailbox() -> None:
    store = MemoryStorage()
    assert store.lock("nobody")
    assert store.scan("nobody") == []


def test_dele_removes_only_listed_keys() -> None:
    store = MemoryStorage()
    k1, k2, k3 = (store.add("alice", b"m%d\n" % i) for i in range(3))
    assert store.lock("alice")
    store.scan("alice")
    store.add("alice", b"late\n")  # delivered during the session
    store.dele("alice", [k1, k3])
    assert store.messages("alice") == [b"m1\n", b"late\n"]
    with pytest.raises(MessageGone):
        store.get("alice", k1)
    with store.get("alice", k2) as f:
        assert f.read() == b"m1\n"


def test_dele_unknown_key_deletes_nothing() -> None:
    store = MemoryStorage()
    key = store.add("alice", b"x\n")
    assert store.lock("alice")
    with pytest.raises(StorageError, match="unknown"):
        store.dele("alice", [key, "nope"])
    assert store.messages("alice") == [b"x\n"]


def test_removed_message_is_gone_and_dele_skips_it() -> None:
    store = MemoryStorage()
    k1, k2 = store.add("alice", b"one\n"), store.add("alice", b"two\n")
    assert store.lock("alice")
    assert len(store.scan("alice")) == 2
    store.remove("alice", k1)
    with pytest.raises(MessageGone):
        store.get("alice", k1)
    store.dele("alice", [k1, k2])
    assert store.messages("alice") == []


def test_keys_of_another_mailbox_are_not_found() -> None:
    store = MemoryStorage()
    bob_key = store.add("bob", b"bob's\n")
    assert store.lock("alice")
    with pytest.raises(MessageGone):
        store.get("alice", bob_key)
    store.dele("alice", [bob_key])
    assert store.messages("bob") == [b"bob's\n"]
