"""The state tables, checked exhaustively: every send either works or raises, nothing else.

Each situation below is reached by a short script through the public API.
For every (situation, response) pair the core must do exactly what the
tables in ``_state.py`` say: accept the response, or raise
LocalProtocolError and leave the connection in ERROR (CLOSED stays CLOSED).
No other exception, ever; and afterwards ``next_event`` only returns or
raises a ProtocolError.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import replies as R
from helpers import cfg, feed, greeted, logged_in, next_events
from hypothesis import given
from hypothesis import strategies as st

from pop3proto import (
    Config,
    Connection,
    ConnectionClosed,
    Data,
    Disconnect,
    EndOfMessage,
    Err,
    Event,
    Greeting,
    LocalProtocolError,
    LoginAccepted,
    Maildrop,
    Ok,
    Phase,
    ProtocolError,
    RemoteProtocolError,
    Response,
    RetrieveMessage,
    SaslChallenge,
    TopOfMessage,
)
from pop3proto._connection import Sentinel
from pop3proto._state import ANSWERS, COMMANDS, KNOWN_COMMANDS, NEXT

CONFIG = cfg(apop=True, stls=True, max_bad_commands_before_login=1)


def _greeting() -> Connection:
    return Connection(CONFIG)


def _authorization() -> Connection:
    return greeted(CONFIG, apop=True)


def _script(
    lines: bytes, *answers: Response, login: bool = False, config: Config = CONFIG
) -> Callable[[], Connection]:
    """Feed *lines* (b"" is EOF), send *answers*, then read what follows."""

    def make() -> Connection:
        conn = logged_in(config) if login else greeted(config, apop=True)
        feed(conn, lines)
        for answer in answers:
            conn.send(answer)
        next_events(conn)
        conn.data_to_send()
        return conn

    return make


def _misused() -> Connection:
    conn = _authorization()
    with pytest.raises(LocalProtocolError):
        conn.send(Ok())
    return conn


def _remote_error() -> Connection:
    conn = _authorization()
    with pytest.raises(RemoteProtocolError):
        feed(conn, b"\x00\r\n")
    return conn


def _send_failed() -> Connection:
    conn = logged_in(CONFIG)
    conn.send_failed()
    return conn


def _greeting_refused() -> Connection:
    conn = Connection(CONFIG)
    conn.send(Err(code="SYS/TEMP"))
    return conn


TOP = b"TOP 1 0\r\n"
SITUATIONS: dict[str, Callable[[], Connection]] = {
    "greeting": _greeting,
    "authorization": _authorization,
    "user-given": _script(b"USER mrose\r\n"),
    "login-pending": _script(b"USER mrose\r\nPASS x\r\n"),
    "apop-pending": _script(f"APOP mrose {R.RFC_DIGEST}\r\n".encode()),
    "auth-start-pending": _script(b"AUTH PLAIN\r\n"),
    "sasl-continuation": _script(b"AUTH PLAIN\r\n", SaslChallenge()),
    "auth-response-pending": _script(b"AUTH PLAIN\r\nAAAA\r\n", SaslChallenge()),
    "auth-aborted-pending": _script(b"AUTH PLAIN\r\n*\r\n", SaslChallenge()),
    "stls-pending": _script(b"STLS\r\n"),
    "after-stls": _script(b"STLS\r\n", Ok()),
    "transaction": lambda: logged_in(CONFIG),
    "retr-pending": _script(b"RETR 1\r\n", login=True),
    "retr-sending": _script(b"RETR 1\r\n", Ok(), login=True),
    "retr-sent-data": _script(b"RETR 1\r\n", Ok(), Data(data=b"x\r"), login=True),
    "retr-done": _script(b"RETR 1\r\nNOOP\r\n", Ok(), EndOfMessage(), login=True),
    "top-pending": _script(TOP, login=True),
    "top-sending": _script(TOP, Ok(), login=True),
    "top-done": _script(TOP, Ok(), Data(data=b"H: 1\r\n\r\nbody\r\n"), login=True),
    "update-pending": _script(b"DELE 1\r\nQUIT\r\n", login=True),
    "closed-by-quit": _script(b"QUIT\r\n"),
    "closed-by-update": _script(b"QUIT\r\n", Ok(), login=True),
    "closed-by-eof": _script(b""),
    "closed-by-disconnect": _script(b"CAPA\r\n", Disconnect(text="bye")),
    "closed-by-auth-failures": _script(
        b"AUTH PLAIN =\r\n", Err(), config=cfg(max_auth_failures=1)
    ),
    "refused-greeting": _greeting_refused,
    "error-misuse": _misused,
    "error-remote": _remote_error,
    "error-send-failed": _send_failed,
}


RESPONSES: list[Response] = [
    Greeting(),
    Greeting(apop_timestamp=R.RFC_TIMESTAMP),
    LoginAccepted(maildrop=Maildrop()),
    SaslChallenge(data=b"x"),
    Ok(),
    Ok(text="text"),
    Err(),
    Err(text="no", code="SYS/TEMP"),
    Data(data=b".x\r\n"),
    Data(data=b""),
    EndOfMessage(),
    Disconnect(),
    Disconnect(text="bye", code="SYS/TEMP"),
    ConnectionClosed(),
]


def allowed(conn: Connection, response: Response) -> bool:
    """What the tables of ``_state.py`` (and its Rule 1 header) allow."""
    if conn.phase in (Phase.CLOSED, Phase.ERROR):
        return False
    kind = type(response)
    if kind in (Disconnect, ConnectionClosed):
        return True
    if kind is Data:
        return conn.sending_lines
    if conn.phase is Phase.GREETING:
        return kind in (Greeting, Err)
    pending = conn.pending
    if pending is None or kind not in ANSWERS[type(pending)]:
        return False
    if isinstance(pending, (RetrieveMessage, TopOfMessage)):
        return (kind is EndOfMessage) == conn.sending_lines
    return True


def check_send(conn: Connection, response: Response) -> None:
    """Send *response*; it must work or raise LocalProtocolError, as ``allowed`` says."""
    expected = allowed(conn, response)
    before = conn.phase
    try:
        conn.send(response)
    except LocalProtocolError:
        assert not expected, (before, response)
        assert conn.phase is (Phase.CLOSED if before is Phase.CLOSED else Phase.ERROR)
    else:
        assert expected, (before, response)
    assert isinstance(conn.data_to_send(), bytes)
    try:
        result = conn.next_event()
    except ProtocolError:
        assert conn.phase is Phase.ERROR
    else:
        assert isinstance(result, (Event, Sentinel))


@pytest.mark.parametrize("response", RESPONSES, ids=repr)
@pytest.mark.parametrize("situation", SITUATIONS)
def test_every_situation_and_response(situation: str, response: Response) -> None:
    check_send(SITUATIONS[situation](), response)


@given(
    st.sampled_from(sorted(SITUATIONS)),
    st.lists(st.sampled_from(RESPONSES), min_size=1, max_size=6),
)
def test_response_sequences(situation: str, responses: list[Response]) -> None:
    conn = SITUATIONS[situation]()
    for response in responses:
        check_send(conn, response)


@pytest.mark.parametrize("situation", SITUATIONS)
def test_situation_reached(situation: str) -> None:
    """Each script reaches what its name says (so the matrix above means something)."""
    conn = SITUATIONS[situation]()
    phase = situation.split("-")[0]
    expected = {
        "greeting": Phase.GREETING,
        "authorization": Phase.AUTHORIZATION,
        "transaction": Phase.TRANSACTION,
        "update": Phase.UPDATE,
        "closed": Phase.CLOSED,
        "refused": Phase.CLOSED,
        "error": Phase.ERROR,
    }.get(phase)
    if expected is not None:
        assert conn.phase is expected
    if situation.endswith("-pending"):
        assert conn.pending is not None
        assert not conn.sending_lines
    if situation.endswith("-sending") or situation.endswith("-data"):
        assert conn.sending_lines
        assert conn.wants_more_data
    if situation == "top-done":
        assert conn.sending_lines
        assert not conn.wants_more_data


# ------------------------------------------------------------ the command table


@pytest.mark.parametrize("keyword", sorted(KNOWN_COMMANDS))
@pytest.mark.parametrize("phase", [Phase.AUTHORIZATION, Phase.TRANSACTION])
def test_command_table(phase: Phase, keyword: bytes) -> None:
    """A known command outside its phase gets the wrong-state -ERR, inside it never does."""
    conn = logged_in() if phase is Phase.TRANSACTION else greeted()
    conn.receive_data(keyword + b"\r\n")
    conn.next_event()
    reply = conn.data_to_send()
    assert (reply == R.wire(R.WRONG_STATE)) is (keyword not in COMMANDS[phase])


def test_tables_cover_every_event_that_waits() -> None:
    assert set(COMMANDS) == {Phase.AUTHORIZATION, Phase.TRANSACTION}
    for answers in ANSWERS.values():
        assert answers
        assert Disconnect not in answers  # handled before the table, everywhere


NEXT_SITUATIONS = {
    "Login": "login-pending",
    "ApopLogin": "apop-pending",
    "AuthStart": "auth-start-pending",
    "AuthResponse": "auth-response-pending",
    "StartTLS": "stls-pending",
    "Update": "update-pending",
}


@pytest.mark.parametrize(("event", "response"), sorted(NEXT, key=repr), ids=repr)
def test_next_phase_table(event: type[Event], response: type[Response]) -> None:
    """Each answer in NEXT leads where the table says (so the table cannot drift)."""
    assert response in ANSWERS[event]
    conn = SITUATIONS[NEXT_SITUATIONS[event.__name__]]()
    assert type(conn.pending) is event
    answer = LoginAccepted(maildrop=Maildrop()) if response is LoginAccepted else response()
    conn.send(answer)
    assert conn.phase is NEXT[(event, response)]


def test_sasl_sub_state_reads_the_next_line_as_an_answer() -> None:
    conn = SITUATIONS["sasl-continuation"]()
    assert conn.pending is None
    # "STAT" here is base64-looking data, not a command.
    assert feed(conn, b"STAT\r\n")[0].__class__.__name__ == "AuthResponse"
