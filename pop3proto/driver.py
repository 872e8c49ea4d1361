"""The session driver: pop3proto's whole server policy for one connection, in any event loop.

A ``SessionDriver`` owns everything between the socket and the server's
callbacks: the greeting, feeding bytes to the core, the ``next_event`` loop,
PAUSED and back-pressure, one flush policy, callback calls, failed-login
delays, the switch to TLS, idle and login deadlines, the final line, the end
reason, the log lines and the maildrop lock's release.  It does no I/O and
reads no clock: the host (a transport, or your own loop) asks it what to do
next and does it::

    driver = SessionDriver(server, peer, tls=False, now=clock())
    while True:
        action = driver.next_action(clock())
        if action is RECEIVE:      # read, but give up at driver.deadline
            data = read_until(driver.deadline)        # None on time-out
            if data is not None:
                driver.receive_data(data)             # b"" at end of input
        elif isinstance(action, Write):
            write_all(action.data)                    # give up at driver.deadline
        elif isinstance(action, Call):                # inline, in a thread, or awaited
            try:
                driver.call_done(run(action))
            except Exception as exc:
                driver.call_failed(exc)
        elif action is START_TLS:
            handshake(driver.ssl_context, until=driver.deadline)
        else:                                         # CLOSE
            close_socket()
            break

Any I/O failure (a reset, a write that timed out, a failed handshake) is
reported with ``connection_lost()``; keep asking for actions after it: the
driver still runs the calls that release the maildrop lock, then says
CLOSE.  ``shutdown()`` (from the host's own thread or task) ends the
session with ``-ERR [SYS/TEMP]`` and no update.

The flush rule: the driver hands out bytes in ``Write`` actions before every
wait (RECEIVE, a failed-login delay, the TLS handshake, CLOSE) and whenever
64 KiB of a message are ready, so all the replies to one read of pipelined
commands leave in one write.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ._config import Config
from ._connection import NEED_DATA, PAUSED, Connection
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import ConnectionClosed, Disconnect, Err, Event, Response
from ._state import Phase
from .policy import START_TLS as _START_TLS_STEP
from .policy import Call, Policy, Sleep, Steps

__all__ = [
    "CLOSE",
    "RECEIVE",
    "START_TLS",
    "Call",
    "Services",
    "SessionDriver",
    "Settings",
    "Write",
]


class _Action(enum.Enum):
    RECEIVE = "RECEIVE"
    START_TLS = "START_TLS"
    CLOSE = "CLOSE"


#: Read from the client (report with ``receive_data``); give up at ``deadline``.
RECEIVE = _Action.RECEIVE
#: Run the server-side TLS handshake with ``ssl_context``; give up at ``deadline``.
START_TLS = _Action.START_TLS
#: Close the connection; the session is over (every later call says CLOSE again).
CLOSE = _Action.CLOSE


@dataclass(frozen=True, slots=True)
class Write:
    """Write all of *data* to the client, then ask for the next action."""

    data: bytes


Action = Write | Call | _Action

#: Octets of a message that are handed out at once (one write per chunk).
FLUSH_AT = 64 * 1024
#: Seconds the last bytes of an ending session (a goodbye) may take to write.
FINAL_WAIT = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """What a session needs from the server's options, taken once when the session starts."""

    auth: Any
    storage: Any
    greeting: str
    hostname: str
    oauth: Callable[[str, str], Any] | None
    chunk_size: int
    idle_timeout: float
    login_timeout: float
    handshake_timeout: float
    #: ``auth.dummy_verifier`` when the authenticator offers one.
    dummy_verifier: Callable[[], Any] | None
    #: Streams from ``storage.get`` may be read on the event loop.
    inline_reads: bool


class Services(Protocol):
    """The narrow interface a driver uses to reach its server (``Server`` implements it)."""

    def session_settings(self) -> Settings:
        """The settings for a session starting now."""

    def session_config(self, host: str, tls: bool, session_id: str) -> Config:
        """The core's Config for a client at *host* (capabilities depend on TLS and address)."""

    def register(self, driver: SessionDriver) -> str | None:
        """Count a new session; a refusal text when over a limit or shutting down."""

    def unregister(self, driver: SessionDriver) -> None:
        """Forget an ended session (its slot is free again)."""

    def login_wait(self, host: str, now: float) -> float:
        """Seconds a login attempt from *host* waits before it is checked."""

    def login_failed(self, host: str, now: float) -> float:
        """Count a failed login from *host*; the delay to serve before answering."""

    def log_event(self, level: int, fields: dict[str, Any]) -> None:
        """Log one session event (``fields["event"]`` says which; see ``pop3proto.ops.logfmt``)."""

    def decoy_scram(self, name: str) -> Any:
        """A SCRAM secret for an unknown *name*: the same for the same name, cheap."""

    def last_login(self, mailbox: str) -> float | None:
        """When *mailbox* last logged in (LOGIN-DELAY), for stores that keep no such time."""

    def logged_in(self, mailbox: str, when: float) -> None:
        """Record a login of *mailbox* at *when* (wall-clock seconds)."""

    def nonce(self) -> str:
        """A fresh random token (APOP timestamps, SASL nonces)."""

    def wall_clock(self) -> float:
        """Seconds since the epoch (for APOP timestamps only)."""

    def ssl_context(self) -> Any:
        """The ``ssl.SSLContext`` for new handshakes, or None without TLS."""

    def next_session_id(self) -> str:
        """A session id unique across the server's processes (``"<pid>-<n>"``)."""


_INFO, _WARNING = 20, 30
#: The Config of a session's Connection until the real one is attached (or it is refused).
_BEFORE_GREETING = Config(sasl_mechanisms=())
#: Input octets a client may send during a failed-login delay before it is cut off.
_MAX_INPUT_WHILE_DELAYED = 64 * 1024
_FINAL_STATES = (Phase.CLOSED, Phase.ERROR)


class SessionDriver:
    """One connection's session, driven by a host through actions (see the module doc).

    Args:
        services: the server (``pop3proto.server.Server``) or anything
            implementing ``Services``.
        peer: the client's (address, port).
        tls: True for implicit TLS: the first action is START_TLS.
        now: the host's monotonic clock, in seconds.
    """

    def __init__(
        self, services: Services, peer: tuple[str, int], *, tls: bool = False, now: float
    ) -> None:
        self.services = services
        self.settings = services.session_settings()
        self.peer = (str(peer[0]), int(peer[1]))
        self.id = services.next_session_id()
        self.tls = tls
        self.now = now
        self.started = now
        self.conn: Connection = Connection(_BEFORE_GREETING, tls=tls)  # attach() replaces it
        self.policy = Policy(self)
        #: Why the session ended, for the logout line.
        self.end_reason = "Connection closed"
        self._steps: Steps | None = None
        self._value: Any = None
        self._error: BaseException | None = None
        self._in_call = False
        self._sleep_until: float | None = None
        self._last_activity = now
        self._touched = False
        self._eof = False
        self._sleep_input = 0
        self._pending_shutdown: str | None = None  # "" for the default text
        self._releasing = False
        self._lost = False
        self._ending = False
        self._closed = False
        self._handshaking = tls
        self._tls_due = tls
        self._greeted = False
        self._refused = services.register(self)
        self._registered = True
        if self._refused is not None:
            self._tls_due = self._handshaking = False
            self.end_reason = f"Refused: {self._refused}"
            self.conn.send(Err(text=self._refused, code="SYS/TEMP"))
            self._ending = True

    # ------------------------------------------------------------------ for hosts

    @property
    def refused(self) -> str | None:
        """The refusal text when the session was refused at once (over a limit)."""
        return self._refused

    @property
    def closed(self) -> bool:
        """Whether the session is over (the host has been told CLOSE)."""
        return self._closed

    @property
    def delaying(self) -> bool:
        """Whether a failed-login delay is running (RECEIVE then only watches for a hang-up)."""
        return self._sleep_until is not None

    @property
    def ssl_context(self) -> Any:
        """The context to run the START_TLS handshake with."""
        return self.services.ssl_context()

    @property
    def partial_line(self) -> bool:
        """Whether the client has sent part of a line (ACK at once: TCP_QUICKACK)."""
        return self.conn.partial_line

    @property
    def deadline(self) -> float | None:
        """When the host must ask for the next action even if nothing happened."""
        if self._closed or self._in_call:
            return None
        if self._sleep_until is not None:
            return self._sleep_until
        if self._handshaking:
            t = self.settings.handshake_timeout
            return self._last_activity + t if t else None
        if self._ending or self._lost:  # the last bytes and the lock's release
            return self._last_activity + FINAL_WAIT
        return self._idle_deadline()

    def _idle_deadline(self) -> float | None:
        settings = self.settings
        idle = settings.idle_timeout
        if self.conn.phase in (Phase.GREETING, Phase.AUTHORIZATION) and settings.login_timeout:
            # A deadline from connect, not an idle timer: a byte now and then must not
            # keep a connection that never logs in (pre-login slowloris).
            login = self.started + settings.login_timeout
            return min(login, self._last_activity + idle) if idle else login
        return self._last_activity + idle if idle else None

    def receive_data(self, data: bytes) -> None:
        """Report bytes read from the client; ``b""`` at end of input."""
        self._touched = True
        if not data:
            self._eof = True
        elif self._sleep_until is not None:
            self._sleep_input += len(data)
        if not self._lost and not self._ending:
            self.conn.receive_data(data)

    def call_done(self, value: Any = None) -> None:
        """Report what the last Call returned."""
        self._in_call = False
        self._value, self._error = value, None

    def call_failed(self, exc: BaseException) -> None:
        """Report what the last Call raised."""
        self._in_call = False
        self._value, self._error = None, exc

    def tls_started(self) -> None:
        """Report that the START_TLS handshake succeeded."""
        self._handshaking = False
        self.tls = True
        self._touched = True

    def connection_lost(self, exc: BaseException | None = None) -> None:
        """Report that the connection failed (reset, write time-out, handshake failure).

        Keep asking for actions: the lock is released through Calls, then CLOSE.
        """
        if self._lost or self._closed:
            return
        self._lost = True
        if self._handshaking:
            self._handshaking = False
            self._log(_INFO, "tls_failed", reason=str(exc) if exc else "failed")
            self.end_reason = "TLS handshake failed"
        elif self.end_reason == "Connection closed" and self.conn.phase not in _FINAL_STATES:
            self.end_reason = "Connection lost"
        self.conn.send_failed()
        if not self._in_call:  # else the call's result (a lock taken?) is seen first
            self._abandon_steps()

    def shutdown(self, text: str | None = None) -> None:
        """End the session now, without an update: ``-ERR [SYS/TEMP] text`` where possible.

        The text is "Server shutting down." in the session's language by default.
        """
        if self._closed or self._ending:
            return
        if self._in_call:  # the call's result is taken in first (a lock taken is released)
            self._pending_shutdown = text or ""
            return
        if self._handshaking:  # no line can be sent in the middle of a handshake
            self.connection_lost(ConnectionAbortedError("server shutting down"))
            self.end_reason = "Server shutting down"
            return
        self.end_reason = "Server shutting down"
        text = text if text is not None else self.conn.text("shutting_down")
        self._say_goodbye(Disconnect(text=text, code="SYS/TEMP"))

    def next_action(self, now: float) -> Action:
        """What the host must do next (see the module doc).

        Raises:
            LocalProtocolError: asked again while a Call is outstanding.
        """
        self.now = now
        if self._touched:
            self._touched = False
            self._last_activity = now
        if self._in_call:
            raise LocalProtocolError("report the last Call with call_done/call_failed first")
        while True:
            if self._closed:
                return CLOSE
            if self._pending_shutdown is not None and self._steps is None:
                text, self._pending_shutdown = self._pending_shutdown, None
                self.shutdown(text or None)
            if self._tls_due:
                out = self._out()
                if out is not None:
                    return out
                self._tls_due = False
                self._handshaking = True
                self._last_activity = now
                return START_TLS
            if self._handshaking:
                if self._expired(now):
                    self.connection_lost(TimeoutError("TLS handshake timed out"))
                    continue
                raise LocalProtocolError("report the handshake with tls_started/connection_lost")
            if self._sleep_until is not None:
                if self._sleep_input > _MAX_INPUT_WHILE_DELAYED and not self._lost:
                    self.end_reason = "Too much input during a failed-login delay"
                    self._say_goodbye(Disconnect(text=self.conn.text("too_much_input"), code=None))
                    continue
                if self._eof or self._lost:
                    # The client hung up during a failed-login delay: free its slot
                    # now (the penalty stays with its address).
                    self._sleep_until = None
                    self.end_reason = "Disconnected during a failed-login delay"
                    self._abandon_steps()
                    self._lost = True
                    continue
                if now < self._sleep_until:
                    return self._out() or RECEIVE
                self._sleep_until = None
                self._sleep_input = 0
                self._last_activity = now
            if self._steps is not None:
                action = self._step()
                if action is not None:
                    return action
                continue
            if self._ending or self._lost:
                return self._finish()
            if not self._greeted:
                self._greeted = True
                self._steps = self.policy.greet()
                continue
            if self._expired(now):
                self._timed_out()
                continue
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:  # the core queued its final -ERR
                self.end_reason = f"Protocol error: {exc}"
                self._ending = True
                continue
            if event is NEED_DATA:
                return self._out() or RECEIVE
            if event is PAUSED:
                if self.conn.pending is not None:  # pragma: no cover - a policy bug
                    raise LocalProtocolError(f"event left unanswered: {self.conn.pending!r}")
                out = self._out()
                if out is None:  # pragma: no cover - PAUSED with nothing to drain
                    raise LocalProtocolError("PAUSED with nothing to write")
                return out
            assert isinstance(event, Event)
            if isinstance(event, ConnectionClosed):
                if self.end_reason == "Connection closed":
                    if self._eof:
                        self.end_reason = "Connection closed by client"
                    elif self.conn.stats.auth_failures >= self.conn.config.max_auth_failures:
                        self.end_reason = "Too many failed logins"
                    else:  # QUIT before login
                        self.end_reason = "Logged out"
                self._ending = True
                continue
            self._steps = self.policy.handle(event)

    # ------------------------------------------------------------------ internals

    def attach(self, config: Config) -> None:
        """Give the session its real Config (the policy does it before the greeting)."""
        self.conn = Connection(config, tls=self.tls)


    def _expired(self, now: float) -> bool:
        deadline = self.deadline
        return deadline is not None and now >= deadline

    def _out(self) -> Write | None:
        data = self.conn.data_to_send()
        if data:
            self._last_activity = self.now  # the write gets a whole deadline of its own
            return Write(data)
        return None

    def _step(self) -> Action | None:
        """Advance the policy's steps by one; an action for the host, or None to go on."""
        steps = self._steps
        assert steps is not None
        value, error, self._value, self._error = self._value, self._error, None, None
        try:
            step = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration:
            self._steps = None
            return None
        except Exception as exc:  # a bug in a callback's contract: end the session
            self._steps = None
            self.log_error("session failed", exc)
            self.conn.send_failed()
            self._lost = True
            return None
        if self._pending_shutdown is not None:
            text, self._pending_shutdown = self._pending_shutdown, None
            self.shutdown(text or None)
            return None
        if isinstance(step, Call):
            if self._lost and not self._releasing:
                # Nobody to answer: stop here (a lock taken by the last call is
                # already recorded, and _finish releases it).
                self._abandon_steps()
                return None
            self._in_call = True
            return step
        if isinstance(step, Sleep):
            if step.seconds > 0:
                self._sleep_until = self.now + step.seconds
                return self._out()
            return None
        if step is _START_TLS_STEP:
            self._tls_due = True
            return None
        assert isinstance(step, Response)
        if self._lost or self.conn.phase in _FINAL_STATES:
            return None
        try:
            self.conn.send(step)
        except LocalProtocolError as exc:
            self.log_error("session failed", exc)
            self._lost = True
            self._abandon_steps()
            return None
        if self.conn.phase is Phase.CLOSED:
            self._ending = True
            if isinstance(step, Disconnect) and self.end_reason == "Connection closed":
                self.end_reason = "Disconnected"
        if self.conn.sending_lines and self.conn.buffered_output >= FLUSH_AT:
            return self._out()  # a message goes out in chunks, not whole
        return None

    def _abandon_steps(self) -> None:
        """Stop the current steps; the lock is released by ``_finish``."""
        if self._steps is not None:
            steps, self._steps = self._steps, None
            try:
                steps.close()
            except Exception:
                pass
        self._value = self._error = None

    def _say_goodbye(self, response: Disconnect) -> None:
        self._abandon_steps()
        self._sleep_until = None
        if not self._lost and self.conn.phase not in _FINAL_STATES:
            try:
                self.conn.send(response)
            except LocalProtocolError:
                pass
        self._ending = True

    def _timed_out(self) -> None:
        self.end_reason = "Disconnected for inactivity"
        self._say_goodbye(Disconnect(text=self.conn.text("inactivity"), code=None))

    def _finish(self) -> Action:
        """The session is ending: write the last bytes, release the lock, then CLOSE."""
        if not self._lost:
            out = self._out()
            if out is not None:
                return out
        if self.policy.locked and not self._releasing:
            self._steps = self.policy.release()
            self._lost = self._releasing = True  # nothing more is written after this
            return self.next_action(self.now)
        self._closed = True
        if self._registered:
            self._registered = False
            self._log_end()
            self.services.unregister(self)
        return CLOSE

    # ------------------------------------------------------------------ logs
    # The driver says what happened (``fields``); the server words it
    # (``pop3proto.ops.logfmt.event_message``), so the text lives in one place.

    def _log(self, level: int, event: str, **extra: Any) -> None:
        fields: dict[str, Any] = {
            "event": event,
            "session": self.id,
            "rip": self.peer[0],
            "rport": self.peer[1],
            "user": self.policy.user or self.policy.attempted_user,
            "tls": self.tls,
        }
        fields.update(extra)
        self.services.log_event(level, fields)

    def log_login(self) -> None:
        """The login line (user, method, TLS, peer, session)."""
        self._log(_INFO, "login", method=self.policy.method)

    def log_login_failed(self, reason: str, delay: float) -> None:
        """One failed login: the reason is for the admin, never for the client."""
        self._log(_INFO, "login_failed", method=self.policy.method, reason=reason, delay=delay)

    def log_error(self, what: str, exc: BaseException) -> None:
        """A callback failed (storage, authenticator): a warning with the exception."""
        self._log(_WARNING, "storage_error", reason=f"{what}: {type(exc).__name__}: {exc}")

    def _log_end(self) -> None:
        p, s = self.policy, self.conn.stats
        duration = round(self.now - self.started, 3)
        if self._refused is not None:
            self._log(_INFO, "refused", reason=self._refused)
            return
        if self.conn.username is None:  # never logged in
            if p.auth_failures:
                why = f"auth failed, {p.auth_failures} attempts"
            elif p.attempted_user:
                why = "no successful login"
            else:
                why = "no auth attempts"
            self._log(_INFO, "disconnect", reason=f"{why}: {self.end_reason}",
                      duration=duration)
            return
        drop = self.conn.maildrop
        total = drop.count + len(drop.deleted) if drop is not None else 0
        self.services.log_event(_INFO, {
            "event": "logout",
            "session": self.id,
            "rip": self.peer[0],
            "rport": self.peer[1],
            "user": p.user,
            "tls": self.tls,
            "reason": self.end_reason,
            "top": list(p.top),
            "retr": list(p.retr),
            "del": [s.deleted, total],
            "size": sum(m.size for m in drop.messages) if drop is not None else 0,
            "in": s.bytes_in,
            "out": s.bytes_out,
            "commands": s.commands,
            "duration": duration,
        })

    # ------------------------------------------------------------------ for the server

    def state(self) -> dict[str, Any]:
        """What ``Server.connection_state`` reports (never a password)."""
        conn = self.conn
        drop = conn.maildrop
        return {
            "id": self.id,
            "state": conn.phase.value,
            "user": conn.username or self.policy.user,
            "peer": self.peer[0],
            "port": self.peer[1],
            "tls": conn.tls,
            "messages": drop.count if drop else 0,
            "size": drop.octets if drop else 0,
            **conn.stats.as_dict(),
            "deleted": sorted(drop.deleted) if drop else [],
            "expunged": conn.stats.deleted,
            "idle": round(max(0.0, self.now - self._last_activity), 3),
        }
