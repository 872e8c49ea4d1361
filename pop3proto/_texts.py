"""The human-readable texts of the replies, one catalog per language (RFC 6856 LANG).

Every text the core (and the server's policy) puts after ``+OK``/``-ERR`` is
named by a message id in ``MESSAGES``, the English originals.  A
``Catalog`` maps every id to the text in one language; a ``Connection``
holds the catalog of the language its client chose with ``LANG`` and
starts in ``i-default`` (RFC 2277: English text for a default audience;
RFC 6856 section 3 makes it the language until the client picks another).

A translation is data: a JSON object ``{"tag": ..., "description": ...,
"texts": {id: text}}`` read with ``Catalog.from_json`` (the shipped ones
live in ``pop3proto/lang/``, loaded by ``pop3proto.lang.load``).  Ids it
leaves out fall back to English; an unknown id, a placeholder the English
text does not have, or a text of more than one line is refused when the
catalog is built, never when a reply is written.

This module reads no file: the English catalogs are built from the
mapping below.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = [
    "DEFAULT_LANGUAGES",
    "EN",
    "I_DEFAULT",
    "MESSAGES",
    "Catalog",
    "match_language",
    "valid_language_range",
]

#: The English text of every message id; ``{name}`` marks a field filled in
#: when the reply is written.  These are the byte-exact replies of the
#: default language.
MESSAGES: Final[Mapping[str, str]] = MappingProxyType(
    {
        # -- framing and command dispatch
        "too_much_input": "Too much input.",
        # -- the session's end, said by the server
        "inactivity": "Disconnected for inactivity.",
        "shutting_down": "Server shutting down.",
        "server_busy": "Server is busy, try again later.",
        "login_delay": "Logged in less than {seconds} seconds ago.",
        "line_too_long": "Line too long.",
        "too_many_bad_commands": "Too many bad commands.",
        "nul_in_command": "NUL in command.",
        "syntax_error": "Syntax error.",
        "wrong_state": "Command not valid in this state.",
        "unknown_command": "Unknown command.",
        # -- AUTHORIZATION
        "capability_list": "Capability list follows",
        "user_disabled": "USER/PASS not available; use AUTH.",
        "plaintext_disallowed": (
            "Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
        ),
        "non_ascii_user": "Non-ASCII user name needs the UTF8 command first.",
        "invalid_user_name": "Invalid user name.",
        "no_username": "No username given.",
        "apop_unavailable": "APOP not available.",
        "apop_invalid": "Invalid APOP arguments.",
        "unsupported_mechanism": "Unsupported authentication mechanism.",
        "invalid_initial_response": "Invalid base64 data in initial response.",
        "invalid_base64": "Invalid base64 data.",
        "auth_failed": "Authentication failed.",
        "auth_aborted": "Authentication aborted.",
        "logged_in": "Logged in.",
        "stls_disabled": "TLS support isn't enabled.",
        "tls_active": "TLS is already active.",
        "begin_tls": "Begin TLS negotiation now.",
        "tls_unavailable": "TLS not available.",
        "utf8_unavailable": "UTF8 not available.",
        "utf8_enabled": "UTF8 enabled",
        "logging_out": "Logging out.",
        # -- LANG (RFC 6856 section 3)
        "lang_unavailable": "LANG not available.",
        "language_listing": "Language listing follows",
        "language_changed": "Language changed",
        "language_unsupported": "Unsupported language.",
        "language_range_invalid": "Invalid language range.",
        # -- TRANSACTION
        "invalid_message_number": "Invalid message number.",
        "message_deleted": "Message is deleted.",
        "no_such_message": "No such message.",
        "invalid_line_count": "Invalid line count.",
        "marked_deleted": "Marked to be deleted.",
        "maildrop_has": "maildrop has {count} messages ({octets} octets)",
        "scan_listing": "{count} messages ({octets} octets)",
        "message_octets": "{size} octets",
        "message_unavailable": "Message unavailable.",
        "deletion_failed": "Deletion failed.",
        # -- the server's policy (pop3proto.policy)
        "auth_unavailable": "Authentication is temporarily unavailable.",
        "authzid_not_allowed": "Authorization identity not allowed.",
        "mailbox_refused": "Mailbox is not accessible.",
        "mailbox_unavailable": "Mailbox is temporarily unavailable.",
        "mailbox_locked": "Mailbox is locked by another POP3 session.",
        "message_temporarily_unavailable": "Message is temporarily unavailable.",
        "some_not_deleted": "Some messages could not be deleted.",
        "not_supported": "Not supported.",
        "no_auth_in_progress": "No authentication in progress.",
        # -- SASL mechanism failures (pop3proto.sasl reasons, by their English text)
        "sasl_invalid_plain": "Invalid PLAIN message.",
        "sasl_invalid_plain_utf8": "Invalid UTF-8 in PLAIN message.",
        "sasl_missing_password": "Missing password.",
        "sasl_invalid_cram": "Invalid CRAM-MD5 answer.",
        "sasl_invalid_utf8": "Invalid UTF-8.",
        "sasl_invalid_oauth": "Invalid OAuth message.",
        "sasl_unexpected_empty": "Unexpected empty answer.",
        "sasl_unexpected_scram": "Unexpected SCRAM message.",
        "sasl_no_channel_binding": "Channel binding is not supported.",
        "sasl_invalid_scram_first": "Invalid SCRAM client-first message.",
        "sasl_scram_mismatch": "SCRAM nonce or channel binding mismatch.",
        "sasl_invalid_scram_proof": "Invalid SCRAM proof.",
    }
)

_FORMATTER = string.Formatter()
#: A language tag as this module accepts it (RFC 5646's shape, without its registry).
_TAG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")
#: RFC 4647 section 2.1: a basic language range.
_RANGE = re.compile(rb"\*|[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")


def _fields(msg_id: str, text: str) -> frozenset[str]:
    """The field names of *text*; refuses conversions, format specs and attribute access."""
    names = set()
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError as exc:
        raise ValueError(f"text {msg_id!r}: {exc}") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"text {msg_id!r}: field {{{name}}} must be a plain name")
        names.add(name)
    return frozenset(names)


_ENGLISH_FIELDS: Final = {msg_id: _fields(msg_id, text) for msg_id, text in MESSAGES.items()}
#: English texts without fields, back to their ids (for texts that arrive as
#: English strings, such as pop3proto.sasl's failure reasons).
_ID_OF_TEXT: Final = {
    text: msg_id for msg_id, text in MESSAGES.items() if not _ENGLISH_FIELDS[msg_id]
}


class Catalog:
    """The reply texts in one language, with its tag and its name in that language.

    Args:
        tag: the language tag (``de``, ``en-GB``, ``i-default``).
        description: the language's name in itself, listed by ``LANG``.
        texts: message id to text; ids left out are English.

    Raises:
        ValueError: a bad tag, an unknown id, a text of more than one line,
            or a field the English text does not have.
    """

    __slots__ = ("_texts", "description", "tag")

    def __init__(self, tag: str, description: str, texts: Mapping[str, str] | None = None) -> None:
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise ValueError(f"bad language tag {tag!r}")
        if not isinstance(description, str) or not _one_line(description):
            raise ValueError(f"language {tag}: the description must be one non-empty line")
        merged = dict(MESSAGES)
        for msg_id, text in (texts or {}).items():
            if msg_id not in MESSAGES:
                raise ValueError(f"language {tag}: unknown message id {msg_id!r}")
            if not isinstance(text, str) or not _one_line(text):
                raise ValueError(f"language {tag}: text {msg_id!r} must be one non-empty line")
            extra = _fields(msg_id, text) - _ENGLISH_FIELDS[msg_id]
            if extra:
                raise ValueError(
                    f"language {tag}: text {msg_id!r} has unknown fields {sorted(extra)}"
                )
            merged[msg_id] = text
        self.tag = tag
        self.description = description
        self._texts: Mapping[str, str] = MappingProxyType(merged)

    @classmethod
    def from_json(cls, data: str | bytes) -> Catalog:
        """A catalog from its data file: ``{"tag", "description", "texts": {id: text}}``."""
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise ValueError(f"language catalog is not JSON: {exc}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("texts", {}), dict):
            raise ValueError("a language catalog is an object with tag, description and texts")
        return cls(obj.get("tag"), obj.get("description"), obj.get("texts"))  # type: ignore[arg-type]

    @property
    def texts(self) -> Mapping[str, str]:
        """Every message id with its text in this language (read-only)."""
        return self._texts

    def text(self, msg_id: str, **fields: object) -> str:
        """The text of *msg_id*, its ``{name}`` fields filled from *fields*."""
        text = self._texts[msg_id]
        return text.format_map(fields) if fields else text

    def localize(self, english: str) -> str:
        """*english* in this language if it is a catalog text without fields, else as given."""
        msg_id = _ID_OF_TEXT.get(english)
        return english if msg_id is None else self._texts[msg_id]

    def __repr__(self) -> str:
        return f"Catalog({self.tag!r}, {self.description!r})"


def _one_line(text: str) -> bool:
    return bool(text) and not any(c in text for c in "\r\n\x00")


#: RFC 2277's default language: English text for an international audience.
I_DEFAULT: Final = Catalog("i-default", "Default language")
#: English (the same texts as i-default).
EN: Final = Catalog("en", "English")
#: What ``Config.languages`` offers unless told otherwise.
DEFAULT_LANGUAGES: Final = (I_DEFAULT, EN)


def valid_language_range(arg: bytes) -> bool:
    """Whether *arg* is an RFC 4647 basic language range (``de``, ``en-GB``, ``*``)."""
    return _RANGE.fullmatch(arg) is not None


def match_language(language_range: str, catalogs: tuple[Catalog, ...]) -> Catalog | None:
    """The first of *catalogs* the range selects by RFC 4647 basic filtering, or None.

    ``*`` selects the first catalog (the administrator's preferred
    language); ``de`` selects ``de`` and ``de-CH``, not ``deu``; case is
    ignored.
    """
    wanted = language_range.lower()
    for catalog in catalogs:
        tag = catalog.tag.lower()
        if wanted == "*" or tag == wanted or tag.startswith(wanted + "-"):
            return catalog
    return None
