"""The server's session policy: how one connection's core events are answered, I/O-free.

``Policy.handle(event)`` is a generator of *steps* that the session driver
(``pop3proto.driver``) carries out; nothing else interprets them:

* a ``Response``: sent to the core;
* a ``Call``: the driver hands it to the host (inline, in a thread, or
  awaited) and sends the result back into the generator, or throws the
  exception into it;
* a ``Sleep``: the failed-login delay (the driver keeps reading, so a client
  that hangs up frees its slot at once; the penalty stays with its address);
* ``START_TLS``: flush, then the host runs the TLS handshake.

The policy reaches the server only through ``Services`` (the narrow
interface ``Server`` implements): penalties, configuration, logging,
randomness.  It reads no clock and does no I/O of its own.

RFC 2449's LOGIN-DELAY and EXPIRE are enforced here.  Each has a global
value (the ``login_delay``/``expire`` options, in the session's Config) that
a user's ``auth.user_settings(name)`` may override; the CAPA after login
shows the user's.  LOGIN-DELAY: after the credentials check out, a login
less than the delay after the user's last one gets ``-ERR [LOGIN-DELAY]``
and the maildrop is not locked; the time is kept by the storage
(``last_login``/``logged_in``) or else by the server, in memory.  EXPIRE
(days): at UPDATE the messages the storage reports first retrieved at least
that many days ago (``expired``) are deleted with the client's, then this
session's first RETR times are handed to it (``retrieved``); with
``EXPIRE 0`` every message retrieved is deleted at UPDATE, DELE or not.  A
session that never reaches UPDATE records and deletes nothing.

Its reply texts come from the core's catalog in the session's language (``_t``,
RFC 6856 LANG), so they are byte-identical to the English ones until a client's LANG.
"""

from __future__ import annotations

import enum
import hmac
import unicodedata
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import sasl
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
from ._maildrop import Maildrop, MessageInfo
from .auth import ScramSecret, Verifier, cram_md5_digest, verify_apop
from .storage import MailboxLocked, MailboxRefused, capability, runs_inline

if TYPE_CHECKING:
    from .driver import SessionDriver

__all__ = ["START_TLS", "Call", "Policy", "Sleep", "Step", "valid_user_name"]

#: The most octets of a password any login path hands to a verifier.
MAX_PASSWORD = 1024


@dataclass(frozen=True, slots=True)
class Call:
    """Run ``fn(*args)`` and send the result back; *inline* if it is safe on an event loop."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    inline: bool = False


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


def valid_user_name(name: str) -> bool:
    """The one rule every login path applies before the authenticator sees a name."""
    return (
        0 < len(name) <= 255
        and ".." not in name
        and not any(c in "/\\" or ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name)
    )


def _count(value: Any) -> bool:
    """A non-negative int (not a bool): LOGIN-DELAY seconds, EXPIRE days."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _call(fn: Callable[..., Any], *args: Any) -> Call:
    return Call(fn, args, runs_inline(fn))


class Policy:
    """One session's answers to its core events, through the server's callbacks."""

    def __init__(self, driver: SessionDriver) -> None:
        self.driver = driver
        self.settings = driver.settings
        self.services = driver.services
        self.mailbox: str | None = None
        self.locked = False
        self.user: str | None = None
        #: The last name a login was tried with (for logs; never a password).
        self.attempted_user: str | None = None
        self.method: str | None = None
        self.auth_failures = 0
        self.retr = [0, 0]
        self.top = [0, 0]
        #: LOGIN-DELAY seconds and EXPIRE days in force for the logged-in user.
        self.login_delay: int | None = None
        self.expire: int | str | None = None
        #: key -> Unix time of its first RETR in this session (for EXPIRE).
        self.retrieved: dict[str, float] = {}
        self._apop_ts: str | None = None
        self._mech: sasl.Mechanism | None = None
        self._scram_user: str | None = None
        self._oauth_failed = False

    def _t(self, msg_id: str) -> str:
        """The reply text *msg_id* in the session's language (the Connection's catalog)."""
        return self.driver.conn.text(msg_id)

    # -- greeting

    def greet(self) -> Steps:
        """Make the Connection (its config may need the authenticator), then greet."""
        driver, settings = self.driver, self.settings
        auth = settings.auth
        try:
            config = yield Call(
                self.services.session_config,
                (driver.peer[0], driver.tls, driver.id),
                auth is None or runs_inline(getattr(auth, "lookup", None)),
            )
        except Exception as exc:  # the host could not run it (no thread under a task limit)
            driver.log_error("session set-up failed", exc)
            driver.end_reason = "Set-up failed"
            yield Disconnect(text=self._t("server_busy"), code="SYS/TEMP")
            return
        driver.attach(config)
        if config.apop and (config.cleartext_auth or driver.tls):
            # Only where APOP is usable now: the timestamp is how clients detect it.
            self._apop_ts = (
                f"<{self.services.nonce()}.{int(self.services.wall_clock())}"
                f"@{settings.hostname}>"
            )
        yield Greeting(text=settings.greeting, apop_timestamp=self._apop_ts)

    # -- events

    def handle(self, event: Event) -> Steps:
        """The steps that answer *event*."""
        if isinstance(event, Login):
            self.method = "USER"
            yield from self._password_login(event.username, event.password)
        elif isinstance(event, (RetrieveMessage, TopOfMessage)):
            yield from self._send_message(event)
        elif isinstance(event, Update):
            yield from self._update(event)
        elif isinstance(event, AuthStart):
            self.method = event.mechanism
            yield from self._auth_start(event)
        elif isinstance(event, AuthResponse):
            yield from self._auth_step(event.data)
        elif isinstance(event, ApopLogin):
            self.method = "APOP"
            yield from self._apop(event)
        elif isinstance(event, StartTLS):
            if self.services.ssl_context() is None:
                yield Err(text=self._t("stls_disabled"))
                return
            yield Ok()
            yield START_TLS
        elif isinstance(event, AuthAborted):
            yield from self.aborted()
        elif isinstance(event, ConnectionClosed):
            yield from self.release()
        else:  # an event this policy does not know: refuse it, never leave it pending
            yield Err(text=self._t("not_supported"))

    # -- logins

    def _fail(self, reason: str, msg_id: str = "auth_failed", text: str = "") -> Steps:
        """A failed login: counted, logged with *reason*, delayed, then ``-ERR [AUTH]``.

        The client sees *text* if given (a SASL mechanism's reason, put in
        the session's language when the catalog knows it), else *msg_id*.
        """
        driver = self.driver
        self.auth_failures += 1
        delay = self.services.login_failed(driver.peer[0], driver.now)
        driver.log_login_failed(reason, delay)
        if delay > 0:
            yield Sleep(delay)
        text = self.driver.conn.localize(text) if text else self._t(msg_id)
        yield Err(text=text, code="AUTH")

    def _unavailable(self, what: str, exc: BaseException) -> Steps:
        """An authenticator failure: [SYS/TEMP], logged, never counted as a failed login."""
        self.driver.log_error(what, exc)
        yield Err(text=self._t("auth_unavailable"), code="SYS/TEMP")

    def _lookup(self, name: str) -> Generator[Step, Any, tuple[Verifier, str] | None]:
        """The (verifier, mailbox) for *name*, None if unknown; raises what lookup raised."""
        driver = self.driver
        self.attempted_user = name
        wait = self.services.login_wait(driver.peer[0], driver.now)
        if wait > 0:
            # Earlier failures from this address have not served their delays:
            # this guess waits its turn (parallel guesses queue up).
            yield Sleep(wait)
        auth = self.settings.auth
        if not name.isascii():
            name = unicodedata.normalize("NFKC", name)  # as USER after UTF8 does
        if auth is None or not valid_user_name(name):
            return None
        found = yield _call(auth.lookup, name)
        return found  # type: ignore[no-any-return]

    def _password_login(self, name: str, password: str) -> Steps:
        try:
            found = yield from self._lookup(name)
        except Exception as exc:  # the contract allows any failure of a callback
            yield from self._unavailable("auth lookup failed", exc)
            return
        if len(password.encode("utf-8", "surrogateescape")) > MAX_PASSWORD:
            yield from self._fail("password too long")
            return
        if found is None:
            dummy = self.settings.dummy_verifier
            if dummy is not None:
                with_dummy = yield _call(dummy)
                if with_dummy is not None:
                    try:  # same time as a known user; the answer is ignored
                        yield _call(with_dummy.verify, password)
                    except Exception:
                        pass
            yield from self._fail("unknown user")
            return
        verifier, mailbox = found
        try:
            ok = yield _call(verifier.verify, password)
        except Exception as exc:
            yield from self._unavailable("password verification failed", exc)
            return
        if not ok:
            yield from self._fail("password mismatch")
            return
        yield from self._open(name, mailbox)

    def _apop(self, event: ApopLogin) -> Steps:
        try:
            found = yield from self._lookup(event.username)
        except Exception as exc:
            yield from self._unavailable("auth lookup failed", exc)
            return
        secret = found[0].cleartext() if found else None
        if found is None:
            yield from self._fail("unknown user")
        elif secret is None or self._apop_ts is None:
            yield from self._fail("no cleartext secret for APOP")
        elif not verify_apop(self._apop_ts, secret, event.digest):
            yield from self._fail("password mismatch")
        else:
            yield from self._open(event.username, found[1])

    def _auth_start(self, event: AuthStart) -> Steps:
        services = self.services
        challenge = (
            f"<{services.nonce()}.{int(services.wall_clock())}@{self.settings.hostname}>"
        ).encode()
        self._mech = sasl.mechanism_for(event.mechanism, nonce=services.nonce(),
                                        challenge=challenge)
        self._scram_user = None
        yield from self._auth_step(event.initial_response)

    def aborted(self) -> Steps:
        """The client cancelled a SASL exchange with ``*``: a failed login like any other."""
        self._mech = None
        self._scram_user = None
        self._oauth_failed = False
        yield from self._fail("aborted", "auth_aborted")

    def _auth_step(self, data: bytes | None) -> Steps:
        mech = self._mech
        if mech is None:  # pragma: no cover - the core only sends AuthResponse mid-exchange
            yield Err(text=self._t("no_auth_in_progress"))
            return
        try:
            yield from self._sasl_step(mech, data)
        except _Unavailable as exc:
            self._mech = None
            yield from self._unavailable("auth lookup failed", exc.__cause__ or exc)

    def _found(self, name: str) -> Generator[Step, Any, tuple[Verifier, str] | None]:
        try:
            return (yield from self._lookup(name))
        except Exception as exc:
            raise _Unavailable() from exc

    def _sasl_step(self, mech: sasl.Mechanism, data: bytes | None) -> Steps:
        if self._oauth_failed:
            self._oauth_failed = False
            self._mech = None
            yield from self._fail("invalid token")
            return
        if self._scram_user is not None:
            # The client acknowledged the SCRAM server-final message.
            name, self._scram_user = self._scram_user, None
            self._mech = None
            found = yield from self._found(name)
            if found is None:
                yield from self._fail("unknown user")
                return
            yield from self._open(name, found[1])
            return
        step = mech.step(data)
        if isinstance(step, sasl.Challenge):
            yield SaslChallenge(data=step.data)
            return
        if isinstance(step, sasl.NeedSecret):
            assert isinstance(mech, sasl.ScramSha256)
            found = yield from self._found(step.username)
            secret: ScramSecret | None = (yield _call(found[0].scram)) if found else None
            if secret is None:
                # A decoy, so the exchange looks the same for unknown users.
                secret = yield self._decoy(step.username)
            yield SaslChallenge(data=mech.server_first(secret).data)
            return
        self._mech = None
        if isinstance(step, sasl.ScramDone):
            self._scram_user = step.username
            self._mech = mech
            yield SaslChallenge(data=step.server_final)
            return
        if isinstance(step, sasl.Failure):
            self.attempted_user = self.attempted_user or None
            yield from self._fail(step.reason.rstrip(".").lower() or "failed", text=step.reason)
            return
        if isinstance(step, sasl.PasswordCredentials):
            if step.authzid and step.authzid != step.authcid:
                self.attempted_user = step.authcid
                yield from self._fail("authorization identity not allowed",
                                      "authzid_not_allowed")
                return
            yield from self._password_login(step.authcid, step.password)
            return
        if isinstance(step, sasl.CramCredentials):
            found = yield from self._found(step.username)
            clear = found[0].cleartext() if found else None
            if found is None:
                yield from self._fail("unknown user")
            elif clear is None or not hmac.compare_digest(
                cram_md5_digest(step.challenge, clear), step.digest
            ):
                yield from self._fail("password mismatch")
            else:
                yield from self._open(step.username, found[1])
            return
        assert isinstance(step, sasl.TokenCredentials)
        checker = self.settings.oauth
        ok = False
        if checker is not None:
            try:
                ok = bool((yield _call(checker, step.username, step.token)))
            except Exception as exc:
                self.driver.log_error("oauth check failed", exc)
        found = (yield from self._found(step.username)) if ok else None
        if found is None:
            self.attempted_user = step.username
            # RFC 7628 s3.2.2: a failure is a JSON challenge the client acknowledges
            # (with 0x01) before the -ERR; clients read "status" to refresh tokens.
            self._oauth_failed = True
            self._mech = mech
            yield SaslChallenge(data=b'{"status":"invalid_token","schemes":"bearer"}')
            return
        yield from self._open(step.username, found[1])

    def _decoy(self, name: str) -> Call:
        """A Call that gives the SCRAM secret to answer an unknown *name* with."""
        auth = self.settings.auth
        decoy = capability(auth, "decoy_scram")
        if decoy is not None:  # per-name salts from the authenticator's secret
            return _call(decoy, name)
        return Call(self.services.decoy_scram, (name,), True)

    def _user_settings(self, name: str) -> Generator[Step, Any, Mapping[str, Any] | None]:
        """The user's overrides (``auth.user_settings``), checked; None if they failed."""
        auth = self.settings.auth
        get = capability(auth, "user_settings")
        if get is None:
            return {}
        if not name.isascii():
            name = unicodedata.normalize("NFKC", name)  # the name lookup was asked with
        try:
            found = yield _call(get, name)
            settings: Mapping[str, Any] = found or {}
            delay, expire = settings.get("login_delay"), settings.get("expire")
            if not (delay is None or _count(delay)) or not (
                expire is None or expire == "NEVER" or _count(expire)
            ):
                raise ValueError(f"bad user settings {dict(settings)!r}")
        except Exception as exc:
            self.driver.log_error("user settings lookup failed", exc)
            return None
        return settings

    def _login_times(self) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
        """(last_login, logged_in): the storage's if it keeps them, else the server's."""
        storage = self.settings.storage
        last, record = capability(storage, "last_login"), capability(storage, "logged_in")
        if last is not None and record is not None:
            return last, record
        return self.services.last_login, self.services.logged_in

    def _open(self, name: str, mailbox: str) -> Steps:
        """Apply LOGIN-DELAY, lock the maildrop and list it; the end of every successful login."""
        storage = self.settings.storage
        driver = self.driver
        self.user = name
        overrides = yield from self._user_settings(name)
        if overrides is None:
            self.user = None
            yield Err(text=self._t("auth_unavailable"), code="SYS/TEMP")
            return
        config = driver.conn.config
        delay = overrides.get("login_delay", config.login_delay)
        self.login_delay, self.expire = delay, overrides.get("expire", config.expire)
        times = self._login_times() if delay else None
        now = self.services.wall_clock()
        if times is not None:
            try:
                last = yield _call(times[0], mailbox)
            except Exception as exc:  # a load limit, not a safeguard: the login goes on
                driver.log_error("reading the last login time failed", exc)
                last = None
            if last is not None and 0 <= now - last < delay:
                # Only after the credentials checked out: it tells a guesser nothing.
                self.user = None
                driver.log_login_failed("login delay", 0.0)
                text = driver.conn.text("login_delay", seconds=delay)
                yield Err(text=text, code="LOGIN-DELAY")
                return
        messages: Sequence[MessageInfo] = ()
        if storage is not None:
            try:
                locked = yield _call(storage.lock, mailbox)
            except MailboxLocked:
                locked = False
            except MailboxRefused as exc:  # for good, not temporarily: logged
                driver.log_error("maildrop refused", exc)
                self.user = None
                yield Err(text=self._t("mailbox_refused"), code="SYS/PERM")
                return
            except Exception as exc:  # any storage failure: [SYS/TEMP], logged
                driver.log_error("lock failed", exc)
                self.user = None
                yield Err(text=self._t("mailbox_unavailable"), code="SYS/TEMP")
                return
            if not locked:
                self.user = None
                driver.log_login_failed("mailbox in use", 0.0)
                yield Err(text=self._t("mailbox_locked"), code="IN-USE")
                return
            self.mailbox, self.locked = mailbox, True
            try:
                messages = yield _call(storage.scan, mailbox)
            except Exception as exc:  # any storage failure: [SYS/TEMP], logged
                driver.log_error("scan failed", exc)
                yield from self.release()
                self.user = None
                yield Err(text=self._t("mailbox_unavailable"), code="SYS/TEMP")
                return
        self.mailbox = mailbox
        if times is not None:
            try:
                yield _call(times[1], mailbox, now)
            except Exception as exc:
                driver.log_error("recording the login time failed", exc)
        driver.log_login()
        yield LoginAccepted(
            maildrop=Maildrop(tuple(messages)),
            username=name,
            login_delay=overrides.get("login_delay"),
            expire=overrides.get("expire"),
        )

    # -- TRANSACTION

    def _send_message(self, event: RetrieveMessage | TopOfMessage) -> Steps:
        storage = self.settings.storage
        if storage is None or self.mailbox is None:  # pragma: no cover - empty maildrops
            yield Err(text=self._t("no_such_message"), code="SYS/TEMP")
            return
        try:
            stream = yield _call(storage.get, self.mailbox, event.key)
        except Exception as exc:  # any storage failure: [SYS/TEMP], logged
            self.driver.log_error(f"message {event.key} unavailable", exc)
            yield Err(text=self._t("message_temporarily_unavailable"), code="SYS/TEMP")
            return
        chunk_size = self.settings.chunk_size
        conn = self.driver.conn
        read = Call(stream.read, (chunk_size,), self.settings.inline_reads)
        counter = self.retr if isinstance(event, RetrieveMessage) else self.top
        try:
            yield Ok()
            # The octets on the wire for the message's lines (CRLF, dot-stuffed, TOP's
            # cut applied), without the status line and the terminator, for the logs.
            start = conn.stats.bytes_out + conn.buffered_output
            while conn.wants_more_data:
                try:
                    chunk = yield read
                except Exception as exc:  # after +OK no -ERR is possible: drop the connection
                    self.driver.log_error(f"reading message {event.key} failed", exc)
                    self.driver.end_reason = "Message read failed"
                    yield Disconnect()
                    return
                if not chunk:
                    break
                yield Data(data=chunk)
            sent = conn.stats.bytes_out + conn.buffered_output - start
            yield EndOfMessage()
            if isinstance(event, RetrieveMessage):
                self.retrieved.setdefault(event.key, self.services.wall_clock())
            counter[0] += 1
            counter[1] += sent
        finally:
            try:
                stream.close()
            except Exception:
                pass

    def _expired(self) -> Generator[Step, Any, list[str]]:
        """The keys EXPIRE deletes at this UPDATE, with the client's (read only)."""
        storage, mailbox, days = self.settings.storage, self.mailbox, self.expire
        if storage is None or mailbox is None or not isinstance(days, int):
            return []
        keys = list(self.retrieved) if days == 0 else []
        find = capability(storage, "expired")
        if find is not None:
            try:
                keys += (yield _call(find, mailbox, days, self.services.wall_clock()))
            except Exception as exc:  # nothing expires this time
                self.driver.log_error("finding expired messages failed", exc)
        return keys

    def _record(self, expired: Sequence[str]) -> Steps:
        """Hand this session's first-RETR times to the storage (after the deletions)."""
        storage, mailbox = self.settings.storage, self.mailbox
        record = capability(storage, "retrieved")
        if (
            record is None
            or mailbox is None
            or not isinstance(self.expire, int)
            or not (self.retrieved or expired)  # else nothing to add, nor to drop
        ):
            return
        try:
            yield _call(record, mailbox, dict(self.retrieved))
        except Exception as exc:  # not recorded: kept longer, never deleted sooner
            self.driver.log_error("recording retrievals failed", exc)

    def _update(self, event: Update) -> Steps:
        storage = self.settings.storage
        expired = yield from self._expired()
        deleted = list(dict.fromkeys([*event.deleted, *expired]))
        if deleted and storage is not None and self.mailbox is not None:
            try:
                yield _call(storage.dele, self.mailbox, deleted)
            except Exception as exc:  # any storage failure: [SYS/TEMP], logged
                self.driver.log_error("deleting messages failed", exc)
                yield from self._record(expired)
                yield from self.release()
                self.driver.end_reason = "Logged out (deletion failed)"
                yield Err(text=self._t("some_not_deleted"), code="SYS/TEMP")
                return
        # After the deletions: a crash in between loses this session's times
        # (messages kept longer), never deletes sooner; gone keys are dropped.
        yield from self._record(expired)
        yield from self.release()
        self.driver.end_reason = "Logged out"
        yield Ok(text=self._t("logging_out"))

    def release(self) -> Steps:
        """Unlock the maildrop if this session holds it (every end of a session runs this)."""
        if self.locked and self.mailbox is not None:
            storage = self.settings.storage
            if storage is not None:
                try:
                    yield _call(storage.unlock, self.mailbox)
                except Exception as exc:
                    self.driver.log_error("unlock failed", exc)
            self.locked = False  # only now: steps abandoned mid-call release again


class _Unavailable(Exception):
    """The authenticator failed during a SASL exchange (carried as ``__cause__``)."""
