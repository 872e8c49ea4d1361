"""The storage and authentication contracts the server facade calls.

These keep the shape of Tcllib pop3d's ``-storage`` and ``-auth`` callbacks
(``lock``, ``unlock``, ``stat``, ``size``, ``get``, ``dele``; ``exists``,
``lookup``) with its defects fixed: messages are named by a stable key rather
than a number, ``get`` returns a stream instead of the whole message, ``scan``
lists sizes and UIDLs in one pass, and the authenticator hands back a
*verifier* rather than a cleartext password.

Every method may be a plain function or a coroutine function; the transports
run both.  Storage methods raise only the exceptions below (or ``OSError``);
the facade turns them into ``-ERR [IN-USE]`` / ``-ERR [SYS/TEMP]``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, BinaryIO, Protocol, TypeVar, runtime_checkable

from ._maildrop import MessageInfo
from .auth import Verifier

Found = tuple[Verifier, str] | None

__all__ = [
    "OPTIONAL",
    "capability",
    "Authenticator",
    "LoginTimes",
    "RetrievalTimes",
    "SafeLog",
    "UserSettings",
    "nonblocking",
    "runs_inline",
    "MailboxLocked",
    "MailboxRefused",
    "MessageGone",
    "Storage",
    "StorageError",
]


_F = TypeVar("_F", bound=Callable[..., Any])


def nonblocking(fn: _F) -> _F:
    """Mark a callback as fast enough to run on an event loop (no thread hop).

    The anyio transport runs every other synchronous callback in a worker
    thread; a hop costs far more than, say, opening a file in the page cache.
    """
    fn.nonblocking = True  # type: ignore[attr-defined]
    return fn


#: Every optional capability an authenticator or a store may have, with the one value
#: it has when absent.  Read them with ``capability()``, never by probing.
OPTIONAL: Mapping[str, Any] = MappingProxyType({
    # -- an Authenticator
    "has_cleartext": False,  # some users have cleartext secrets: APOP, CRAM-MD5 offered
    "has_scram": False,  # some users can answer SCRAM-SHA-256: the mechanism is offered
    "dummy_verifier": None,  # () -> Verifier costing what a real one does (unknown users)
    "decoy_scram": None,  # (name) -> ScramSecret for an unknown name, same for the same name
    "user_settings": None,  # (name) -> {"login_delay": s, "expire": days} overrides
    # -- a Storage
    "nonblocking_reads": False,  # streams from get() may be read on an event loop
    "last_login": None,  # (mailbox) -> time of the last login (LOGIN-DELAY)
    "logged_in": None,  # (mailbox, time): record a login
    "expired": None,  # (mailbox, days, now) -> keys retrieved at least that long ago (EXPIRE)
    "retrieved": None,  # (mailbox, {key: time}): record first retrievals
    # -- either
    "nonblocking": False,  # every method is safe to call on an event loop
})


def capability(obj: Any, name: str) -> Any:
    """*obj*'s optional capability *name* (see ``OPTIONAL``), or its declared default.

    An object that is None, lacks the attribute, or raises while answering
    (a property that needs a database) has the default.
    """
    default = OPTIONAL[name]
    if obj is None:
        return default
    try:
        return getattr(obj, name, default)
    except Exception:
        return default


def runs_inline(fn: Any) -> bool:
    """Whether callback *fn* is declared safe to run on an event loop (no thread hop).

    The declaration is ``@nonblocking`` on the function or method, or
    ``nonblocking = True`` on the object that owns the method (an in-memory
    store, a cleartext verifier).  Coroutine functions are awaited on the
    loop.  Everything else may block, and runs in a worker thread.
    """
    if fn is None:
        return True
    if getattr(fn, "nonblocking", False) is True or inspect.iscoroutinefunction(fn):
        return True
    owner = getattr(fn, "__self__", None)
    return owner is not None and getattr(owner, "nonblocking", False) is True


class SafeLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger adapter that never raises: a broken log handler never fails a session."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log as usual; an exception from a handler is dropped."""
        try:
            super().log(level, msg, *args, **kwargs)
        except Exception:
            pass


class StorageError(Exception):
    """A temporary storage failure: the client sees ``-ERR [SYS/TEMP]``."""


class MailboxLocked(StorageError):
    """The maildrop is held by another session: ``-ERR [IN-USE]``."""


class MailboxRefused(StorageError):
    """The maildrop is refused for good (a link where a directory must be): ``-ERR [SYS/PERM]``."""


class MessageGone(StorageError):
    """A listed message vanished or became unreadable during the session."""


@runtime_checkable
class Storage(Protocol):
    """Where maildrops live.  *mailbox* is the reference the authenticator returned."""

    def lock(self, mailbox: str) -> bool | Awaitable[bool]:
        """Take the exclusive maildrop lock; False (or MailboxLocked) if it is held."""

    def unlock(self, mailbox: str) -> Awaitable[None] | None:
        """Release the lock taken by ``lock``; must not fail if already released."""

    def scan(self, mailbox: str) -> Sequence[MessageInfo] | Awaitable[Sequence[MessageInfo]]:
        """List the locked maildrop once: keys, CRLF sizes and UIDLs, in number order."""

    def get(self, mailbox: str, key: str) -> BinaryIO | Awaitable[BinaryIO]:
        """Open one message for reading (LF or CRLF bytes); raise MessageGone if it cannot."""

    def dele(self, mailbox: str, keys: Sequence[str]) -> Awaitable[None] | None:
        """Remove these messages (called only at UPDATE); all or nothing where possible."""


class LoginTimes(Protocol):
    """Optional storage capability: each maildrop's last login, for LOGIN-DELAY (RFC 2449).

    Kept where every worker and a restarted server see it (MaildirStorage: a
    file beside the Maildir).  A store without it gets the server's
    in-process table instead.
    """

    def last_login(self, mailbox: str) -> float | Awaitable[float | None] | None:
        """The Unix time of the last login recorded by ``logged_in``; None if none."""

    def logged_in(self, mailbox: str, when: float) -> Awaitable[None] | None:
        """Record a login at Unix time *when* (called while the maildrop is locked)."""


class RetrievalTimes(Protocol):
    """Optional storage capability: when messages were first retrieved, for EXPIRE (RFC 2449).

    Both are called only at UPDATE, while the maildrop is locked (a dropped
    session records nothing): ``expired`` before the deletions, ``retrieved``
    after them (so it can drop the records of the keys just deleted).
    A store without them can still enforce ``EXPIRE 0`` (the session's own
    retrievals), but not a retention of days.
    """

    def retrieved(
        self, mailbox: str, times: Mapping[str, float]
    ) -> Awaitable[None] | None:
        """Record *times* (key -> Unix time of its RETR), crash-safely.

        A key already recorded keeps its older time; records of keys no longer
        in the maildrop may be dropped.
        """

    def expired(
        self, mailbox: str, days: int, now: float
    ) -> Sequence[str] | Awaitable[Sequence[str]]:
        """Keys listed by this session's ``scan`` first retrieved *days* days before *now*."""


@runtime_checkable
class Authenticator(Protocol):
    """Who may log in.  pop3d's ``exists`` and ``lookup``."""

    def exists(self, name: str) -> bool | Awaitable[bool]:
        """Whether *name* is a known user."""

    def lookup(self, name: str) -> Found | Awaitable[Found]:
        """(verifier, mailbox reference) for *name*, or None for an unknown user."""


class UserSettings(Protocol):
    """Optional authenticator capability: per-user overrides of server options.

    ``user_settings(name)`` is asked after *name* has authenticated; the keys
    it may return are ``login_delay`` (seconds, an int) and ``expire`` (days,
    an int, or ``"NEVER"``).  A missing key means the server's option applies.
    ``PasswdFile`` reads them from Dovecot-style extra fields
    (``userdb_pop3_login_delay=60 userdb_pop3_expire=30``).
    """

    def user_settings(self, name: str) -> Mapping[str, Any] | Awaitable[Mapping[str, Any]]:
        """The overrides for *name* (an empty mapping if none)."""
