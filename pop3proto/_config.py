"""Per-connection configuration of the core: capabilities and limits.

Everything the core needs from the outside world is a field here or an
argument of ``Connection``: the core reads no clock, environment or file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ._texts import DEFAULT_LANGUAGES, Catalog

__all__ = ["PLAINTEXT_MECHANISMS", "Config"]

#: SASL mechanisms that carry the password in clear; refused before TLS
#: unless ``Config.cleartext_auth`` allows it.
PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """What a Connection offers and how much it tolerates.

    Attributes:
        implementation: the CAPA ``IMPLEMENTATION`` text, or None to omit it.
        max_line_length: longest command line in octets, CRLF included
            (RFC 2449: 255).  A longer line is answered ``-ERR Line too
            long.`` and counts as a bad command; the session reads on.
        max_sasl_line_length: longest AUTH command or SASL continuation line
            (a longer SASL answer fails the exchange).  A partial line is
            held up to this length; past it, its octets are dropped up to
            the line's end, and a line that does not end within
            ``max_buffered_input`` octets ends the session.
        max_bad_commands_before_login: unknown/misplaced/malformed commands in
            a row tolerated in AUTHORIZATION before the session is closed.
        max_bad_commands: the same after login.
        max_auth_failures: failed logins before the session is closed.
        max_buffered_input: unprocessed input octets held before the session
            is closed (a transport that reads only on NEED_DATA never gets near).
        output_high_water: outbound octets after which ``next_event`` stops
            answering pipelined commands and returns PAUSED until drained.
        user_command: offer USER/PASS.
        apop: accept APOP (the greeting must also carry a timestamp).
        sasl_mechanisms: SASL mechanisms offered, in CAPA order.
        cleartext_auth: allow USER/PASS, APOP and PLAIN/LOGIN without TLS.
        stls: offer STLS (the application can start TLS).
        utf8: offer the RFC 6856 UTF8 command.
        lang: offer the RFC 6856 LANG command.
        languages: the reply languages offered, in the administrator's order
            of preference (``LANG *`` picks the first); one must be tagged
            ``i-default`` (RFC 2277), the language every session starts in.
            The default offers ``i-default`` and ``en``; an embedder adds
            catalogs, e.g. ``pop3proto.lang.load("de")``.
        login_delay: LOGIN-DELAY seconds to announce, or None.
        expire: EXPIRE days (an int) or "NEVER" to announce, or None.
        trace: called with ("C", line) for each command (secrets redacted)
            and ("S", line) for each status line; None for no tracing.
    """

    implementation: str | None = "pop3proto"
    max_line_length: int = 255
    max_sasl_line_length: int = 8192
    max_bad_commands_before_login: int = 3
    max_bad_commands: int = 20
    max_auth_failures: int = 3
    max_buffered_input: int = 1 << 20
    output_high_water: int = 1 << 16
    user_command: bool = True
    apop: bool = False
    sasl_mechanisms: tuple[str, ...] = ()
    cleartext_auth: bool = True
    stls: bool = False
    utf8: bool = True
    lang: bool = True
    languages: tuple[Catalog, ...] = DEFAULT_LANGUAGES
    login_delay: int | None = None
    expire: int | str | None = None
    trace: Callable[[str, str], None] | None = None

    def __post_init__(self) -> None:
        if not 16 <= self.max_line_length <= self.max_sasl_line_length:
            raise ValueError("need 16 <= max_line_length <= max_sasl_line_length")
        for name in ("max_bad_commands_before_login", "max_bad_commands", "max_auth_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_buffered_input < self.max_sasl_line_length:
            raise ValueError("max_buffered_input must be at least max_sasl_line_length")
        if self.expire is not None and self.expire != "NEVER" and (
            not isinstance(self.expire, int) or self.expire < 0
        ):
            raise ValueError("expire must be a non-negative int or 'NEVER'")
        if self.login_delay is not None and self.login_delay < 0:
            raise ValueError("login_delay must be non-negative")
        tags = [c.tag.lower() for c in self.languages if isinstance(c, Catalog)]
        if len(tags) != len(self.languages) or len(set(tags)) != len(tags):
            raise ValueError("languages must be Catalogs with distinct tags")
        if "i-default" not in tags:
            raise ValueError("languages must include the 'i-default' catalog (RFC 2277)")
        for mech in self.sasl_mechanisms:
            if not mech or not mech.isascii() or mech != mech.upper() or " " in mech:
                raise ValueError(f"bad SASL mechanism name {mech!r}")
