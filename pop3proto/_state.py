"""The POP3 state rules as data.

Rule 1: every legal move is in one of these tables, and anything not in them
is refused.  ``COMMANDS[phase]`` lists the commands a client may give in that
phase (and names their handlers); any other known command gets ``-ERR`` and
counts as a bad command.  ``NEXT`` gives the phase an answer leads to.
Inside an AUTH exchange (``Reply.SASL``) the next line is the client's SASL
answer, not a command.
``ANSWERS[type(pending event)]`` lists the responses the application may send
while that event is pending; anything else is a ``LocalProtocolError`` (so is
any answer with no event pending, except ``Greeting``/``Err`` in GREETING).
``Disconnect`` is allowed everywhere but CLOSED and ERROR and is handled
before the table is consulted.

Theory of operation: the connection starts in GREETING and sends nothing
until the application sends ``Greeting`` (or ``Err`` to refuse).  Then
AUTHORIZATION -> (login accepted) -> TRANSACTION -> (QUIT) -> UPDATE ->
(Update answered) -> CLOSED.  QUIT in AUTHORIZATION, peer EOF, Disconnect
and too many failed logins go straight to CLOSED.  RFC 1939 never lets
anything but QUIT in TRANSACTION reach UPDATE.
"""

from __future__ import annotations

import enum

from ._events import (
    ApopLogin,
    AuthAborted,
    AuthResponse,
    AuthStart,
    Data,
    EndOfMessage,
    Err,
    Event,
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

__all__ = ["ANSWERS", "COMMANDS", "KNOWN_COMMANDS", "NEXT", "Phase", "Reply"]


class Phase(enum.Enum):
    """Where the session is (RFC 1939 section 3 plus the edges)."""

    #: Nothing sent yet; waiting for the application's Greeting.
    GREETING = "greeting"
    #: Before login: USER/PASS, APOP, AUTH, STLS, UTF8, LANG, CAPA, QUIT.
    AUTHORIZATION = "authorization"
    #: Logged in with the maildrop locked.
    TRANSACTION = "transaction"
    #: QUIT in TRANSACTION; the application is applying deletions.
    UPDATE = "update"
    #: The session is over; close the socket.
    CLOSED = "closed"
    #: A protocol error ended the session.
    ERROR = "error"


class Reply(enum.Enum):
    """Our side of the current exchange."""

    #: Nothing pending: the core is reading commands.
    IDLE = "idle"
    #: An event waits for the application's answer.
    AWAITING_APP = "awaiting-app"
    #: Inside a RETR/TOP block: Data until EndOfMessage.
    SENDING_LINES = "sending-lines"
    #: A SASL challenge was sent: the next line is the client's answer
    #: (AuthResponse, or AuthAborted for "*"), not a command.
    SASL = "sasl"


#: The one command table: the commands each phase takes, each with the name
#: of the ``Connection`` method that handles it (``_cmd_<name>``).  The
#: handler answers alone, or returns the event that waits for the
#: application; the phase it leads to is in its docstring and in ``NEXT``.
COMMANDS: dict[Phase, dict[bytes, str]] = {
    Phase.AUTHORIZATION: {
        b"USER": "user",
        b"PASS": "pass",  # -> Login
        b"APOP": "apop",  # -> ApopLogin
        b"AUTH": "auth",  # -> AuthStart
        b"STLS": "stls",  # -> StartTLS
        b"UTF8": "utf8",
        b"LANG": "lang",
        b"CAPA": "capa",
        b"QUIT": "quit",  # -> CLOSED
    },
    Phase.TRANSACTION: {
        b"STAT": "stat",
        b"LIST": "list",
        b"UIDL": "uidl",
        b"RETR": "retr",  # -> RetrieveMessage
        b"TOP": "top",  # -> TopOfMessage
        b"DELE": "dele",
        b"RSET": "rset",
        b"NOOP": "noop",
        b"QUIT": "quit",  # -> UPDATE, Update
        b"CAPA": "capa",
        b"LANG": "lang",
    },
}

KNOWN_COMMANDS: frozenset[bytes] = frozenset(k for table in COMMANDS.values() for k in table)

_LOGIN: frozenset[type[Response]] = frozenset({LoginAccepted, Err})

#: The phase an accepted answer leads to (absent: the phase stays).  A
#: counted login failure at ``Config.max_auth_failures`` closes too.
NEXT: dict[tuple[type[Event], type[Response]], Phase] = {
    (Login, LoginAccepted): Phase.TRANSACTION,
    (ApopLogin, LoginAccepted): Phase.TRANSACTION,
    (AuthStart, LoginAccepted): Phase.TRANSACTION,
    (AuthResponse, LoginAccepted): Phase.TRANSACTION,
    (StartTLS, Ok): Phase.AUTHORIZATION,  # started over: nothing before TLS counts
    (Update, Ok): Phase.CLOSED,
    (Update, Err): Phase.CLOSED,
}

ANSWERS: dict[type[Event], frozenset[type[Response]]] = {
    Login: _LOGIN,
    ApopLogin: _LOGIN,
    AuthStart: frozenset({LoginAccepted, Err, SaslChallenge}),
    AuthResponse: frozenset({LoginAccepted, Err, SaslChallenge}),
    AuthAborted: frozenset({Err}),
    StartTLS: frozenset({Ok, Err}),
    RetrieveMessage: frozenset({Ok, Err, Data, EndOfMessage}),
    TopOfMessage: frozenset({Ok, Err, Data, EndOfMessage}),
    Update: frozenset({Ok, Err}),
}
