"""The ``Server`` options: one table that ``configure()``, the command line and the docs read.

Each ``Option`` has its default, a one-line description, a check, and two
flags: ``listen`` (takes effect when the server is next brought up) and
``cli`` (a plain value the command line and a config file can set; objects
such as ``auth`` or ``ssl_context`` are for code).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["OPTIONS", "Option", "check_option", "worker_count"]


@dataclass(frozen=True, slots=True)
class Option:
    """One server option: name, default, meaning, and what values it takes."""

    name: str
    default: Any
    doc: str
    #: What a value must be, in words (shown in errors and the docs).
    accepts: str
    check: Callable[[Any], bool]
    #: Takes effect only when the server is next brought up.
    listen: bool = False
    #: A plain value (str, number, bool, list of strings) the CLI and config file can set.
    cli: bool = True


def _is(*types: type) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        return isinstance(v, types) and not (isinstance(v, bool) and bool not in types)

    return check


def _nonneg(*types: type) -> Callable[[Any], bool]:
    base = _is(*types)
    return lambda v: base(v) and v >= 0


def _or_none(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _port(v: Any) -> bool:
    return _is(int)(v) and 0 <= v <= 65535


def _names(v: Any) -> bool:
    return v is None or (isinstance(v, (tuple, list)) and all(isinstance(x, str) and x for x in v))


def _networks(v: Any) -> bool:
    if not isinstance(v, (tuple, list)):
        return False
    try:
        for x in v:
            ipaddress.ip_network(x, strict=False)
    except (ValueError, TypeError):
        return False
    return True


def _expire(v: Any) -> bool:
    return v is None or v == "NEVER" or (_is(int)(v) and v >= 0)


def _anything(v: Any) -> bool:
    return True


def _callable(v: Any) -> bool:
    return v is None or callable(v)


_SECONDS = "a non-negative number of seconds"
_COUNT = "a non-negative integer"

_TABLE = [
    Option("name", "pop3proto", "Server name, for logs and the CAPA IMPLEMENTATION line.",
           "a string", _is(str)),
    Option("host", "127.0.0.1", "Address to listen on ('::' for every IPv4 and IPv6 address).",
           "a string", _is(str), listen=True),
    Option("port", 110, "Plain POP3 port; 0 lets the OS pick (cget('port') then tells it).",
           "a port number 0-65535", _port, listen=True),
    Option("pop3s_port", None, "Implicit-TLS port (RFC 8314), or None for none.",
           "a port number 0-65535 or None", _or_none(_port), listen=True),
    Option("auth", None, "The Authenticator (exists, lookup) or a pop3d-style callable; "
           "None refuses every login.", "an Authenticator, a callable or None", _anything,
           cli=False),
    Option("storage", None, "The Storage (lock, unlock, scan, get, dele) or a pop3d-style "
           "callable; None serves empty maildrops.", "a Storage, a callable or None", _anything,
           cli=False),
    Option("socket_factory", None, "pop3d's -socket: socket_factory(host, port) returns the "
           "listening socket (pre-opened or systemd sockets).", "a callable or None", _callable,
           listen=True, cli=False),
    Option("ssl_context", None, "Server-side ssl.SSLContext for STLS and the implicit-TLS port.",
           "an ssl.SSLContext or None", _or_none(_is(ssl.SSLContext)), cli=False),
    Option("tls_cert", None, "PEM certificate chain file (loads a context; enables STLS).",
           "a path or None", _or_none(_is(str))),
    Option("tls_key", None, "PEM private key file for tls_cert.", "a path or None",
           _or_none(_is(str))),
    Option("transport", "blocking", "What up() runs: 'blocking', 'selectors' or 'anyio'.",
           "a transport name", _is(str), listen=True),
    Option("greeting", "POP3 server ready.", "Text of the +OK greeting.", "a string", _is(str)),
    Option("hostname", None, "Host name in APOP timestamps and SASL challenges; None: the "
           "machine's name, looked up when a server is made.", "a string or None",
           _or_none(_is(str))),
    Option("apop", False, "Offer APOP (needs cleartext secrets, such as {PLAIN}).", "a bool",
           _is(bool)),
    Option("cleartext_auth", "loopback", "Allow USER/PASS, APOP and AUTH PLAIN/LOGIN before TLS: "
           "True, False, or 'loopback' (only from loopback addresses).",
           "True, False or 'loopback'", lambda v: v in (True, False, "loopback")),
    Option("sasl_mechanisms", None, "SASL mechanisms to offer, in order; None offers every one "
           "the authenticator can serve.", "a list of names or None", _names),
    Option("oauth", None, "oauth(user, token) -> bool; enables OAUTHBEARER and XOAUTH2.",
           "a callable or None", _callable, cli=False),
    Option("utf8", True, "Offer the UTF8 command (RFC 6856).", "a bool", _is(bool)),
    Option("lang", True, "Offer the LANG command (RFC 6856): reply texts in the client's "
           "language.", "a bool", _is(bool)),
    Option("languages", (), "Reply languages besides i-default and English: tags of the "
           "shipped translations (such as 'de') or pop3proto.Catalog objects.",
           "a list of language tags or Catalogs",
           lambda v: isinstance(v, (tuple, list)) and all((isinstance(x, str) and x) or
                                                         hasattr(x, "tag") for x in v)),
    Option("idle_timeout", 600.0, "Seconds a logged-in session may stay silent (RFC 1939 "
           "autologout: at least 600); 0 for none.", _SECONDS, _nonneg(int, float)),
    Option("login_timeout", 60.0, "Seconds from connect to a successful login; 0 for none.",
           _SECONDS, _nonneg(int, float)),
    Option("handshake_timeout", 30.0, "Seconds for a TLS handshake or a PROXY header.",
           _SECONDS, _nonneg(int, float)),
    Option("max_connections", 10000, "Live connections in all; over it a client gets "
           "-ERR [SYS/TEMP]. 0 for no limit.", _COUNT, _nonneg(int)),
    Option("max_connections_per_address", 100, "Live connections per client address (IPv6 "
           "grouped by address_ipv6_prefix). 0 for no limit.", _COUNT, _nonneg(int)),
    Option("limit_loopback", False, "Apply the per-address limit to loopback clients too.",
           "a bool", _is(bool)),
    Option("address_ipv6_prefix", 64, "IPv6 prefix length that counts as one address for "
           "max_connections_per_address.", "an integer 0-128",
           lambda v: _is(int)(v) and 0 <= v <= 128),
    Option("penalty_ipv6_prefix", 48, "IPv6 prefix length that shares one failed-login "
           "penalty (Dovecot uses 48).", "an integer 0-128",
           lambda v: _is(int)(v) and 0 <= v <= 128),
    Option("auth_failure_delay", 2.0, "First failed-login delay in seconds; it doubles with "
           "each failure from the same address up to auth_failure_delay_max.", _SECONDS,
           _nonneg(int, float)),
    Option("auth_failure_delay_max", 15.0, "Longest failed-login delay in seconds.", _SECONDS,
           _nonneg(int, float)),
    Option("login_delay", None, "LOGIN-DELAY (RFC 2449) in seconds: a user may log in once "
           "per this many seconds (a login sooner is refused); None for no limit. A user's "
           "userdb_pop3_login_delay= extra field (passwd file) overrides it.",
           "a non-negative integer or None", _or_none(_nonneg(int))),
    Option("expire", None, "EXPIRE (RFC 2449): days a retrieved message is kept (deleted at a "
           "later session's QUIT; 0: at the QUIT of the session that retrieved it), 'NEVER', "
           "or None not to announce it. A user's userdb_pop3_expire= extra field (passwd file) "
           "overrides it.", "days (an integer), 'NEVER' or None", _expire),
    Option("max_line_length", 255, "Longest command line in octets, CRLF included (RFC 2449: "
           "255); 16 to 8192.", "an integer 16-8192", lambda v: _is(int)(v) and 16 <= v <= 8192),
    Option("max_bad_commands", 20, "Bad commands in a row after login before the session is "
           "closed (3 before login).", "a positive integer", lambda v: _is(int)(v) and v >= 1),
    Option("max_auth_failures", 3, "Failed logins in one session before it is closed.",
           "a positive integer", lambda v: _is(int)(v) and v >= 1),
    Option("chunk_size", 64 * 1024, "Octets read from storage per step of a RETR or TOP.",
           "an integer 512-16777216", lambda v: _is(int)(v) and 512 <= v <= 1 << 24),
    Option("trace", None, "trace(session_id, 'C'|'S', line): every command (secrets redacted) "
           "and status line.", "a callable or None", _callable, cli=False),
    Option("logger", logging.getLogger("pop3proto"), "The logging.Logger sessions write to.",
           "a logging.Logger", _is(logging.Logger), cli=False),
    Option("proxy_protocol", False, "Expect a HAProxy PROXY v1/v2 header on every connection "
           "(only from trusted_proxies).", "a bool", _is(bool), listen=True),
    Option("trusted_proxies", (), "Networks allowed to send a PROXY header.",
           "a list of networks such as '10.0.0.0/8'", _networks),
    Option("workers", 1, "Worker processes sharing the listening sockets; 'auto' starts one "
           "per core.", "a positive integer or 'auto'",
           lambda v: v == "auto" or (_is(int)(v) and v >= 1), listen=True),
]

#: Every option by name, in the order the docs list them.
OPTIONS: dict[str, Option] = {o.name: o for o in _TABLE}


def worker_count(value: int | str) -> int:
    """The number of worker processes the ``workers`` option asks for ('auto': one per core)."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    return int(value)


def check_option(name: str, value: Any) -> None:
    """Raise TypeError unless *name* is an option and *value* one it accepts."""
    option = OPTIONS.get(name)
    if option is None:
        raise TypeError(f"unknown option {name!r}")
    if not option.check(value):
        raise TypeError(f"option {name!r} must be {option.accepts}, got {value!r}")
