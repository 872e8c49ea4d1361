"""PostgreSQL storage and authentication: ``PgStore`` and ``PgAuthenticator``.

Several front ends (POP3 servers on different hosts) can share one database;
the maildrop lock is a PostgreSQL advisory lock, so it works across all of
them.  Needs the ``postgres`` extra (``psycopg`` 3 and ``psycopg-pool``).

The schema (``migrate``, or ``python -m pop3proto pg-migrate CONNINFO``)::

    users(name text PRIMARY KEY, password text NOT NULL)      -- "{SCHEME}..." as in a passwd-file
    messages(id bigserial PRIMARY KEY, mailbox text, uid text, -- UNIQUE (mailbox, uid)
             size bigint,                                     -- the POP3 size (wire_size)
             data bytea, delivered_at timestamptz)            -- index (mailbox, id)
    pop3proto_schema(version integer PRIMARY KEY, applied_at timestamptz)

Theory of operation:

* **Locking.**  ``lock`` checks a connection out of the pool, takes
  ``pg_try_advisory_lock(lock_key(mailbox))`` on it and keeps that connection
  for the session; ``unlock`` releases the lock and returns the connection.
  Advisory locks belong to the database session, so another session of the
  same front end is refused exactly like another front end, and a front end
  that dies loses its TCP connection and with it the lock: there is no stale
  lock to clean.  ``scan``, ``get`` and ``dele`` run on the locking
  connection: if it drops (and the lock with it), they fail instead of
  touching a maildrop the session no longer holds.  So each locked session
  holds one pool connection: ``max_size`` bounds the concurrent sessions of
  one ``PgStore`` (a login beyond it waits ``timeout`` seconds for a free
  connection, then gets ``-ERR [SYS/TEMP]``).
* **Sizes** are computed at delivery with ``wire_size`` and stored; ``scan``
  never reads message data.  The key of a message is ``str(id)``, so the
  listing order is delivery order.
* **Reading.**  ``get`` fetches the length and the first ``fetch_size``
  bytes in one query (most messages are then one round trip) and returns a
  buffered stream whose every further refill is one ``substring(data FROM pos
  FOR n)`` query, so a 50 MB message is never held in memory whole.  ``data``
  is stored EXTERNAL (uncompressed out of line) so that PostgreSQL fetches
  just the TOAST chunks of each slice instead of decompressing the value from
  its start.
* **Deletion** is one transaction on the locking connection: all or nothing.
  Only ids listed by this session's ``scan`` can be deleted.
* **Dead connections.**  Pooled connections are not tested at checkout (a
  round trip per login); when a query on one fails with a connection error
  (the server restarted), the pool's idle connections are checked, the dead
  ones replaced, and the query tried once more on a fresh one.
* **Threads.**  One instance serves many sessions in many threads; the
  mailbox -> connection map is guarded by a lock, and psycopg connections
  serialise their own use.  Every method blocks (the anyio transport runs
  them in worker threads; selectors and blocking run them inline).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from ._maildrop import MessageInfo
from ._writers import WireSizer, wire_size
from .auth import PlainVerifier, ScramSecret, Verifier, decoy_scram, derived_scram_salt
from .maildir import MaildirStorage, MessageTooBig, valid_mailbox_name

# Private, but the one parser of "{SCHEME}..." fields: the users table holds
# exactly what a passwd-file does, so it must accept exactly the same.
from .passwd import (
    BARE_PREFIXES,
    SCHEME_ALIASES,
    cost_in_bounds,
    dearest_dummy,
    default_secret,
    dummy_for,
    parse_secret,
    user_name_problem,
)
from .storage import MailboxRefused, MessageGone, StorageError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from psycopg.rows import TupleRow

    Conn = psycopg.Connection[TupleRow]
    Pool = ConnectionPool[Conn]

__all__ = [
    "SCHEMA_VERSION",
    "ImportResult",
    "PgAuthenticator",
    "PgStore",
    "add_user",
    "deliver",
    "import_maildir",
    "import_passwd_file",
    "lock_key",
    "migrate",
]

_log = logging.getLogger(__name__)

#: The schema version this module needs; ``migrate`` brings a database to it.
SCHEMA_VERSION = 1

# version -> statements; a run applies the missing ones and their version rows in one transaction.
_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE users (
               name text PRIMARY KEY,
               password text NOT NULL
           )""",
        """CREATE TABLE messages (
               id bigserial PRIMARY KEY,
               mailbox text NOT NULL,
               uid text NOT NULL CHECK (uid ~ '^[!-~]{1,70}$'),
               size bigint NOT NULL CHECK (size >= 0),
               data bytea NOT NULL,
               delivered_at timestamptz NOT NULL DEFAULT now(),
               CONSTRAINT messages_mailbox_uid UNIQUE (mailbox, uid)
           )""",
        # Uncompressed out-of-line storage: substring() then reads only the
        # TOAST chunks it needs; compressed values are decompressed from the start.
        "ALTER TABLE messages ALTER COLUMN data SET STORAGE EXTERNAL",
        "CREATE INDEX messages_mailbox_id ON messages (mailbox, id) INCLUDE (size, uid)",
    )),
)  # fmt: skip
_MIGRATE_LOCK = 0x706F7033_6D696772  # "pop3migr": serialises concurrent migrations

_FETCH = 256 * 1024
# Tries of a query on pooled connections: after a server restart the idle ones are dead.
# A failed query (not a check on every checkout) finds out; pool.check() then replaces
# every dead idle one, and the second try gets a working connection.
_ATTEMPTS = 2
_SCAN = "SELECT id, size, uid FROM messages WHERE mailbox = %s ORDER BY id"
_SLICE = "SELECT substring(data FROM %s FOR %s) FROM messages WHERE mailbox = %s AND id = %s"
# The first slice and the length in one round trip: a message up to fetch_size is one query.
_OPEN = (
    "SELECT substring(data FROM %s FOR %s), octet_length(data) FROM messages"
    " WHERE mailbox = %s AND id = %s"
)
_DELETE = "DELETE FROM messages WHERE mailbox = %s AND id = ANY(%s::bigint[])"
_INSERT = "INSERT INTO messages (mailbox, uid, size, data) VALUES (%s, %s, %s, %s)"
_COPY_CHUNK = 256 * 1024  # what deliver copies at once
_CLEAR_RE = r"^\{(PLAIN|CLEAR|CLEARTEXT)\}."
_SCRAM_RE = r"^\{(SCRAM-SHA-256)\}[0-9]+,"


def lock_key(mailbox: str) -> int:
    """The 64-bit advisory-lock key of *mailbox* (a keyed BLAKE2b hash, signed)."""
    digest = hashlib.blake2b(
        mailbox.encode("utf-8", "surrogateescape"), digest_size=8, person=b"pop3proto-lock"
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (libpq's span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _mailbox_problem(mailbox: str) -> str | None:
    if not mailbox:
        return "empty mailbox name"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF
           for c in mailbox):  # fmt: skip
        return f"mailbox name with control characters: {mailbox!r}"
    if len(mailbox.encode("utf-8")) > 255:
        return "mailbox name longer than 255 bytes"
    return None


def _new_uid() -> str:
    """A fresh UIDL: 24 URL-safe base64 characters (144 random bits)."""
    return secrets.token_urlsafe(18)


def _make_pool(conninfo: str, min_size: int, max_size: int, timeout: float, name: str) -> Pool:
    if not 0 <= min_size <= max_size or max_size < 1:
        raise ValueError(f"need 0 <= min_size <= max_size and max_size >= 1, "
                         f"got {min_size}, {max_size}")  # fmt: skip
    return ConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max_size,
        kwargs={"autocommit": True},
        timeout=timeout,
        name=name,
        open=True,
    )


def _drop_dead_connections(pool: Pool, log: logging.Logger) -> None:
    """Test the pool's idle connections and replace the dead ones (after a failed query)."""
    try:
        pool.check()
    except Exception as e:  # a closed pool: the retry fails with the real reason
        log.debug("pool check failed: %s", e)


@contextlib.contextmanager
def _connect(target: str | Conn) -> Iterator[Conn]:
    """An autocommit connection: a new one for a conninfo string (closed after), or *target*."""
    if isinstance(target, str):
        with psycopg.connect(target, autocommit=True) as conn:
            yield conn
        return
    was = target.autocommit
    if not was:
        target.autocommit = True
    try:
        yield target
    finally:
        if not was and not target.closed:
            target.autocommit = False


# -- schema ----------------------------------------------------------------------------


def migrate(target: str | Conn) -> tuple[int, int]:
    """Create or upgrade the schema to ``SCHEMA_VERSION``; (version before, version after).

    Idempotent and safe to run from several hosts at once (an advisory lock
    serialises runs).  *target* is a conninfo string or an idle connection.

    Raises:
        StorageError: the database is newer than this code, or a statement failed
            (for instance on a foreign ``users`` table); nothing is changed then.
        psycopg.OperationalError: cannot connect.
    """
    with _connect(target) as conn:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS pop3proto_schema ("
                    " version integer PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                row = conn.execute("SELECT coalesce(max(version), 0) FROM pop3proto_schema")
                before = int(row.fetchone()[0])  # type: ignore[index]
                if before > SCHEMA_VERSION:
                    raise StorageError(f"the database schema is at version {before}, newer "
                                       f"than this pop3proto's {SCHEMA_VERSION}")  # fmt: skip
                for version, statements in _MIGRATIONS:
                    if version > before:
                        for statement in statements:
                            conn.execute(statement)
                        conn.execute(
                            "INSERT INTO pop3proto_schema (version) VALUES (%s)", (version,)
                        )
        except psycopg.OperationalError:
            raise
        except psycopg.Error as e:
            raise StorageError(f"migration failed: {_one_line(e)}") from e
    return before, SCHEMA_VERSION


# -- storage ---------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Held:
    """One locked maildrop: the connection holding its advisory lock, and scan state."""

    conn: Conn
    key: int
    autocommit_was: bool
    listed: set[int] = field(default_factory=set)
    active: bool = True


class _BlobReader(io.RawIOBase):
    """Reads one message's bytea a slice at a time on the session's connection."""

    def __init__(
        self, held: _Held, mailbox: str, ident: int, length: int, fetch: int, first: bytes
    ) -> None:
        super().__init__()
        self._held = held
        self._mailbox = mailbox
        self._id = ident
        self._length = length
        self._fetch = fetch
        self._first = memoryview(first)  # fetched by get(), handed out before any query
        self._pos = len(first)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        """Fill *buffer* with up to ``fetch_size`` bytes: one query."""
        if self.closed:
            raise ValueError("I/O operation on closed file")
        view = memoryview(buffer).cast("B")
        if self._first:
            n = min(len(view), len(self._first))
            view[:n] = self._first[:n]
            self._first = self._first[n:] if n < len(self._first) else memoryview(b"")
            return n
        n = min(len(view), self._length - self._pos, self._fetch)
        if n <= 0:
            return 0
        if not self._held.active:
            raise StorageError("the maildrop was unlocked while a message was being read")
        try:
            row = self._held.conn.execute(
                _SLICE, (self._pos + 1, n, self._mailbox, self._id), binary=True
            ).fetchone()
        except psycopg.Error as e:
            raise StorageError(f"cannot read message {self._id}: {_one_line(e)}") from e
        if row is None:
            raise MessageGone(f"message {self._id} was deleted while being read")
        chunk: bytes = row[0]
        if len(chunk) != n:
            raise MessageGone(f"message {self._id} changed while being read")
        view[:n] = chunk
        self._pos += n
        return n


class PgStore:
    """``Storage`` in PostgreSQL; the mailbox reference is any name (the user name).

    Args:
        conninfo: a libpq connection string (``"host=... dbname=..."``, a
            ``postgresql://`` URI, or ``"service=pop3"`` to keep the password
            in a service/password file), or a ``psycopg_pool.ConnectionPool``
            to share (it is not closed by ``close``).
        min_size, max_size: the pool's size; each locked session holds one
            connection, so *max_size* bounds this front end's concurrent sessions.
        timeout: seconds to wait for a free pool connection before a login
            fails with ``[SYS/TEMP]``.  Keep it short under a single-threaded
            transport, where the wait stalls every session.
        fetch_size: bytes fetched per query when streaming a message.
        logger: where unlock problems go; default ``pop3proto.pgstore``.

    The schema must exist (``migrate``).  Use as a context manager or call
    ``close()``.  psycopg_pool logs every checkout at INFO on ``psycopg.pool``:
    raise that logger's level where pop3proto logs at INFO.
    """

    def __init__(
        self,
        conninfo: str | Pool,
        *,
        min_size: int = 1,
        max_size: int = 20,
        timeout: float = 10.0,
        fetch_size: int = _FETCH,
        logger: logging.Logger | None = None,
    ) -> None:
        if fetch_size < 1:
            raise ValueError("fetch_size must be positive")
        if isinstance(conninfo, str):
            self.pool: Pool = _make_pool(conninfo, min_size, max_size, timeout, "pop3proto-store")
            self._own_pool = True
        else:
            self.pool, self._own_pool = conninfo, False
        self.timeout = timeout
        self.fetch_size = fetch_size
        self._log = logger if logger is not None else _log
        self._mutex = threading.Lock()
        self._held: dict[str, _Held] = {}

    # -- the Storage protocol ------------------------------------------------

    def lock(self, mailbox: str) -> bool:
        """Take the maildrop's advisory lock on a connection kept for the session.

        Returns False if another session (of this or any front end) holds it.

        Raises:
            StorageError: no pool connection within ``timeout``, or the query
                failed (the lock is then not held).
        """
        with self._mutex:
            if mailbox in self._held:
                return False
        key = lock_key(mailbox)
        for attempt in range(1, _ATTEMPTS + 1):
            conn, autocommit_was = self._checkout()
            try:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                break
            except BaseException as e:
                conn.close()  # whatever its state, it must not go back holding a lock
                self.pool.putconn(conn)
                if attempt < _ATTEMPTS and isinstance(e, psycopg.OperationalError):
                    _drop_dead_connections(self.pool, self._log)
                    continue
                if isinstance(e, psycopg.Error):
                    raise StorageError(f"cannot lock {mailbox!r}: {_one_line(e)}") from e
                raise
        held = _Held(conn, key, autocommit_was)
        if row is not None and row[0]:
            with self._mutex:
                if mailbox not in self._held:
                    self._held[mailbox] = held
                    return True
            self._release(held)  # a stale entry of ours whose connection had died
            return False
        self._checkin(conn, autocommit_was)
        return False

    def unlock(self, mailbox: str) -> None:
        """Release the lock and return its connection to the pool; a no-op if not held."""
        with self._mutex:
            held = self._held.pop(mailbox, None)
        if held is not None:
            self._release(held)

    def scan(self, mailbox: str) -> list[MessageInfo]:
        """List the locked maildrop in delivery order: key ``str(id)``, stored size, uid.

        Raises:
            StorageError: not locked, or the query failed.
        """
        held = self._state(mailbox)
        try:
            rows = held.conn.execute(_SCAN, (mailbox,)).fetchall()
        except psycopg.Error as e:
            raise StorageError(f"cannot list {mailbox!r}: {_one_line(e)}") from e
        held.listed = {int(r[0]) for r in rows}
        return [MessageInfo(key=str(r[0]), size=int(r[1]), uid=str(r[2])) for r in rows]

    def get(self, mailbox: str, key: str) -> BinaryIO:
        """A stream over message *key* that fetches ``fetch_size`` bytes per query.

        Raises:
            MessageGone: *key* was not listed by this session's ``scan``, or its row is gone.
            StorageError: not locked, or the query failed.
        """
        held = self._state(mailbox)
        ident = self._ident(held, key)
        if ident is None:
            raise MessageGone(f"no message {key!r} in this session")
        try:
            params = (1, self.fetch_size, mailbox, ident)
            row = held.conn.execute(_OPEN, params, binary=True).fetchone()
        except psycopg.Error as e:
            raise StorageError(f"cannot open message {key!r}: {_one_line(e)}") from e
        if row is None:
            raise MessageGone(f"message {key!r} is gone")
        raw = _BlobReader(held, mailbox, ident, int(row[1]), self.fetch_size, row[0])
        return io.BufferedReader(raw, buffer_size=self.fetch_size)

    def dele(self, mailbox: str, keys: Sequence[str]) -> None:
        """Delete these messages in one transaction on the locking connection.

        Rows already gone are fine.  Nothing is deleted if anything fails.

        Raises:
            StorageError: not locked, a key not listed by this session's
                ``scan``, or the transaction failed.
        """
        held = self._state(mailbox)
        ids: list[int] = []
        unknown: list[str] = []
        for key in keys:
            ident = self._ident(held, key)
            if ident is None:
                unknown.append(key)
            else:
                ids.append(ident)
        if unknown:
            raise StorageError(f"keys not listed by scan: {unknown[:3]!r}")
        if not ids:
            return
        try:
            with held.conn.transaction():
                held.conn.execute(_DELETE, (mailbox, ids))
        except psycopg.Error as e:
            raise StorageError(f"cannot delete from {mailbox!r}: {_one_line(e)}") from e
        held.listed.difference_update(ids)

    # -- delivery ------------------------------------------------------------

    def deliver(self, mailbox: str, data: bytes) -> str:
        """Store *data* as a new message of *mailbox*; return its UIDL (random, 24 chars).

        Raises:
            StorageError: a bad mailbox name or a database failure (nothing stored).
        """
        try:
            with self.pool.connection(timeout=self.timeout) as conn:
                return deliver(conn, mailbox, data)
        except PoolTimeout as e:
            raise StorageError(f"cannot deliver to {mailbox!r}: {_one_line(e)}") from e

    # -- life cycle ----------------------------------------------------------

    def close(self) -> None:
        """Release every lock still held and close the pool (if this instance made it)."""
        with self._mutex:
            held, self._held = list(self._held.values()), {}
        for h in held:
            self._release(h)
        if self._own_pool:
            self.pool.close()

    def __enter__(self) -> PgStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------

    def _checkout(self) -> tuple[Conn, bool]:
        try:
            conn = self.pool.getconn(timeout=self.timeout)
        except PoolTimeout as e:
            raise StorageError(f"no database connection free: {_one_line(e)}") from e
        except psycopg.Error as e:
            raise StorageError(f"no database connection: {_one_line(e)}") from e
        was = conn.autocommit
        if not was:  # a shared pool without autocommit: no session-long transactions
            try:
                conn.autocommit = True
            except psycopg.Error as e:
                conn.close()
                self.pool.putconn(conn)
                raise StorageError(f"no usable database connection: {_one_line(e)}") from e
        return conn, was

    def _checkin(self, conn: Conn, autocommit_was: bool) -> None:
        with contextlib.suppress(psycopg.Error):
            if not autocommit_was and not conn.closed:
                conn.autocommit = False
        self.pool.putconn(conn)

    def _release(self, held: _Held) -> None:
        """Unlock and return the connection; close it instead if the unlock is not certain."""
        held.active = False
        conn = held.conn
        ok = False
        try:
            if not conn.closed:
                row = conn.execute("SELECT pg_advisory_unlock(%s)", (held.key,)).fetchone()
                ok = bool(row is not None and row[0])
        except psycopg.Error as e:
            self._log.warning("unlock failed (the connection is dropped): %s", _one_line(e))
        if not ok:
            conn.close()  # PostgreSQL frees the lock with the session
        self._checkin(conn, held.autocommit_was)

    def _state(self, mailbox: str) -> _Held:
        with self._mutex:
            held = self._held.get(mailbox)
        if held is None:
            raise StorageError(f"maildrop {mailbox!r} is not locked")
        return held

    @staticmethod
    def _ident(held: _Held, key: str) -> int | None:
        """The id behind *key* if this session's scan listed it, else None."""
        if not key.isascii() or not key.isdigit() or len(key) > 19:
            return None
        ident = int(key)
        return ident if ident in held.listed else None


# -- authentication --------------------------------------------------------------------


#: The cost part of a password field (everything before the salt), grouped by in SQL.
_COST_KEY = (
    r"^((?:\{[^}]*\})?(?:\$[0-9a-zA-Z]+\$(?:rounds=[0-9]+\$|v=[0-9]+\$m=[0-9]+,t=[0-9]+,"
    r"p=[0-9]+|[0-9]{2}\$)?|[0-9]+,)?).*$"
)
_COST_QUERY = (
    "SELECT k, count(*) FROM (SELECT regexp_replace(password, %s, '\\1') AS k FROM users) t"
    " GROUP BY k ORDER BY count(*) DESC LIMIT 1000"
)
_SHA_ROUNDS = re.compile(r"\$[56]\$(?:rounds=([0-9]{1,10})\$)?")


def _cost_of_key(key: str) -> tuple[str, str] | None:
    """(scheme, params) as ``hash_cost`` gives them, from a ``_COST_KEY`` prefix, or None."""
    scheme, value = "", key
    if key.startswith("{"):
        scheme, _, value = key[1:].partition("}")
    else:
        scheme = next((s for p, s in BARE_PREFIXES.items() if key.startswith(p)), "")
    canon = SCHEME_ALIASES.get(scheme.upper(), scheme.upper())
    if canon == "PLAIN":
        return "PLAIN", ""
    if canon == "SCRAM-SHA-256":
        digits = value.rstrip(",")
        return (canon, digits) if digits.isdigit() and len(digits) <= 10 else None
    if canon in ("SHA512-CRYPT", "SHA256-CRYPT"):
        m = _SHA_ROUNDS.match(value)
        return None if m is None else (canon, m[1] or "")
    if canon == "BLF-CRYPT":
        return (canon, value[4:6]) if value[4:6].isdigit() else None
    if canon in ("ARGON2ID", "ARGON2I") and value.startswith(("$argon2id$", "$argon2i$")):
        return canon, value.rstrip("$")
    return None


@dataclass(frozen=True)
class _Summary:
    """What PgAuthenticator reads from the whole users table, refreshed in the background."""

    at: float  # time.monotonic() of the read
    has_cleartext: bool = False
    has_scram: bool = False
    dummy: Verifier = field(default_factory=lambda: dummy_for("SHA512-CRYPT", ""))
    scram_iterations: int = 4096


class PgAuthenticator:
    """``Authenticator`` over the ``users`` table; the mailbox reference is the user name.

    ``password`` holds a passwd-file password field (``{SHA512-CRYPT}$6$...``,
    ``{BLF-CRYPT}``, ``{ARGON2ID}``, ``{SCRAM-SHA-256}``, ``{PLAIN}``...), read
    by passwd.py's parser, so the schemes and their rules (cost bounds
    included) are the same: a bare recognised hash is accepted, anything else
    without ``{SCHEME}`` is not.  Every ``lookup`` reads the row, so changes
    apply at the next login.  A bad entry is logged and that user cannot log in.

    ``lookup`` raises ``StorageError`` when the database or the pool fails:
    that is no unknown user.  ``has_cleartext``, ``has_scram``,
    ``dummy_verifier`` and ``decoy_scram`` never raise and never wait long:
    they answer from a summary of the whole table (which schemes, the
    dearest cost, the usual SCRAM iteration count) that one background
    thread re-reads every ``cache_ttl`` seconds.  A caller that finds it
    stale starts that re-read and waits for it at most ``refresh_wait``
    seconds; a slow or dead database leaves the last good summary in use
    (before the first: no cleartext, no SCRAM, a SHA512-CRYPT dummy).

    Args:
        conninfo: a libpq connection string or a ``ConnectionPool`` to share
            (for instance ``store.pool``, sized then for the sessions plus the
            logins in progress; it is not closed by ``close``).
        min_size, max_size, timeout: the pool made for a conninfo string.
        cache_ttl: seconds the table summary is reused.
        refresh_wait: the longest a caller waits for a re-read of the summary.
        secret: the server secret the SCRAM salts of ``{PLAIN}`` users and of
            decoys are derived from.  Every front end of one database must
            have the same one.  Default: a hash of the connection string
            (the pool's, when one is given), the same for front ends
            configured alike and unknown to clients only if it holds a
            password: without one (peer or trust authentication), pass a
            random secret shared by the front ends.
        logger: where bad entries and database failures go.
    """

    def __init__(
        self,
        conninfo: str | Pool,
        *,
        min_size: int = 1,
        max_size: int = 4,
        timeout: float = 10.0,
        cache_ttl: float = 60.0,
        refresh_wait: float = 0.25,
        secret: bytes | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if isinstance(conninfo, str):
            self.pool: Pool = _make_pool(conninfo, min_size, max_size, timeout, "pop3proto-auth")
            self._own_pool = True
        else:
            self.pool, self._own_pool = conninfo, False
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.refresh_wait = refresh_wait
        if secret is None:
            info = self.pool.conninfo  # a function in newer pools: not called (it may do I/O)
            seed = info if isinstance(info, str) else f"pool {self.pool.name}"
            secret = default_secret(b"postgresql\0" + seed.encode("utf-8", "surrogatepass"))
        self._secret = secret
        self._log = logger if logger is not None else _log
        self._lock = threading.Lock()
        self._summary = _Summary(at=-float("inf"))
        self._refreshing: threading.Event | None = None  # set when the running re-read ends
        self._plain: dict[tuple[str, str], Verifier] = {}  # (name, field) -> cached verifier
        self._fresh()  # start the first read now, so that it is there for the first login

    def _query(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self.pool.connection(timeout=self.timeout) as conn:
                    return conn.execute(query, params).fetchall()
            except psycopg.OperationalError as e:
                if attempt < _ATTEMPTS:
                    _drop_dead_connections(self.pool, self._log)
                    continue
                raise StorageError(f"users table unavailable: {_one_line(e)}") from e
            except (psycopg.Error, PoolTimeout) as e:
                raise StorageError(f"users table unavailable: {_one_line(e)}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    def exists(self, name: str) -> bool:
        """Whether *name* is a user with a usable entry (raises ``StorageError`` as ``lookup``)."""
        return self.lookup(name) is not None

    def lookup(self, name: str) -> tuple[Verifier, str] | None:
        """(verifier, mailbox = the user name) for *name*, or None if unknown or unusable.

        Raises:
            StorageError: the database or the pool failed (no connection
                within ``timeout``, a dropped connection, a failed query):
                the facade answers ``-ERR [SYS/TEMP]`` and counts no failure.
        """
        if user_name_problem(name) is not None:
            return None
        rows = self._query("SELECT password FROM users WHERE name = %s", (name,))
        if not rows:
            return None
        secret: str = rows[0][0]
        parsed = parse_secret(secret, bare_is_plain=False)
        if isinstance(parsed, str):
            self._log.warning("users table, user %r: %s", name, parsed)
            return None
        if isinstance(parsed, PlainVerifier):  # a salt of its own, its keys derived once
            with self._lock:
                cached = self._plain.get((name, secret))
                if cached is None:
                    if len(self._plain) >= 10_000:
                        self._plain.clear()
                    salt = derived_scram_salt(self._secret, name)
                    cached = self._plain[(name, secret)] = PlainVerifier(parsed.secret, salt)
            parsed = cached
        return parsed, name

    # -- the table summary -----------------------------------------------------------

    def _fresh(self) -> _Summary:
        """The summary, after starting a re-read if it is stale and waiting a little for it."""
        summary = self._summary
        if time.monotonic() - summary.at < self.cache_ttl:
            return summary
        with self._lock:
            done = self._refreshing
            started = done is None
            if done is None:
                done = self._refreshing = threading.Event()
        if started:
            try:
                threading.Thread(target=self._refresh, args=(done,), daemon=True,
                                 name="pop3proto-auth-summary").start()  # fmt: skip
            except RuntimeError as e:  # no thread to be had (a task limit): keep the old one
                self._log.warning("cannot re-read the users table summary: %s", e)
                with self._lock:
                    self._refreshing = None
                return summary
            done.wait(self.refresh_wait)
        return self._summary

    def _refresh(self, done: threading.Event) -> None:
        """Re-read the summary (in its own thread); on failure keep the last one."""
        try:
            self._summary = self._read_summary()
        except Exception as e:  # StorageError, a closed pool: logged, never raised
            self._log.warning("%s", e)
        finally:
            with self._lock:
                self._refreshing = None
            done.set()

    def _read_summary(self) -> _Summary:
        now = time.monotonic()
        row = self._query(
            "SELECT EXISTS (SELECT 1 FROM users WHERE password ~* %s),"
            " EXISTS (SELECT 1 FROM users WHERE password ~* %s)",
            (_CLEAR_RE, _SCRAM_RE),
        )[0]
        costs: Counter[tuple[str, str]] = Counter()
        for key, n in self._query(_COST_QUERY, (_COST_KEY,)):
            cost = _cost_of_key(key)
            if cost is not None and cost_in_bounds(*cost):
                costs[cost] += n
        scram: Counter[int] = Counter()
        for (scheme, params), n in costs.items():
            if scheme == "SCRAM-SHA-256":
                scram[int(params)] += n
            elif scheme == "PLAIN":
                scram[4096] += n
        return _Summary(
            at=now,
            has_cleartext=bool(row[0]),
            has_scram=bool(row[0] or row[1]),
            dummy=dearest_dummy(costs),
            scram_iterations=scram.most_common(1)[0][0] if scram else 4096,
        )

    @property
    def has_cleartext(self) -> bool:
        """Whether some entry holds its secret in clear (so APOP and CRAM-MD5 can work)."""
        return self._fresh().has_cleartext

    @property
    def has_scram(self) -> bool:
        """Whether some entry can answer SCRAM-SHA-256 ({SCRAM-SHA-256} or cleartext)."""
        return self._fresh().has_scram

    def dummy_verifier(self) -> Verifier:
        """A verifier that costs what the dearest real one does and matches nothing.

        Like ``PasswdFile.dummy_verifier``: the most expensive scheme and cost
        in the table (within ``COST_BOUNDS``), from the summary.
        """
        return self._fresh().dummy

    def decoy_scram(self, name: str) -> ScramSecret:
        """SCRAM-SHA-256 keys for *name*, an unknown user (see ``PasswdFile.decoy_scram``)."""
        return decoy_scram(self._secret, name, self._fresh().scram_iterations)

    def close(self) -> None:
        """Close the pool (if this instance made it)."""
        if self._own_pool:
            self.pool.close()

    def __enter__(self) -> PgAuthenticator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- delivery and administration ------------------------------------------------------


def deliver(
    target: str | Conn, mailbox: str, data: bytes | BinaryIO, *, max_size: int | None = None
) -> str:
    """Store a message of *mailbox* over a conninfo or a connection; return its UIDL.

    ``PgStore.deliver`` without a pool.  *data* is the message's bytes or a
    binary stream.  A stream is copied in chunks to an anonymous temporary file
    (its size capped by *max_size*), then sent with ``COPY`` in chunks: the
    client's memory stays flat whatever the size.  (The row holds the message
    as one ``bytea`` value, so the server assembles it whole, up to its 1 GB
    field limit.)

    Raises:
        MessageTooBig: more than *max_size* bytes (nothing stored).
        StorageError: a bad mailbox name or a database failure (nothing stored).
    """
    problem = _mailbox_problem(mailbox)
    if problem is not None:
        raise StorageError(problem)
    if isinstance(data, bytes | bytearray | memoryview):
        whole = bytes(data)
        if max_size is not None and len(whole) > max_size:
            raise MessageTooBig(f"message over {max_size} bytes: not delivered")
        return _deliver_value(target, mailbox, whole)
    with tempfile.TemporaryFile() as spool:
        sizer = WireSizer()
        total = 0
        while chunk := data.read(_COPY_CHUNK):
            total += len(chunk)
            if max_size is not None and total > max_size:
                raise MessageTooBig(f"message over {max_size} bytes: not delivered")
            sizer.feed(chunk)
            spool.write(chunk)
        return _deliver_copy(target, mailbox, spool, sizer.total())


def _deliver_value(target: str | Conn, mailbox: str, data: bytes) -> str:
    size = wire_size(data)
    try:
        with _connect(target) as conn:
            for _ in range(3):
                uid = _new_uid()
                try:
                    with conn.transaction():
                        conn.execute(_INSERT, (mailbox, uid, size, data))
                    return uid
                except pg_errors.UniqueViolation:  # 144 random bits: never, but cheap
                    continue
    except psycopg.Error as e:
        raise StorageError(f"cannot deliver to {mailbox!r}: {_one_line(e)}") from e
    raise StorageError(f"cannot deliver to {mailbox!r}: no unused UIDL found")


def _copy_text(value: str) -> bytes:
    """*value* as a field of COPY's text format."""
    for c, esc in (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")):
        value = value.replace(c, esc)
    return value.encode("utf-8")


def _deliver_copy(target: str | Conn, mailbox: str, spool: BinaryIO, size: int) -> str:
    """Store the spooled message with ``COPY ... FROM STDIN``, its bytea in hex chunks."""
    try:
        with _connect(target) as conn:
            for _ in range(3):
                uid = _new_uid()
                spool.seek(0)
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        sql = "COPY messages (mailbox, uid, size, data) FROM STDIN"
                        with cur.copy(sql) as copy:
                            copy.write(b"\t".join([_copy_text(mailbox), _copy_text(uid),
                                                    str(size).encode(), b"\\\\x"]))  # fmt: skip
                            while chunk := spool.read(_COPY_CHUNK):
                                copy.write(chunk.hex().encode("ascii"))
                            copy.write(b"\n")
                    return uid
                except pg_errors.UniqueViolation:  # 144 random bits: never, but cheap
                    continue
    except psycopg.Error as e:
        raise StorageError(f"cannot deliver to {mailbox!r}: {_one_line(e)}") from e
    raise StorageError(f"cannot deliver to {mailbox!r}: no unused UIDL found")


def add_user(target: str | Conn, name: str, field: str, *, replace: bool = False) -> bool:
    """Store user *name* with password field *field* (``{SCHEME}...``).

    Returns False (and changes nothing) if the user exists and not *replace*.

    Raises:
        ValueError: an unusable name or password field (the reason is the message).
        StorageError: a database failure.
    """
    problem = user_name_problem(name)
    parsed = parse_secret(field, bare_is_plain=False)
    if problem is None and isinstance(parsed, str):
        problem = parsed
    if problem is not None:
        raise ValueError(problem)
    action = "UPDATE SET password = EXCLUDED.password" if replace else "NOTHING"
    with _connect(target) as conn:
        try:
            cur = conn.execute(
                "INSERT INTO users (name, password) VALUES (%s, %s) "
                f"ON CONFLICT (name) DO {action}",
                (name, field),
            )
        except psycopg.Error as e:
            raise StorageError(f"cannot store user {name!r}: {_one_line(e)}") from e
        return cur.rowcount == 1


def import_passwd_file(
    target: str | Conn, path: str | os.PathLike[str]
) -> tuple[int, int, list[str]]:
    """Copy a Dovecot passwd-file's users into the users table, keeping existing rows.

    Returns (added, already present, problems); a bad line is a problem, not an error.

    Raises:
        OSError: the file cannot be read.
        StorageError: a database failure (nothing is added).
    """
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "surrogateescape")
    rows: list[tuple[str, str]] = []
    problems: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, _, rest = line.partition(":")
        secret = rest.partition(":")[0]
        problem = user_name_problem(user)
        parsed = parse_secret(secret, bare_is_plain=False)
        if problem is None and isinstance(parsed, str):
            problem = parsed
        if problem is None:
            rows.append((user, secret))
        else:
            problems.append(f"{os.fspath(path)}:{number}: {problem}")
    added = 0
    with _connect(target) as conn:
        try:
            with conn.transaction():
                for user, secret in rows:
                    cur = conn.execute(
                        "INSERT INTO users (name, password) VALUES (%s, %s) "
                        "ON CONFLICT (name) DO NOTHING",
                        (user, secret),
                    )
                    added += cur.rowcount
        except psycopg.Error as e:
            raise StorageError(f"cannot import users: {_one_line(e)}") from e
    return added, len(rows) - added, problems


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What ``import_maildir`` did for one user."""

    user: str
    imported: int  #: messages stored
    present: int  #: messages already in the database (an earlier import)
    renamed: int  #: stored under a new UIDL: their UIDL was taken by a different message
    vanished: int  #: listed but gone before they could be read


def import_maildir(
    target: str | Conn,
    root: str | os.PathLike[str],
    users: Iterable[str] | None = None,
    *,
    logger: logging.Logger | None = None,
) -> list[ImportResult]:
    """Copy every user's Maildir (``new/`` and ``cur/``) under *root* into ``messages``.

    Messages keep the UIDL ``MaildirStorage`` gives them (Dovecot's when
    ``dovecot-uidlist`` knows them, else the unique name), so POP3 clients do
    not download them again, and keep their order.  Each user is one
    transaction; running the import again adds only what is new (a message is
    "present" when a row with its UIDL has the same bytes).  Like a POP3
    login, the scan moves ``new/`` into ``cur/``; nothing is deleted.  No
    symlink is followed: a maildrop that is one, or whose ``cur``, ``new`` or
    ``tmp`` is one, is skipped with a warning (the POP3 server refuses it too).

    Args:
        users: the maildrops to import; default every directory under *root*
            that is a valid mailbox name and holds ``cur`` or ``new``.

    Raises:
        StorageError: a maildrop is locked by a POP3 session or cannot be
            read, or a database failure (that user's import is rolled back;
            earlier users stay imported).
    """
    log = logger if logger is not None else _log
    base = os.fspath(root)
    if users is None:
        users = _maildir_users(base, log)
    maildir = MaildirStorage(base, logger=log)
    results: list[ImportResult] = []
    try:
        with _connect(target) as conn:
            for user in users:
                try:  # never follows a link: the maildrop and cur/new/tmp are opened O_NOFOLLOW
                    locked = maildir.lock(user)
                except MailboxRefused:
                    continue  # logged by the Maildir reader; the other users go on
                if not locked:
                    raise StorageError(f"maildrop {user!r} is locked by a POP3 session")
                try:
                    results.append(_import_one(conn, maildir, user, log))
                finally:
                    maildir.unlock(user)
    finally:
        maildir.close()
    return results


def _maildir_users(base: str, log: logging.Logger) -> list[str]:
    """The valid mailbox names under *base* that are directories holding ``cur`` or ``new``.

    Nothing is followed: a symlinked maildrop, ``cur`` or ``new`` is left out
    (with a warning), as the POP3 server refuses it.
    """
    try:
        with os.scandir(base) as it:
            entries = sorted((e.name, e) for e in it if valid_mailbox_name(e.name))
    except OSError as e:
        raise StorageError(f"cannot list {base!r}: {e.strerror or e}") from e
    users = []
    for name, entry in entries:
        try:
            if entry.is_symlink():
                log.warning("skipping maildrop %r: it is a symlink", name)
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            with os.scandir(entry.path) as it:
                subs = {e.name: e.is_dir(follow_symlinks=False) for e in it
                        if e.name in ("cur", "new")}  # fmt: skip
        except OSError as e:
            log.warning("skipping maildrop %r: %s", name, e.strerror or e)
            continue
        if any(subs.values()):
            users.append(name)
    return users


def _import_one(
    conn: Conn, maildir: MaildirStorage, user: str, log: logging.Logger
) -> ImportResult:
    infos = maildir.scan(user)
    imported = present = renamed = vanished = 0
    try:
        with conn.transaction():
            for info in infos:
                try:
                    with maildir.get(user, info.key) as f:
                        data = f.read()
                except (MessageGone, OSError) as e:
                    log.warning("%s: skipping %s: %s", user, info.key, e)
                    vanished += 1
                    continue
                digest = hashlib.md5(data).hexdigest()
                # If another message has the UIDL, store under a derived one (the
                # client downloads it again) rather than lose it.
                for n, uid in enumerate((info.uid, f"{info.uid[:37]}-{digest}"[:70])):
                    row = conn.execute(
                        _INSERT + " ON CONFLICT (mailbox, uid) DO NOTHING RETURNING id",
                        (user, uid, wire_size(data), data),
                    ).fetchone()
                    if row is not None:
                        imported += n == 0
                        renamed += n == 1
                        if n == 1:
                            log.warning("%s: UIDL %r of %s is taken by another message; "
                                        "stored as %r", user, info.uid, info.key, uid)  # fmt: skip
                        break
                    same = conn.execute(
                        "SELECT md5(data) = %s FROM messages WHERE mailbox = %s AND uid = %s",
                        (digest, user, uid),
                    ).fetchone()
                    if same is not None and same[0]:
                        present += 1
                        break
    except psycopg.Error as e:
        raise StorageError(f"importing {user!r} failed: {_one_line(e)}") from e
    return ImportResult(user, imported, present, renamed, vanished)
