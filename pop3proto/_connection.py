"""The sans-I/O POP3 server connection.

``Connection`` owns every rule of RFC 1939, 2449, 2595 (STLS framing), 5034
(SASL framing) and 6856 (UTF8, LANG) and does no I/O.  Bytes go in with
``receive_data``; ``next_event`` parses commands, answers on its own what it
can from its state (CAPA, STAT, LIST, UIDL, DELE, RSET, NOOP, USER, LANG,
every ``-ERR``) and returns an event for what needs the application (a login, a
message's bytes, the deletions at QUIT, STLS).  The application answers with
``send``; the bytes to write come from ``data_to_send``.  Its reply texts
come from the catalog (``_texts``) of the language the client chose.

.. rule:: After any call into a Connection, write out ``data_to_send()``.
"""

from __future__ import annotations

import base64
import enum
import re
import unicodedata
from collections.abc import Callable
from typing import Final, NoReturn

from ._config import PLAINTEXT_MECHANISMS, Config
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
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
from ._maildrop import Maildrop
from ._readers import decode_base64, parse_number, parse_username
from ._receivebuffer import OVERLONG, ReceiveBuffer
from ._state import ANSWERS, COMMANDS, KNOWN_COMMANDS, Phase, Reply
from ._texts import MESSAGES, match_language, valid_language_range
from ._writers import DotStuffer, TopLimiter, status_line

__all__ = ["NEED_DATA", "PAUSED", "Connection", "Sentinel", "Stats"]


class Sentinel(enum.Enum):
    """The non-event results of ``next_event``."""

    #: Feed more bytes with ``receive_data`` (or b"" at end of input).
    NEED_DATA = "NEED_DATA"
    #: Answer the pending event, or drain ``data_to_send()``, then call again.
    PAUSED = "PAUSED"


NEED_DATA: Final = Sentinel.NEED_DATA
PAUSED: Final = Sentinel.PAUSED

_CLOSED_EVENT = ConnectionClosed()
_HEX = frozenset("0123456789abcdef")
_LOGIN_EVENTS = (Login, ApopLogin, AuthStart, AuthResponse, AuthAborted)
#: How every command but PASS splits its arguments (any run of ASCII
#: whitespace); the trace's redaction uses the same function.
_split_args: Final = bytes.split
#: Commands whose arguments after the first are secrets.
_SECRET_AFTER_FIRST = frozenset({b"AUTH", b"APOP"})
#: A SASL mechanism name (RFC 4422 section 3.1), any case.
_MECH_NAME = re.compile(rb"[A-Za-z0-9_-]{1,20}")


class Stats:
    """Per-session counters, for logs and ``Server.connection_state``."""

    __slots__ = ("auth_failures", "bytes_in", "bytes_out", "commands", "deleted", "retrieved")

    def __init__(self) -> None:
        self.commands = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.retrieved = 0
        self.deleted = 0
        self.auth_failures = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {name: getattr(self, name) for name in self.__slots__}


class Connection:
    """One POP3 session, server side, as a state machine over bytes.

    Args:
        config: capabilities and limits; ``Config()`` when omitted.
        tls: True when the transport already runs TLS (implicit TLS, RFC 8314).

    Nothing is sent until the application sends ``Greeting`` (or ``Err`` to
    refuse the connection).
    """

    def __init__(self, config: Config | None = None, *, tls: bool = False) -> None:
        self.config = config if config is not None else Config()
        self._buf = ReceiveBuffer()
        self._out: list[bytes] = []
        self._out_len = 0
        self._phase = Phase.GREETING
        self._reply = Reply.IDLE
        self._pending: Event | None = None
        self._error: RemoteProtocolError | None = None
        #: Why the connection is in ERROR (for the LocalProtocolError of later calls).
        self._why = ""
        self._tls = tls
        self._utf8 = False
        self._texts = self._i_default = next(
            c for c in self.config.languages if c.tag.lower() == "i-default"
        )
        self._user: str | None = None
        self._username: str | None = None
        self._maildrop: Maildrop | None = None
        self._apop_ts: str | None = None
        self._bad = 0
        #: The mechanism of the SASL exchange under way (set by AUTH).
        self._mechanism = ""
        self._stuffer: DotStuffer | None = None
        self._top: TopLimiter | None = None
        self._login_delay = self.config.login_delay
        self._expire = self.config.expire
        self.stats = Stats()

    # ------------------------------------------------------------ state

    @property
    def phase(self) -> Phase:
        """The session's phase (RFC 1939 state plus GREETING/CLOSED/ERROR)."""
        return self._phase

    @property
    def pending(self) -> Event | None:
        """The event waiting for the application's answer, if any."""
        return self._pending

    @property
    def username(self) -> str | None:
        """The logged-in user, once a login was accepted."""
        return self._username

    @property
    def maildrop(self) -> Maildrop | None:
        """The locked maildrop's snapshot and deletion marks, in TRANSACTION and UPDATE."""
        return self._maildrop

    @property
    def tls(self) -> bool:
        """Whether the session runs over TLS (implicit, or after STLS)."""
        return self._tls

    @property
    def utf8(self) -> bool:
        """Whether the client enabled UTF8 (RFC 6856)."""
        return self._utf8

    @property
    def language(self) -> str:
        """The tag of the reply language (``i-default`` until the client's LANG)."""
        return self._texts.tag

    def text(self, msg_id: str, **fields: object) -> str:
        """The reply text *msg_id* (see ``pop3proto._texts.MESSAGES``) in the session's language.

        For the application's own ``Err``/``Ok`` texts, so they follow LANG too.
        """
        return self._texts.text(msg_id, **fields)

    def localize(self, english: str) -> str:
        """*english* in the session's language when it is a catalog text, else unchanged."""
        return self._texts.localize(english)

    @property
    def sending_lines(self) -> bool:
        """Whether a RETR/TOP block is open (Data and EndOfMessage are expected)."""
        return self._reply is Reply.SENDING_LINES

    @property
    def wants_more_data(self) -> bool:
        """False once a TOP block has all it will send: stop reading the message."""
        return self._reply is Reply.SENDING_LINES and not (self._top and self._top.done)

    @property
    def partial_line(self) -> bool:
        """Whether the input so far ends inside a line (bytes of it are buffered or skipped).

        A host may use it after ``receive_data`` to acknowledge at once when
        a client's command arrives in pieces (``TCP_QUICKACK``, as Dovecot
        does), instead of waiting for a delayed ACK.
        """
        return self._buf.partial_line

    @property
    def buffered_output(self) -> int:
        """Octets waiting in ``data_to_send()`` (a host flushes a long message in chunks)."""
        return self._out_len

    # ------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means end of input.

        Bytes that arrive after the session closed are ignored.
        After any call into a Connection, write out ``data_to_send()``.
        """
        if self._phase is Phase.CLOSED or self._phase is Phase.ERROR:
            return
        if data:
            self.stats.bytes_in += len(data)
            self._buf.feed(data)
        else:
            self._buf.eof = True

    def next_event(self) -> Event | Sentinel:
        """Process input until an event for the application, or NEED_DATA / PAUSED.

        Returns:
            An ``Event``; ``NEED_DATA`` when more input is needed; ``PAUSED``
            while an event awaits its answer (or the greeting is not sent),
            or when ``output_high_water`` octets wait in ``data_to_send()``.
            ``ConnectionClosed`` once the session is over (repeatedly).

        Raises:
            RemoteProtocolError: the client broke framing beyond repair; the
                final ``-ERR`` is queued.  Raised again on every later call.
            LocalProtocolError: our side is in ERROR; the message says why
                (an API misuse, ``send_failed()``, an exception raised inside).

        An exception other than a ProtocolError raised inside (by a trace
        callback, say) leaves the connection in ERROR, never half-updated.

        After any call into a Connection, write out ``data_to_send()``.
        """
        try:
            return self._next_event()
        except ProtocolError:
            raise
        except Exception as exc:
            self._broken(f"an unexpected {type(exc).__name__} inside next_event(): {exc}")
            raise

    def _next_event(self) -> Event | Sentinel:
        if self._error is not None:
            raise self._error
        phase = self._phase
        if phase is Phase.ERROR:
            raise LocalProtocolError(f"connection is in ERROR after {self._why}")
        if phase is Phase.CLOSED:
            return _CLOSED_EVENT
        if self._pending is not None or phase is Phase.GREETING:
            return PAUSED
        buf = self._buf
        config = self.config
        while True:
            # Checked here, not on NEED_DATA (when only a bounded partial line
            # is left): unread input piles up while we are PAUSED.
            if buf.buffered > config.max_buffered_input:
                self._fatal("too_much_input")
            if self._out_len >= config.output_high_water:
                return PAUSED
            line = buf.next_line()
            if line is None:
                if buf.partial_length >= config.max_sasl_line_length:
                    # Too long for any line: skip to its end, answer it there.
                    buf.skip_partial()
                if buf.skipping and buf.skipped >= config.max_buffered_input:
                    self._fatal("line_too_long")  # a "line" that never ends
                if buf.eof:
                    self._phase = Phase.CLOSED
                    return _CLOSED_EVENT
                return NEED_DATA
            event = self._handle_line(line)
            if event is not None:
                self._pending = event
                return event
            if self._phase is Phase.CLOSED:
                return _CLOSED_EVENT

    # ------------------------------------------------------------ output

    def send(self, response: Response) -> None:
        """Answer the pending event (or greet / disconnect).

        Raises:
            LocalProtocolError: the response does not fit the state (no event
                pending, Data outside a block, ...).  The connection moves to
                ERROR and every later call raises.  So does any other
                exception raised inside (by a trace callback, say).

        After any call into a Connection, write out ``data_to_send()``.
        """
        try:
            self._send(response)
        except ProtocolError:
            raise
        except Exception as exc:
            self._broken(f"an unexpected {type(exc).__name__} inside send(): {exc}")
            raise

    def _send(self, response: Response) -> None:
        phase = self._phase
        if phase is Phase.ERROR:
            raise LocalProtocolError(f"connection is in ERROR after {self._why}")
        if phase is Phase.CLOSED:
            raise LocalProtocolError(f"cannot send {type(response).__name__}: connection closed")
        kind = type(response)
        if isinstance(response, Data):
            self._send_data(response)
            return
        if isinstance(response, (Disconnect, ConnectionClosed)):
            if (
                isinstance(response, Disconnect)
                and self._reply is not Reply.SENDING_LINES
                and (response.text or response.code)
            ):
                self._write(status_line(False, response.text, response.code))
            self._close()
            return
        pending = self._pending
        if phase is Phase.GREETING:
            if kind is Greeting:
                assert isinstance(response, Greeting)
                text = response.text
                if response.apop_timestamp:
                    self._apop_ts = response.apop_timestamp
                    text = f"{text} {response.apop_timestamp}" if text else response.apop_timestamp
                self._write(status_line(True, text))
                self._phase = Phase.AUTHORIZATION
                return
            if kind is Err:
                assert isinstance(response, Err)
                self._write(status_line(False, response.text, response.code))
                self._close()
                return
            self._misuse(f"{kind.__name__} before the Greeting")
        if pending is None:
            self._misuse(f"{kind.__name__} sent with no event pending")
        if kind not in ANSWERS[type(pending)]:
            self._misuse(f"{kind.__name__} is no answer to {type(pending).__name__}")
        if isinstance(pending, (RetrieveMessage, TopOfMessage)):
            self._answer_message(pending, response)
        elif isinstance(pending, _LOGIN_EVENTS):
            self._answer_login(pending, response)
        elif isinstance(pending, StartTLS):
            self._pending = None
            if isinstance(response, Ok):
                self._write(status_line(True, response.text or self.text("begin_tls")))
                # RFC 2595 / CVE-2011-0411: nothing sent before TLS counts after it.
                self._buf.clear()
                self._tls = True
                self._user = None
                self._utf8 = False
                self._texts = self._i_default
                self._bad = 0
            else:
                assert isinstance(response, Err)
                text = response.text or self.text("tls_unavailable")
                self._write(status_line(False, text, response.code))
        else:
            assert isinstance(pending, Update)
            if isinstance(response, Ok):
                self._write(status_line(True, response.text or self.text("logging_out")))
                self.stats.deleted += len(pending.deleted)
            else:
                assert isinstance(response, Err)
                text = response.text or self.text("deletion_failed")
                self._write(status_line(False, text, response.code))
            self._close()

    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """Take up to *max_bytes* (all when None) of the bytes waiting to be written."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if max_bytes is not None and len(data) > max_bytes:
            out.append(data[max_bytes:])
            data = data[:max_bytes]
        self._out_len = len(out[0]) if out else 0
        self.stats.bytes_out += len(data)
        return data

    def send_failed(self) -> None:
        """The transport could not deliver our bytes: the session is over (ERROR).

        Later calls raise LocalProtocolError saying the transport failed.
        """
        self._broken("send_failed(): the transport could not deliver our bytes")

    # ------------------------------------------------------------ internals

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        self._out_len += len(data)
        trace = self.config.trace
        if trace is not None and self._reply is not Reply.SENDING_LINES:
            trace("S", data.decode("utf-8", "replace").rstrip("\r\n"))

    def _close(self) -> None:
        self._phase = Phase.CLOSED
        self._pending = None
        self._reply = Reply.IDLE

    def _broken(self, why: str) -> None:
        """Move to ERROR for good; *why* goes into every later LocalProtocolError."""
        self._phase = Phase.ERROR
        self._pending = None
        self._reply = Reply.IDLE
        self._why = why

    def _misuse(self, msg: str) -> NoReturn:
        self._broken(f"an API misuse: {msg}")
        raise LocalProtocolError(msg)

    def _fatal(self, msg_id: str) -> NoReturn:
        text = self.text(msg_id)
        self._write(status_line(False, text))
        english = MESSAGES[msg_id]
        self._broken(f"the client's protocol error: {english}")
        self._error = RemoteProtocolError(english, response_hint=text)
        raise self._error

    def _bad_command(self, msg_id: str) -> None:
        """An unknown, misplaced or malformed command: -ERR, and count it."""
        self._bad += 1
        limit = (
            self.config.max_bad_commands
            if self._phase is Phase.TRANSACTION
            else self.config.max_bad_commands_before_login
        )
        if self._bad >= limit:
            self._fatal("too_many_bad_commands")
        self._write(status_line(False, self.text(msg_id)))

    def _plain_ok(self) -> bool:
        return self._tls or self.config.cleartext_auth

    def _mechanisms(self) -> list[str]:
        plain_ok = self._plain_ok()
        return [
            m for m in self.config.sasl_mechanisms if plain_ok or m not in PLAINTEXT_MECHANISMS
        ]

    def _handle_line(self, line: bytes) -> Event | None:
        if line is OVERLONG:
            if self._reply is not Reply.SASL:
                self.stats.commands += 1
            self._line_too_long()
            return None
        if line[-1:] == b"\r":
            line = line[:-1]
        config = self.config
        if self._reply is Reply.SASL:
            return self._sasl_line(line)
        self.stats.commands += 1
        if b"\x00" in line:
            self._fatal("nul_in_command")
        keyword, _, rest = line.partition(b" ")
        keyword = keyword.upper()
        if len(line) + 2 > config.max_line_length and (
            keyword != b"AUTH" or len(line) + 2 > config.max_sasl_line_length
        ):
            self._line_too_long()
            return None
        if config.trace is not None and keyword in KNOWN_COMMANDS:
            self._trace_command(keyword, rest)
        if self._user is not None and keyword != b"PASS":
            self._user = None  # RFC 1939: PASS only immediately after a successful USER
        handler = _HANDLERS[self._phase].get(keyword)
        if handler is None:
            if config.trace is not None and keyword not in KNOWN_COMMANDS:
                # Could be a SASL answer sent after a refused AUTH: never echo it.
                config.trace("C", f"(unknown command, {len(line)} octets)")
            if keyword in KNOWN_COMMANDS:
                self._bad_command("wrong_state")
            else:
                self._bad_command("unknown_command")
            return None
        return handler(self, rest)

    def _trace_command(self, keyword: bytes, rest: bytes) -> None:
        """Trace a known command, its secrets redacted by the parser's own splitting."""
        assert self.config.trace is not None
        shown = keyword.decode("ascii", "replace")
        if keyword == b"PASS":
            # PASS takes the rest of the line, spaces and all.
            if rest:
                shown += " ***"
        elif keyword in _SECRET_AFTER_FIRST:
            # AUTH mech [initial-response], APOP name digest: _syntax splits
            # these with _split_args, so the redaction does too.
            args = _split_args(rest)
            if args:
                first = args[0]
                if keyword == b"AUTH" and not _MECH_NAME.fullmatch(first):
                    shown += " ***"  # not a mechanism name: maybe a misplaced secret
                else:
                    shown += " " + first.decode("utf-8", "replace")
                if len(args) > 1:
                    shown += " ***"
        elif rest:
            shown += " " + rest.decode("utf-8", "replace")
        self.config.trace("C", shown)

    def _syntax(self, rest: bytes, nargs: tuple[int, ...]) -> list[bytes] | None:
        args = _split_args(rest)
        if len(args) in nargs:
            self._bad = 0
            return args
        self._bad_command("syntax_error")
        return None

    def _ok(self, msg_id: str = "", **fields: object) -> None:
        self._write(status_line(True, self.text(msg_id, **fields) if msg_id else ""))

    def _err(self, msg_id: str, code: str | None = None) -> None:
        self._write(status_line(False, self.text(msg_id), code))

    def _multiline(self, first: str, lines: list[str]) -> None:
        lines.append(".")
        self._write(status_line(True, first) + ("\r\n".join(lines) + "\r\n").encode("utf-8"))

    # -- AUTHORIZATION

    def _cmd_capa(self, rest: bytes) -> None:
        if self._syntax(rest, (0,)) is None:
            return
        caps = ["CAPA", "TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"]
        config = self.config
        if self._phase is Phase.AUTHORIZATION:
            user = config.user_command and self._plain_ok()
            if user:
                caps.append("USER")
            mechs = self._mechanisms()
            if mechs:
                caps.append("SASL " + " ".join(mechs))
            if config.stls and not self._tls:
                caps.append("STLS")
            if config.utf8:
                caps.append("UTF8 USER" if user else "UTF8")
        if config.lang:
            caps.append("LANG")
        if self._login_delay is not None:
            caps.append(f"LOGIN-DELAY {self._login_delay}")
        if self._expire is not None:
            caps.append(f"EXPIRE {self._expire}")
        if config.implementation:
            caps.append(f"IMPLEMENTATION {config.implementation}")
        self._multiline(self.text("capability_list"), caps)

    def _cmd_user(self, rest: bytes) -> None:
        args = self._syntax(rest, (1,))
        if args is None:
            return
        if not self.config.user_command:
            self._err("user_disabled")
            return
        if not self._plain_ok():
            self._err("plaintext_disallowed", "AUTH")
            return
        name = parse_username(args[0], self._utf8)
        if name is None:
            self._user = None
            if not args[0].isascii() and not self._utf8:
                self._err("non_ascii_user")
            else:
                self._err("invalid_user_name")
            return
        self._user = name
        self._ok()

    def _cmd_pass(self, rest: bytes) -> Event | None:
        # RFC 1939: the argument may contain spaces; it is the rest of the line.
        if not rest:
            self._user = None  # a failed PASS ends the USER/PASS pair too
            self._bad_command("syntax_error")
            return None
        self._bad = 0
        if self._user is None:
            self._err("no_username")
            return None
        user, self._user = self._user, None
        password = rest.decode("utf-8", "surrogateescape")
        if self._utf8 and password.isprintable():
            password = unicodedata.normalize("NFKC", password)
        return Login(username=user, password=password)

    def _cmd_apop(self, rest: bytes) -> Event | None:
        args = self._syntax(rest, (2,))
        if args is None:
            return None
        if not self.config.apop or self._apop_ts is None:
            self._err("apop_unavailable")
            return None
        if not self._plain_ok():
            self._err("plaintext_disallowed", "AUTH")
            return None
        name = parse_username(args[0], self._utf8)
        digest = args[1].decode("latin-1").lower()
        if name is None or len(digest) != 32 or not _HEX.issuperset(digest):
            self._err("apop_invalid")
            return None
        return ApopLogin(username=name, digest=digest)

    def _cmd_auth(self, rest: bytes) -> Event | None:
        args = self._syntax(rest, (0, 1, 2))
        if args is None:
            return None
        mechs = self._mechanisms()
        if not args:
            # Outlook's discovery form: list the mechanisms (like Dovecot).
            self._multiline("", list(mechs))
            return None
        mech = args[0].upper().decode("ascii", "replace")
        if mech not in mechs:
            self._err("unsupported_mechanism")
            return None
        initial: bytes | None = None
        if len(args) == 2:
            initial = b"" if args[1] == b"=" else decode_base64(args[1])
            if initial is None:
                self._auth_failed(Err(text=self.text("invalid_initial_response")))
                return None
        self._mechanism = mech
        return AuthStart(mechanism=mech, initial_response=initial)

    def _line_too_long(self) -> None:
        """A line over the limit: -ERR in its place, and the session reads on.

        As a SASL answer it fails the exchange; as a command it counts as a
        bad one (so a stream of them still ends the session).
        """
        trace = self.config.trace
        if self._reply is Reply.SASL:
            if trace is not None:
                trace("C", "***")
            self._reply = Reply.IDLE
            self._auth_failed(Err(text=self.text("line_too_long")))
            return
        if trace is not None:
            trace("C", "(line too long)")
        self._user = None  # it was not PASS
        self._bad_command("line_too_long")

    def _sasl_line(self, line: bytes) -> Event | None:
        if len(line) + 2 > self.config.max_sasl_line_length:
            self._line_too_long()
            return None
        if self.config.trace is not None:
            self.config.trace("C", "***")
        self._reply = Reply.IDLE
        if line == b"*":
            return AuthAborted(mechanism=self._mechanism)
        data = decode_base64(line)
        if data is None:
            self._auth_failed(Err(text=self.text("invalid_base64")))
            return None
        return AuthResponse(data=data)

    def _auth_failed(self, err: Err) -> None:
        self._write(status_line(False, err.text or self.text("auth_failed"), err.code))
        if err.code in (None, "AUTH"):
            self.stats.auth_failures += 1
            if self.stats.auth_failures >= self.config.max_auth_failures:
                self._close()

    def _cmd_stls(self, rest: bytes) -> Event | None:
        if self._syntax(rest, (0,)) is None:
            return None
        if not self.config.stls:
            self._err("stls_disabled")
            return None
        if self._tls:
            self._err("tls_active")
            return None
        return StartTLS()

    def _cmd_utf8(self, rest: bytes) -> None:
        if self._syntax(rest, (0,)) is None:
            return
        if not self.config.utf8:
            self._err("utf8_unavailable")
            return
        self._utf8 = True
        self._ok("utf8_enabled")

    def _cmd_lang(self, rest: bytes) -> None:
        """RFC 6856 section 3: list the languages, or pick one by a language range."""
        args = self._syntax(rest, (0, 1))
        if args is None:
            return
        config = self.config
        if not config.lang:
            self._err("lang_unavailable")
            return
        if not args:
            listing = [f"{c.tag} {c.description}" for c in config.languages]
            self._multiline(self.text("language_listing"), listing)
            return
        if not valid_language_range(args[0]):
            self._err("language_range_invalid")
            return
        chosen = match_language(args[0].decode("ascii"), config.languages)
        if chosen is None:
            # RFC 6856 names no response code for this; the language stays.
            self._err("language_unsupported")
            return
        self._texts = chosen
        self._write(status_line(True, f"{chosen.tag} {chosen.text('language_changed')}"))

    def _cmd_quit(self, rest: bytes) -> Event | None:
        if self._syntax(rest, (0,)) is None:
            return None
        if self._phase is Phase.TRANSACTION:
            assert self._maildrop is not None
            self._phase = Phase.UPDATE
            return Update(deleted=self._maildrop.deleted_keys())
        self._ok("logging_out")
        self._close()
        return None

    # -- TRANSACTION

    def _message(self, arg: bytes) -> int | None:
        """The live message numbered *arg*, or None after writing the -ERR."""
        number = parse_number(arg)
        drop = self._maildrop
        assert drop is not None
        if number is None:
            self._err("invalid_message_number")
            return None
        if drop.get(number) is None:
            self._err("message_deleted" if drop.exists(number) else "no_such_message")
            return None
        return number

    def _cmd_stat(self, rest: bytes) -> None:
        if self._syntax(rest, (0,)) is not None:
            drop = self._maildrop
            assert drop is not None
            self._write(b"+OK %d %d\r\n" % (drop.count, drop.octets))

    def _cmd_list(self, rest: bytes) -> None:
        args = self._syntax(rest, (0, 1))
        if args is None:
            return
        drop = self._maildrop
        assert drop is not None
        if args:
            number = self._message(args[0])
            if number is not None:
                self._write(b"+OK %d %d\r\n" % (number, drop.messages[number - 1].size))
            return
        lines = [status_line(True, self.text("scan_listing", count=drop.count,
                                             octets=drop.octets))[:-2]]
        lines += [b"%d %d" % (n, m.size) for n, m in drop.live()]
        lines.append(b".\r\n")
        self._write(b"\r\n".join(lines))

    def _cmd_uidl(self, rest: bytes) -> None:
        args = self._syntax(rest, (0, 1))
        if args is None:
            return
        drop = self._maildrop
        assert drop is not None
        if args:
            number = self._message(args[0])
            if number is not None:
                self._write(status_line(True, f"{number} {drop.messages[number - 1].uid}"))
            return
        lines = [f"{n} {m.uid}" for n, m in drop.live()]
        self._multiline("", lines)

    def _cmd_retr(self, rest: bytes) -> Event | None:
        args = self._syntax(rest, (1,))
        if args is None:
            return None
        number = self._message(args[0])
        if number is None:
            return None
        assert self._maildrop is not None
        info = self._maildrop.messages[number - 1]
        return RetrieveMessage(number=number, key=info.key, size=info.size)

    def _cmd_top(self, rest: bytes) -> Event | None:
        args = self._syntax(rest, (2,))
        if args is None:
            return None
        number = self._message(args[0])
        if number is None:
            return None
        lines = parse_number(args[1])
        if lines is None:
            self._err("invalid_line_count")
            return None
        assert self._maildrop is not None
        info = self._maildrop.messages[number - 1]
        return TopOfMessage(number=number, key=info.key, lines=lines)

    def _cmd_dele(self, rest: bytes) -> None:
        args = self._syntax(rest, (1,))
        if args is None:
            return
        number = self._message(args[0])
        if number is not None:
            assert self._maildrop is not None
            self._maildrop.mark(number)
            self._ok("marked_deleted")

    def _cmd_rset(self, rest: bytes) -> None:
        if self._syntax(rest, (0,)) is not None:
            drop = self._maildrop
            assert drop is not None
            drop.reset()
            self._ok("maildrop_has", count=drop.count, octets=drop.octets)

    def _cmd_noop(self, rest: bytes) -> None:
        if self._syntax(rest, (0,)) is not None:
            self._write(b"+OK\r\n")

    # -- answers

    def _answer_login(self, pending: Event, response: Response) -> None:
        self._pending = None
        if isinstance(response, SaslChallenge):
            # ANSWERS allows SaslChallenge only for AuthStart/AuthResponse.
            self._write(b"+ " + base64.b64encode(response.data) + b"\r\n")
            self._reply = Reply.SASL
            return
        self._reply = Reply.IDLE
        if isinstance(response, LoginAccepted):
            if response.username is not None:
                self._username = response.username
            elif isinstance(pending, (Login, ApopLogin)):
                self._username = pending.username
            self._maildrop = response.maildrop
            if response.login_delay is not None:
                self._login_delay = response.login_delay
            if response.expire is not None:
                self._expire = response.expire
            self._phase = Phase.TRANSACTION
            self._bad = 0
            self._write(status_line(True, response.text or self.text("logged_in")))
            return
        assert isinstance(response, Err)
        if not response.text:
            text = self.text("auth_aborted" if isinstance(pending, AuthAborted) else "auth_failed")
            response = Err(text=text, code=response.code)
        self._auth_failed(response)

    def _answer_message(self, pending: RetrieveMessage | TopOfMessage, response: Response) -> None:
        kind = type(response)
        if self._reply is Reply.SENDING_LINES:
            if kind is EndOfMessage:
                assert self._stuffer is not None
                self._write(self._stuffer.end())
                self._stuffer = self._top = None
                self._reply = Reply.IDLE
                self._pending = None
                if isinstance(pending, RetrieveMessage):
                    self.stats.retrieved += 1
                return
            self._misuse(f"{kind.__name__} inside a multi-line block")
        if kind is Ok:
            assert isinstance(response, Ok)
            text = response.text
            if not text and isinstance(pending, RetrieveMessage):
                text = self.text("message_octets", size=pending.size)
            self._write(status_line(True, text))
            self._stuffer = DotStuffer()
            if isinstance(pending, TopOfMessage):
                self._top = TopLimiter(pending.lines)
            self._reply = Reply.SENDING_LINES
            return
        if kind is Err:
            assert isinstance(response, Err)
            text = response.text or self.text("message_unavailable")
            self._write(status_line(False, text, response.code))
            self._pending = None
            return
        self._misuse(f"{kind.__name__} before Ok")

    def _send_data(self, response: Data) -> None:
        stuffer = self._stuffer
        if self._reply is not Reply.SENDING_LINES or stuffer is None:
            self._misuse("Data outside a RETR/TOP block")
        chunk = response.data
        if self._top is not None:
            chunk = self._top.feed(chunk)
        if chunk:
            out = stuffer.feed(chunk)
            self._out.append(out)
            self._out_len += len(out)


# The handlers of _state.COMMANDS, looked up once.
_HANDLERS: dict[Phase, dict[bytes, Callable[[Connection, bytes], Event | None]]] = {
    phase: {keyword: getattr(Connection, "_cmd_" + name) for keyword, name in table.items()}
    for phase, table in COMMANDS.items()
}
