"""Test helpers for the sans-I/O core: feeding bytes, a toy application, transcripts, oracles.

* ``feed``/``feed_bytewise`` push client bytes and collect the events up to
  NEED_DATA, PAUSED or ConnectionClosed (h11's ``get_all_events``).
* ``App`` is a tiny application (users and their passwords, a list of
  message bytes) that answers every event the core emits.
* ``transcript`` runs a ``C:``/``S:`` script against a Connection and the App
  three ways (one packet per command, one byte per packet, the whole client
  side in one packet) and checks the server's bytes exactly each time.
* ``unstuff``, ``crlf`` and ``top_oracle`` are independent, obviously-correct
  models of what RETR and TOP must put on the wire.
"""

from __future__ import annotations

import base64
import copy
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import replies as R

from pop3proto import (
    NEED_DATA,
    PAUSED,
    ApopLogin,
    AuthAborted,
    AuthResponse,
    AuthStart,
    Config,
    Connection,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Err,
    Event,
    Greeting,
    Login,
    LoginAccepted,
    Maildrop,
    MessageInfo,
    Ok,
    RemoteProtocolError,
    Response,
    RetrieveMessage,
    SaslChallenge,
    StartTLS,
    TopOfMessage,
    Update,
    wire_size,
)
from pop3proto.auth import verify_apop

# ------------------------------------------------------------ configs

#: The SASL mechanisms the tests offer (``Config()`` offers none).
SASL = ("PLAIN", "LOGIN")


def cfg(**kwargs: Any) -> Config:
    """A Config for the tests: ``Config(**kwargs)`` offering PLAIN and LOGIN unless told."""
    kwargs.setdefault("sasl_mechanisms", SASL)
    return Config(**kwargs)


# ------------------------------------------------------------ messages

#: RFC 1939 section 10's maildrop: two messages of 120 and 200 octets.
MSG1 = (
    b"From: mrose@dbc.mtview.ca.us\r\n"
    b"Subject: one\r\n"
    b"\r\n"
    b".signature line starting with a dot\r\n"
    b"." + b"x" * 34 + b"\r\n"
)
MSG2 = (
    b"From: mrose@dbc.mtview.ca.us\r\n"
    b"Subject: two\r\n"
    b"\r\n" + b"y" * 68 + b"\r\n" + b"z" * 82 + b"\r\n"
)
assert (wire_size(MSG1), wire_size(MSG2)) == (120, 200)
#: The UIDs of RFC 1939's UIDL example.
RFC_UIDS = ("whqtswO00WBw418f9t5JxYwZ", "QhdPYR:00WBw1Ph7x7")


def message_lines(message: bytes) -> list[str]:
    """*message* as transcript ``S:`` lines, dot-stuffed (CRLF input only)."""
    assert message.endswith(b"\r\n")
    lines = message.decode("utf-8").split("\r\n")[:-1]
    return ["." + line if line.startswith(".") else line for line in lines]


def server_says(lines: Iterable[str]) -> str:
    """Transcript ``S:`` lines for *lines* (e.g. ``message_lines(MSG1)``)."""
    return "\n".join(f"S: {line}" if line else "S:" for line in lines)


def maildrop(messages: Iterable[bytes], uids: Iterable[str] | None = None) -> Maildrop:
    """A Maildrop of *messages*; keys are ``m1``, ``m2``...; sizes from ``wire_size``."""
    messages = list(messages)
    uid_list = list(uids) if uids is not None else [f"uid-{n}" for n in range(1, len(messages) + 1)]
    return Maildrop(
        tuple(
            MessageInfo(key=f"m{n}", size=wire_size(m), uid=uid)
            for n, (m, uid) in enumerate(zip(messages, uid_list, strict=True), 1)
        )
    )


# ------------------------------------------------------------ feeding


def next_events(conn: Connection) -> list[Event]:
    """Call next_event until NEED_DATA, PAUSED or ConnectionClosed (included)."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is PAUSED:
            return events
        assert isinstance(event, Event)
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def feed(conn: Connection, data: bytes) -> list[Event]:
    """``receive_data(data)`` then the events up to NEED_DATA/PAUSED/ConnectionClosed."""
    conn.receive_data(data)
    return next_events(conn)


def feed_bytewise(conn: Connection, data: bytes) -> list[Event]:
    """Like ``feed`` but one byte per ``receive_data``; the events of all the calls."""
    events: list[Event] = []
    for i in range(len(data)):
        events += feed(conn, data[i : i + 1])
    return events


def greeted(config: Config | None = None, *, tls: bool = False, apop: bool = False) -> Connection:
    """A Connection that has sent its greeting (already drained)."""
    conn = Connection(config if config is not None else cfg(), tls=tls)
    conn.send(Greeting(apop_timestamp=R.RFC_TIMESTAMP if apop else None))
    conn.data_to_send()
    return conn


def logged_in(
    config: Config | None = None,
    messages: Iterable[bytes] = (MSG1, MSG2),
    *,
    tls: bool = False,
    login_delay: int | None = None,
    expire: int | str | None = None,
) -> Connection:
    """A Connection in TRANSACTION on a maildrop of *messages* (output drained)."""
    conn = greeted(config, tls=tls)
    assert feed(conn, b"USER mrose\r\nPASS secret\r\n") == [
        Login(username="mrose", password="secret")
    ]
    drop = maildrop(messages)
    conn.send(LoginAccepted(maildrop=drop, login_delay=login_delay, expire=expire))
    conn.data_to_send()
    return conn


def chat(conn: Connection, data: bytes) -> bytes:
    """Feed *data* that the core answers alone; return the reply bytes."""
    assert feed(conn, data) == []
    return conn.data_to_send()


# ------------------------------------------------------------ oracles


def crlf(message: bytes) -> bytes:
    """*message* as RETR must send it before stuffing: CRLF line ends, ending in CRLF.

    A bare LF becomes CRLF, a bare CR inside a line stays, and a final bare CR
    is completed to CRLF.  An empty message is one empty line.
    """
    if not message:
        return b"\r\n"
    out = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if out.endswith(b"\r") and not out.endswith(b"\r\n"):
        return out + b"\n"
    if out and not out.endswith(b"\r\n"):
        return out + b"\r\n"
    return out


def unstuff(block: bytes) -> bytes:
    """The body of a multi-line block (no status line) as a client reads it.

    Checks the framing on the way: CRLF everywhere, every line that starts
    with "." doubled, and exactly one terminator, at the end.
    """
    assert block.endswith(b".\r\n"), block[-20:]
    assert block == b".\r\n" or block.endswith(b"\r\n.\r\n"), block[-20:]
    assert block.count(b"\n") == block.count(b"\r\n"), "bare LF on the wire"
    lines = block.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    body = []
    for line in lines[:-2]:
        if line.startswith(b"."):
            assert line.startswith(b".."), f"unstuffed dot line {line!r}"
            line = line[1:]
        body.append(line + b"\r\n")
    return b"".join(body)


def top_oracle(message: bytes, lines: int) -> bytes:
    """What TOP n *lines* must carry (unstuffed): the header, the blank line, *lines* lines."""
    text = crlf(message)
    if not text:
        return b""
    all_lines = text.split(b"\r\n")[:-1]
    keep = len(all_lines)
    if b"" in all_lines:
        keep = min(keep, all_lines.index(b"") + 1 + lines)
    return b"".join(line + b"\r\n" for line in all_lines[:keep])


def split_status(reply: bytes) -> tuple[bytes, bytes]:
    """(status line with CRLF, the rest) of a multi-line reply."""
    head, sep, rest = reply.partition(b"\r\n")
    assert sep
    return head + sep, rest


# ------------------------------------------------------------ the toy application


def decode_plain(data: bytes) -> tuple[str, str, str] | None:
    """RFC 4616 PLAIN: (authzid, authcid, password), or None when malformed."""
    parts = data.split(b"\x00")
    if len(parts) != 3:
        return None
    authzid, authcid, password = (p.decode("utf-8", "replace") for p in parts)
    return authzid, authcid, password


@dataclass
class App:
    """A toy POP3 application: answers every event the core emits.

    ``respond(conn, event)`` yields the responses; the caller sends each and
    writes ``data_to_send()`` before taking the next one (DESIGN section 6).
    """

    users: dict[str, str] = field(default_factory=lambda: {"mrose": R.RFC_SECRET})
    messages: list[bytes] = field(default_factory=lambda: [MSG1, MSG2])
    uids: tuple[str, ...] | None = RFC_UIDS
    #: The APOP timestamp of the greeting (None: a greeting without one).
    timestamp: str | None = R.RFC_TIMESTAMP
    #: Data chunk size for RETR/TOP (None: the whole message in one Data).
    chunk: int | None = None
    #: Users whose maildrop is "locked" by another session.
    locked: frozenset[str] = frozenset()
    #: The answer to Update (None: Ok with RFC 1939's sign-off text).
    update_answer: Response | None = None
    #: The answer to StartTLS.
    stls_answer: Response = field(default_factory=Ok)
    #: Every event seen, in order.
    events: list[Event] = field(default_factory=list)
    _mechanism: str = ""
    _sasl_user: str | None = None

    def greeting(self) -> Greeting:
        return Greeting(text="POP3 server ready", apop_timestamp=self.timestamp)

    def respond(self, conn: Connection, event: Event) -> Iterator[Response]:
        self.events.append(event)
        if isinstance(event, Login):
            yield self._login(event.username, event.password)
        elif isinstance(event, ApopLogin):
            secret = self.users.get(event.username)
            assert self.timestamp is not None
            ok = secret is not None and verify_apop(self.timestamp, secret, event.digest)
            yield self._accept(event.username) if ok else Err(code="AUTH")
        elif isinstance(event, AuthStart):
            self._mechanism = event.mechanism
            yield self._sasl(event.initial_response)
        elif isinstance(event, AuthResponse):
            yield self._sasl(event.data)
        elif isinstance(event, AuthAborted):
            self._sasl_user = None
            yield Err()
        elif isinstance(event, (RetrieveMessage, TopOfMessage)):
            yield Ok()
            data = self.messages[int(event.key[1:]) - 1]
            step = self.chunk or max(len(data), 1)
            for i in range(0, len(data), step):
                if not conn.wants_more_data:
                    break
                yield Data(data=data[i : i + step])
            yield EndOfMessage()
        elif isinstance(event, Update):
            left = len(self.messages) - len(event.deleted)
            state = f"{left} messages left" if left else "maildrop empty"
            yield self.update_answer or Ok(text=f"dewey POP3 server signing off ({state})")
        else:
            assert isinstance(event, StartTLS), event
            yield self.stls_answer

    def _accept(self, user: str) -> Response:
        if user in self.locked:
            return Err(text="maildrop already locked", code="IN-USE")
        drop = maildrop(self.messages, self.uids)
        return LoginAccepted(
            maildrop=drop,
            username=user,
            text=f"{user}'s maildrop has {drop.count} messages ({drop.octets} octets)",
        )

    def _login(self, user: str, password: str) -> Response:
        if self.users.get(user) == password:
            return self._accept(user)
        return Err(code="AUTH")

    def _sasl(self, data: bytes | None) -> Response:
        if self._mechanism == "LOGIN":
            if data is None or (self._sasl_user is None and not data):
                return SaslChallenge(data=b"Username:")
            if self._sasl_user is None:
                self._sasl_user = data.decode("utf-8", "replace")
                return SaslChallenge(data=b"Password:")
            user, self._sasl_user = self._sasl_user, None
            return self._login(user, data.decode("utf-8", "replace"))
        if data is None:
            return SaslChallenge()
        plain = decode_plain(data)
        if plain is None:
            return Err(text="Malformed PLAIN response.")
        return self._login(plain[1], plain[2])


def plain(user: str, password: str, authzid: str = "") -> str:
    """A base64 PLAIN response."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ------------------------------------------------------------ transcripts


@dataclass
class Run:
    """What one transcript run produced."""

    output: bytes
    events: list[Event]
    error: RemoteProtocolError | None
    conn: Connection


def pump(conn: Connection, app: App, out: bytearray) -> RemoteProtocolError | None:
    """Process events until NEED_DATA or the end, answering each with *app*.

    Writes ``data_to_send()`` into *out* after every call into the Connection.
    """
    while True:
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            out += conn.data_to_send()
            return exc
        out += conn.data_to_send()
        if event is NEED_DATA:
            return None
        if event is PAUSED:
            # Only output_high_water pauses us here: we answer every event at once.
            assert conn.pending is None
            continue
        assert isinstance(event, Event)
        if isinstance(event, ConnectionClosed):
            return None
        for response in app.respond(conn, event):
            conn.send(response)
            out += conn.data_to_send()


def parse_script(script: str) -> tuple[list[bytes], bytes]:
    """(client lines with CRLF, expected server bytes) of a ``C:``/``S:`` script.

    One space after the colon is dropped; the rest of the line is verbatim.
    """
    client: list[bytes] = []
    server = bytearray()
    for raw in textwrap.dedent(script).splitlines():
        if not raw.strip():
            continue
        who, text = raw[:2], raw[2:]
        assert who in ("C:", "S:"), raw
        text = text[1:] if text.startswith(" ") else text
        line = text.encode("utf-8") + b"\r\n"
        if who == "C:":
            client.append(line)
        else:
            server += line
    return client, bytes(server)


MODES = ("whole", "bytewise", "pipelined")


def run(
    script: str,
    app: App | None = None,
    config: Config | None = None,
    *,
    mode: str = "whole",
    tls: bool = False,
) -> Run:
    """Play the client side of *script* in one *mode*, then EOF; return what the server did."""
    app = copy.deepcopy(app) if app is not None else App()
    client, _ = parse_script(script)
    conn = Connection(config if config is not None else cfg(apop=True), tls=tls)
    out = bytearray()
    conn.send(app.greeting())
    out += conn.data_to_send()
    if mode == "whole":
        packets = client
    elif mode == "bytewise":
        stream = b"".join(client)
        packets = [stream[i : i + 1] for i in range(len(stream))]
    else:
        assert mode == "pipelined", mode
        packets = [b"".join(client)]
    error = None
    for packet in [*packets, b""]:
        conn.receive_data(packet)
        error = pump(conn, app, out) or error
    return Run(output=bytes(out), events=app.events, error=error, conn=conn)


def transcript(
    script: str,
    app: App | None = None,
    config: Config | None = None,
    *,
    modes: Iterable[str] = MODES,
    tls: bool = False,
) -> Run:
    """Run *script* in every mode; the server bytes must match the ``S:`` lines each time.

    The events the application saw and the error raised must not depend on
    the mode either.  Returns the first run.
    """
    _, expected = parse_script(script)
    runs = [run(script, app, config, mode=m, tls=tls) for m in modes]
    for mode, result in zip(modes, runs, strict=True):
        assert (
            result.output.decode("utf-8", "replace").splitlines()
            == expected.decode("utf-8", "replace").splitlines()
        ), mode
        assert result.output == expected, mode
        assert result.events == runs[0].events, mode
        assert repr(result.error) == repr(runs[0].error), mode
    return runs[0]
