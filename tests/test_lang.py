"""LANG (RFC 6856 section 3) and the catalog of reply texts.

What a client sees: LANG in CAPA, the language listing, a language picked
by a range and every later reply in it (the core's and the server's), an
unknown range refused in the current language; and what an embedder sees:
catalogs built from data files, refused when broken, offered by ``Config``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from importlib import resources
from typing import Any

import pytest
import replies as R
from helpers import MSG1, chat, feed, greeted, logged_in
from helpers import cfg as base_cfg
from replies import wire as W

from pop3proto import (
    AuthStart,
    Config,
    Connection,
    Data,
    EndOfMessage,
    Err,
    Greeting,
    Login,
    LoginAccepted,
    Ok,
    RemoteProtocolError,
    StartTLS,
    Update,
)
from pop3proto import lang as shipped
from pop3proto._texts import (
    DEFAULT_LANGUAGES,
    EN,
    I_DEFAULT,
    MESSAGES,
    Catalog,
    match_language,
)
from pop3proto.driver import CLOSE, RECEIVE, START_TLS, Call, SessionDriver, Write
from pop3proto.memstore import MemoryStorage
from pop3proto.passwd import DictAuthenticator
from pop3proto.server import Server
from pop3proto.transports._common import perform_call

DE = shipped.load("de")
WITH_DE = (*DEFAULT_LANGUAGES, DE)
LISTING_DEFAULT = ["+OK Language listing follows", "i-default Default language", "en English", "."]


def cfg(**kwargs: Any) -> Config:
    """The test Config, offering German beside the defaults unless told."""
    kwargs.setdefault("languages", WITH_DE)
    return base_cfg(**kwargs)


def german(config: Config | None = None, **kwargs: Any) -> Connection:
    """A greeted Connection that switched to German (output drained)."""
    conn = greeted(config if config is not None else cfg(**kwargs))
    assert chat(conn, b"LANG de\r\n") == W("+OK de Sprache gewechselt")
    return conn


# ================================================================ CAPA and the listing


def test_capa_announces_lang_in_both_states() -> None:
    assert "LANG" in chat(greeted(), b"CAPA\r\n").decode().split("\r\n")
    assert "LANG" in chat(logged_in(), b"CAPA\r\n").decode().split("\r\n")


def test_lang_can_be_turned_off() -> None:
    conn = greeted(base_cfg(lang=False))
    assert "LANG" not in chat(conn, b"CAPA\r\n").decode().split("\r\n")
    assert chat(conn, b"LANG\r\nLANG en\r\n") == W("-ERR LANG not available.") * 2
    assert conn.language == "i-default"


def test_the_default_lists_i_default_and_en() -> None:
    assert chat(greeted(base_cfg()), b"LANG\r\n") == W(*LISTING_DEFAULT)


def test_the_listing_has_each_language_in_itself_in_config_order() -> None:
    assert chat(greeted(cfg()), b"LANG\r\n") == W(*LISTING_DEFAULT[:-1], "de Deutsch", ".")


def test_the_listing_follows_the_language_in_use() -> None:
    conn = german()
    assert chat(conn, b"LANG\r\n") == W(
        "+OK Liste der Sprachen folgt", "i-default Default language", "en English",
        "de Deutsch", ".",
    )


# ================================================================ choosing


def test_a_session_starts_in_i_default() -> None:
    conn = greeted(cfg(languages=(DE, *DEFAULT_LANGUAGES)))
    assert conn.language == "i-default"
    assert chat(conn, b"FOO\r\n") == W(R.UNKNOWN)


@pytest.mark.parametrize(
    ("command", "reply", "tag"),
    [
        (b"LANG en", "+OK en Language changed", "en"),
        (b"lang EN", "+OK en Language changed", "en"),
        (b"LANG i-default", "+OK i-default Language changed", "i-default"),
        (b"LANG i", "+OK i-default Language changed", "i-default"),  # basic filtering
        (b"LANG *", "+OK i-default Language changed", "i-default"),  # the first offered
        (b"LANG De", "+OK de Sprache gewechselt", "de"),
    ],
)
def test_lang_picks_by_basic_filtering(command: bytes, reply: str, tag: str) -> None:
    conn = greeted(cfg())
    assert chat(conn, command + b"\r\n") == W(reply)
    assert conn.language == tag


def test_star_picks_the_administrators_first_language() -> None:
    conn = greeted(cfg(languages=(DE, *DEFAULT_LANGUAGES)))
    assert chat(conn, b"LANG *\r\n") == W("+OK de Sprache gewechselt")


def test_a_range_selects_more_specific_tags_not_less() -> None:
    swiss = Catalog("de-CH", "Schweizerdeutsch", DE.texts)
    conn = greeted(cfg(languages=(*DEFAULT_LANGUAGES, swiss)))
    assert chat(conn, b"LANG de\r\n") == W("+OK de-CH Sprache gewechselt")
    conn = greeted(cfg())
    assert chat(conn, b"LANG de-CH\r\n") == W("-ERR Unsupported language.")
    assert conn.language == "i-default"


def test_an_unknown_language_is_refused_in_the_current_one() -> None:
    conn = german()
    assert chat(conn, b"LANG fr\r\n") == W("-ERR Sprache nicht unterstützt.")
    assert conn.language == "de"
    conn = greeted(cfg())
    assert chat(conn, b"LANG fr\r\nSTAT\r\n") == W("-ERR Unsupported language.", R.WRONG_STATE)


@pytest.mark.parametrize(
    "arg", [b"de_DE", b"123456789", b"abcdefghi", b"*-x", b"de-", b"-de", b"\xc3\xbc", b"x--y"]
)
def test_a_malformed_range_is_refused(arg: bytes) -> None:
    conn = greeted(cfg())
    assert chat(conn, b"LANG " + arg + b"\r\n") == W("-ERR Invalid language range.")
    assert conn.language == "i-default"


def test_lang_takes_at_most_one_argument() -> None:
    conn = greeted(cfg())
    assert chat(conn, b"LANG de en\r\n") == W(R.SYNTAX)


def test_stls_forgets_the_language() -> None:
    conn = german(stls=True)
    assert feed(conn, b"STLS\r\n") == [StartTLS()]
    conn.send(Ok())
    assert conn.data_to_send() == W("+OK TLS-Aushandlung kann beginnen.")
    assert conn.language == "i-default"
    assert chat(conn, b"FOO\r\n") == W(R.UNKNOWN)


# ================================================================ the replies follow


def test_authorization_replies_follow_the_language() -> None:
    conn = german(user_command=True, apop=False)
    assert chat(conn, b"PASS x\r\n") == W("-ERR Kein Benutzername angegeben.")
    assert chat(conn, b"APOP a b\r\n") == W("-ERR APOP nicht verfügbar.")
    assert chat(conn, b"AUTH X\r\n") == W("-ERR Nicht unterstütztes Anmeldeverfahren.")
    assert chat(conn, b"AUTH PLAIN !!\r\n") == W(
        "-ERR Ungültige Base64-Daten in der ersten Antwort."
    )
    assert chat(conn, b"UTF8\r\n") == W("+OK UTF8 eingeschaltet")
    assert chat(conn, b"STAT\r\n") == W("-ERR Befehl in diesem Zustand nicht zulässig.")
    assert feed(conn, b"USER mrose\r\nPASS secret\r\n") == [
        Login(username="mrose", password="secret")
    ]
    conn.send(Err())
    assert conn.data_to_send() == W(R.OK, "-ERR Anmeldung fehlgeschlagen.")
    assert feed(conn, b"AUTH PLAIN\r\n") == [AuthStart(mechanism="PLAIN", initial_response=None)]
    conn.send(Err(text=conn.text("auth_failed"), code="AUTH"))
    assert conn.data_to_send() == W("-ERR [AUTH] Anmeldung fehlgeschlagen.")


def test_a_login_after_lang_is_greeted_in_that_language() -> None:
    conn = german()
    assert feed(conn, b"USER mrose\r\nPASS secret\r\n") != []
    conn.send(LoginAccepted(maildrop=logged_in().maildrop))  # type: ignore[arg-type]
    assert conn.data_to_send() == W(R.OK, "+OK Angemeldet.")


def test_the_default_login_text_is_unchanged() -> None:
    conn = greeted(cfg())
    assert feed(conn, b"USER mrose\r\nPASS secret\r\n") != []
    conn.send(LoginAccepted(maildrop=logged_in().maildrop))  # type: ignore[arg-type]
    assert conn.data_to_send() == W(R.OK, R.LOGGED_IN)


def test_transaction_replies_follow_the_language() -> None:
    conn = logged_in(cfg())
    assert chat(conn, b"LANG de\r\n") == W("+OK de Sprache gewechselt")
    assert chat(conn, b"STAT\r\nLIST\r\nNOOP\r\n") == W(
        R.STAT_2, "+OK 2 Nachrichten (320 Oktette)", "1 120", "2 200", ".", R.OK
    )
    assert chat(conn, b"DELE 1\r\nDELE 1\r\nLIST 3\r\nLIST x\r\nTOP 2 x\r\n") == W(
        "+OK Zum Löschen vorgemerkt.",
        "-ERR Nachricht ist gelöscht.",
        "-ERR Keine solche Nachricht.",
        "-ERR Ungültige Nachrichtennummer.",
        "-ERR Ungültige Zeilenzahl.",
    )
    assert chat(conn, b"RSET\r\n") == W("+OK Postfach enthält 2 Nachrichten (320 Oktette)")
    assert len(feed(conn, b"RETR 1\r\n")) == 1
    conn.send(Ok())
    assert conn.data_to_send() == W("+OK 120 Oktette")
    conn.send(Data(data=MSG1))
    conn.send(EndOfMessage())
    conn.data_to_send()
    assert len(feed(conn, b"RETR 2\r\n")) == 1
    conn.send(Err())
    assert conn.data_to_send() == W("-ERR Nachricht nicht verfügbar.")
    assert feed(conn, b"QUIT\r\n") == [Update(deleted=())]
    conn.send(Ok())
    assert conn.data_to_send() == W("+OK Abmeldung.")


def test_a_failed_update_is_said_in_the_language() -> None:
    conn = logged_in(cfg())
    chat(conn, b"LANG de\r\n")
    assert feed(conn, b"QUIT\r\n") == [Update(deleted=())]
    conn.send(Err(code="SYS/TEMP"))
    assert conn.data_to_send() == W("-ERR [SYS/TEMP] Löschen fehlgeschlagen.")


def test_the_final_error_is_in_the_language_and_the_exception_in_english() -> None:
    conn = german(max_bad_commands_before_login=2)
    assert chat(conn, b"FOO\r\n") == W("-ERR Unbekannter Befehl.")
    conn.receive_data(b"FOO\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert conn.data_to_send() == W("-ERR Zu viele ungültige Befehle.")
    assert info.value.response_hint == "Zu viele ungültige Befehle."
    assert str(info.value) == "Too many bad commands."


def test_the_trace_shows_the_translated_lines() -> None:
    seen: list[tuple[str, str]] = []
    conn = greeted(cfg(trace=lambda d, line: seen.append((d, line))))
    chat(conn, b"LANG de\r\nFOO\r\n")
    assert ("S", "-ERR Unbekannter Befehl.") in seen
    assert ("C", "LANG de") in seen


def test_the_application_gets_texts_in_the_session_language() -> None:
    conn = german()
    assert conn.text("mailbox_locked") == "Postfach ist von einer anderen POP3-Sitzung gesperrt."
    assert conn.text("message_octets", size=7) == "7 Oktette"
    assert conn.localize("Invalid PLAIN message.") == "Ungültige PLAIN-Nachricht."
    assert conn.localize("Something else.") == "Something else."


# ================================================================ catalogs


def test_i_default_and_en_are_the_english_texts() -> None:
    assert dict(I_DEFAULT.texts) == dict(EN.texts) == dict(MESSAGES)
    assert Config().languages == (I_DEFAULT, EN)


def test_english_texts_are_distinct() -> None:
    # localize() maps an English text back to one id.
    assert len(set(MESSAGES.values())) == len(MESSAGES)


def test_the_shipped_translation_is_complete() -> None:
    data = json.loads(resources.files(shipped).joinpath("de.json").read_bytes())
    assert set(data["texts"]) == set(MESSAGES)
    assert shipped.available() == ["de"]
    assert DE.tag == "de"
    assert DE.description == "Deutsch"


def test_an_unknown_shipped_language_is_a_lookup_error() -> None:
    with pytest.raises(LookupError, match="xx"):
        shipped.load("xx")


def test_ids_left_out_are_english() -> None:
    catalog = Catalog("fr", "Français", {"syntax_error": "Erreur de syntaxe."})
    assert catalog.text("syntax_error") == "Erreur de syntaxe."
    assert catalog.text("no_such_message") == "No such message."
    assert repr(catalog) == "Catalog('fr', 'Français')"


def test_a_catalog_from_json() -> None:
    catalog = Catalog.from_json(
        '{"tag": "nl", "description": "Nederlands", "texts": {"message_octets": "{size} octetten"}}'
    )
    assert catalog.text("message_octets", size=3) == "3 octetten"
    assert Catalog.from_json('{"tag": "x-a", "description": "A"}').text("logged_in") == "Logged in."


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ("{", "not JSON"),
        ("[]", "an object"),
        ('{"tag": "nl", "description": "N", "texts": []}', "an object"),
        ('{"description": "N"}', "bad language tag"),
        ('{"tag": "nl_NL", "description": "N"}', "bad language tag"),
        ('{"tag": "nl"}', "description"),
        ('{"tag": "nl", "description": "a\\nb"}', "description"),
        ('{"tag": "nl", "description": "N", "texts": {"nope": "x"}}', "unknown message id"),
        ('{"tag": "nl", "description": "N", "texts": {"logged_in": ""}}', "one non-empty line"),
        ('{"tag": "nl", "description": "N", "texts": {"logged_in": 3}}', "one non-empty line"),
        ('{"tag": "nl", "description": "N", "texts": {"logged_in": "a\\r\\nb"}}', "one non"),
        ('{"tag": "nl", "description": "N", "texts": {"logged_in": "{user}"}}', "unknown fields"),
        ('{"tag": "nl", "description": "N", "texts": {"message_octets": "{size!r}"}}', "plain"),
        ('{"tag": "nl", "description": "N", "texts": {"message_octets": "{size:>9}"}}', "plain"),
        ('{"tag": "nl", "description": "N", "texts": {"message_octets": "{size.real}"}}', "plain"),
        ('{"tag": "nl", "description": "N", "texts": {"message_octets": "{size"}}', "message_oc"),
    ],
)
def test_a_broken_catalog_is_refused_when_built(data: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Catalog.from_json(data)


@pytest.mark.parametrize(
    ("languages", "error"),
    [
        ((EN,), "i-default"),
        ((I_DEFAULT, EN, Catalog("EN", "English")), "distinct"),
        ((I_DEFAULT, "de"), "Catalogs"),
        ((), "i-default"),
    ],
)
def test_config_needs_i_default_and_distinct_tags(languages: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Config(languages=languages)


def test_match_language_without_a_match() -> None:
    assert match_language("fr", WITH_DE) is None
    assert match_language("*", (EN, I_DEFAULT)) is EN


# ================================================================ through the server


class GermanServer(Server):
    """A Server whose sessions also offer German (what a ``languages`` option would do)."""

    def session_config(self, host: str, tls: bool, session_id: str) -> Config:
        return replace(super().session_config(host, tls, session_id), languages=WITH_DE)


class Host:
    """Runs one session driver with scripted input and calls inline (no sockets)."""

    def __init__(self, server: Server) -> None:
        self.driver = SessionDriver(server, ("192.0.2.10", 4000), now=100.0)
        self.now = 100.0

    def run(self, data: bytes) -> bytes:
        """Feed *data*, serve failed-login delays, return what was written until input is needed."""
        pending, wire, driver = [data], bytearray(), self.driver
        for _ in range(10_000):
            action = driver.next_action(self.now)
            if action is RECEIVE:
                if pending:
                    driver.receive_data(pending.pop())
                elif driver.delaying and driver.deadline is not None:
                    self.now = driver.deadline
                else:
                    break
            elif isinstance(action, Write):
                wire += action.data
            elif isinstance(action, Call):
                perform_call(driver, action)
            else:
                assert action is not START_TLS
                assert action is CLOSE
                break
        return bytes(wire)


def german_server() -> Server:
    store = MemoryStorage()
    store.add("alice", b"Subject: one\n\nbody\n")
    auth = DictAuthenticator({"alice": "pencil"})
    return GermanServer(auth=auth, storage=store, cleartext_auth=True, auth_failure_delay=1.0)


def test_the_servers_own_replies_follow_the_language() -> None:
    server = german_server()
    first = Host(server)
    out = first.run(b"LANG de\r\nUSER alice\r\nPASS nope\r\nUSER alice\r\nPASS pencil\r\n")
    assert out.split(b"\r\n")[1:-1] == [
        b"+OK de Sprache gewechselt",
        b"+OK",
        b"-ERR [AUTH] Anmeldung fehlgeschlagen.",
        b"+OK",
        b"+OK Angemeldet.",
    ]
    second = Host(server)
    out = second.run(b"LANG de\r\nAUTH PLAIN YWxpY2U=\r\nUSER alice\r\nPASS pencil\r\n")
    assert out.split(b"\r\n")[1:-1] == [
        b"+OK de Sprache gewechselt",
        "-ERR [AUTH] Ungültige PLAIN-Nachricht.".encode(),
        b"+OK",
        b"-ERR [IN-USE] Postfach ist von einer anderen POP3-Sitzung gesperrt.",
    ]
    assert first.run(b"QUIT\r\n") == b"+OK Abmeldung.\r\n"


def test_the_servers_replies_are_unchanged_in_the_default_language() -> None:
    server = german_server()
    first = Host(server)
    first.run(b"USER alice\r\nPASS pencil\r\n")
    out = Host(server).run(b"AUTH PLAIN YWxpY2U=\r\nUSER alice\r\nPASS pencil\r\n")
    assert out.split(b"\r\n")[1:-1] == [
        b"-ERR [AUTH] Invalid PLAIN message.",
        b"+OK",
        b"-ERR [IN-USE] Mailbox is locked by another POP3 session.",
    ]


def test_the_greeting_stays_in_i_default() -> None:
    conn = Connection(cfg())
    conn.send(Greeting())
    assert conn.data_to_send() == W(R.GREETING_DEFAULT)


@pytest.mark.parametrize("transport", ["blocking", "selectors", "anyio"])
def test_lang_over_a_real_socket_with_the_languages_option(transport: str) -> None:
    """The languages option offers a shipped translation; replies follow LANG to the goodbye."""
    import socket

    from pop3proto.memstore import MemoryStorage
    from pop3proto.passwd import DictAuthenticator

    server = Server(transport=transport, port=0, auth=DictAuthenticator({"a": "b"}),
                    storage=MemoryStorage(), languages=("de",), cleartext_auth=True,
                    auth_failure_delay=0)
    server.up()
    try:
        with socket.create_connection(("127.0.0.1", server.cget("port")), timeout=5) as sock:
            f = sock.makefile("rb")
            assert f.readline() == b"+OK POP3 server ready.\r\n"
            sock.sendall(b"LANG\r\n")
            listing = []
            while (line := f.readline()) != b".\r\n":
                listing.append(line)
            assert listing[1:] == [b"i-default Default language\r\n", b"en English\r\n",
                                   b"de Deutsch\r\n"]
            sock.sendall(b"LANG de\r\nUSER a\r\nPASS x\r\nFOO\r\n")
            assert f.readline() == b"+OK de Sprache gewechselt\r\n"
            assert f.readline() == b"+OK\r\n"
            assert f.readline() == b"-ERR [AUTH] Anmeldung fehlgeschlagen.\r\n"
            assert f.readline() == b"-ERR Unbekannter Befehl.\r\n"
            server.kill_sessions()
            assert f.readline() == b"-ERR [SYS/TEMP] Der Server wird heruntergefahren.\r\n"
    finally:
        server.destroy("kill")


def test_an_unknown_language_is_refused_at_configure() -> None:
    with pytest.raises(TypeError, match="languages"):
        Server(languages=("xx-nope",))
