"""The Connection as a client sees it: bytes in, bytes out.

RFC 1939 sections 4-7 example sessions run as transcripts (whole, byte by
byte, pipelined); then CAPA, STLS, SASL framing, UTF8, errors and limits,
API misuse, streaming, pipelining and disconnects.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import replies as R
from helpers import (
    MODES,
    MSG1,
    MSG2,
    RFC_UIDS,
    App,
    b64,
    cfg,
    chat,
    crlf,
    feed,
    greeted,
    logged_in,
    maildrop,
    message_lines,
    next_events,
    plain,
    run,
    server_says,
    split_status,
    top_oracle,
    transcript,
    unstuff,
)

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
    Disconnect,
    EndOfMessage,
    Err,
    Greeting,
    LocalProtocolError,
    Login,
    LoginAccepted,
    Maildrop,
    MessageInfo,
    Ok,
    Phase,
    RemoteProtocolError,
    Response,
    RetrieveMessage,
    SaslChallenge,
    StartTLS,
    TopOfMessage,
    Update,
    wire_size,
)

W = R.wire
#: "mrose" and "secret" in FULLWIDTH LATIN letters: NFKC folds them to ASCII.
FW_MROSE = "\uff4d\uff52\uff4f\uff53\uff45"
FW_SECRET = "\uff53\uff45\uff43\uff52\uff45\uff54"

# ================================================================ RFC 1939 transcripts

LOGIN_USER_PASS = f"""
S: {R.GREETING}
C: USER mrose
S: {R.OK}
C: PASS {R.RFC_SECRET}
S: {R.MAILDROP_2}
"""

# RFC 1939 section 10, the example POP3 session (our DELE text is Dovecot's).
SECTION_10 = f"""
S: {R.GREETING}
C: APOP mrose {R.RFC_DIGEST}
S: {R.MAILDROP_2}
C: STAT
S: +OK 2 320
C: LIST
S: +OK 2 messages (320 octets)
S: 1 120
S: 2 200
S: .
C: RETR 1
S: +OK 120 octets
{server_says(message_lines(MSG1))}
S: .
C: DELE 1
S: {R.DELETED}
C: RETR 2
S: +OK 200 octets
{server_says(message_lines(MSG2))}
S: .
C: DELE 2
S: {R.DELETED}
C: QUIT
S: {R.SIGN_OFF_EMPTY}
"""

# Section 5: STAT and LIST.
STAT_LIST = f"""{LOGIN_USER_PASS}
C: STAT
S: {R.STAT_2}
C: LIST
S: {R.LIST_2}
S: 1 120
S: 2 200
S: .
C: LIST 2
S: +OK 2 200
C: LIST 3
S: {R.NO_SUCH_MESSAGE}
C: QUIT
S: {R.SIGN_OFF_2_LEFT}
"""

# Section 5: RETR, DELE (and DELE of a deleted message), NOOP, RSET.
RETR_DELE_NOOP_RSET = f"""{LOGIN_USER_PASS}
C: RETR 1
S: +OK 120 octets
{server_says(message_lines(MSG1))}
S: .
C: DELE 1
S: {R.DELETED}
C: DELE 1
S: {R.MESSAGE_DELETED}
C: NOOP
S: {R.OK}
C: RSET
S: {R.RSET_2}
C: DELE 2
S: {R.DELETED}
C: QUIT
S: {R.SIGN_OFF_1_LEFT}
"""

# Section 7: TOP and UIDL (with the RFC's unique-ids).
TOP_UIDL = f"""{LOGIN_USER_PASS}
C: TOP 1 10
S: {R.OK}
{server_says(message_lines(MSG1))}
S: .
C: TOP 1 0
S: {R.OK}
S: From: mrose@dbc.mtview.ca.us
S: Subject: one
S:
S: .
C: TOP 2 1
S: {R.OK}
{server_says(message_lines(MSG2)[:4])}
S: .
C: TOP 100 3
S: {R.NO_SUCH_MESSAGE}
C: UIDL
S: {R.OK}
S: 1 whqtswO00WBw418f9t5JxYwZ
S: 2 QhdPYR:00WBw1Ph7x7
S: .
C: UIDL 2
S: +OK 2 QhdPYR:00WBw1Ph7x7
C: UIDL 3
S: {R.NO_SUCH_MESSAGE}
C: QUIT
S: {R.SIGN_OFF_2_LEFT}
"""

# Section 6: QUIT in AUTHORIZATION.
QUIT_AUTHORIZATION = f"""
S: {R.GREETING}
C: QUIT
S: {R.LOGGING_OUT}
"""

# Section 7: USER and PASS (a wrong password, PASS without USER, then a login).
USER_PASS = f"""
S: {R.GREETING}
C: USER mrose
S: {R.OK}
C: PASS secret
S: {R.BAD_CREDENTIALS}
C: PASS {R.RFC_SECRET}
S: {R.NO_USERNAME}
C: USER mrose
S: {R.OK}
C: PASS {R.RFC_SECRET}
S: {R.MAILDROP_2}
C: QUIT
S: {R.SIGN_OFF_2_LEFT}
"""

# Section 7: APOP, a wrong digest then the RFC's own one (upper case is fine).
APOP = f"""
S: {R.GREETING}
C: APOP mrose {"0" * 32}
S: {R.BAD_CREDENTIALS}
C: APOP mrose {R.RFC_DIGEST.upper()}
S: {R.MAILDROP_2}
"""


@pytest.mark.parametrize(
    "script",
    [SECTION_10, STAT_LIST, RETR_DELE_NOOP_RSET, TOP_UIDL, QUIT_AUTHORIZATION, USER_PASS, APOP],
    ids=["section-10", "stat-list", "retr-dele-noop-rset", "top-uidl", "quit", "user-pass", "apop"],
)
def test_rfc1939_examples(script: str) -> None:
    transcript(script)


def test_rfc1939_section_10_events() -> None:
    result = transcript(SECTION_10)
    assert result.events == [
        ApopLogin(username="mrose", digest=R.RFC_DIGEST),
        RetrieveMessage(number=1, key="m1", size=120),
        RetrieveMessage(number=2, key="m2", size=200),
        Update(deleted=("m1", "m2")),
    ]
    assert result.conn.phase is Phase.CLOSED
    assert result.conn.username == "mrose"


def test_quit_in_authorization_yields_no_update() -> None:
    assert transcript(QUIT_AUTHORIZATION).events == []


def test_pass_answer_in_use_is_not_an_auth_failure() -> None:
    script = f"""
S: {R.GREETING}
C: USER mrose
S: {R.OK}
C: PASS {R.RFC_SECRET}
S: {R.IN_USE}
C: USER mrose
S: {R.OK}
C: PASS {R.RFC_SECRET}
S: {R.IN_USE}
C: USER mrose
S: {R.OK}
C: PASS {R.RFC_SECRET}
S: {R.IN_USE}
C: USER mrose
S: {R.OK}
"""
    result = transcript(script, App(locked=frozenset({"mrose"})))
    assert result.conn.stats.auth_failures == 0


def test_deleted_messages_are_invisible_and_others_keep_numbers() -> None:
    third = b"Subject: three\r\n\r\nthird\r\n"
    size3 = wire_size(third)
    script = f"""{LOGIN_USER_PASS.replace("2 messages (320", f"3 messages ({320 + size3}")}
C: DELE 2
S: {R.DELETED}
C: STAT
S: +OK 2 {120 + size3}
C: LIST
S: +OK 2 messages ({120 + size3} octets)
S: 1 120
S: 3 {size3}
S: .
C: LIST 2
S: {R.MESSAGE_DELETED}
C: UIDL
S: {R.OK}
S: 1 whqtswO00WBw418f9t5JxYwZ
S: 3 third-uid
S: .
C: UIDL 2
S: {R.MESSAGE_DELETED}
C: RETR 2
S: {R.MESSAGE_DELETED}
C: TOP 2 0
S: {R.MESSAGE_DELETED}
C: DELE 2
S: {R.MESSAGE_DELETED}
C: RETR 3
S: +OK {size3} octets
S: Subject: three
S:
S: third
S: .
C: LIST 3
S: +OK 3 {size3}
C: QUIT
S: +OK dewey POP3 server signing off (2 messages left)
"""
    app = App(messages=[MSG1, MSG2, third], uids=(*RFC_UIDS, "third-uid"))
    result = transcript(script, app)
    assert result.events[-1] == Update(deleted=("m2",))


def test_update_lists_the_marked_keys_in_number_order() -> None:
    messages = [b"a\r\n", b"b\r\n", b"c\r\n", b"d\r\n"]
    script = f"""
S: {R.GREETING}
C: USER mrose
S: {R.OK}
C: PASS {R.RFC_SECRET}
S: +OK mrose's maildrop has 4 messages (12 octets)
C: DELE 4
S: {R.DELETED}
C: DELE 1
S: {R.DELETED}
C: DELE 3
S: {R.DELETED}
C: QUIT
S: +OK dewey POP3 server signing off (1 messages left)
"""
    result = transcript(script, App(messages=messages, uids=None))
    assert result.events[-1] == Update(deleted=("m1", "m3", "m4"))


def test_rset_unmarks_everything() -> None:
    script = f"""{LOGIN_USER_PASS}
C: DELE 1
S: {R.DELETED}
C: DELE 2
S: {R.DELETED}
C: STAT
S: +OK 0 0
C: LIST
S: +OK 0 messages (0 octets)
S: .
C: RSET
S: {R.RSET_2}
C: QUIT
S: {R.SIGN_OFF_2_LEFT}
"""
    assert transcript(script).events[-1] == Update(deleted=())


def test_eof_in_transaction_applies_nothing(txn: Connection) -> None:
    assert chat(txn, b"DELE 1\r\n") == W(R.DELETED)
    assert feed(txn, b"") == [ConnectionClosed()]
    assert txn.phase is Phase.CLOSED
    assert txn.data_to_send() == b""


# ================================================================ CAPA


def capa_of(conn: Connection) -> list[str]:
    return chat(conn, b"CAPA\r\n").decode().split("\r\n")[:-1]


@pytest.mark.parametrize(
    ("config", "tls", "expected"),
    [
        (cfg(), False, R.CAPA_AUTHORIZATION),
        (cfg(), True, R.CAPA_AUTHORIZATION),
        (
            cfg(cleartext_auth=False),
            False,
            R.capa("UTF8", "LANG", "IMPLEMENTATION pop3proto"),
        ),
        (cfg(cleartext_auth=False), True, R.CAPA_AUTHORIZATION),
        (
            cfg(cleartext_auth=False, sasl_mechanisms=("SCRAM-SHA-256", "PLAIN")),
            False,
            R.capa("SASL SCRAM-SHA-256", "UTF8", "LANG", "IMPLEMENTATION pop3proto"),
        ),
        (
            cfg(stls=True),
            False,
            R.capa(
                "USER", "SASL PLAIN LOGIN", "STLS", "UTF8 USER", "LANG", "IMPLEMENTATION pop3proto"
            ),
        ),
        (cfg(stls=True), True, R.CAPA_AUTHORIZATION),
        (
            cfg(login_delay=900, expire="NEVER", implementation="test 1.0"),
            False,
            R.capa(
                "USER",
                "SASL PLAIN LOGIN",
                "UTF8 USER",
                "LANG",
                "LOGIN-DELAY 900",
                "EXPIRE NEVER",
                "IMPLEMENTATION test 1.0",
            ),
        ),
        (
            cfg(implementation=None, utf8=False, lang=False, sasl_mechanisms=()),
            False,
            R.capa("USER"),
        ),
        (
            cfg(user_command=False, expire=0),
            False,
            R.capa("SASL PLAIN LOGIN", "UTF8", "LANG", "EXPIRE 0", "IMPLEMENTATION pop3proto"),
        ),
    ],
    ids=[
        "default",
        "default-tls",
        "no-cleartext",
        "no-cleartext-tls",
        "no-cleartext-scram",
        "stls",
        "stls-implicit-tls",
        "delay-expire",
        "minimal",
        "no-user",
    ],
)
def test_capa_in_authorization(config: Config, tls: bool, expected: list[str]) -> None:
    assert capa_of(greeted(config, tls=tls)) == expected


def test_capa_in_transaction(txn: Connection) -> None:
    assert capa_of(txn) == R.CAPA_TRANSACTION


def test_capa_in_transaction_with_policy() -> None:
    conn = logged_in(cfg(login_delay=900, expire=31, stls=True))
    assert capa_of(conn) == R.capa(
        "LANG", "LOGIN-DELAY 900", "EXPIRE 31", "IMPLEMENTATION pop3proto"
    )


def test_capa_in_transaction_is_per_user() -> None:
    conn = logged_in(cfg(login_delay=900, expire="NEVER"), login_delay=60, expire=30)
    assert capa_of(conn) == R.capa(
        "LANG", "LOGIN-DELAY 60", "EXPIRE 30", "IMPLEMENTATION pop3proto"
    )
    conn = logged_in(login_delay=0, expire="NEVER")
    assert capa_of(conn) == R.capa(
        "LANG", "LOGIN-DELAY 0", "EXPIRE NEVER", "IMPLEMENTATION pop3proto"
    )


def test_capa_takes_no_argument(conn: Connection) -> None:
    assert chat(conn, b"CAPA x\r\n") == W(R.SYNTAX)


def test_plaintext_logins_refused_without_tls() -> None:
    conn = greeted(cfg(cleartext_auth=False, apop=True), apop=True)
    assert chat(conn, b"USER mrose\r\n") == W(R.PLAINTEXT_DISALLOWED)
    assert chat(conn, b"PASS x\r\n") == W(R.NO_USERNAME)
    assert chat(conn, f"APOP mrose {R.RFC_DIGEST}\r\n".encode()) == W(R.PLAINTEXT_DISALLOWED)
    assert chat(conn, b"AUTH PLAIN\r\n") == W(R.UNSUPPORTED_MECHANISM)
    assert chat(conn, b"AUTH\r\n") == W(R.OK, R.END)
    assert conn.phase is Phase.AUTHORIZATION


def test_plaintext_logins_allowed_over_tls() -> None:
    conn = greeted(cfg(cleartext_auth=False), tls=True)
    assert conn.tls
    assert feed(conn, b"USER mrose\r\nPASS x\r\n") == [Login(username="mrose", password="x")]
    assert conn.data_to_send() == W(R.OK)


# ================================================================ STLS

STLS_CONFIG = cfg(stls=True)
CAPA_BEFORE_TLS = R.capa(
    "USER", "SASL PLAIN LOGIN", "STLS", "UTF8 USER", "LANG", "IMPLEMENTATION pop3proto"
)


def test_stls_discards_pipelined_input() -> None:
    conn = greeted(STLS_CONFIG)
    assert feed(conn, b"STLS\r\nCAPA\r\n") == [StartTLS()]
    assert conn.next_event() is PAUSED
    assert conn.data_to_send() == b""
    conn.send(Ok())
    assert conn.data_to_send() == W(R.BEGIN_TLS)
    assert conn.tls
    # RFC 2595 / CVE-2011-0411: the CAPA sent in clear is never answered.
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""
    assert capa_of(conn) == R.CAPA_AUTHORIZATION


def test_stls_discards_a_pipelined_partial_line() -> None:
    conn = greeted(STLS_CONFIG)
    assert feed(conn, b"STLS\r\nUSER mal") == [StartTLS()]
    conn.send(Ok(text="Go ahead"))
    assert conn.data_to_send() == W("+OK Go ahead")
    assert chat(conn, b"lory\r\n") == W(R.UNKNOWN)


def test_stls_restarts_the_session() -> None:
    script = f"""
S: {R.GREETING}
C: CAPA
{server_says(CAPA_BEFORE_TLS)}
C: UTF8
S: {R.UTF8_ENABLED}
C: USER mrose
S: {R.OK}
C: STLS
S: {R.BEGIN_TLS}
C: PASS {R.RFC_SECRET}
S: {R.NO_USERNAME}
C: CAPA
{server_says(R.CAPA_AUTHORIZATION)}
C: STLS
S: {R.TLS_ACTIVE}
C: USER mrösé
S: {R.NON_ASCII_USER}
C: USER mrose
S: {R.OK}
C: PASS {R.RFC_SECRET}
S: {R.MAILDROP_2}
C: STLS
S: {R.WRONG_STATE}
"""
    result = transcript(script, config=STLS_CONFIG, modes=("whole", "bytewise"))
    assert result.events[0] == StartTLS()
    assert result.conn.tls
    assert not result.conn.utf8


def test_stls_pipelined_transcript_loses_everything_after_stls() -> None:
    script = f"""
S: {R.GREETING}
C: STLS
S: {R.BEGIN_TLS}
C: CAPA
C: USER mrose
C: QUIT
"""
    result = transcript(script, config=STLS_CONFIG, modes=("pipelined",))
    assert result.conn.phase is Phase.CLOSED  # by the EOF, not by the QUIT


def test_stls_refused_answers_the_pipelined_command() -> None:
    conn = greeted(STLS_CONFIG)
    assert feed(conn, b"STLS\r\nCAPA\r\n") == [StartTLS()]
    conn.send(Err())
    assert not conn.tls
    assert next_events(conn) == []
    assert conn.data_to_send() == W(R.TLS_UNAVAILABLE, *CAPA_BEFORE_TLS)
    assert feed(conn, b"STLS\r\n") == [StartTLS()]
    conn.send(Err(text="No certificate.", code="SYS/TEMP"))
    assert conn.data_to_send() == W("-ERR [SYS/TEMP] No certificate.")


@pytest.mark.parametrize(
    ("config", "tls", "line", "reply"),
    [
        (cfg(), False, b"STLS\r\n", R.STLS_DISABLED),
        (STLS_CONFIG, True, b"STLS\r\n", R.TLS_ACTIVE),
        (STLS_CONFIG, False, b"STLS now\r\n", R.SYNTAX),
    ],
)
def test_stls_refused(config: Config, tls: bool, line: bytes, reply: str) -> None:
    assert chat(greeted(config, tls=tls), line) == W(reply)


def test_stls_after_login_is_refused() -> None:
    assert chat(logged_in(STLS_CONFIG), b"STLS\r\n") == W(R.WRONG_STATE)


def test_stls_keeps_auth_failure_count() -> None:
    conn = greeted(cfg(stls=True, max_auth_failures=2))
    assert feed(conn, b"USER a\r\nPASS b\r\n") == [Login(username="a", password="b")]
    conn.send(Err())
    assert feed(conn, b"STLS\r\n") == [StartTLS()]
    conn.send(Ok())
    assert feed(conn, b"USER a\r\nPASS b\r\n") == [Login(username="a", password="b")]
    conn.send(Err(code="AUTH"))
    assert conn.phase is Phase.CLOSED


# ================================================================ SASL


def test_auth_plain_with_initial_response() -> None:
    script = f"""
S: {R.GREETING}
C: AUTH PLAIN {plain("mrose", R.RFC_SECRET)}
S: {R.MAILDROP_2}
C: QUIT
S: {R.SIGN_OFF_2_LEFT}
"""
    result = transcript(script)
    assert result.events[0] == AuthStart(
        mechanism="PLAIN", initial_response=f"\0mrose\0{R.RFC_SECRET}".encode()
    )
    assert result.conn.username == "mrose"


def test_auth_plain_with_challenge() -> None:
    script = f"""
S: {R.GREETING}
C: auth plain
S: {R.EMPTY_CHALLENGE}
C: {plain("mrose", R.RFC_SECRET, authzid="mrose")}
S: {R.MAILDROP_2}
"""
    result = transcript(script)
    assert result.events == [
        AuthStart(mechanism="PLAIN", initial_response=None),
        AuthResponse(data=f"mrose\0mrose\0{R.RFC_SECRET}".encode()),
    ]


def test_auth_plain_empty_initial_response() -> None:
    script = f"""
S: {R.GREETING}
C: AUTH PLAIN =
S: -ERR Malformed PLAIN response.
C: CAPA
{server_says(R.CAPA_AUTHORIZATION)}
"""
    result = transcript(script)
    assert result.events == [AuthStart(mechanism="PLAIN", initial_response=b"")]
    assert result.conn.stats.auth_failures == 1


def test_auth_login() -> None:
    script = f"""
S: {R.GREETING}
C: AUTH LOGIN
S: {R.CHALLENGE_USERNAME}
C: {b64("mrose")}
S: {R.CHALLENGE_PASSWORD}
C: {b64("wrong")}
S: {R.BAD_CREDENTIALS}
C: AUTH LOGIN {b64("mrose")}
S: {R.CHALLENGE_PASSWORD}
C: {b64(R.RFC_SECRET)}
S: {R.MAILDROP_2}
"""
    result = transcript(script)
    assert result.conn.stats.auth_failures == 1
    assert result.conn.username == "mrose"


def test_auth_cancel_and_bad_base64() -> None:
    script = f"""
S: {R.GREETING}
C: AUTH PLAIN
S: {R.EMPTY_CHALLENGE}
C: *
S: {R.AUTH_ABORTED}
C: AUTH PLAIN
S: {R.EMPTY_CHALLENGE}
C: not base64!
S: {R.BAD_BASE64}
C: CAPA
{server_says(R.CAPA_AUTHORIZATION)}
"""
    result = transcript(script, config=cfg(max_auth_failures=5))
    assert result.conn.stats.auth_failures == 2


def test_auth_abort_is_an_event_for_the_application() -> None:
    # RFC 5034: "*" cancels; the application hears of it (failed-login
    # accounting, delays, logs) and answers with the -ERR.
    conn = greeted(cfg(max_auth_failures=2, sasl_mechanisms=("LOGIN",)))
    assert feed(conn, b"AUTH LOGIN\r\n") == [AuthStart(mechanism="LOGIN", initial_response=None)]
    conn.send(SaslChallenge(data=b"Username:"))
    assert feed(conn, b"*\r\nCAPA\r\n") == [AuthAborted(mechanism="LOGIN")]
    assert conn.data_to_send() == b"+ VXNlcm5hbWU6\r\n"
    assert conn.next_event() is PAUSED  # CAPA waits behind the pending event
    conn.send(Err(code="AUTH"))
    assert conn.data_to_send() == W(R.AUTH_ABORTED_CODE)
    assert conn.stats.auth_failures == 1
    assert next_events(conn) == []
    assert conn.data_to_send().startswith(b"+OK Capability list follows\r\n")
    # A temporary failure does not count; an aborted exchange otherwise does.
    feed(conn, b"AUTH LOGIN\r\n")
    conn.send(SaslChallenge())
    assert feed(conn, b"*\r\n") == [AuthAborted(mechanism="LOGIN")]
    conn.send(Err(text="Try later.", code="SYS/TEMP"))
    assert conn.stats.auth_failures == 1
    feed(conn, b"AUTH LOGIN\r\n")
    conn.send(SaslChallenge())
    feed(conn, b"*\r\n")
    conn.send(Err())
    assert conn.data_to_send().endswith(W(R.AUTH_ABORTED))
    assert conn.phase is Phase.CLOSED  # the second counted failure ends it


@pytest.mark.parametrize("answer", [LoginAccepted(maildrop=Maildrop()), SaslChallenge(), Ok()])
def test_auth_abort_takes_only_err(answer: Response) -> None:
    conn = greeted()
    feed(conn, b"AUTH PLAIN\r\n")
    conn.send(SaslChallenge())
    assert feed(conn, b"*\r\n") == [AuthAborted(mechanism="PLAIN")]
    with pytest.raises(LocalProtocolError):
        conn.send(answer)
    assert conn.phase is Phase.ERROR


@pytest.mark.parametrize("initial", [b"abc", b"ab=c", b"a===", b"YWJ\xff"])
def test_auth_bad_initial_response(conn: Connection, initial: bytes) -> None:
    assert chat(conn, b"AUTH PLAIN " + initial + b"\r\n") == W(R.BAD_INITIAL_RESPONSE)
    assert conn.stats.auth_failures == 1


def test_bare_auth_lists_mechanisms(conn: Connection) -> None:
    assert chat(conn, b"AUTH\r\n") == W(R.OK, "PLAIN", "LOGIN", R.END)


@pytest.mark.parametrize("line", [b"AUTH CRAM-MD5\r\n", b"AUTH X =\r\n", b"AUTH \xff\r\n"])
def test_auth_unknown_mechanism(conn: Connection, line: bytes) -> None:
    assert chat(conn, line) == W(R.UNSUPPORTED_MECHANISM)
    assert conn.stats.auth_failures == 0


def test_auth_too_many_arguments(conn: Connection) -> None:
    assert chat(conn, b"AUTH PLAIN = x\r\n") == W(R.SYNTAX)


def test_auth_in_transaction(txn: Connection) -> None:
    assert chat(txn, b"AUTH PLAIN\r\n") == W(R.WRONG_STATE)


def test_auth_answered_without_username_leaves_it_unset(conn: Connection) -> None:
    assert feed(conn, b"AUTH PLAIN =\r\n") == [AuthStart(mechanism="PLAIN", initial_response=b"")]
    conn.send(LoginAccepted(maildrop=Maildrop()))
    assert conn.data_to_send() == W(R.LOGGED_IN)
    assert conn.username is None
    assert conn.phase is Phase.TRANSACTION


def test_sasl_challenge_again_after_response() -> None:
    conn = greeted(cfg(sasl_mechanisms=("X-TEST",)))
    assert feed(conn, b"AUTH X-TEST\r\n") == [AuthStart(mechanism="X-TEST", initial_response=None)]
    conn.send(SaslChallenge(data=b"one"))
    assert feed(conn, b"\r\n") == [AuthResponse(data=b"")]
    conn.send(SaslChallenge(data=b"two"))
    assert feed(conn, b"Zm9v\r\n") == [AuthResponse(data=b"foo")]
    conn.send(Err(code="AUTH"))
    assert conn.data_to_send() == W("+ b25l", "+ dHdv", R.BAD_CREDENTIALS)
    assert conn.stats.auth_failures == 1


def test_auth_failures_close_the_session() -> None:
    script = f"""
S: {R.GREETING}
C: USER mrose
S: {R.OK}
C: PASS a
S: {R.BAD_CREDENTIALS}
C: AUTH PLAIN {b64("x")}
S: -ERR Malformed PLAIN response.
C: APOP mrose {"1" * 32}
S: {R.BAD_CREDENTIALS}
C: CAPA
"""
    result = transcript(script)
    assert result.conn.phase is Phase.CLOSED
    assert result.conn.stats.auth_failures == 3
    assert result.conn.next_event() == ConnectionClosed()


@pytest.mark.parametrize(
    ("err", "line"),
    [
        (Err(), R.AUTH_FAILED),
        (Err(code="AUTH"), R.BAD_CREDENTIALS),
        (Err(text="No.", code="AUTH"), "-ERR [AUTH] No."),
        (Err(code="SYS/TEMP"), "-ERR [SYS/TEMP] Authentication failed."),
        (Err(text="Too soon.", code="LOGIN-DELAY"), "-ERR [LOGIN-DELAY] Too soon."),
    ],
)
def test_login_refusals(err: Err, line: str) -> None:
    conn = greeted(cfg(max_auth_failures=1))
    assert feed(conn, b"USER u\r\nPASS p\r\n") == [Login(username="u", password="p")]
    conn.send(err)
    assert conn.data_to_send() == W(R.OK, line)
    counted = err.code in (None, "AUTH")
    assert conn.stats.auth_failures == int(counted)
    assert conn.phase is (Phase.CLOSED if counted else Phase.AUTHORIZATION)


def test_auth_line_may_exceed_the_command_limit() -> None:
    config = cfg(max_line_length=64, max_sasl_line_length=128, max_buffered_input=1024)
    conn = greeted(config)
    initial = b64("\0mrose\0" + "p" * 60)
    line = f"AUTH PLAIN {initial}\r\n".encode()
    assert 64 < len(line) <= 128
    event = AuthStart(mechanism="PLAIN", initial_response=b"\0mrose\0" + b"p" * 60)
    assert feed(conn, line) == [event]


def test_auth_line_over_the_sasl_limit() -> None:
    config = cfg(max_line_length=64, max_sasl_line_length=128, max_buffered_input=1024)
    conn = greeted(config)
    line = b"AUTH PLAIN " + b"A" * 116 + b"\r\n"
    assert len(line) == 129
    assert feed(conn, line + b"NOOP\r\n") == []
    assert conn.data_to_send() == W(R.LINE_TOO_LONG, R.WRONG_STATE)
    assert conn.phase is Phase.AUTHORIZATION
    assert conn.stats.auth_failures == 0  # a bad command, not a failed login


def test_sasl_continuation_line_limits() -> None:
    config = cfg(max_line_length=64, max_sasl_line_length=128, max_buffered_input=1024)
    conn = greeted(config)
    assert feed(conn, b"AUTH PLAIN\r\n") == [AuthStart(mechanism="PLAIN", initial_response=None)]
    conn.send(SaslChallenge())
    conn.data_to_send()
    ok = b"A" * 124 + b"\r\n"  # 126 octets: under the limit
    assert feed(conn, ok) == [AuthResponse(data=b"\0" * 93)]
    conn.send(SaslChallenge())
    conn.data_to_send()
    # Over the limit: the exchange fails like bad base64, and commands follow.
    assert feed(conn, b"A" * 128 + b"\r\nCAPA\r\n") == []
    assert conn.data_to_send() == W(R.LINE_TOO_LONG, *R.CAPA_AUTHORIZATION)
    assert conn.stats.auth_failures == 1


def test_sasl_continuation_too_long_to_buffer() -> None:
    config = cfg(max_line_length=64, max_sasl_line_length=128, max_buffered_input=1024)
    conn = greeted(config)
    feed(conn, b"AUTH PLAIN\r\n")
    conn.send(SaslChallenge())
    conn.data_to_send()
    assert feed(conn, b"A" * 500) == []  # dropped as it comes
    assert conn.partial_line
    assert feed(conn, b"A" * 500 + b"\r\nNOOP\r\n") == []
    assert conn.data_to_send() == W(R.LINE_TOO_LONG, R.WRONG_STATE)
    assert conn.stats.auth_failures == 1
    assert conn.phase is Phase.AUTHORIZATION


def test_eof_while_waiting_for_a_sasl_response(conn: Connection) -> None:
    assert feed(conn, b"AUTH PLAIN\r\n") == [AuthStart(mechanism="PLAIN", initial_response=None)]
    conn.send(SaslChallenge())
    assert feed(conn, b"") == [ConnectionClosed()]


# ================================================================ UTF8


def test_utf8_user_names() -> None:
    conn = greeted()
    assert chat(conn, "USER mrösé\r\n".encode()) == W(R.NON_ASCII_USER)
    assert chat(conn, b"UTF8\r\n") == W(R.UTF8_ENABLED)
    assert conn.utf8
    line = f"USER {FW_MROSE.replace(chr(0xFF4F), 'ö')}\r\nPASS {FW_SECRET}\r\n"
    assert feed(conn, line.encode()) == [Login(username="mröse", password="secret")]
    assert conn.data_to_send() == W(R.OK)


def test_password_is_not_normalised_before_utf8(conn: Connection) -> None:
    password = f"{FW_SECRET} é"
    assert feed(conn, f"USER a\r\nPASS {password}\r\n".encode()) == [
        Login(username="a", password=password)
    ]


def test_password_undecodable_octets_survive(conn: Connection) -> None:
    [event] = feed(conn, b"USER a\r\nPASS \xff\xfe x\r\n")
    assert isinstance(event, Login)
    assert event.password.encode("utf-8", "surrogateescape") == b"\xff\xfe x"


def test_undecodable_password_after_utf8_is_kept(conn: Connection) -> None:
    chat(conn, b"UTF8\r\n")
    [event] = feed(conn, b"USER a\r\nPASS \xff\r\n")
    assert isinstance(event, Login)
    assert event.password == "\udcff"


@pytest.mark.parametrize(
    ("utf8", "name"),
    [
        (False, b"a\x01b"),
        (False, b"a\x7fb"),
        (True, b"\xff\xfe"),
        (True, "a\u0085b".encode()),
        (True, b"a\x1bb"),
    ],
)
def test_invalid_user_names(conn: Connection, utf8: bool, name: bytes) -> None:
    if utf8:
        chat(conn, b"UTF8\r\n")
    assert chat(conn, b"USER " + name + b"\r\n") == W(R.BAD_USERNAME)


def test_failed_user_forgets_the_previous_one(conn: Connection) -> None:
    reply = chat(conn, b"USER a\r\nUSER a\x01\r\nPASS x\r\n")
    assert reply == W(R.OK, R.BAD_USERNAME, R.NO_USERNAME)


def test_utf8_unavailable_or_misplaced() -> None:
    assert chat(greeted(cfg(utf8=False)), b"UTF8\r\n") == W(R.UTF8_UNAVAILABLE)
    assert chat(greeted(), b"UTF8 on\r\n") == W(R.SYNTAX)
    assert chat(logged_in(), b"UTF8\r\n") == W(R.WRONG_STATE)


# ================================================================ USER / PASS / APOP details


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"USER\r\n", R.SYNTAX),
        (b"USER a b\r\n", R.SYNTAX),
        (b"PASS\r\n", R.SYNTAX),
        (b"PASS \r\n", R.SYNTAX),
        (b"PASS x\r\n", R.NO_USERNAME),
        (b"APOP mrose\r\n", R.SYNTAX),
        (b"APOP mrose " + R.RFC_DIGEST.encode() + b" x\r\n", R.SYNTAX),
        (b"APOP mrose " + R.RFC_DIGEST[:-1].encode() + b"\r\n", R.APOP_BAD_ARGS),
        (b"APOP mrose " + R.RFC_DIGEST[:-1].encode() + b"g\r\n", R.APOP_BAD_ARGS),
        (b"APOP mr\x01se " + R.RFC_DIGEST.encode() + b"\r\n", R.APOP_BAD_ARGS),
        (b"APOP mr\xc3\xb6se " + R.RFC_DIGEST.encode() + b"\r\n", R.APOP_BAD_ARGS),
    ],
)
def test_authorization_argument_errors(line: bytes, reply: str) -> None:
    conn = greeted(cfg(apop=True), apop=True)
    assert chat(conn, line) == W(reply)
    assert conn.phase is Phase.AUTHORIZATION


def test_pass_keeps_spaces(conn: Connection) -> None:
    assert feed(conn, b"USER a\r\nPASS  two  words \r\n") == [
        Login(username="a", password=" two  words ")
    ]


def test_user_command_disabled() -> None:
    conn = greeted(cfg(user_command=False))
    assert chat(conn, b"USER mrose\r\nPASS x\r\n") == W(R.USER_DISABLED, R.NO_USERNAME)


@pytest.mark.parametrize(
    ("config", "apop"),
    [(cfg(apop=False), True), (cfg(apop=True), False)],
    ids=["config-off", "no-timestamp"],
)
def test_apop_unavailable(config: Config, apop: bool) -> None:
    conn = greeted(config, apop=apop)
    assert chat(conn, f"APOP mrose {R.RFC_DIGEST}\r\n".encode()) == W(R.APOP_UNAVAILABLE)


def test_apop_event_and_greeting_without_text() -> None:
    conn = Connection(cfg(apop=True))
    conn.send(Greeting(text="", apop_timestamp=R.RFC_TIMESTAMP))
    assert conn.data_to_send() == W(f"+OK {R.RFC_TIMESTAMP}")
    event = ApopLogin(username="mrose", digest=R.RFC_DIGEST)
    assert feed(conn, f"apop mrose {R.RFC_DIGEST.upper()}\r\n".encode()) == [event]
    conn.send(LoginAccepted(maildrop=Maildrop()))
    assert conn.username == "mrose"


def test_login_accepted_username_overrides() -> None:
    conn = greeted()
    feed(conn, b"USER MRose\r\nPASS x\r\n")
    conn.send(LoginAccepted(maildrop=Maildrop(), username="mrose", text="Hello."))
    assert conn.data_to_send() == W(R.OK, "+OK Hello.")
    assert conn.username == "mrose"


def test_greetings() -> None:
    assert Connection().phase is Phase.GREETING
    conn = Connection()
    assert conn.next_event() is PAUSED
    assert conn.data_to_send() == b""
    conn.send(Greeting())
    assert conn.data_to_send() == W(R.GREETING_DEFAULT)
    assert conn.phase is Phase.AUTHORIZATION
    conn = Connection()
    conn.send(Greeting(text=""))
    assert conn.data_to_send() == W(R.OK)


# ================================================================ ordinary -ERR and bad commands


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"FOO\r\n", R.UNKNOWN),
        (b"\r\n", R.UNKNOWN),
        (b" USER a\r\n", R.UNKNOWN),
        (b"LIST\tx\r\n", R.UNKNOWN),
        (b"STAT\r\n", R.WRONG_STATE),
        (b"RETR 1\r\n", R.WRONG_STATE),
        (b"NOOP\r\n", R.WRONG_STATE),
        (b"USER\xff a\r\n", R.UNKNOWN),
    ],
)
def test_authorization_rejects(conn: Connection, line: bytes, reply: str) -> None:
    assert chat(conn, line) == W(reply)
    assert feed(conn, b"QUIT\r\n") == [ConnectionClosed()]
    assert conn.data_to_send() == W(R.LOGGING_OUT)


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"FOO\r\n", R.UNKNOWN),
        (b"USER mrose\r\n", R.WRONG_STATE),
        (b"PASS x\r\n", R.WRONG_STATE),
        (b"APOP a b\r\n", R.WRONG_STATE),
        (b"STAT 1\r\n", R.SYNTAX),
        (b"LIST 1 2\r\n", R.SYNTAX),
        (b"UIDL 1 2\r\n", R.SYNTAX),
        (b"RETR\r\n", R.SYNTAX),
        (b"RETR 1 2\r\n", R.SYNTAX),
        (b"DELE\r\n", R.SYNTAX),
        (b"TOP 1\r\n", R.SYNTAX),
        (b"TOP 1 2 3\r\n", R.SYNTAX),
        (b"NOOP x\r\n", R.SYNTAX),
        (b"RSET x\r\n", R.SYNTAX),
        (b"QUIT now\r\n", R.SYNTAX),
        (b"TOP 1 -1\r\n", R.BAD_LINE_COUNT),
        (b"TOP 1 x\r\n", R.BAD_LINE_COUNT),
        (b"TOP 3 x\r\n", R.NO_SUCH_MESSAGE),
    ],
)
def test_transaction_rejects(txn: Connection, line: bytes, reply: str) -> None:
    assert chat(txn, line) == W(reply)
    assert chat(txn, b"STAT\r\n") == W(R.STAT_2)


BAD_NUMBERS = [
    (b"0", R.NO_SUCH_MESSAGE),
    (b"3", R.NO_SUCH_MESSAGE),
    (b"-1", R.BAD_NUMBER),
    (b"+1", R.BAD_NUMBER),
    (b"1.0", R.BAD_NUMBER),
    (b"0x1", R.BAD_NUMBER),
    (b"1e0", R.BAD_NUMBER),
    (b"1_0", R.BAD_NUMBER),
    (str(2**64 + 1).encode(), R.NO_SUCH_MESSAGE),
    (b"9" * 12, R.NO_SUCH_MESSAGE),
    (b"0" * 11 + b"1" + b"0", R.NO_SUCH_MESSAGE),
    ("\u0661".encode(), R.BAD_NUMBER),  # ARABIC-INDIC DIGIT ONE
    ("\uff11".encode(), R.BAD_NUMBER),  # FULLWIDTH DIGIT ONE
    (b"\xff", R.BAD_NUMBER),
]


@pytest.mark.parametrize("command", [b"LIST", b"UIDL", b"RETR", b"DELE", b"TOP"])
@pytest.mark.parametrize(("number", "reply"), BAD_NUMBERS)
def test_bad_message_numbers(txn: Connection, command: bytes, number: bytes, reply: str) -> None:
    suffix = b" 0" if command == b"TOP" else b""
    assert chat(txn, command + b" " + number + suffix + b"\r\n") == W(reply)
    assert chat(txn, b"STAT\r\n") == W(R.STAT_2)


def test_leading_zeros_are_accepted(txn: Connection) -> None:
    assert chat(txn, b"LIST 01\r\nUIDL 0002\r\n") == W("+OK 1 120", "+OK 2 uid-2")
    assert feed(txn, b"TOP 000000000001 000\r\n") == [TopOfMessage(number=1, key="m1", lines=0)]


def test_commands_are_case_insensitive(txn: Connection) -> None:
    assert chat(txn, b"stat\r\nLiSt 2\r\nnoop\r\n") == W(R.STAT_2, "+OK 2 200", R.OK)


def test_bare_lf_line_ends_are_accepted(txn: Connection) -> None:
    assert chat(txn, b"STAT\nNOOP\r\n") == W(R.STAT_2, R.OK)


def test_too_many_bad_commands_before_login(conn: Connection) -> None:
    assert chat(conn, b"FOO\r\nSTAT\r\n") == W(R.UNKNOWN, R.WRONG_STATE)
    with pytest.raises(RemoteProtocolError, match="Too many bad commands") as info:
        feed(conn, b"USER\r\nCAPA\r\n")
    assert info.value.response_hint == "Too many bad commands."
    assert conn.data_to_send() == W(R.TOO_MANY_BAD)
    assert conn.phase is Phase.ERROR
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value is info.value
    conn.receive_data(b"CAPA\r\n")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.data_to_send() == b""


def test_good_commands_reset_the_bad_count(conn: Connection) -> None:
    bad_good = b"FOO\r\nBAR\r\nCAPA\r\n" * 3
    assert feed(conn, bad_good + b"FOO\r\nPASS x\r\nFOO\r\nFOO\r\n") == []
    assert conn.phase is Phase.AUTHORIZATION
    with pytest.raises(RemoteProtocolError):
        feed(conn, b"FOO\r\n")


def test_too_many_bad_commands_after_login() -> None:
    conn = logged_in(cfg(max_bad_commands=3, max_bad_commands_before_login=1))
    assert chat(conn, b"FOO\r\nSTAT 1\r\nNOOP\r\nUSER x\r\nRETR\r\n") == W(
        R.UNKNOWN, R.SYNTAX, R.OK, R.WRONG_STATE, R.SYNTAX
    )
    with pytest.raises(RemoteProtocolError):
        feed(conn, b"DELE\r\n")
    assert conn.data_to_send() == W(R.TOO_MANY_BAD)


@pytest.mark.parametrize("logged", [False, True])
def test_line_too_long(logged: bool) -> None:
    # Like Dovecot: -ERR in the line's place, and the session reads on.
    config = cfg(max_bad_commands_before_login=5)
    conn = logged_in(config) if logged else greeted(config)
    exact = b"NOOP " + b"x" * 248 + b"\r\n"
    assert len(exact) == 255
    assert feed(conn, exact) == []
    assert conn.data_to_send() == W(R.SYNTAX if logged else R.WRONG_STATE)
    assert feed(conn, b"NOOP " + b"x" * 249 + b"\r\nNOOP\r\n") == []
    assert conn.data_to_send() == W(R.LINE_TOO_LONG, R.OK if logged else R.WRONG_STATE)
    assert conn.phase is (Phase.TRANSACTION if logged else Phase.AUTHORIZATION)


def test_line_too_long_is_no_pass_after_user() -> None:
    conn = greeted()
    assert chat(conn, b"USER mrose\r\nPASS " + b"p" * 300 + b"\r\nPASS p\r\n") == W(
        R.OK, R.LINE_TOO_LONG, R.NO_USERNAME
    )


def test_line_too_long_counts_as_a_bad_command() -> None:
    conn = greeted(cfg(max_bad_commands_before_login=2))
    assert chat(conn, b"X" * 300 + b"\r\n") == W(R.LINE_TOO_LONG)
    with pytest.raises(RemoteProtocolError, match="Too many bad commands"):
        feed(conn, b"Y" * 300 + b"\r\n")
    assert conn.data_to_send() == W(R.TOO_MANY_BAD)


def test_partial_line_over_the_limit_is_skipped() -> None:
    config = cfg(max_line_length=64, max_sasl_line_length=128, max_buffered_input=1024)
    conn = greeted(config)
    assert feed(conn, b"CAPA\r\nAUTH PLAIN " + b"A" * 116) == []  # 127 octets, no LF yet
    assert conn.data_to_send() == W(*R.CAPA_AUTHORIZATION)
    assert conn.partial_line
    for _ in range(4):  # 4 * 200 more octets: dropped, not held
        assert feed(conn, b"A" * 200) == []
        assert conn.data_to_send() == b""
    assert feed(conn, b"A\r") == []
    assert feed(conn, b"\nQUIT\r\n") == [ConnectionClosed()]
    assert conn.data_to_send() == W(R.LINE_TOO_LONG, R.LOGGING_OUT)
    assert conn.stats.commands == 3


def test_a_line_that_never_ends_closes() -> None:
    config = cfg(max_line_length=64, max_sasl_line_length=128, max_buffered_input=1024)
    conn = greeted(config)
    feed(conn, b"A" * 1000)
    feed(conn, b"A" * 23)  # 1023 octets: its LF could still come within 1024
    with pytest.raises(RemoteProtocolError, match="Line too long") as info:
        feed(conn, b"A")  # 1024 octets and no line end: it cannot end within the bound
    assert info.value.response_hint == "Line too long."
    assert conn.data_to_send() == W(R.LINE_TOO_LONG)
    assert conn.phase is Phase.ERROR


def test_eof_while_skipping_a_long_line() -> None:
    conn = greeted()
    assert feed(conn, b"X" * 10000) == []
    assert feed(conn, b"") == [ConnectionClosed()]
    assert conn.data_to_send() == b""


def test_stls_forgets_a_line_being_skipped() -> None:
    conn = greeted(cfg(stls=True))
    assert feed(conn, b"STLS\r\n") == [StartTLS()]
    conn.receive_data(b"X" * 10000)  # plaintext injection, still unread
    conn.send(Ok())
    assert not conn.partial_line
    assert conn.data_to_send() == W(R.BEGIN_TLS)
    assert feed(conn, b"CAPA\r\n") == []
    assert conn.data_to_send().startswith(b"+OK")


@pytest.mark.parametrize("line", [b"NOOP\x00\r\n", b"\x00\r\n", b"USER a\x00b\r\n"])
def test_nul_in_command(line: bytes) -> None:
    conn = greeted()
    with pytest.raises(RemoteProtocolError, match="NUL") as info:
        feed(conn, b"CAPA\r\n" + line)
    assert info.value.response_hint == "NUL in command."
    assert conn.data_to_send() == W(*R.CAPA_AUTHORIZATION, R.NUL_IN_COMMAND)


def test_too_much_input_in_one_packet() -> None:
    config = cfg(max_line_length=32, max_sasl_line_length=64, max_buffered_input=100)
    conn = greeted(config)
    packet = b"USER a\r\n" * 11 + b"USER abcde\r\n"
    assert len(packet) == 100
    assert feed(conn, packet) == []  # the limit is fine
    assert conn.data_to_send() == W(R.OK) * 12
    with pytest.raises(RemoteProtocolError, match="Too much input"):
        feed(conn, packet + b"X")
    assert conn.data_to_send() == W(R.TOO_MUCH_INPUT)  # nothing else was answered


def test_too_much_input_while_paused() -> None:
    config = cfg(max_line_length=32, max_sasl_line_length=64, max_buffered_input=100)
    conn = logged_in(config)
    assert feed(conn, b"RETR 1\r\nNOOP\r\n") == [RetrieveMessage(number=1, key="m1", size=120)]
    conn.receive_data(b"NOOP\r\n" * 20)
    assert conn.next_event() is PAUSED  # the pending event comes first
    conn.send(Err())
    assert conn.data_to_send() == W(R.MESSAGE_UNAVAILABLE)
    with pytest.raises(RemoteProtocolError, match="Too much input"):
        conn.next_event()
    assert conn.data_to_send() == W(R.TOO_MUCH_INPUT)


def test_bytes_after_quit_are_ignored(conn: Connection) -> None:
    assert feed(conn, b"QUIT\r\nCAPA\r\n") == [ConnectionClosed()]
    assert conn.data_to_send() == W(R.LOGGING_OUT)
    assert feed(conn, b"CAPA\r\n") == [ConnectionClosed()]
    assert feed(conn, b"") == [ConnectionClosed()]
    assert conn.data_to_send() == b""


def test_bytes_after_quit_in_transaction_are_ignored(txn: Connection) -> None:
    assert feed(txn, b"QUIT\r\nSTAT\r\n") == [Update(deleted=())]
    assert txn.phase is Phase.UPDATE
    assert txn.next_event() is PAUSED
    txn.receive_data(b"NOOP\r\n")
    txn.send(Ok())
    assert txn.data_to_send() == W(R.LOGGING_OUT)
    assert next_events(txn) == [ConnectionClosed()]
    assert txn.data_to_send() == b""


def test_eof_mid_line(conn: Connection) -> None:
    assert feed(conn, b"CAPA") == []
    assert feed(conn, b"") == [ConnectionClosed()]
    assert conn.data_to_send() == b""
    assert conn.phase is Phase.CLOSED


def test_eof_after_pipelined_quit(txn: Connection) -> None:
    txn.receive_data(b"DELE 2\r\nQUIT\r\n")
    txn.receive_data(b"")
    assert next_events(txn) == [Update(deleted=("m2",))]
    txn.send(Ok())
    assert next_events(txn) == [ConnectionClosed()]
    assert txn.data_to_send() == W(R.DELETED, R.LOGGING_OUT)


def test_eof_after_pipelined_quit_in_authorization(conn: Connection) -> None:
    conn.receive_data(b"QUIT\r\n")
    assert feed(conn, b"") == [ConnectionClosed()]
    assert conn.data_to_send() == W(R.LOGGING_OUT)


@pytest.mark.parametrize(
    ("answer", "line"),
    [
        (Ok(), R.LOGGING_OUT),
        (Ok(text="Bye."), "+OK Bye."),
        (Err(), R.DELETION_FAILED),
        (
            Err(text="Some messages not deleted.", code="SYS/TEMP"),
            "-ERR [SYS/TEMP] Some messages not deleted.",
        ),
    ],
)
def test_update_answers(txn: Connection, answer: Response, line: str) -> None:
    assert feed(txn, b"DELE 1\r\nQUIT\r\n") == [Update(deleted=("m1",))]
    txn.send(answer)
    assert txn.data_to_send() == W(R.DELETED, line)
    assert txn.phase is Phase.CLOSED
    assert txn.stats.deleted == (1 if isinstance(answer, Ok) else 0)


# ================================================================ LocalProtocolError


def assert_in_error(conn: Connection) -> None:
    """Our side is in ERROR: every call raises, input is ignored, nothing more is written."""
    assert conn.phase is Phase.ERROR
    conn.data_to_send()
    with pytest.raises(LocalProtocolError):
        conn.send(Ok())
    with pytest.raises(LocalProtocolError):
        conn.send(Disconnect())
    conn.receive_data(b"CAPA\r\n")
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    assert conn.data_to_send() == b""


def test_data_with_no_block(conn: Connection) -> None:
    with pytest.raises(LocalProtocolError, match="Data outside"):
        conn.send(Data(data=b"x"))
    assert_in_error(conn)


def test_login_accepted_with_nothing_pending(conn: Connection) -> None:
    with pytest.raises(LocalProtocolError, match="no event pending"):
        conn.send(LoginAccepted(maildrop=Maildrop()))
    assert_in_error(conn)


def test_two_greetings(conn: Connection) -> None:
    with pytest.raises(LocalProtocolError):
        conn.send(Greeting())
    assert_in_error(conn)


@pytest.mark.parametrize("response", [Ok(), Data(data=b""), EndOfMessage(), SaslChallenge()])
def test_answers_before_the_greeting(response: Response) -> None:
    conn = Connection()
    with pytest.raises(LocalProtocolError):
        conn.send(response)
    assert_in_error(conn)


def test_send_after_closed(conn: Connection) -> None:
    feed(conn, b"QUIT\r\n")
    with pytest.raises(LocalProtocolError, match="closed"):
        conn.send(Ok())
    with pytest.raises(LocalProtocolError, match="closed"):
        conn.send(Disconnect())
    assert conn.phase is Phase.CLOSED
    assert conn.next_event() == ConnectionClosed()


@pytest.mark.parametrize(
    ("lines", "response"),
    [
        (b"USER a\r\nPASS b\r\n", Ok()),
        (b"USER a\r\nPASS b\r\n", SaslChallenge()),
        (b"USER a\r\nPASS b\r\n", Greeting()),
        (b"AUTH PLAIN\r\n", Ok()),
        (b"AUTH PLAIN\r\n", EndOfMessage()),
    ],
)
def test_wrong_answer_in_authorization(conn: Connection, lines: bytes, response: Response) -> None:
    assert len(feed(conn, lines)) == 1
    with pytest.raises(LocalProtocolError, match="is no answer"):
        conn.send(response)
    assert_in_error(conn)


@pytest.mark.parametrize(
    ("line", "responses", "bad"),
    [
        (b"RETR 1\r\n", [], LoginAccepted(maildrop=Maildrop())),
        (b"RETR 1\r\n", [], EndOfMessage()),
        (b"RETR 1\r\n", [], Data(data=b"x")),
        (b"TOP 1 1\r\n", [Ok()], Ok()),
        (b"TOP 1 1\r\n", [Ok()], Err()),
        (b"RETR 1\r\n", [Ok(), Data(data=b"x")], SaslChallenge()),
        (b"QUIT\r\n", [], Data(data=b"x")),
        (b"QUIT\r\n", [], EndOfMessage()),
    ],
)
def test_wrong_answer_in_transaction(
    txn: Connection, line: bytes, responses: list[Response], bad: Response
) -> None:
    assert len(feed(txn, line)) == 1
    for response in responses:
        txn.send(response)
    with pytest.raises(LocalProtocolError):
        txn.send(bad)
    assert_in_error(txn)


def test_stls_wrong_answer() -> None:
    conn = greeted(STLS_CONFIG)
    feed(conn, b"STLS\r\n")
    with pytest.raises(LocalProtocolError):
        conn.send(Data(data=b""))
    assert_in_error(conn)


def test_send_failed(txn: Connection) -> None:
    feed(txn, b"RETR 1\r\n")
    txn.send(Ok())
    txn.send_failed()
    assert txn.pending is None
    assert not txn.sending_lines
    assert_in_error(txn)


# ================================================================ streaming RETR / TOP

MESSAGES = [
    b"",
    b"a",
    b".",
    b"..",
    b".\r",
    b".\r\n",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\r\n",
    b"\n\n",
    b".\n.\n",
    b"\r\n.\r\n",
    b"a\rb",
    b"a\r.b\n",
    b"line\r\n.\r\n..\r\n.x\r\nend",
    b"no final newline",
    b"mixed\r\nlf\nends\r\n",
    b"From: a\nSubject: b\n\n.body\n..\n.\nlast",
    b"From: a\r\nSubject: b\r\n\r\nbody 1\r\nbody 2\r\n",
    MSG1,
]


def retr(conn: Connection, chunks: list[bytes], number: int = 1) -> bytes:
    """RETR *number* answered with *chunks*; the reply bytes."""
    [event] = feed(conn, b"RETR %d\r\n" % number)
    assert isinstance(event, RetrieveMessage)
    conn.send(Ok())
    for chunk in chunks:
        assert conn.wants_more_data
        conn.send(Data(data=chunk))
    conn.send(EndOfMessage())
    return conn.data_to_send()


@pytest.mark.parametrize("message", MESSAGES)
def test_retr_every_split(message: bytes) -> None:
    expected = retr(logged_in(messages=[message]), [message])
    status, block = split_status(expected)
    assert status == b"+OK %d octets\r\n" % wire_size(message)
    assert unstuff(block) == crlf(message)
    assert len(unstuff(block)) == wire_size(message)
    for i in range(len(message) + 1):
        parts = [message[:i], message[i:]]
        assert retr(logged_in(messages=[message]), parts) == expected, i
    for i in range(len(message) + 1):
        for j in range(i, len(message) + 1):
            parts = [message[:i], b"", message[i:j], message[j:]]
            assert retr(logged_in(messages=[message]), parts) == expected, (i, j)
    bytewise = [message[k : k + 1] for k in range(len(message))]
    assert retr(logged_in(messages=[message]), bytewise) == expected


def test_retr_splits_at_crlf_and_dot() -> None:
    message = b"a\r\n.b\r\n"
    expected = W("+OK 7 octets", "a", "..b", ".")
    assert retr(logged_in(messages=[message]), [message]) == expected
    assert retr(logged_in(messages=[message]), [b"a\r", b"\n.b\r\n"]) == expected
    assert retr(logged_in(messages=[message]), [b"a\r\n", b".b\r\n"]) == expected
    assert retr(logged_in(messages=[message]), [b"a\r", b"\n", b".", b"b\r\n"]) == expected


def test_retr_lf_input() -> None:
    conn = logged_in(messages=[b"x\n.\n"])
    assert retr(conn, [b"x\n", b".", b"\n"]) == W("+OK 6 octets", "x", "..", ".")


def test_retr_ok_text_and_stats(txn: Connection) -> None:
    assert len(feed(txn, b"RETR 2\r\n")) == 1
    txn.send(Ok(text="message follows"))
    assert txn.sending_lines
    txn.send(EndOfMessage())
    assert not txn.sending_lines
    assert txn.data_to_send() == W("+OK message follows", "", R.END)  # no data: one empty line
    assert txn.stats.retrieved == 1


@pytest.mark.parametrize("command", [b"RETR 1", b"TOP 1 0", b"TOP 1 5"])
@pytest.mark.parametrize("chunks", [[], [b""], [b"", b""]])
def test_empty_message_is_one_empty_line(command: bytes, chunks: list[bytes]) -> None:
    # Tcllib's pop3 client reads a bare terminator after the status line as
    # data and waits forever; Dovecot sends one empty line, and so do we.
    conn = logged_in(messages=[b""])
    assert chat(conn, b"STAT\r\nLIST\r\n") == W("+OK 1 2", "+OK 1 messages (2 octets)", "1 2", ".")
    assert len(feed(conn, command + b"\r\n")) == 1
    conn.send(Ok())
    for chunk in chunks:
        conn.send(Data(data=chunk))
    conn.send(EndOfMessage())
    first = "+OK 2 octets" if command.startswith(b"RETR") else R.OK
    assert conn.data_to_send() == W(first, "", ".")


@pytest.mark.parametrize(
    ("answer", "line"),
    [(Err(), R.MESSAGE_UNAVAILABLE), (Err(text="Gone.", code="SYS/TEMP"), "-ERR [SYS/TEMP] Gone.")],
)
def test_retr_refused(txn: Connection, answer: Err, line: str) -> None:
    feed(txn, b"RETR 1\r\nNOOP\r\n")
    txn.send(answer)
    assert next_events(txn) == []
    assert txn.data_to_send() == W(line, R.OK)
    assert txn.stats.retrieved == 0


def top(conn: Connection, chunks: list[bytes], lines: int) -> tuple[bytes, int]:
    """TOP 1 *lines* answered chunk by chunk while the core wants more: (reply, chunks sent)."""
    [event] = feed(conn, b"TOP 1 %d\r\n" % lines)
    assert event == TopOfMessage(number=1, key="m1", lines=lines)
    conn.send(Ok())
    sent = 0
    for chunk in chunks:
        if not conn.wants_more_data:
            break
        conn.send(Data(data=chunk))
        sent += 1
    conn.send(EndOfMessage())
    assert not conn.wants_more_data
    return conn.data_to_send(), sent


TOP_MESSAGES = [
    *MESSAGES,
    b"H: 1\r\nH: 2\r\n\r\n1\r\n2\r\n3\r\n",
    b"H: 1\nH: 2\n\n1\n2\n3",
    b"H: 1\r\n\r\n\r\n\r\n.\r\n",
    b"H: 1\r\nno blank line\r\n",
    b"H: x\r\r\nH: y\r\n\r\nbody\r\n",
    b"\r\nbody first\r\n",
]


@pytest.mark.parametrize("message", TOP_MESSAGES)
@pytest.mark.parametrize("lines", [0, 1, 2, 5, 10**12])
def test_top_every_split(message: bytes, lines: int) -> None:
    expected, _ = top(logged_in(messages=[message]), [message], lines)
    status, block = split_status(expected)
    assert status == W(R.OK)
    assert unstuff(block) == top_oracle(message, lines)
    for i in range(len(message) + 1):
        got, _ = top(logged_in(messages=[message]), [message[:i], message[i:]], lines)
        assert got == expected, i
    bytewise = [message[k : k + 1] for k in range(len(message))]
    assert top(logged_in(messages=[message]), bytewise, lines)[0] == expected


def test_top_zero_is_headers_and_blank_line() -> None:
    message = b"From: a\r\nSubject: b\r\n\r\nbody\r\nmore\r\n"
    conn = logged_in(messages=[message])
    assert top(conn, [message], 0)[0] == W(R.OK, "From: a", "Subject: b", "", R.END)


def test_top_beyond_the_body_is_the_whole_message() -> None:
    message = b"From: a\r\n\r\nbody\r\n.more\r\n"
    conn = logged_in(messages=[message])
    assert top(conn, [message], 3)[0] == W(R.OK, "From: a", "", "body", "..more", R.END)


def test_top_without_blank_line_sends_everything() -> None:
    message = b"From: a\r\nSubject: b"
    conn = logged_in(messages=[message])
    assert top(conn, [message], 0)[0] == W(R.OK, "From: a", "Subject: b", R.END)


def test_top_stops_wanting_data() -> None:
    message = b"H: 1\r\n\r\nb1\r\nb2\r\nb3\r\n"
    bytewise = [message[k : k + 1] for k in range(len(message))]
    reply, sent = top(logged_in(messages=[message]), bytewise, 1)
    assert reply == W(R.OK, "H: 1", "", "b1", R.END)
    assert sent == len(b"H: 1\r\n\r\nb1\r\n")
    # Data after TOP has all it sends is accepted and dropped.
    conn = logged_in(messages=[message])
    feed(conn, b"TOP 1 0\r\n")
    conn.send(Ok())
    conn.send(Data(data=message))
    assert not conn.wants_more_data
    conn.send(Data(data=b"more\r\n"))
    conn.send(Data(data=b""))
    conn.send(EndOfMessage())
    assert conn.data_to_send() == W(R.OK, "H: 1", "", R.END)
    assert conn.stats.retrieved == 0


# ================================================================ pipelining and PAUSED


def test_pipelined_commands_are_answered_in_order(txn: Connection) -> None:
    packet = b"STAT\r\nLIST 1\r\nUIDL 2\r\nFOO\r\nNOOP\r\nDELE 1\r\nSTAT\r\nLIST\r\nRSET\r\n"
    assert chat(txn, packet) == W(
        R.STAT_2,
        "+OK 1 120",
        "+OK 2 uid-2",
        R.UNKNOWN,
        R.OK,
        R.DELETED,
        "+OK 1 200",
        "+OK 1 messages (200 octets)",
        "2 200",
        R.END,
        R.RSET_2,
    )


def test_pending_event_pauses_later_commands(txn: Connection) -> None:
    assert feed(txn, b"NOOP\r\nRETR 2\r\nSTAT\r\nTOP 1 0\r\nNOOP\r\n") == [
        RetrieveMessage(number=2, key="m2", size=200)
    ]
    assert txn.pending == RetrieveMessage(number=2, key="m2", size=200)
    assert txn.data_to_send() == W(R.OK)
    assert txn.next_event() is PAUSED
    assert feed(txn, b"NOOP\r\n") == []
    assert txn.data_to_send() == b""
    txn.send(Ok())
    assert txn.next_event() is PAUSED
    txn.send(Data(data=MSG2))
    assert txn.next_event() is PAUSED
    txn.send(EndOfMessage())
    assert txn.pending is None
    assert next_events(txn) == [TopOfMessage(number=1, key="m1", lines=0)]
    txn.send(Err())
    assert next_events(txn) == []
    assert txn.data_to_send() == W(
        "+OK 200 octets",
        *message_lines(MSG2),
        R.END,
        R.STAT_2,
        R.MESSAGE_UNAVAILABLE,
        R.OK,
        R.OK,
    )


def test_output_high_water_pauses_until_drained() -> None:
    conn = greeted(cfg(output_high_water=64))
    capa = W(*R.CAPA_AUTHORIZATION)
    assert len(capa) > 64
    assert feed(conn, b"CAPA\r\n" * 4 + b"QUIT\r\n") == []
    assert conn.next_event() is PAUSED
    out = conn.data_to_send(max_bytes=len(capa) - 64)
    assert conn.next_event() is PAUSED  # still 64 octets waiting
    out += conn.data_to_send(max_bytes=1)
    while True:
        event = conn.next_event()
        out += conn.data_to_send()
        if event == ConnectionClosed():
            break
        assert event is PAUSED
    assert out == capa * 4 + W(R.LOGGING_OUT)


def test_output_high_water_with_retr() -> None:
    conn = logged_in(cfg(output_high_water=64))
    feed(conn, b"RETR 1\r\nSTAT\r\n")
    conn.send(Ok())
    conn.send(Data(data=MSG1))
    conn.send(EndOfMessage())
    assert conn.next_event() is PAUSED
    out = conn.data_to_send()
    assert conn.next_event() is NEED_DATA
    out += conn.data_to_send()
    assert out == W("+OK 120 octets", *message_lines(MSG1), R.END, R.STAT_2)


@pytest.mark.parametrize("size", [0, 1, 7, 1000])
def test_data_to_send_max_bytes(txn: Connection, size: int) -> None:
    expected = W(R.STAT_2, *R.CAPA_TRANSACTION)
    feed(txn, b"STAT\r\nCAPA\r\n")
    out = b""
    while chunk := txn.data_to_send(max_bytes=size):
        assert len(chunk) <= size
        out += chunk
    assert txn.data_to_send() == expected[len(out) :]
    if size:
        assert out == expected
    assert txn.data_to_send() == b""


# ================================================================ disconnects


def test_disconnect_mid_block_writes_nothing_extra(txn: Connection) -> None:
    feed(txn, b"RETR 1\r\n")
    txn.send(Ok())
    txn.send(Data(data=b"partial"))
    txn.send(Disconnect(text="Shutting down.", code="SYS/TEMP"))
    assert txn.data_to_send() == b"+OK 120 octets\r\npartial"
    assert txn.phase is Phase.CLOSED
    assert txn.next_event() == ConnectionClosed()


@pytest.mark.parametrize(
    ("response", "line"),
    [
        (Disconnect(text="Shutting down.", code="SYS/TEMP"), "-ERR [SYS/TEMP] Shutting down."),
        (Disconnect(text="Idle too long."), "-ERR Idle too long."),
        (Disconnect(code="SYS/PERM"), "-ERR [SYS/PERM]"),
        (Disconnect(), None),
        (ConnectionClosed(), None),
    ],
)
@pytest.mark.parametrize("where", ["greeting", "authorization", "pending", "transaction", "update"])
def test_disconnect(response: Response, line: str | None, where: str) -> None:
    if where == "greeting":
        conn = Connection()
    elif where == "authorization":
        conn = greeted()
    elif where == "pending":
        conn = greeted()
        feed(conn, b"USER a\r\nPASS b\r\n")
        conn.data_to_send()
    else:
        conn = logged_in()
        if where == "update":
            feed(conn, b"DELE 1\r\nQUIT\r\n")
            conn.data_to_send()
    conn.send(response)
    assert conn.data_to_send() == (W(line) if line else b"")
    assert conn.phase is Phase.CLOSED
    assert conn.pending is None
    assert next_events(conn) == [ConnectionClosed()]


@pytest.mark.parametrize(
    ("err", "line"),
    [
        (Err(text="Too busy.", code="SYS/TEMP"), "-ERR [SYS/TEMP] Too busy."),
        (Err(), "-ERR"),
    ],
)
def test_err_as_greeting_closes(err: Err, line: str) -> None:
    conn = Connection()
    conn.send(err)
    assert conn.data_to_send() == W(line)
    assert conn.phase is Phase.CLOSED
    assert feed(conn, b"CAPA\r\n") == [ConnectionClosed()]
    assert conn.data_to_send() == b""


# ================================================================ properties, stats, trace


def test_properties_through_a_session() -> None:
    conn = Connection(tls=True)
    assert conn.config == Config()
    assert conn.pending is None
    assert conn.maildrop is None
    assert conn.username is None
    assert conn.tls
    assert not conn.utf8
    assert not conn.sending_lines
    assert not conn.wants_more_data
    conn.send(Greeting())
    feed(conn, b"USER mrose\r\nPASS p\r\n")
    assert conn.pending == Login(username="mrose", password="p")
    drop = maildrop([MSG1])
    conn.send(LoginAccepted(maildrop=drop))
    assert conn.maildrop is drop
    assert conn.username == "mrose"
    assert conn.phase is Phase.TRANSACTION


def test_partial_line_tells_the_host_a_command_is_split() -> None:
    # A client that writes "NOOP" and "\r\n" in two sends: the host can see
    # the first read ended inside a line (and set TCP_QUICKACK).
    conn = logged_in()
    assert not conn.partial_line
    conn.receive_data(b"NOOP")
    assert conn.partial_line
    assert conn.next_event() is NEED_DATA
    assert conn.partial_line
    conn.receive_data(b"\r")
    assert conn.partial_line
    conn.receive_data(b"\nSTAT\r\n")
    assert not conn.partial_line  # complete lines are waiting, none is cut
    assert next_events(conn) == []
    assert conn.data_to_send() == W(R.OK, "+OK 2 320")
    assert not conn.partial_line


def test_buffered_output_counts_what_data_to_send_would_give() -> None:
    conn = logged_in()
    assert conn.buffered_output == 0
    conn.receive_data(b"NOOP\r\nSTAT\r\n")
    assert next_events(conn) == []
    assert conn.buffered_output == len(b"+OK\r\n+OK 2 320\r\n")
    assert conn.buffered_output == len(conn.data_to_send())
    assert conn.buffered_output == 0


def test_stats() -> None:
    conn = logged_in()
    retr(conn, [MSG1])
    session = b"DELE 1\r\nDELE 2\r\nFOO\r\nQUIT\r\n"
    feed(conn, session)
    conn.send(Ok())
    out = conn.data_to_send()
    stats = conn.stats.as_dict()
    assert stats == {
        "auth_failures": 0,
        "bytes_in": len(b"USER mrose\r\nPASS secret\r\nRETR 1\r\n" + session),
        "bytes_out": stats["bytes_out"],
        "commands": 7,
        "deleted": 2,
        "retrieved": 1,
    }
    assert stats["bytes_out"] > len(out) > 0


def test_trace_redacts_secrets() -> None:
    seen: list[tuple[str, str]] = []
    conn = greeted(cfg(trace=lambda who, line: seen.append((who, line))))
    feed(conn, b"CAPA x\r\nPASS\r\nUSER mrose\r\nPASS hunter2\r\n")
    conn.send(Err(code="AUTH"))
    # A SASL answer pipelined after a refused AUTH arrives as an unknown command.
    feed(conn, b"AUTH X\r\nAGEAYg==\r\nSTAT\r\nUSER a\r\n")
    feed(conn, b"AUTH PLAIN AGEAYg==\r\n")
    conn.send(Err())
    feed(conn, b"AUTH PLAIN\r\n")
    conn.send(SaslChallenge())
    feed(conn, b"AGEAYg==\r\n")
    conn.send(LoginAccepted(maildrop=maildrop([b"x"])))
    feed(conn, b"RETR 1\r\n")
    conn.send(Ok())
    conn.send(Data(data=b"secret body"))
    conn.send(EndOfMessage())
    assert seen == [
        ("S", R.GREETING_DEFAULT),
        ("C", "CAPA x"),
        ("S", R.SYNTAX),
        ("C", "PASS"),
        ("S", R.SYNTAX),
        ("C", "USER mrose"),
        ("S", R.OK),
        ("C", "PASS ***"),
        ("S", R.BAD_CREDENTIALS),
        ("C", "AUTH X"),
        ("S", R.UNSUPPORTED_MECHANISM),
        ("C", "(unknown command, 8 octets)"),
        ("S", R.UNKNOWN),
        ("C", "STAT"),
        ("S", R.WRONG_STATE),
        ("C", "USER a"),
        ("S", R.OK),
        ("C", "AUTH PLAIN ***"),
        ("S", R.AUTH_FAILED),
        ("C", "AUTH PLAIN"),
        ("S", "+ "),
        ("C", "***"),
        ("S", R.LOGGED_IN),
        ("C", "RETR 1"),
        ("S", "+OK 3 octets"),
    ]
    assert "hunter2" not in repr(seen)
    assert "AGEAYg==" not in repr(seen)


@pytest.mark.parametrize("sep", [b" ", b"\t", b"\x0b", b"\x0c", b" \t "])
def test_trace_redaction_follows_the_parsers_splitting(sep: bytes) -> None:
    # Whatever whitespace the parser takes between arguments, the trace takes too.
    seen: list[tuple[str, str]] = []
    config = cfg(apop=True, trace=lambda who, line: seen.append((who, line)))
    conn = greeted(config, apop=True)
    digest = "c4c9334bac560ecc979e58001b3e22fb"
    events = feed(conn, b"AUTH" + b" PLAIN" + sep + b"AGEAYg==\r\n")
    assert events == [AuthStart(mechanism="PLAIN", initial_response=b"\x00a\x00b")]
    conn.send(Err())
    events = feed(conn, b"APOP mrose" + sep + digest.encode() + b"\r\n")
    assert events == [ApopLogin(username="mrose", digest=digest)]
    conn.send(Err())
    feed(conn, b"APOP mrose" + sep + b"x\r\n")  # malformed, still redacted
    feed(conn, b"AUTH AGEAYg==\r\n")  # no mechanism name: maybe a misplaced secret
    feed(conn, b"AUTH\r\n")
    commands = [line for who, line in seen if who == "C"]
    assert commands == [
        "AUTH PLAIN ***", "APOP mrose ***", "APOP mrose ***", "AUTH ***", "AUTH"
    ]
    assert "AGEAYg" not in repr(seen)
    assert digest not in repr(seen)


def test_trace_of_overlong_lines() -> None:
    seen: list[tuple[str, str]] = []
    conn = greeted(cfg(trace=lambda who, line: seen.append((who, line))))
    secret = b64("\0mrose\0" + "p" * 9000)
    feed(conn, f"PASS {secret}\r\n".encode())
    feed(conn, b"AUTH PLAIN\r\n")
    conn.send(SaslChallenge())
    feed(conn, secret.encode() + b"\r\n")
    assert [line for who, line in seen if who == "C"] == [
        "(line too long)", "AUTH PLAIN", "***"
    ]
    assert secret[20:40] not in repr(seen)


def test_event_reprs_hide_secrets() -> None:
    secrets = ["hunter2", "c4c9334bac560ecc979e58001b3e22fb", "AGEAYg", "\\x00a\\x00b"]
    events = [
        Login(username="mrose", password="hunter2"),
        ApopLogin(username="mrose", digest="c4c9334bac560ecc979e58001b3e22fb"),
        AuthStart(mechanism="PLAIN", initial_response=b"\x00a\x00b"),
        AuthResponse(data=b"\x00a\x00b"),
    ]
    shown = repr(events)
    assert "mrose" in shown
    assert "PLAIN" in shown
    for secret in secrets:
        assert secret not in shown
    # Equality still sees the secrets.
    assert Login(username="a", password="x") != Login(username="a", password="y")


# ================================================================ value checks


@pytest.mark.parametrize(
    "make",
    [
        lambda: Greeting(text="two\r\nlines"),
        lambda: Greeting(apop_timestamp="1896.697170952@dbc"),
        lambda: Greeting(apop_timestamp="<1896.697170952>"),
        lambda: Greeting(apop_timestamp="<a b@c>"),
        lambda: Greeting(apop_timestamp="<é@c>"),
        lambda: Greeting(apop_timestamp="<a@c>\r\n"),
        lambda: Ok(text="a\nb"),
        lambda: Err(text="a\rb"),
        lambda: Err(code="NOPE"),
        lambda: Disconnect(text="x\n"),
        lambda: Disconnect(code="auth"),
        lambda: LoginAccepted(maildrop=Maildrop(), text="x\ny"),
    ],
)
def test_invalid_responses(make: Callable[[], Response]) -> None:
    with pytest.raises(ValueError, match=r"one line|timestamp|response code"):
        make()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_line_length": 15},
        {"max_line_length": 300, "max_sasl_line_length": 299},
        {"max_bad_commands_before_login": 0},
        {"max_bad_commands": 0},
        {"max_auth_failures": 0},
        {"max_buffered_input": 8191},
        {"expire": -1},
        {"expire": "SOMETIMES"},
        {"expire": 1.5},
        {"login_delay": -1},
        {"sasl_mechanisms": ("",)},
        {"sasl_mechanisms": ("plain",)},
        {"sasl_mechanisms": ("X Y",)},
        {"sasl_mechanisms": ("PLAİN",)},
    ],
)
def test_invalid_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"need|must|bad SASL"):
        Config(**kwargs)  # type: ignore[arg-type]


def test_config_boundaries() -> None:
    Config(max_line_length=16, max_sasl_line_length=16, max_buffered_input=16)
    Config(expire=0, login_delay=0, sasl_mechanisms=())


def test_maildrop_of_login_is_the_snapshot() -> None:
    messages = (MessageInfo(key="k", size=5, uid="u"),)
    conn = greeted()
    feed(conn, b"USER a\r\nPASS b\r\n")
    conn.send(LoginAccepted(maildrop=Maildrop(messages)))
    conn.data_to_send()
    assert chat(conn, b"DELE 1\r\n") == W(R.DELETED)
    assert conn.maildrop is not None
    assert conn.maildrop.deleted == {1}


@pytest.mark.parametrize("mode", MODES)
def test_transcript_runner_reports_remote_errors(mode: str) -> None:
    result = run(f"S: {R.GREETING}\nC: A\nC: B\nC: C\nC: D", mode=mode)
    assert isinstance(result.error, RemoteProtocolError)
    assert result.output == W(R.GREETING, R.UNKNOWN, R.UNKNOWN, R.TOO_MANY_BAD)


@pytest.mark.parametrize("between", [b"CAPA\r\n", b"XYZZY\r\n", b"UTF8\r\n"])
def test_pass_only_immediately_after_user(conn: Connection, between: bytes) -> None:
    # RFC 1939 section 7: PASS "may only be given ... immediately after a successful USER".
    assert chat(conn, b"USER mrose\r\n") == W(R.OK)
    chat(conn, between)
    assert chat(conn, b"PASS secret\r\n") == W(R.NO_USERNAME)
    assert conn.pending is None


def test_a_malformed_pass_ends_the_user_pass_pair(conn: Connection) -> None:
    assert chat(conn, b"USER mrose\r\n") == W(R.OK)
    assert chat(conn, b"PASS\r\n") == W(R.SYNTAX)
    assert chat(conn, b"PASS secret\r\n") == W(R.NO_USERNAME)
    assert conn.pending is None


# ================================================================ the README's example

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    """The code of README.md's "The core in 25 lines" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## The core in 25 lines\n\n```python\n(.*?)```", text, re.S)
    assert match is not None
    return match.group(1)


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (b"USER bob\r\nPASS secret\r\nSTAT\r\nRETR 1\r\nTOP 1 0\r\nQUIT\r\n", "..dots"),
        (b"USER bob\r\nPASS wrong\r\nQUIT\r\n", "-ERR [AUTH] Authentication failed."),
        (b"AUTH PLAIN AGJvYgBzZWNyZXQ=\r\nAUTH PLAIN\r\n*\r\nQUIT\r\n", R.UNSUPPORTED_MECHANISM),
        (b"STLS\r\nQUIT\r\n", R.STLS_DISABLED),
        (b"APOP bob c4c9334bac560ecc979e58001b3e22fb\r\nQUIT\r\n", R.APOP_UNAVAILABLE),
        (b"\xff\xfe\x01garbage\r\nHELO\r\n\x1b[2J\r\nXYZZY\r\n", R.TOO_MANY_BAD),
        (b"NOOP\x00\r\n", R.NUL_IN_COMMAND),
        (b"USER bob\r\nPASS secret\r\n" + b"LIST\r\n" * 20000, "+OK 1 messages"),
        (b"", "+OK POP3 ready."),  # EOF at once
    ],
    ids=["session", "bad-password", "auth", "stls", "apop", "garbage", "nul", "flood", "eof"],
)
def test_readme_example_ends_on_any_input(client: bytes, expected: str) -> None:
    """The README's loop answers whatever a client sends, and ends (never spins)."""
    code = readme_example()
    assert len(re.findall(r"(?m)^client = ", code)) == 1
    code = re.sub(r"(?m)^client = .*$", lambda _: f"client = {client!r}", code)
    result = subprocess.run(
        [sys.executable, "-"], input=code.encode(), cwd=ROOT, capture_output=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    out = result.stdout.decode()
    assert out.startswith("+OK POP3 ready.")
    assert expected in out


def test_a_bare_config_offers_nothing_the_application_must_implement() -> None:
    assert Config().sasl_mechanisms == ()
    conn = Connection()
    conn.send(Greeting())
    conn.data_to_send()
    capa = chat(conn, b"CAPA\r\n")
    assert b"SASL" not in capa
    assert b"STLS" not in capa
    assert chat(conn, b"AUTH PLAIN AGEAYg==\r\nAUTH\r\n") == W(R.UNSUPPORTED_MECHANISM, "+OK", ".")


def test_public_names() -> None:
    import pop3proto

    assert not {"Sentinel", "Stats", "DotStuffer", "WireSizer"} & set(pop3proto.__all__)
    assert "AuthAborted" in pop3proto.__all__
    for name in pop3proto.__all__:
        assert getattr(pop3proto, name) is not None
    # Internals left __all__ but old imports keep working.
    from pop3proto import DotStuffer, Sentinel, Stats, WireSizer
    from pop3proto._connection import Sentinel as S
    from pop3proto._connection import Stats as T
    from pop3proto._writers import DotStuffer as D
    from pop3proto._writers import WireSizer as Z

    assert (Sentinel, Stats, DotStuffer, WireSizer) == (S, T, D, Z)
    with pytest.raises(AttributeError):
        pop3proto.NoSuchName  # noqa: B018


# ================================================================ errors: whose, and after what


def test_after_send_failed_calls_say_the_transport_failed() -> None:
    conn = logged_in()
    conn.send_failed()
    assert conn.phase is Phase.ERROR
    with pytest.raises(LocalProtocolError, match="transport could not deliver"):
        conn.next_event()
    with pytest.raises(LocalProtocolError, match="transport could not deliver"):
        conn.send(Ok())


def test_after_a_misuse_calls_say_it_was_a_misuse() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="no event pending"):
        conn.send(Ok())
    with pytest.raises(LocalProtocolError, match="API misuse: Ok sent with no event pending"):
        conn.next_event()


def test_after_the_clients_error_send_says_so() -> None:
    conn = greeted()
    with pytest.raises(RemoteProtocolError):
        feed(conn, b"\x00\r\n")
    with pytest.raises(LocalProtocolError, match="client's protocol error: NUL"):
        conn.send(Ok())


class Boom(Exception):
    """Raised by a trace callback."""


def exploding_trace(who: str, line: str) -> None:
    if line.startswith("+OK 2 320") or line == "RETR 1":
        raise Boom(line)


@pytest.mark.parametrize("line", [b"RETR 1\r\n", b"STAT\r\n"])
def test_an_exception_inside_leaves_the_connection_in_error(line: bytes) -> None:
    # RETR: the command's trace raises; STAT: the trace of its reply raises.
    conn = logged_in(cfg(trace=exploding_trace))
    conn.receive_data(line)
    with pytest.raises(Boom):
        conn.next_event()
    assert conn.phase is Phase.ERROR
    assert conn.pending is None
    assert not conn.sending_lines
    with pytest.raises(LocalProtocolError, match="unexpected Boom inside next_event"):
        conn.next_event()
    with pytest.raises(LocalProtocolError, match="unexpected Boom"):
        conn.send(Ok())


def test_an_exception_inside_send_leaves_the_connection_in_error() -> None:
    conn = logged_in(cfg(trace=lambda who, line: None))
    assert len(feed(conn, b"RETR 1\r\n")) == 1
    conn.config = cfg(trace=exploding_trace)  # the next status line raises
    with pytest.raises(Boom):
        conn.send(Ok(text="2 320"))
    assert conn.phase is Phase.ERROR
    assert not conn.sending_lines
    with pytest.raises(LocalProtocolError, match="unexpected Boom inside send"):
        conn.send(EndOfMessage())
