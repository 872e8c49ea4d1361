"""Events (client -> application) and responses (application -> client).

Each is a frozen, keyword-only, slotted dataclass.  Don't subclass these: the
core dispatches on the exact type.

Events come out of ``Connection.next_event()``.  Every event except
``ConnectionClosed`` waits for an answer through ``Connection.send``; until it
is answered, ``next_event`` returns ``PAUSED`` and pipelined commands stay
buffered.  Commands the core can answer from its own state (CAPA, STAT, LIST,
UIDL, DELE, RSET, NOOP, USER, every -ERR) never become events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._maildrop import Maildrop

__all__ = [
    "ApopLogin",
    "AuthAborted",
    "AuthResponse",
    "AuthStart",
    "ConnectionClosed",
    "Data",
    "Disconnect",
    "EndOfMessage",
    "Err",
    "Event",
    "Greeting",
    "Login",
    "LoginAccepted",
    "Ok",
    "Response",
    "RetrieveMessage",
    "SaslChallenge",
    "StartTLS",
    "TopOfMessage",
    "Update",
]

RESPONSE_CODES = frozenset(
    {"IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM", "AUTH", "UTF8"}
)


def _one_line(text: str, what: str) -> None:
    if "\r" in text or "\n" in text:
        raise ValueError(f"{what} must be one line: {text!r}")


class Event:
    """Base class of everything ``next_event`` returns."""

    __slots__ = ()


class Response:
    """Base class of everything ``send`` accepts."""

    __slots__ = ()


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True, kw_only=True)
class Login(Event):
    """USER then PASS.  Answer LoginAccepted or Err(code="AUTH")."""

    #: The name from USER (NFKC-normalised after UTF8).
    username: str
    #: The PASS argument; undecodable octets survive as surrogate escapes.
    #: Left out of the repr, like every secret an event carries.
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApopLogin(Event):
    """APOP name digest.  Check with ``auth.verify_apop`` and the greeting's timestamp."""

    username: str
    #: 32 lowercase hex digits (left out of the repr).
    digest: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthStart(Event):
    """AUTH mechanism [initial-response] (RFC 5034).

    Answer SaslChallenge (the client's reply comes as AuthResponse),
    LoginAccepted, or Err.
    """

    #: Upper-case mechanism name, one of ``Config.sasl_mechanisms``.
    mechanism: str
    #: Decoded initial response (b"" for "="), or None when none was sent.
    #: Left out of the repr: PLAIN carries the password here.
    initial_response: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthResponse(Event):
    """The client's base64-decoded answer to a SaslChallenge."""

    #: Left out of the repr: it may carry the password.
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthAborted(Event):
    """The client cancelled a SASL exchange with ``*`` (RFC 5034 section 4).

    Answer Err (the default text is "Authentication aborted."); like any
    failed login it counts toward ``Config.max_auth_failures`` unless its
    code is neither None nor "AUTH".  The application counts it in its own
    failed-login accounting too (delays, logs).
    """

    #: The mechanism of the cancelled exchange (as in its AuthStart).
    mechanism: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StartTLS(Event):
    """STLS (RFC 2595).  Answer Ok (then start TLS at the next byte) or Err.

    On Ok the core discards every byte received after the STLS line and
    starts the session over in AUTHORIZATION.
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrieveMessage(Event):
    """RETR n, already checked against the snapshot.  Answer Ok, Data..., EndOfMessage; or Err."""

    number: int
    key: str
    #: The listed size (CRLF octets).
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TopOfMessage(Event):
    """TOP n m: stream the whole message; the core keeps the header and m body lines."""

    number: int
    key: str
    lines: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Update(Event):
    """QUIT in TRANSACTION: expunge ``deleted`` (storage keys), unlock, answer Ok or Err."""

    deleted: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed(Event, Response):
    """The session is over (QUIT answered, peer EOF, or a close we made).  No answer.

    Deletions are never implied: they come only in an ``Update``.
    """


# ------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True, kw_only=True)
class Greeting(Response):
    """The first line.  ``apop_timestamp`` (``<...@...>``) enables APOP when Config.apop."""

    text: str = "POP3 server ready."
    apop_timestamp: str | None = None

    def __post_init__(self) -> None:
        _one_line(self.text, "greeting")
        ts = self.apop_timestamp
        if ts is not None and not (
            ts.startswith("<") and ts.endswith(">") and "@" in ts and ts.isascii()
            and " " not in ts and "\r" not in ts and "\n" not in ts
        ):
            raise ValueError(f"APOP timestamp must look like <x@y>: {ts!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginAccepted(Response):
    """The login succeeded and the maildrop is locked: enter TRANSACTION.

    ``login_delay``/``expire`` override the CAPA values for this user
    (RFC 2449 lets them differ after login).
    """

    maildrop: Maildrop
    #: The +OK text; empty picks the catalog's "Logged in." in the session's language.
    text: str = ""
    #: The authenticated name (needed after AUTH; USER/APOP supply it).
    username: str | None = None
    login_delay: int | None = None
    expire: int | str | None = None

    def __post_init__(self) -> None:
        _one_line(self.text, "text")


@dataclass(frozen=True, slots=True, kw_only=True)
class SaslChallenge(Response):
    """A server challenge (sent base64-encoded after ``+ ``)."""

    data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ok(Response):
    """A positive first line for the pending RETR/TOP/STLS/Update; empty text picks a default."""

    text: str = ""

    def __post_init__(self) -> None:
        _one_line(self.text, "text")


@dataclass(frozen=True, slots=True, kw_only=True)
class Err(Response):
    """A -ERR line, with an RFC 2449/3206 response code such as "AUTH" or "SYS/TEMP"."""

    text: str = ""
    code: str | None = None

    def __post_init__(self) -> None:
        _one_line(self.text, "text")
        if self.code is not None and self.code not in RESPONSE_CODES:
            raise ValueError(f"unknown response code {self.code!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Data(Response):
    """A chunk of message bytes (any size, LF or CRLF) inside an open RETR/TOP block."""

    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfMessage(Response):
    """Closes the RETR/TOP block; the core writes the terminator."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnect(Response):
    """The server ends the session now (shutdown, idle timeout, busy).

    Writes ``-ERR [code] text`` first when text is given and no multi-line
    block is open; no deletions are applied.  Allowed in any phase but CLOSED.
    """

    text: str = ""
    code: str | None = None

    def __post_init__(self) -> None:
        _one_line(self.text, "text")
        if self.code is not None and self.code not in RESPONSE_CODES:
            raise ValueError(f"unknown response code {self.code!r}")
