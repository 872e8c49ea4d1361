"""The maildrop snapshot taken at login, and the session's deletion marks.

RFC 1939 numbers the messages 1..n when the maildrop is locked; the numbers
hold for the whole session.  A message marked for deletion disappears from
STAT, LIST, UIDL, RETR, TOP and DELE while the others keep their numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Maildrop", "MessageInfo", "valid_uid"]


def valid_uid(uid: str) -> bool:
    """Whether *uid* is an RFC 1939 unique-id: 1-70 characters in 0x21-0x7E."""
    # isascii + isprintable leave exactly 0x20-0x7E; then refuse the space.
    return 0 < len(uid) <= 70 and uid.isascii() and uid.isprintable() and " " not in uid


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageInfo:
    """One message of a maildrop as the storage lists it at login.

    Attributes:
        key: the storage's own name for the message (a Maildir base name, a
            database id); handed back in ``RetrieveMessage`` and ``Update``.
        size: the message's size in octets as POP3 sends it: CRLF line ends,
            before dot-stuffing (RFC 1939 section 11).  See ``wire_size``.  An
            empty message is sent as one empty line, so a size of 0 (a store
            that measured the file) is listed as 2.
        uid: the UIDL unique-id, 1-70 characters in 0x21-0x7E, stable across
            sessions.
    """

    key: str
    size: int
    uid: str

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"negative message size {self.size}")
        if self.size == 0:  # what RETR sends for it: one empty line
            object.__setattr__(self, "size", 2)
        if not valid_uid(self.uid):
            raise ValueError(f"invalid UIDL {self.uid!r}: need 1-70 chars in 0x21-0x7E")


@dataclass(slots=True)
class Maildrop:
    """A locked maildrop's listing plus this session's deletion marks.

    Built by the application (``LoginAccepted(maildrop=Maildrop(...))``); the
    core then owns the marks.  Messages are numbered from 1 in list order.
    """

    messages: tuple[MessageInfo, ...]
    deleted: set[int] = field(default_factory=set)
    _live_count: int = field(init=False, default=0)
    _live_octets: int = field(init=False, default=0)

    def __init__(self, messages: tuple[MessageInfo, ...] | list[MessageInfo] = ()) -> None:
        self.messages = tuple(messages)
        self.deleted = set()
        self._live_count = len(self.messages)
        self._live_octets = sum(m.size for m in self.messages)

    def get(self, number: int) -> MessageInfo | None:
        """The live message numbered *number*, or None if absent or deleted."""
        if 1 <= number <= len(self.messages) and number not in self.deleted:
            return self.messages[number - 1]
        return None

    def exists(self, number: int) -> bool:
        """Whether *number* names a message of the snapshot (deleted or not)."""
        return 1 <= number <= len(self.messages)

    def mark(self, number: int) -> None:
        """Mark live message *number* for deletion at UPDATE.

        Raises:
            ValueError: *number* names no live message (absent or already
                marked); the marks are unchanged.
        """
        info = self.get(number)
        if info is None:
            raise ValueError(f"message {number} is absent or already marked")
        self.deleted.add(number)
        self._live_count -= 1
        self._live_octets -= info.size

    def reset(self) -> None:
        """Clear every deletion mark (RSET)."""
        self.deleted.clear()
        self._live_count = len(self.messages)
        self._live_octets = sum(m.size for m in self.messages)

    @property
    def count(self) -> int:
        """Number of messages not marked for deletion (what STAT reports)."""
        return self._live_count

    @property
    def octets(self) -> int:
        """Total size of the messages not marked for deletion."""
        return self._live_octets

    def live(self) -> list[tuple[int, MessageInfo]]:
        """(number, info) for every message not marked, in number order."""
        deleted = self.deleted
        return [(n, m) for n, m in enumerate(self.messages, 1) if n not in deleted]

    def deleted_keys(self) -> tuple[str, ...]:
        """Storage keys of the marked messages, in number order."""
        return tuple(self.messages[n - 1].key for n in sorted(self.deleted))
