"""PgStore and PgAuthenticator against a throwaway PostgreSQL cluster (skipped without one).

One cluster per module (``pgserver.PgCluster``); every test gets a fresh,
migrated database.  The storage contract that every store keeps runs in
tests/test_storage_contract.py; covered here: the schema migration, streaming
in slices, the advisory lock across pools and across a SIGKILL, the
all-or-nothing deletion under a failure, whole POP3 sessions through
``Server`` and ``poplib``, the Maildir importer and the command-line tools.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import poplib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")
pytest.importorskip("psycopg_pool")

import pgserver  # noqa: E402

if pgserver.find_bindir() is None:
    pytest.skip("PostgreSQL server binaries are not installed", allow_module_level=True)

from pop3proto.__main__ import main  # noqa: E402
from pop3proto._maildrop import valid_uid  # noqa: E402
from pop3proto._writers import wire_size  # noqa: E402
from pop3proto.maildir import MaildirStorage  # noqa: E402
from pop3proto.passwd import HashVerifier, ScramVerifier, hash_password  # noqa: E402
from pop3proto.pgstore import (  # noqa: E402
    SCHEMA_VERSION,
    PgAuthenticator,
    PgStore,
    add_user,
    import_maildir,
    lock_key,
    migrate,
)
from pop3proto.server import Server  # noqa: E402
from pop3proto.storage import Authenticator, MessageGone, StorageError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
_names = itertools.count(1)


@pytest.fixture(scope="module")
def cluster() -> Iterator[pgserver.PgCluster]:
    yield from pgserver.running_or_skip()


@pytest.fixture
def empty_db(cluster: pgserver.PgCluster) -> str:
    """A new database without the schema."""
    return cluster.createdb(f"t{os.getpid()}_{next(_names)}")


@pytest.fixture
def db(empty_db: str) -> str:
    """A new migrated database."""
    migrate(empty_db)
    return empty_db


@pytest.fixture
def store(db: str) -> Iterator[PgStore]:
    with PgStore(db) as s:
        yield s


def sql(db: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(db, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def count(db: str, mailbox: str = "alice") -> int:
    return int(sql(db, "SELECT count(*) FROM messages WHERE mailbox = %s", (mailbox,))[0][0])


def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "pop3proto", *args], input=stdin, cwd=REPO,
                          env=env, capture_output=True, timeout=120, check=False)  # fmt: skip


def crlf(data: bytes) -> bytes:
    """What RETR puts on the wire before dot-stuffing, for messages without bare CR."""
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


def wait_for(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# -- schema ------------------------------------------------------------------------------


def test_migrate_creates_the_schema_and_is_idempotent(empty_db: str) -> None:
    assert migrate(empty_db) == (0, SCHEMA_VERSION)
    assert migrate(empty_db) == (SCHEMA_VERSION, SCHEMA_VERSION)
    with psycopg.connect(empty_db) as conn:  # a caller's connection, left open and usable
        assert migrate(conn) == (SCHEMA_VERSION, SCHEMA_VERSION)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert sql(empty_db, "SELECT version FROM pop3proto_schema") == [(SCHEMA_VERSION,)]
    columns = sql(empty_db, "SELECT column_name, data_type FROM information_schema.columns "
                            "WHERE table_name = 'messages' ORDER BY ordinal_position")  # fmt: skip
    assert columns == [("id", "bigint"), ("mailbox", "text"), ("uid", "text"), ("size", "bigint"),
                       ("data", "bytea"), ("delivered_at", "timestamp with time zone")]  # fmt: skip
    indexes = [r[0] for r in sql(empty_db, "SELECT indexdef FROM pg_indexes "
                                           "WHERE tablename = 'messages'")]  # fmt: skip
    assert any("(mailbox, id)" in d for d in indexes)
    assert any("UNIQUE" in d and "(mailbox, uid)" in d for d in indexes)
    storage = sql(empty_db, "SELECT attstorage FROM pg_attribute WHERE "
                            "attrelid = 'messages'::regclass AND attname = 'data'")  # fmt: skip
    assert storage == [("e",)]  # EXTERNAL: slices without decompression


def test_concurrent_migrations_apply_once(empty_db: str) -> None:
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(empty_db))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [(0, 1)] + [(1, 1)] * 5
    assert sql(empty_db, "SELECT count(*) FROM pop3proto_schema") == [(1,)]


def test_migrate_refuses_a_newer_schema(db: str) -> None:
    sql(db, "INSERT INTO pop3proto_schema (version) VALUES (99)")
    with pytest.raises(StorageError, match="version 99"):
        migrate(db)


def test_migrate_refuses_foreign_tables(empty_db: str) -> None:
    sql(empty_db, "CREATE TABLE users (id int)")
    with pytest.raises(StorageError, match="migration failed"):
        migrate(empty_db)
    # Transactional DDL: nothing of the failed version is left.
    assert sql(empty_db, "SELECT to_regclass('messages'), to_regclass('pop3proto_schema')") \
        == [(None, None)]  # fmt: skip


# -- deliver, scan, get ------------------------------------------------------------------


def test_authenticator_protocol(store: PgStore) -> None:
    with PgAuthenticator(store.pool) as auth:
        assert isinstance(auth, Authenticator)


def test_large_message_is_streamed_in_slices(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    slices: list[tuple[Any, ...]] = []
    real = psycopg.Cursor.execute

    def spy(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
        if "substring" in str(query):
            slices.append(tuple(params))
        return real(self, query, params, **kw)

    small = os.urandom(1_000_003)
    big = small * 4
    with PgStore(db, fetch_size=65536) as store:
        store.deliver("alice", small)
        store.deliver("alice", big)
        assert store.lock("alice")
        k_small, k_big = (m.key for m in store.scan("alice"))
        monkeypatch.setattr(psycopg.Cursor, "execute", spy)
        trips = []
        for key, data in ((k_small, small), (k_big, big)):
            slices.clear()
            parts = []
            with store.get("alice", key) as f:
                while chunk := f.read(65536):
                    assert len(chunk) <= 65536
                    parts.append(chunk)
            assert b"".join(parts) == data
            assert all(p[1] <= 65536 for p in slices)  # no query fetches more
            assert len(slices) == -(-len(data) // 65536)
            trips.append(len(slices))
        assert trips[1] >= 4 * trips[0] - 3
        store.unlock("alice")


def test_get_only_listed_and_present_messages(store: PgStore, db: str) -> None:
    store.deliver("alice", b"one\n")
    store.deliver("bob", b"bob's\n")
    assert store.lock("alice")
    (info,) = store.scan("alice")
    bob_id = sql(db, "SELECT id FROM messages WHERE mailbox = 'bob'")[0][0]
    for key in (str(bob_id), "0", "x", "-1", "99999999999999999999999", f"{info.key} "):
        with pytest.raises(MessageGone):
            store.get("alice", key)
    store.unlock("alice")


def test_message_deleted_while_being_read(db: str) -> None:
    with PgStore(db, fetch_size=4096) as store:
        store.deliver("alice", b"z" * 20000)
        assert store.lock("alice")
        (info,) = store.scan("alice")
        f = store.get("alice", info.key)
        assert len(f.read(4096)) == 4096
        sql(db, "DELETE FROM messages")
        with pytest.raises(MessageGone):
            f.read(4096)
        f.close()
        store.unlock("alice")


def test_stream_stops_after_unlock(db: str) -> None:
    with PgStore(db, fetch_size=1024) as store:
        store.deliver("alice", b"q" * 5000)
        assert store.lock("alice")
        (info,) = store.scan("alice")
        f = store.get("alice", info.key)
        f.read(1024)
        store.unlock("alice")
        with pytest.raises(StorageError, match="unlocked"):
            f.read(1024)
        f.close()


def test_deliver_refuses_bad_mailbox_names(store: PgStore) -> None:
    for name in ("", "a\nb", "a\x00b", "x" * 256):
        with pytest.raises(StorageError):
            store.deliver(name, b"x\n")


def test_deliver_without_schema_is_a_storage_error(empty_db: str) -> None:
    with PgStore(empty_db) as store, pytest.raises(StorageError, match="messages"):
        store.deliver("alice", b"x\n")


# -- locking -------------------------------------------------------------------------------


def test_lock_is_exclusive_across_pools(db: str) -> None:
    with PgStore(db) as a, PgStore(db) as b:  # two front ends, each with its own pool
        assert a.lock("alice")
        assert not b.lock("alice")
        a.unlock("alice")
        assert b.lock("alice")
        assert not a.lock("alice")
    # The held connections go back to the pool, so more sessions than
    # connections in sequence are fine.
    with PgStore(db, max_size=1) as c:
        for _ in range(5):
            assert c.lock("alice")
            c.unlock("alice")


def test_lock_keys_are_distinct_64_bit() -> None:
    keys = {lock_key(f"user{i}") for i in range(10000)}
    assert len(keys) == 10000
    assert all(-(2**63) <= k < 2**63 for k in keys)
    assert lock_key("alice") == lock_key("alice")


def test_concurrent_lock_race_has_one_winner(db: str) -> None:
    stores = [PgStore(db) for _ in range(4)]
    barrier = threading.Barrier(16)
    wins: list[bool] = []

    def attempt(s: PgStore) -> None:
        barrier.wait()
        wins.append(s.lock("alice"))

    threads = [threading.Thread(target=attempt, args=(stores[i % 4],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    for s in stores:
        s.close()


def test_pool_exhausted_is_a_storage_error(db: str) -> None:
    with PgStore(db, max_size=1, timeout=0.3) as store:
        assert store.lock("alice")
        with pytest.raises(StorageError, match="no database connection"):
            store.lock("bob")
        store.unlock("alice")
        assert store.lock("bob")


def test_dropped_connection_frees_the_lock_and_fails_the_session(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    with PgStore(db) as a, PgStore(db) as b:
        a.deliver("alice", b"x\n")
        assert a.lock("alice")
        a.scan("alice")
        pid = sql(db, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted")[0][0]
        sql(db, "SELECT pg_terminate_backend(%s)", (pid,))
        assert wait_for(lambda: b.lock("alice"))
        with pytest.raises(StorageError):  # never runs without the lock
            a.scan("alice")
        caplog.set_level(logging.CRITICAL, logger="psycopg.pool")
        a.unlock("alice")  # does not raise; the dead connection is discarded
        assert not a.lock("alice")
        b.unlock("alice")
        assert a.lock("alice")


def test_idle_pooled_connections_dropped_by_the_server(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="psycopg.pool")
    add_user(db, "alice", "{PLAIN}x")
    with PgStore(db, min_size=2) as store, PgAuthenticator(db, min_size=2) as auth:
        assert store.lock("alice")
        store.unlock("alice")
        assert auth.lookup("alice") is not None
        assert wait_for(lambda: store.pool.get_stats().get("pool_available", 0) >= 2)
        assert wait_for(lambda: auth.pool.get_stats().get("pool_available", 0) >= 2)
        dbname = db.rsplit("=", 1)[1]
        sql(db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))  # fmt: skip
        assert store.lock("alice")  # no failed login: dead connections are replaced
        store.unlock("alice")
        assert auth.lookup("alice") is not None


SERVER_SCRIPT = textwrap.dedent("""
    import sys, time
    from pop3proto.pgstore import PgAuthenticator, PgStore
    from pop3proto.server import Server

    db = sys.argv[1]
    server = Server(transport="blocking", host="127.0.0.1", port=0, auth=PgAuthenticator(db),
                    storage=PgStore(db), auth_failure_delay=0)
    server.up()
    print(server.cget("port"), flush=True)
    time.sleep(3600)
""")


def test_sigkilled_front_end_leaves_the_lock_free_and_nothing_deleted(
    db: str, tmp_path: Path
) -> None:
    add_user(db, "alice", "{PLAIN}secret")
    with PgStore(db) as store:
        for i in range(3):
            store.deliver("alice", f"Subject: {i}\r\n\r\nbody\r\n".encode())
    script = tmp_path / "front_end.py"
    script.write_text(SERVER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), db], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("alice")
        client.pass_("secret")
        client.dele(1)
        client.dele(2)
        with PgStore(db) as other:
            assert not other.lock("alice")  # held by the live front end
        os.kill(proc.pid, signal.SIGKILL)  # mid-session, before QUIT
        proc.wait(10)
        client.close()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    with PgStore(db) as other:
        assert wait_for(lambda: other.lock("alice"))
        assert len(other.scan("alice")) == 3
        other.unlock("alice")
    assert count(db) == 3


# -- deletion ------------------------------------------------------------------------------


def test_dele_deletes_those_rows_and_forgets_their_keys(store: PgStore, db: str) -> None:
    for i in range(5):
        store.deliver("alice", f"{i}\n".encode())
    assert store.lock("alice")
    keys = [m.key for m in store.scan("alice")]
    store.dele("alice", [keys[1], keys[3]])
    assert [r[0] for r in sql(db, "SELECT id FROM messages WHERE mailbox = 'alice' ORDER BY id")] \
        == [int(keys[i]) for i in (0, 2, 4)]  # fmt: skip
    with pytest.raises(StorageError, match="not listed"):  # gone from this session's list
        store.dele("alice", [keys[1]])
    store.unlock("alice")


def test_dele_failure_mid_transaction_deletes_nothing(
    store: PgStore, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(4):
        store.deliver("alice", f"{i}\n".encode())
    assert store.lock("alice")
    keys = [m.key for m in store.scan("alice")]
    real = psycopg.Cursor.execute
    ran: list[int] = []

    def fail_after_delete(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
        result = real(self, query, params, **kw)
        if str(query).startswith("DELETE"):
            ran.append(self.rowcount)  # the rows are gone inside the transaction...
            raise psycopg.OperationalError("injected failure before COMMIT")
        return result

    monkeypatch.setattr(psycopg.Cursor, "execute", fail_after_delete)
    with pytest.raises(StorageError, match="injected failure"):
        store.dele("alice", keys)
    monkeypatch.undo()
    assert ran == [4]
    assert count(db) == 4  # ...and back after the rollback
    store.dele("alice", keys)  # the connection is still usable, the keys still listed
    assert count(db) == 0
    store.unlock("alice")


# -- authentication ------------------------------------------------------------------------


def test_authenticator_reads_passwd_file_fields(db: str, caplog: pytest.LogCaptureFixture) -> None:
    add_user(db, "plain", "{PLAIN}pw1")
    add_user(db, "sha", hash_password("pw2", "SHA512-CRYPT"))
    add_user(db, "scram", hash_password("pw3", "SCRAM-SHA-256"))
    add_user(db, "sha256", hash_password("pw4", "SHA256-CRYPT").removeprefix("{SHA256-CRYPT}"))
    sql(db, "INSERT INTO users VALUES ('broken', '{SHA512-CRYPT}nonsense'), ('bare', 'pw'), "
            "('../evil', '{PLAIN}x')")  # fmt: skip
    with PgAuthenticator(db) as auth:
        for name, pw in (("plain", "pw1"), ("sha", "pw2"), ("scram", "pw3"), ("sha256", "pw4")):
            found = auth.lookup(name)
            assert found is not None, name
            verifier, mailbox = found
            assert mailbox == name
            assert verifier.verify(pw), name
            assert not verifier.verify(pw + "x"), name
            assert auth.exists(name)
        assert isinstance(auth.lookup("sha256")[0], HashVerifier)  # type: ignore[index]
        assert isinstance(auth.lookup("scram")[0], ScramVerifier)  # type: ignore[index]
        assert auth.lookup("plain")[0].cleartext() == "pw1"  # type: ignore[index]
        with caplog.at_level(logging.WARNING, logger="pop3proto.pgstore"):
            assert auth.lookup("broken") is None
            assert auth.lookup("bare") is None  # no {SCHEME}: not a cleartext password
        assert "malformed" in caplog.text
        assert auth.lookup("../evil") is None
        assert auth.lookup("nobody") is None
        assert not auth.exists("nobody")
        assert auth.has_cleartext
        assert auth.has_scram


def test_authenticator_flags_and_dummy(db: str) -> None:
    with PgAuthenticator(db, cache_ttl=0) as auth:
        assert not auth.has_cleartext
        assert not auth.has_scram
        dummy = auth.dummy_verifier()
        assert isinstance(dummy, HashVerifier)
        assert dummy.scheme == "SHA512-CRYPT"
        add_user(db, "s1", hash_password("x", "SCRAM-SHA-256", rounds=5000))
        assert not auth.has_cleartext
        assert auth.has_scram
        for i in range(3):
            add_user(db, f"u{i}", hash_password("x", "SHA256-CRYPT", rounds=20000))
        dummy = auth.dummy_verifier()
        assert isinstance(dummy, HashVerifier)
        assert dummy.scheme == "SHA256-CRYPT"
        assert "rounds=20000$" in dummy.hashed
        assert not dummy.verify("x")
        assert not dummy.verify("")
        add_user(db, "p", "{plain}y")
        assert auth.has_cleartext
    with PgAuthenticator(db, cache_ttl=3600) as cached:
        assert cached.has_cleartext
        sql(db, "DELETE FROM users")
        assert cached.has_cleartext  # until the cache expires


def test_authenticator_database_down(cluster: pgserver.PgCluster) -> None:
    bad = f"host=127.0.0.1 port={cluster.port} user=postgres dbname=no_such_db"
    with PgAuthenticator(bad, timeout=0.5, min_size=0) as auth:
        with pytest.raises(StorageError, match="unavailable"):
            auth.lookup("alice")
        assert not auth.has_cleartext
        assert auth.dummy_verifier() is not None


def test_add_user(db: str) -> None:
    assert add_user(db, "alice", "{PLAIN}one")
    assert not add_user(db, "alice", "{PLAIN}two")
    assert sql(db, "SELECT password FROM users") == [("{PLAIN}one",)]
    assert add_user(db, "alice", "{PLAIN}two", replace=True)
    assert sql(db, "SELECT password FROM users") == [("{PLAIN}two",)]
    with pytest.raises(ValueError, match="unsafe"):
        add_user(db, "a/b", "{PLAIN}x")
    with pytest.raises(ValueError, match="unknown scheme"):
        add_user(db, "bob", "{MD9}x")


# -- whole POP3 sessions -------------------------------------------------------------------


def pop_server(db: str, store: PgStore | None = None) -> tuple[Server, PgStore, PgAuthenticator]:
    store = store or PgStore(db)
    auth = PgAuthenticator(db)
    server = Server(transport="blocking", host="127.0.0.1", port=0, auth=auth, storage=store,
                    auth_failure_delay=0)  # fmt: skip
    server.up()
    return server, store, auth


def login(server: Server, user: str = "alice", password: str = "secret") -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", server.cget("port"), timeout=10)
    client.user(user)
    try:
        client.pass_(password)
    except poplib.error_proto:
        client.close()
        raise
    return client


def refusal(fn: Callable[[], object]) -> bytes:
    """The -ERR line *fn* failed with (poplib's exceptions hold bytes: no str() under -bb)."""
    try:
        fn()
    except poplib.error_proto as e:
        return bytes(e.args[0])
    raise AssertionError("no -ERR")


def test_pop3_session_end_to_end(db: str) -> None:
    add_user(db, "alice", hash_password("secret", "SHA512-CRYPT"))
    messages = [
        b"Subject: one\r\n\r\n.dot line\r\nbody\r\n",
        b"Subject: two\n\nLF only\n..two dots\n",
        b"Subject: three\r\n\r\n"
        + b"".join(os.urandom(38).hex().encode() + b"\r\n" for _ in range(5000)),
    ]
    server, store, auth = pop_server(db)
    try:
        uids = [store.deliver("alice", m) for m in messages]
        client = login(server)
        assert client.stat() == (3, sum(wire_size(m) for m in messages))
        _, listing, _ = client.list()
        assert listing == [f"{i} {wire_size(m)}".encode() for i, m in enumerate(messages, 1)]
        _, uidl, _ = client.uidl()
        assert uidl == [f"{i} {u}".encode() for i, u in enumerate(uids, 1)]
        for i, m in enumerate(messages, 1):
            _, lines, _ = client.retr(i)
            assert b"\r\n".join(lines) + b"\r\n" == crlf(m)
        client.dele(2)
        assert client.quit().startswith(b"+OK")
        remaining = sql(db, "SELECT uid FROM messages WHERE mailbox = 'alice' ORDER BY id")
        assert [r[0] for r in remaining] == [uids[0], uids[2]]
        client = login(server)  # the lock was released at QUIT
        assert client.stat()[0] == 2
        client.quit()
        assert refusal(lambda: login(server, password="wrong")).startswith(b"-ERR [AUTH]")
        assert refusal(lambda: login(server, user="nobody")).startswith(b"-ERR [AUTH]")
    finally:
        server.destroy()
        store.close()
        auth.close()


def test_two_front_ends_answer_in_use_to_each_other(db: str) -> None:
    add_user(db, "alice", "{PLAIN}secret")
    s1, store1, auth1 = pop_server(db)
    s2, store2, auth2 = pop_server(db)
    try:
        store1.deliver("alice", b"Subject: x\r\n\r\nx\r\n")
        a = login(s1)
        assert refusal(lambda: login(s2)).startswith(b"-ERR [IN-USE]")
        assert refusal(lambda: login(s1)).startswith(b"-ERR [IN-USE]")
        a.dele(1)
        a.quit()
        b = login(s2)
        assert b.stat() == (0, 0)
        assert refusal(lambda: login(s1)).startswith(b"-ERR [IN-USE]")
        b.quit()
        login(s1).quit()
    finally:
        for s in (s1, s2):
            s.destroy()
        for x in (store1, store2, auth1, auth2):
            x.close()


def test_session_killed_by_server_destroy_releases_the_lock(db: str) -> None:
    add_user(db, "alice", "{PLAIN}secret")
    server, store, auth = pop_server(db)
    try:
        store.deliver("alice", b"x\r\n")
        client = login(server)
        client.dele(1)
        server.destroy("kill")
        client.close()
        with PgStore(db) as other:
            assert wait_for(lambda: other.lock("alice"))
            assert len(other.scan("alice")) == 1
            other.unlock("alice")
    finally:
        server.destroy()
        store.close()
        auth.close()


# -- importer and commands -----------------------------------------------------------------


def make_maildirs(root: Path) -> dict[str, list[bytes]]:
    maildir = MaildirStorage(root, create=True)
    mail = {
        "alice": [b"Subject: a1\n\nfirst\n", b"Subject: a2\r\n\r\n.second\r\n", b"no newline"],
        "bob": [b"Subject: b1\n\n" + b"x" * 100_000 + b"\n"],
    }
    for user, messages in mail.items():
        for m in messages:
            maildir.deliver(user, m)
    # A message Dovecot knows: its UIDL comes from dovecot-uidlist.
    (root / "bob" / "cur" / "1700000000.M1P1.host:2,S").write_bytes(b"Subject: old\n\nold\n")
    (root / "bob" / "dovecot-uidlist").write_text("3 V1234 N9\n7 :1700000000.M1P1.host\n")
    mail["bob"].insert(0, b"Subject: old\n\nold\n")
    (root / "not a maildir").mkdir()
    return mail


def maildir_listing(root: Path, user: str) -> list[tuple[str, int, bytes]]:
    maildir = MaildirStorage(root)
    assert maildir.lock(user)
    out = []
    for m in maildir.scan(user):
        with maildir.get(user, m.key) as f:
            out.append((m.uid, m.size, f.read()))
    maildir.unlock(user)
    return out


def pg_listing(db: str, user: str) -> list[tuple[str, int, bytes]]:
    with PgStore(db) as store:
        assert store.lock(user)
        out = []
        for m in store.scan(user):
            with store.get(user, m.key) as f:
                out.append((m.uid, m.size, f.read()))
        store.unlock(user)
    return out


def test_import_maildir_keeps_uidls_order_and_bytes(db: str, tmp_path: Path) -> None:
    mail = make_maildirs(tmp_path)
    expected = {user: maildir_listing(tmp_path, user) for user in mail}
    assert expected["bob"][0][0] == f"{7:08X}{1234:08X}"  # Dovecot's UIDL
    results = import_maildir(db, tmp_path)
    assert [(r.user, r.imported, r.present) for r in results] == [("alice", 3, 0), ("bob", 2, 0)]
    for user in mail:
        assert pg_listing(db, user) == expected[user]
        assert [x[2] for x in expected[user]] == mail[user]
    again = import_maildir(db, tmp_path)  # idempotent
    assert [(r.imported, r.present) for r in again] == [(0, 3), (0, 2)]
    assert count(db, "alice") == 3
    assert count(db, "bob") == 2


def test_import_keeps_a_message_whose_uidl_is_taken(db: str, tmp_path: Path) -> None:
    MaildirStorage(tmp_path, create=True).deliver("alice", b"maildir copy\n")
    ((uid, _, _),) = maildir_listing(tmp_path, "alice")
    sql(db, "INSERT INTO messages (mailbox, uid, size, data) VALUES ('alice', %s, 3, 'x\n')",
        (uid,))  # fmt: skip
    (result,) = import_maildir(db, tmp_path, ["alice"])
    assert (result.imported, result.renamed) == (0, 1)
    assert count(db) == 2
    (result,) = import_maildir(db, tmp_path, ["alice"])
    assert (result.imported, result.present, result.renamed) == (0, 1, 0)


def test_import_refuses_a_locked_maildrop(db: str, tmp_path: Path) -> None:
    maildir = MaildirStorage(tmp_path, create=True)
    maildir.deliver("alice", b"x\n")
    assert maildir.lock("alice")
    with pytest.raises(StorageError, match="locked"):
        import_maildir(db, tmp_path)
    maildir.unlock("alice")


def test_pg_import_command(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_maildirs(tmp_path / "mail")
    passwd = tmp_path / "users"
    passwd.write_text(f"alice:{hash_password('a', 'SHA256-CRYPT')}::::::\n"
                      "bob:{PLAIN}b\nbad:{NOPE}x\n# comment\n")  # fmt: skip
    root = str(tmp_path / "mail")
    assert main(["pg-import", "--db", db, "--passwd-file", str(passwd), root]) == 0
    out, err = capsys.readouterr()
    assert "users: 2 added, 0 already present" in out
    assert "alice: 3 imported" in out
    assert "bob: 2 imported" in out
    assert "unknown scheme {NOPE}" in err
    with PgAuthenticator(db) as auth:
        assert auth.lookup("alice")[0].verify("a")  # type: ignore[index]
        assert auth.lookup("bob")[0].verify("b")  # type: ignore[index]
    assert main(["pg-import", "--db", db, "-u", "bob", str(tmp_path / "mail")]) == 0
    assert capsys.readouterr().out == "bob: 0 imported, 2 already present\n"
    assert main(["pg-import", "--db", db, str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_pg_migrate_and_adduser_commands(empty_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pg-migrate", empty_db]) == 0
    assert capsys.readouterr().out == f"schema at version {SCHEMA_VERSION} (was 0)\n"
    assert main(["pg-migrate", empty_db]) == 0
    assert capsys.readouterr().out == f"schema at version {SCHEMA_VERSION}\n"
    assert main(["pg-adduser", "--db", empty_db, "alice", "-s", "scram-sha-256", "-p", "pw"]) == 0
    assert main(["pg-adduser", "--db", empty_db, "alice", "-p", "other"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["pg-adduser", "--db", empty_db, "alice", "-p", "new", "--update"]) == 0
    assert main(["pg-adduser", "--db", empty_db, "a/b", "-p", "x"]) == 2
    assert main(["pg-adduser", "--db", empty_db, "bob", "-s", "md9", "-p", "x"]) == 2
    with PgAuthenticator(empty_db) as auth:
        verifier = auth.lookup("alice")[0]  # type: ignore[index]
        assert isinstance(verifier, HashVerifier)
        assert verifier.verify("new")
    assert main(["pg-migrate", "host=127.0.0.1 port=1 connect_timeout=2"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 3  # one line per failure


def test_deliver_command(db: str, cluster: pgserver.PgCluster) -> None:
    add_user(db, "alice", "{PLAIN}x")
    message = b"Subject: via stdin\n\n.dot\r\nbody\x00\xff\n"
    result = run_cli("deliver", "--db", db, "alice", stdin=message)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert result.stderr == b""
    rows = sql(db, "SELECT mailbox, size, data, uid FROM messages")
    assert [(r[0], r[1], bytes(r[2])) for r in rows] == [("alice", wire_size(message), message)]
    assert valid_uid(rows[0][3])
    for args in (["nobody"], ["a\nb"]):  # unknown user, bad name
        result = run_cli("deliver", "--db", db, *args, stdin=b"x\n")
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1, result.stderr
    result = run_cli("deliver", "--db", db, "--any-user", "nobody", stdin=b"x\n")
    assert result.returncode == 0, result.stderr
    assert count(db, "nobody") == 1
    bad = f"host=127.0.0.1 port={cluster.port} user=postgres dbname=missing"
    result = run_cli("deliver", "--db", bad, "alice", stdin=b"x\n")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert b"missing" in result.stderr
    assert count(db) == 1


def test_import_never_follows_a_link(
    db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "mail"
    store = MaildirStorage(root, create=True)
    for user in ("alice", "bob", "carol", "mallory"):
        store.deliver(user, f"{user}'s own\n".encode())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "1700000000.M1P1.secret:2,").write_bytes(b"secret\n")
    for user, sub in (("bob", "cur"), ("carol", "new")):
        os.rename(root / user / sub, root / user / f"{sub}.real")
        os.symlink(outside, root / user / sub)
    os.symlink("alice", root / "linked")  # a second name for alice's maildrop
    (root / "dave").mkdir()
    os.symlink(outside, root / "dave" / "cur")  # only a linked cur/: not a maildrop
    with caplog.at_level(logging.WARNING):
        results = import_maildir(db, root)
    assert [(r.user, r.imported) for r in results] == [("alice", 1), ("mallory", 1)]
    assert sql(db, "SELECT count(*) FROM messages WHERE data = 'secret\n'::bytea")[0][0] == 0
    text = caplog.text
    assert "'bob': cur/ is a link" in text
    assert "'carol': new/ is a link" in text
    assert "'linked': it is a symlink" in text
    assert (outside / "1700000000.M1P1.secret:2,").read_bytes() == b"secret\n"
    assert import_maildir(db, root, ["bob"]) == []  # named explicitly: skipped the same way
    assert sorted(os.listdir(outside)) == ["1700000000.M1P1.secret:2,"]


def test_deliver_streams_with_a_cap(db: str, tmp_path: Path) -> None:
    import io

    from pop3proto.maildir import MessageTooBig
    from pop3proto.pgstore import deliver

    data = b"Subject: streamed\r\n\r\n.dot\nbare\rcr\x00\xff\\x\t\n" + os.urandom(3_000_000)
    for name in ("alice", "we\\ird\u00e9 name"):  # COPY's text escapes
        uid = deliver(db, name, io.BytesIO(data), max_size=len(data))
        rows = sql(db, "SELECT size, data FROM messages WHERE mailbox = %s AND uid = %s",
                   (name, uid))  # fmt: skip
        assert [(r[0], bytes(r[1])) for r in rows] == [(wire_size(data), data)]
    with pytest.raises(MessageTooBig):
        deliver(db, "alice", io.BytesIO(data), max_size=len(data) - 1)
    assert count(db) == 1

    add_user(db, "bob", "{PLAIN}x")
    big = tmp_path / "big"
    line = b"0123456789" * 9 + b"abcdefghi\n"
    with open(big, "wb") as f:
        for _ in range(400):
            f.write(line * 1024)  # 40 MiB
    size = big.stat().st_size
    code = ("import sys\nfrom pop3proto.__main__ import main\nc = main(sys.argv[1:])\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0],"
            " file=sys.stderr)\nsys.exit(c)")  # fmt: skip
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    hwms = []
    small = tmp_path / "small"
    small.write_bytes(line)
    for source, cap, status in ((small, size, 0), (big, size - 1, 2), (big, size, 0)):
        with open(source, "rb") as f:
            run = subprocess.run([sys.executable, "-c", code, "deliver", "--db", db,
                                  "--max-size", str(cap), "bob"], stdin=f, capture_output=True,
                                 env=env, timeout=120, check=False)  # fmt: skip
        assert run.returncode == status, run.stderr
        *err, hwm = run.stderr.decode().strip().splitlines()
        hwms.append(int(hwm.split()[1]))
    assert err == []
    rows = sql(db, "SELECT size, length(data), md5(data) FROM messages WHERE mailbox = 'bob' "
               "ORDER BY id")  # fmt: skip
    assert rows[1:] == [(size + size // len(line), size, hashlib.md5(big.read_bytes()).hexdigest())]
    print(f"\n[figure] pg deliver VmHWM: {size >> 20} MiB message {hwms[2] >> 10} MiB, "
          f"one line {hwms[0] >> 10} MiB", file=sys.stderr)  # fmt: skip
    assert hwms[2] - hwms[0] < 16 * 1024  # kB: the message (40 MiB) was never held whole
