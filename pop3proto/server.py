"""The server facade (Tcllib pop3d's shape) and the session logic behind it.

``Server`` holds the options (``configure``/``cget``), the live sessions
(``connections``/``connection_state``) and the life cycle (``up``/``down``/
``destroy``); a transport moves the bytes.  ``Session`` answers one
connection's core events through the two callbacks, ``auth`` and
``storage``.

``Session.handle(event)`` is a generator of *steps*, so the same policy runs
under every transport without knowing whether it is threaded or async:

* a ``Response``: ``conn.send`` it, then write ``conn.data_to_send()``;
* a ``Call``: run ``fn(*args)`` (a coroutine result is awaited; anyio runs
  blocking calls in a worker thread) and ``send()`` the result back into the
  generator, or ``throw()`` the exception;
* a ``Sleep``: wait that long (the failed-login delay);
* ``START_TLS``: flush, then run the TLS handshake on this connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import importlib
import inspect
import io
import ipaddress
import itertools
import logging
import os
import secrets
import socket
import ssl
import threading
import time
import unicodedata
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Protocol

from . import sasl as _sasl
from ._config import Config
from ._connection import Connection
from ._events import (
    ApopLogin,
    AuthAborted,
    AuthResponse,
    AuthStart,
    ConnectionClosed,
    Data,
    Disconnect,
    EndOfMessage,
    Err,
    Event,
    Greeting,
    Login,
    LoginAccepted,
    Ok,
    Response,
    RetrieveMessage,
    SaslChallenge,
    StartTLS,
    TopOfMessage,
    Update,
)
from ._maildrop import Maildrop, MessageInfo, valid_uid
from ._state import Phase
from ._writers import WireSizer
from .auth import PlainVerifier, ScramSecret, Verifier, cram_md5_digest, verify_apop
from .storage import MailboxLocked, MailboxRefused, SafeLog

__all__ = [
    "START_TLS",
    "Call",
    "Server",
    "Session",
    "Sleep",
    "Step",
    "TransportHandle",
    "run_call_sync",
]

log = logging.getLogger("pop3proto")


# ------------------------------------------------------------------ steps


@dataclass(frozen=True, slots=True)
class Call:
    """Run ``fn(*args)`` and send the result back (may block: disk, password hash)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait *seconds* before the next step (the failed-login delay)."""

    seconds: float


class _Marker(enum.Enum):
    START_TLS = "START_TLS"


#: Flush, then start the TLS handshake (after the +OK to STLS).
START_TLS = _Marker.START_TLS

Step = Response | Call | Sleep | _Marker
Steps = Generator[Step, Any, None]


def run_call_sync(call: Call) -> Any:
    """Run a Call in this thread; a coroutine result is run to completion."""
    result = call.fn(*call.args)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(value: Any) -> Any:
    return await value


class TransportHandle(Protocol):
    """What a transport's ``start(server)`` returns: a server running in a thread."""

    ports: dict[str, int]

    def stop_listening(self) -> None:
        """Close the listening sockets; live sessions go on."""

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the transport has stopped; True if it did."""


# ------------------------------------------------------------------ pop3d adapters


class _Pop3dAuth:
    """Adapts a pop3d-style ``auth(cmd, name)`` callable (lookup -> (password, mailbox))."""

    def __init__(self, cmd: Callable[..., Any]) -> None:
        self._cmd = cmd

    def exists(self, name: str) -> bool:
        return bool(self._cmd("exists", name))

    def lookup(self, name: str) -> tuple[Verifier, str] | None:
        found = self._cmd("lookup", name)
        if not found:
            return None
        password, mailbox = found
        return PlainVerifier(str(password)), str(mailbox)


class _Pop3dStorage:
    """Adapts a pop3d-style ``storage(cmd, mbox, *args)`` callable to the Storage contract.

    pop3d numbers messages 1..n from ``stat``; ``get`` may return bytes, str
    or a binary stream.  UIDLs come from a ``uidl`` command when the callable
    supports it, else from an MD5 of the message (read once per login).
    """

    def __init__(self, cmd: Callable[..., Any]) -> None:
        self._cmd = cmd

    def lock(self, mailbox: str) -> bool:
        return bool(self._cmd("lock", mailbox))

    def unlock(self, mailbox: str) -> None:
        self._cmd("unlock", mailbox)

    def scan(self, mailbox: str) -> list[MessageInfo]:
        # pop3d's "size" is whatever the callable says (often the LF file size);
        # the listed size must be what RETR sends, so each message is read once
        # here and measured with the core's rule (and hashed when the callable
        # has no "uidl" answer).
        count = int(self._cmd("stat", mailbox))
        out = []
        for n in range(1, count + 1):
            sizer, digest = WireSizer(), hashlib.md5()
            with self.get(mailbox, str(n)) as f:
                for chunk in iter(lambda: f.read(65536), b""):
                    sizer.feed(chunk)
                    digest.update(chunk)
            try:
                uid = self._cmd("uidl", mailbox, n)
            except Exception:
                uid = None
            uid = str(uid) if uid is not None and valid_uid(str(uid)) else digest.hexdigest()
            out.append(MessageInfo(key=str(n), size=sizer.total(), uid=uid))
        return out

    def get(self, mailbox: str, key: str) -> BinaryIO:
        data = self._cmd("get", mailbox, int(key))
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        if isinstance(data, (bytes, bytearray)):
            return io.BytesIO(bytes(data))
        return data  # type: ignore[no-any-return]

    def dele(self, mailbox: str, keys: Sequence[str]) -> None:
        self._cmd("dele", mailbox, [int(k) for k in keys])


# ------------------------------------------------------------------ options


def _is_callable_or_none(v: Any) -> bool:
    return v is None or callable(v)


_OptionCheck = Callable[[Any], bool]


def _t(*types: type) -> _OptionCheck:
    def check(v: Any) -> bool:
        return isinstance(v, types) and not (isinstance(v, bool) and bool not in types)

    check.__doc__ = " or ".join(t.__name__ for t in types)
    return check


def _nonneg(*types: type) -> _OptionCheck:
    base = _t(*types)

    def check(v: Any) -> bool:
        return base(v) and v >= 0

    check.__doc__ = f"non-negative {base.__doc__}"
    return check


def _opt(check: _OptionCheck) -> _OptionCheck:
    def wrapped(v: Any) -> bool:
        return v is None or check(v)

    wrapped.__doc__ = f"{check.__doc__} or None"
    return wrapped


def _cleartext(v: Any) -> bool:
    return v in (True, False, "loopback")


_cleartext.__doc__ = "True, False or 'loopback'"
_any_callable = _is_callable_or_none
_any_callable.__doc__ = "a callable or None"


def _obj(v: Any) -> bool:
    return True


_obj.__doc__ = "an object"


def _port(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535


_port.__doc__ = "a port number 0-65535"


def _names(v: Any) -> bool:
    return v is None or (
        isinstance(v, (tuple, list)) and all(isinstance(x, str) and x for x in v)
    )


_names.__doc__ = "a tuple of names or None"


def _networks(v: Any) -> bool:
    if not isinstance(v, (tuple, list)):
        return False
    try:
        for x in v:
            ipaddress.ip_network(x, strict=False)
    except (ValueError, TypeError):
        return False
    return True


_networks.__doc__ = "a tuple of networks such as '10.0.0.0/8'"

#: name -> (check, default).  pop3d's options plus our limits.
OPTIONS: dict[str, tuple[_OptionCheck, Any]] = {
    "name": (_t(str), "pop3proto"),
    "host": (_t(str), "127.0.0.1"),
    "port": (_port, 110),
    "pop3s_port": (_opt(_port), None),
    "auth": (_obj, None),
    "storage": (_obj, None),
    "socket_factory": (_any_callable, None),
    "ssl_context": (_opt(_t(ssl.SSLContext)), None),
    "tls_cert": (_opt(_t(str)), None),
    "tls_key": (_opt(_t(str)), None),
    "transport": (_t(str), "blocking"),
    "greeting": (_t(str), "POP3 server ready."),
    "hostname": (_t(str), socket.gethostname() or "localhost"),
    "apop": (_t(bool), False),
    "cleartext_auth": (_cleartext, "loopback"),
    "sasl_mechanisms": (_names, None),
    "oauth": (_any_callable, None),
    "utf8": (_t(bool), True),
    "idle_timeout": (_nonneg(int, float), 600.0),
    "login_timeout": (_nonneg(int, float), 60.0),
    "handshake_timeout": (_nonneg(int, float), 30.0),
    "max_connections": (_nonneg(int), 10000),
    "max_connections_per_address": (_nonneg(int), 100),
    "limit_loopback": (_t(bool), False),
    "auth_failure_delay": (_nonneg(int, float), 2.0),
    "auth_failure_delay_max": (_nonneg(int, float), 15.0),
    "login_delay": (_opt(_nonneg(int)), None),
    "expire": (_obj, None),
    "max_line_length": (_nonneg(int), 255),
    "max_bad_commands": (_nonneg(int), 20),
    "max_auth_failures": (_nonneg(int), 3),
    "chunk_size": (_nonneg(int), 64 * 1024),
    "trace": (_any_callable, None),
    "logger": (_t(logging.Logger), log),
    "proxy_protocol": (_t(bool), False),
    "trusted_proxies": (_networks, ()),
    "workers": (_nonneg(int), 1),
}

#: Options that only take effect when the server is next brought up.
_LISTEN_OPTIONS = frozenset(
    {"host", "port", "pop3s_port", "socket_factory", "transport", "workers", "proxy_protocol"}
)


def is_loopback(host: str) -> bool:
    """Whether *host* is a loopback address (127/8, ::1, v4-mapped loopback)."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


# ------------------------------------------------------------------ session


class Session:
    """One connection's policy: answers the core's events through the callbacks.

    Transports create it with ``server.open_session(peer, tls=...)``, send
    the steps of ``greet()``, then feed ``conn`` and run ``handle(event)`` for
    each event, and call ``server.close_session(self)`` at the end (which
    releases the maildrop lock if the session still holds it).
    """

    def __init__(
        self, server: Server, session_id: int, peer: tuple[str, int], *, tls: bool
    ) -> None:
        self.server = server
        self.id = session_id
        self.peer = peer
        self.started = time.time()
        self._t0 = time.monotonic()
        self.last_activity = self._t0
        self.conn = server._connection(peer, tls, session_id)
        self.refused: str | None = None
        self.mailbox: str | None = None
        self.locked = False
        self.user: str | None = None
        #: The last name a login was tried with (for the logout line; never a password).
        self.attempted_user: str | None = None
        self.retr_octets = 0
        self.end_reason = "Disconnected"
        self._apop_ts: str | None = None
        self._mech: _sasl.Mechanism | None = None
        self._scram_user: str | None = None
        self._oauth_failed = False
        self._killer: Callable[[], None] | None = None

    # -- transport hooks

    def set_killer(self, fn: Callable[[], None]) -> None:
        """Register how the transport aborts this connection (``destroy("kill")``)."""
        self._killer = fn

    def kill(self) -> None:
        """Abort the connection without an update (the transport's killer)."""
        self.end_reason = "Killed"
        if self._killer is not None:
            with contextlib.suppress(Exception):
                self._killer()

    def touch(self) -> None:
        """Note client activity (for ``connection_state``)."""
        self.last_activity = time.monotonic()

    def idle_timeout(self) -> float:
        """How long this session may stay silent now: shorter before login."""
        opts = self.server._options
        if self.conn.phase in (Phase.GREETING, Phase.AUTHORIZATION) and opts["login_timeout"]:
            # A deadline, not an idle timer: a byte now and then must not keep a
            # connection that never logs in (pre-login slowloris).
            left = self._t0 + opts["login_timeout"] - time.monotonic()
            return float(max(0.001, min(left, opts["idle_timeout"] or left)))
        return float(opts["idle_timeout"])

    def timed_out(self) -> Disconnect:
        """The response to send when the idle timer fires (no update, RFC 1939)."""
        self.end_reason = "Disconnected for inactivity"
        return Disconnect(text="Disconnected for inactivity.")

    def shutting_down(self) -> Disconnect:
        """The response to send when the server stops (no update)."""
        self.end_reason = "Server shutting down"
        return Disconnect(text="Server shutting down.", code="SYS/TEMP")

    # -- the session logic

    def greet(self) -> Steps:
        """The greeting, or a -ERR [SYS/TEMP] when over a connection limit."""
        if self.refused:
            self.end_reason = f"Refused: {self.refused}"
            yield Err(text=self.refused, code="SYS/TEMP")
            return
        opts = self.server._options
        config = self.conn.config
        if config.apop and opts["auth"] is not None and (config.cleartext_auth or self.conn.tls):
            # Only where APOP is usable now: the timestamp is how clients detect it.
            nonce = secrets.randbelow(1 << 48)
            self._apop_ts = f"<{os.getpid()}.{int(time.time())}.{nonce:x}@{opts['hostname']}>"
        yield Greeting(text=opts["greeting"], apop_timestamp=self._apop_ts)

    def handle(self, event: Event) -> Steps:
        """The steps that answer *event* (see the module docstring)."""
        if isinstance(event, Login):
            yield from self._password_login(event.username, event.password)
        elif isinstance(event, (RetrieveMessage, TopOfMessage)):
            yield from self._send_message(event)
        elif isinstance(event, Update):
            yield from self._update(event)
        elif isinstance(event, AuthStart):
            yield from self._auth_start(event)
        elif isinstance(event, AuthResponse):
            yield from self._auth_step(event.data)
        elif isinstance(event, AuthAborted):
            # The client cancelled with "*": a failed login like any other.
            self._mech, self._scram_user, self._oauth_failed = None, None, False
            yield from self._fail("Authentication aborted.")
        elif isinstance(event, ApopLogin):
            yield from self._apop(event)
        elif isinstance(event, StartTLS):
            if self.server._ssl_context() is None:
                yield Err(text="TLS support isn't enabled.")
                return
            yield Ok()
            yield START_TLS
        elif isinstance(event, ConnectionClosed):
            yield from self._release()

    def _fail(self, text: str = "Authentication failed.") -> Steps:
        delay = self.server._auth_failed(self.peer[0])
        if delay > 0:
            yield Sleep(delay)
        yield Err(text=text, code="AUTH")

    def _lookup(self, name: str) -> Generator[Step, Any, tuple[Verifier, str] | None]:
        penalty = self.server._auth_penalty(self.peer[0])
        if penalty > 0:
            # The last failure from this address has not served its delay (the
            # client hung up on it): no new guess is checked before it has.
            yield Sleep(penalty)
        auth = self.server._auth()
        if not name.isascii():
            name = unicodedata.normalize("NFKC", name)  # as USER after UTF8 does
        if auth is None or not _valid_user(name):
            return None
        try:
            found = yield Call(auth.lookup, (name,))
        except Exception as exc:  # the contract allows any failure of a callback
            self.server._log_error(self, "auth lookup failed", exc)
            return None
        return found  # type: ignore[no-any-return]

    def _password_login(self, name: str, password: str) -> Steps:
        self.attempted_user = name
        found = yield from self._lookup(name)
        if found is None:
            dummy = yield Call(self.server._dummy_verifier)
            if dummy is not None:
                yield Call(dummy.verify, (password,))  # same time as a known user
            yield from self._fail()
            return
        verifier, mailbox = found
        try:
            ok = yield Call(verifier.verify, (password,))
        except Exception as exc:
            self.server._log_error(self, "password verification failed", exc)
            ok = False
        if not ok:
            yield from self._fail()
            return
        yield from self._open(name, mailbox)

    def _apop(self, event: ApopLogin) -> Steps:
        found = yield from self._lookup(event.username)
        secret = found[0].cleartext() if found else None
        if found is None or secret is None or self._apop_ts is None:
            yield from self._fail()
            return
        if not verify_apop(self._apop_ts, secret, event.digest):
            yield from self._fail()
            return
        yield from self._open(event.username, found[1])

    def _auth_start(self, event: AuthStart) -> Steps:
        host = self.server._options["hostname"]
        nonce = secrets.token_urlsafe(18)
        challenge = f"<{secrets.randbelow(1 << 40)}.{int(time.time())}@{host}>".encode()
        self._mech = _sasl.mechanism_for(event.mechanism, nonce=nonce, challenge=challenge)
        self._scram_user = None
        yield from self._auth_step(event.initial_response)

    def _auth_step(self, data: bytes | None) -> Steps:
        mech = self._mech
        if mech is None:  # pragma: no cover - the core only sends AuthResponse mid-exchange
            yield Err(text="No authentication in progress.")
            return
        if self._oauth_failed:
            self._oauth_failed = False
            self._mech = None
            yield from self._fail()
            return
        if self._scram_user is not None:
            # The client acknowledged the SCRAM server-final message.
            name, self._scram_user = self._scram_user, None
            self._mech = None
            found = yield from self._lookup(name)
            if found is None:
                yield from self._fail()
                return
            yield from self._open(name, found[1])
            return
        step = mech.step(data)
        if isinstance(step, _sasl.Challenge):
            yield SaslChallenge(data=step.data)
            return
        if isinstance(step, _sasl.NeedSecret):
            assert isinstance(mech, _sasl.ScramSha256)
            found = yield from self._lookup(step.username)
            secret = (yield Call(found[0].scram)) if found else None
            if secret is None:
                # A decoy, so the exchange looks the same for unknown users
                # (PBKDF2 is slow: a Call, so async transports run it off-loop).
                secret = yield Call(
                    ScramSecret.from_password, (secrets.token_hex(8), b"decoy-salt", 4096)
                )
            yield SaslChallenge(data=mech.server_first(secret).data)
            return
        self._mech = None
        if isinstance(step, _sasl.ScramDone):
            self._scram_user = step.username
            self._mech = mech
            yield SaslChallenge(data=step.server_final)
            return
        if isinstance(step, _sasl.Failure):
            yield from self._fail(step.reason)
            return
        if isinstance(step, _sasl.PasswordCredentials):
            if step.authzid and step.authzid != step.authcid:
                yield from self._fail("Authorization identity not allowed.")
                return
            yield from self._password_login(step.authcid, step.password)
            return
        if isinstance(step, _sasl.CramCredentials):
            found = yield from self._lookup(step.username)
            clear = found[0].cleartext() if found else None
            if (
                found is None
                or clear is None
                or not hmac.compare_digest(cram_md5_digest(step.challenge, clear), step.digest)
            ):
                yield from self._fail()
                return
            yield from self._open(step.username, found[1])
            return
        assert isinstance(step, _sasl.TokenCredentials)
        checker = self.server._options["oauth"]
        ok = False
        if checker is not None:
            try:
                ok = bool((yield Call(checker, (step.username, step.token))))
            except Exception as exc:
                self.server._log_error(self, "oauth check failed", exc)
        found = (yield from self._lookup(step.username)) if ok else None
        if found is None:
            # RFC 7628 s3.2.2: a failure is a JSON challenge the client acknowledges
            # (with 0x01) before the -ERR; clients read "status" to refresh tokens.
            self._oauth_failed = True
            self._mech = mech
            yield SaslChallenge(data=b'{"status":"invalid_token","schemes":"bearer"}')
            return
        yield from self._open(step.username, found[1])

    def _open(self, name: str, mailbox: str) -> Steps:
        """Lock the maildrop and list it; the end of every successful login."""
        storage = self.server._storage()
        self.user = name
        messages: Sequence[MessageInfo] = ()
        if storage is not None:
            try:
                locked = yield Call(storage.lock, (mailbox,))
            except MailboxLocked:
                locked = False
            except MailboxRefused as exc:  # for good, not temporarily: logged
                self.server._log_error(self, "maildrop refused", exc)
                yield Err(text="Mailbox is not accessible.", code="SYS/PERM")
                return
            except Exception as exc:  # any storage failure: [SYS/TEMP], logged
                self.server._log_error(self, "lock failed", exc)
                yield Err(text="Mailbox is temporarily unavailable.", code="SYS/TEMP")
                return
            if not locked:
                yield Err(text="Mailbox is locked by another POP3 session.", code="IN-USE")
                return
            self.mailbox, self.locked = mailbox, True
            try:
                messages = yield Call(storage.scan, (mailbox,))
            except Exception as exc:  # any storage failure: [SYS/TEMP], logged
                self.server._log_error(self, "scan failed", exc)
                yield from self._release()
                yield Err(text="Mailbox is temporarily unavailable.", code="SYS/TEMP")
                return
        self.mailbox = mailbox
        self.server._auth_succeeded(self.peer[0])
        yield LoginAccepted(maildrop=Maildrop(tuple(messages)), username=name)

    def _send_message(self, event: RetrieveMessage | TopOfMessage) -> Steps:
        storage = self.server._storage()
        if storage is None or self.mailbox is None:  # pragma: no cover - empty maildrops
            yield Err(text="No such message.", code="SYS/TEMP")
            return
        try:
            stream = yield Call(storage.get, (self.mailbox, event.key))
        except Exception as exc:  # any storage failure: [SYS/TEMP], logged
            self.server._log_error(self, f"message {event.key} unavailable", exc)
            yield Err(text="Message is temporarily unavailable.", code="SYS/TEMP")
            return
        chunk_size = self.server._options["chunk_size"]
        conn = self.conn
        try:
            yield Ok()
            while conn.wants_more_data:
                try:
                    chunk = yield Call(stream.read, (chunk_size,))
                except Exception as exc:  # after +OK no -ERR is possible: drop the connection
                    self.server._log_error(self, f"reading message {event.key} failed", exc)
                    self.end_reason = "Message read failed"
                    yield Disconnect()
                    return
                if not chunk:
                    break
                if isinstance(event, RetrieveMessage):
                    self.retr_octets += len(chunk)
                yield Data(data=chunk)
            yield EndOfMessage()
        finally:
            with contextlib.suppress(Exception):
                stream.close()

    def _update(self, event: Update) -> Steps:
        storage = self.server._storage()
        if event.deleted and storage is not None and self.mailbox is not None:
            try:
                yield Call(storage.dele, (self.mailbox, event.deleted))
            except Exception as exc:  # any storage failure: [SYS/TEMP], logged
                self.server._log_error(self, "deleting messages failed", exc)
                yield from self._release()
                self.end_reason = "Logged out (deletion failed)"
                yield Err(text="Some messages could not be deleted.", code="SYS/TEMP")
                return
        yield from self._release()
        self.end_reason = "Logged out"
        yield Ok(text="Logging out.")

    def _release(self) -> Steps:
        if self.locked and self.mailbox is not None:
            self.locked = False
            storage = self.server._storage()
            if storage is not None:
                try:
                    yield Call(storage.unlock, (self.mailbox,))
                except Exception as exc:
                    self.server._log_error(self, "unlock failed", exc)

    def release_sync(self) -> None:
        """Release the lock from a transport's cleanup path, in this thread.

        A coroutine ``unlock`` is run with ``asyncio.run``, which cannot work
        from a thread whose event loop is running: async transports release
        through ``handle(ConnectionClosed())`` before ``close_session``.
        """
        for step in self._release():
            if isinstance(step, Call):
                try:
                    run_call_sync(step)
                except Exception as exc:
                    self.server._log_error(self, "unlock failed", exc)

    def state(self) -> dict[str, Any]:
        """What ``Server.connection_state`` reports (never a password)."""
        conn = self.conn
        drop = conn.maildrop
        return {
            "id": self.id,
            "state": conn.phase.value,
            "user": conn.username or self.user,
            "peer": self.peer[0],
            "port": self.peer[1],
            "tls": conn.tls,
            "messages": drop.count if drop else 0,
            "size": drop.octets if drop else 0,
            **conn.stats.as_dict(),
            # The marks (message numbers); the count of messages expunged at
            # UPDATE is "expunged".
            "deleted": sorted(drop.deleted) if drop else [],
            "expunged": conn.stats.deleted,
            "started": self.started,
            "idle": round(time.monotonic() - self.last_activity, 3),
        }

    def summary(self) -> str:
        """Dovecot-style logout line: peer, user, counters, duration; never a password."""
        s = self.conn.stats
        return (
            f"session={self.id} peer={self.peer[0]}:{self.peer[1]} "
            f"user={self.conn.username or self.user or '-'} "
            + (f"tried={self.attempted_user!r} " if self.attempted_user and not self.user else "")
            + f"reason={self.end_reason!r} "
            f"commands={s.commands} retr={s.retrieved}/{self.retr_octets} del={s.deleted} "
            f"in={s.bytes_in} out={s.bytes_out} "
            f"duration={time.monotonic() - self._t0:.3f}s"
        )


def _load_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server context for *cert*/*key* (None without a cert); raises if they don't load."""
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key or None)
    return ctx


def _listen(host: str, port: int) -> socket.socket:
    """The default listener: TCP, SO_REUSEADDR, a deep backlog, dual-stack for '::'."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server(
        (host, port),
        family=family,
        backlog=4096,
        reuse_port=False,
        dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6(),
    )
    return sock


def _valid_user(name: str) -> bool:
    """The rule every login path applies before the authenticator sees a name."""
    return (
        0 < len(name) <= 255
        and ".." not in name
        and not any(c in "/\\" or ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name)
    )


# ------------------------------------------------------------------ server


class Server:
    """A POP3 server: options, life cycle and live sessions (Tcllib pop3d's API).

    ``Server(**options)``; see ``OPTIONS`` for names and defaults.  With no
    ``auth`` every login fails; with no ``storage`` every maildrop is empty.
    """

    def __init__(self, name: str | None = None, **options: Any) -> None:
        self._options: dict[str, Any] = {k: default for k, (_, default) in OPTIONS.items()}
        if name is not None:
            options["name"] = name
        self._lock = threading.RLock()
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._per_address: dict[str, int] = {}
        self._failures: dict[str, tuple[int, float, float]] = {}
        self._state = "down"
        self._handle: TransportHandle | None = None
        self._bound: dict[str, int] = {}
        self._idle = threading.Condition(self._lock)
        self._config_cache: dict[tuple[bool, bool, bool, bool], Config] = {}
        self._tls_context: ssl.SSLContext | None = None
        self._trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.configure(**options)

    # -- options

    def configure(self, **options: Any) -> dict[str, Any] | None:
        """Set options; with no arguments, return every option and its value.

        Raises:
            TypeError: an unknown option, or a value of the wrong type.
            RuntimeError: a listening option changed while the server is up.
        """
        if not options:
            return {k: self.cget(k) for k in OPTIONS}
        for key, value in options.items():
            if key not in OPTIONS:
                raise TypeError(f"unknown option {key!r}")
            check = OPTIONS[key][0]
            if not check(value):
                raise TypeError(f"option {key!r} must be {check.__doc__}, got {value!r}")
            if key == "expire" and value is not None and value != "NEVER" and not (
                isinstance(value, int) and value >= 0
            ):
                raise TypeError(f"option 'expire' must be days or 'NEVER', got {value!r}")
            if key in _LISTEN_OPTIONS and self._state != "down":
                if value != self.cget(key):
                    raise RuntimeError(f"option {key!r} cannot change while the server is up")
                options[key] = self._options[key]  # the bound port reads back as itself
        if callable(options.get("auth")) and not hasattr(options["auth"], "lookup"):
            options["auth"] = _Pop3dAuth(options["auth"])
        if callable(options.get("storage")) and not hasattr(options["storage"], "scan"):
            options["storage"] = _Pop3dStorage(options["storage"])
        if {"tls_cert", "tls_key"} & options.keys():
            # Load first: a certificate that fails to load changes nothing.
            self._tls_context = _load_tls(
                options.get("tls_cert", self._options["tls_cert"]),
                options.get("tls_key", self._options["tls_key"]),
            )
        self._options.update(options)
        self._config_cache.clear()
        self._trusted = iter_networks(self._options["trusted_proxies"])
        return None

    def cget(self, name: str) -> Any:
        """One option's value; ``port`` is the bound port while the server is up."""
        if name not in OPTIONS:
            raise TypeError(f"unknown option {name!r}")
        if name == "port" and "pop3" in self._bound:
            return self._bound["pop3"]
        if name == "pop3s_port" and "pop3s" in self._bound:
            return self._bound["pop3s"]
        return self._options[name]

    def reload_tls(self) -> None:
        """(Re)load ``tls_cert``/``tls_key`` into a fresh context; live sessions keep theirs."""
        self._tls_context = _load_tls(self._options["tls_cert"], self._options["tls_key"])
        self._config_cache.clear()

    def _ssl_context(self) -> ssl.SSLContext | None:
        ctx: ssl.SSLContext | None = self._options["ssl_context"] or self._tls_context
        return ctx

    def ssl_context(self) -> ssl.SSLContext | None:
        """The context new TLS handshakes use (explicit ``ssl_context`` or cert/key)."""
        return self._ssl_context()

    @property
    def state(self) -> str:
        """``down``, ``up`` or ``exiting`` (read-only)."""
        return self._state

    @property
    def logger(self) -> logging.Logger:
        """The configured logger (add handlers here)."""
        logger: logging.Logger = self._options["logger"]
        return logger

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """What sessions and transports write to: the logger, but a failing handler is ignored."""
        return SafeLog(self.logger, {})

    # -- life cycle

    def up(self) -> None:
        """Start listening in a background thread; returns once the ports are bound."""
        with self._lock:
            if self._state == "up":
                return
            if self._state == "exiting":
                raise RuntimeError("server is being destroyed")
        handle: TransportHandle
        if self._options["workers"] > 1:
            from .workers import WorkerPool

            handle = WorkerPool(self, self._options["workers"])
        else:
            module = importlib.import_module(
                f"pop3proto.transports.{self._options['transport']}"
            )
            handle = module.start(self)
        with self._lock:
            self._handle = handle
            self._bound = dict(handle.ports)
            self._state = "up"

    def down(self) -> None:
        """Stop listening; live sessions go on (pop3d ``down``).

        With ``workers`` > 1 the workers own the sessions: ``down`` stops them
        all, like ``destroy("kill")``.
        """
        with self._lock:
            handle = self._handle
            self._state = "down" if self._state == "up" else self._state
        if handle is not None:
            handle.stop_listening()

    def destroy(self, mode: str = "kill", timeout: float | None = 30.0) -> None:
        """Stop the server.  ``kill`` aborts sessions (no updates); ``defer`` lets them finish.

        Blocks until every session has ended (or *timeout* passes).
        """
        if mode not in ("kill", "defer"):
            raise ValueError("mode must be 'kill' or 'defer'")
        with self._lock:
            handle, self._handle = self._handle, None
            self._state = "exiting"
        if handle is not None:
            handle.stop_listening()
        if mode == "kill":
            for session in self.sessions():
                session.kill()
        self.wait_sessions(timeout)
        if handle is not None:
            handle.join(timeout)
        with self._lock:
            self._state = "down"
            self._bound = {}

    def wait_sessions(self, timeout: float | None = None) -> bool:
        """Wait until no session is live; True if none is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._sessions:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def __enter__(self) -> Server:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy("kill")

    def open_listeners(self) -> list[tuple[socket.socket, bool]]:
        """Bind the listening sockets: (socket, implicit TLS?) for ``port`` and ``pop3s_port``.

        ``socket_factory(host, port)`` (pop3d's ``-socket``) makes each one when set.

        Raises:
            OSError: a port is in use or the address is not available.
        """
        opts = self._options
        factory = opts["socket_factory"] or _listen
        out = [(factory(opts["host"], opts["port"]), False)]
        if opts["pop3s_port"] is not None:
            if self._ssl_context() is None:
                for sock, _ in out:
                    sock.close()
                raise ValueError("pop3s_port needs ssl_context or tls_cert/tls_key")
            try:
                out.append((factory(opts["host"], opts["pop3s_port"]), True))
            except OSError:
                out[0][0].close()
                raise
        return out

    def proxy_expected(self) -> bool:
        """Whether connections must start with a PROXY header (``proxy_protocol``)."""
        return bool(self._options["proxy_protocol"])

    def proxy_trusted(self, host: str) -> bool:
        """Whether *host* may send a PROXY header (it is in ``trusted_proxies``)."""
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._trusted)

    # -- connections

    def connections(self) -> list[int]:
        """The ids of the live sessions."""
        with self._lock:
            return list(self._sessions)

    def connection_state(self, session_id: int) -> dict[str, Any]:
        """A session's state, user, peer, counts and deletion marks (KeyError if gone)."""
        with self._lock:
            session = self._sessions[session_id]
        return session.state()

    def sessions(self) -> list[Session]:
        """The live Session objects (for transports and embedding code)."""
        with self._lock:
            return list(self._sessions.values())

    def open_session(self, peer: tuple[str, int], *, tls: bool = False) -> Session:
        """Register a new connection; over a limit the session greets with -ERR and ends."""
        with self._lock:
            sid = next(self._ids)
            session = Session(self, sid, (str(peer[0]), int(peer[1])), tls=tls)
            opts = self._options
            host = session.peer[0]
            counted = opts["limit_loopback"] or not is_loopback(host)
            if self._state == "exiting":
                session.refused = "Server shutting down."
            elif opts["max_connections"] and len(self._sessions) >= opts["max_connections"]:
                session.refused = "Too many connections."
            elif (
                counted
                and opts["max_connections_per_address"]
                and self._per_address.get(host, 0) >= opts["max_connections_per_address"]
            ):
                session.refused = "Too many connections from your address."
            self._sessions[sid] = session
            self._per_address[host] = self._per_address.get(host, 0) + 1
            return session

    def close_session(self, session: Session) -> None:
        """Forget a finished session: release its lock if held, log its summary line."""
        session.release_sync()
        with self._idle:
            if self._sessions.pop(session.id, None) is None:
                return
            host = session.peer[0]
            left = self._per_address.get(host, 1) - 1
            if left > 0:
                self._per_address[host] = left
            else:
                self._per_address.pop(host, None)
            self._idle.notify_all()
        try:
            self.logger.info("%s", session.summary())
        except Exception:  # a failing log handler never kills a session
            pass

    # -- used by Session

    def _connection(self, peer: tuple[str, int], tls: bool, session_id: int) -> Connection:
        opts = self._options
        cleartext = opts["cleartext_auth"]
        plain_ok = bool(cleartext is True or (cleartext == "loopback" and is_loopback(peer[0])))
        auth = opts["auth"]
        key = (
            plain_ok,
            tls,
            bool(getattr(auth, "has_cleartext", True)),
            bool(getattr(auth, "has_scram", False)),
        )
        config = self._config_cache.get(key)
        if config is None:
            config = self._make_config(plain_ok, tls)
            self._config_cache[key] = config
        trace = opts["trace"]
        if trace is not None:
            config = replace(config, trace=lambda d, line: trace(session_id, d, line))
        return Connection(config, tls=tls)

    def _make_config(self, plain_ok: bool, tls: bool) -> Config:
        opts = self._options
        auth = opts["auth"]
        mechs = opts["sasl_mechanisms"]
        if mechs is None:
            mechs = ["PLAIN", "LOGIN"]
            if auth is not None and getattr(auth, "has_cleartext", False):
                mechs.append("CRAM-MD5")
            if auth is not None and getattr(auth, "has_scram", False):
                mechs.append("SCRAM-SHA-256")
            if opts["oauth"] is not None:
                mechs += ["OAUTHBEARER", "XOAUTH2"]
        return Config(
            implementation=opts["name"],
            max_line_length=max(16, opts["max_line_length"]),
            max_bad_commands=max(1, opts["max_bad_commands"]),
            max_auth_failures=max(1, opts["max_auth_failures"]),
            apop=bool(opts["apop"]) and bool(getattr(auth, "has_cleartext", True)),
            sasl_mechanisms=tuple(m.upper() for m in mechs),
            cleartext_auth=plain_ok,
            stls=self._ssl_context() is not None and not tls,
            utf8=opts["utf8"],
            login_delay=opts["login_delay"],
            expire=opts["expire"],
        )

    def _auth(self) -> Any:
        return self._options["auth"]

    def _storage(self) -> Any:
        return self._options["storage"]

    def _dummy_verifier(self) -> Verifier | None:
        factory = getattr(self._options["auth"], "dummy_verifier", None)
        if factory is None:
            return None
        try:
            verifier: Verifier = factory()
        except Exception:
            return None
        return verifier

    def _auth_failed(self, host: str) -> float:
        """Count a failed login from *host*; the delay to apply (2 s doubling to 15 s)."""
        now = time.monotonic()
        with self._lock:
            count, last, _ = self._failures.get(host, (0, now, now))
            if now - last > 300:
                count = 0
            count += 1
            delay = self._delay(count)
            self._failures[host] = (count, now, now + delay)
            if len(self._failures) > 100_000:
                oldest = sorted(self._failures.items(), key=lambda kv: kv[1][1])[:50_000]
                for h, _ in oldest:
                    self._failures.pop(h, None)
        return delay

    def _delay(self, failures: int) -> float:
        """The failed-login delay after *failures* recent failures: base doubling to the cap."""
        base = float(self._options["auth_failure_delay"])
        cap = float(self._options["auth_failure_delay_max"])
        return 0.0 if base <= 0 else float(min(base * 2 ** min(failures - 1, 16), cap))

    def _auth_penalty(self, host: str) -> float:
        """How long a new login attempt from *host* waits before it is checked.

        While *host*'s last failed-login delay is not served (its client hung
        up on it, or attempts run in parallel), each attempt waits for it and
        pushes it on by one more delay, so parallel guesses queue up.
        """
        now = time.monotonic()
        with self._lock:
            entry = self._failures.get(host)
            if entry is None or entry[2] <= now:
                return 0.0
            count, last, until = entry
            self._failures[host] = (count, last, until + self._delay(count))
        return until - now

    def _auth_succeeded(self, host: str) -> None:
        with self._lock:
            self._failures.pop(host, None)

    def _log_error(self, session: Session, what: str, exc: BaseException) -> None:
        try:
            self.logger.warning(
                "session=%s user=%s: %s: %s: %s",
                session.id,
                session.user or "-",
                what,
                type(exc).__name__,
                exc,
            )
        except Exception:
            pass


def iter_networks(values: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Parse network strings (for ``trusted_proxies``)."""
    return [ipaddress.ip_network(v, strict=False) for v in values]
