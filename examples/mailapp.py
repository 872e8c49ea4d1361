"""The application half shared by the bare-``Connection`` examples: users, mail, answers.

A ``Connection`` asks its application for every decision it cannot make
alone.  ``MailApp.answer`` makes them for one user's in-memory maildrop and
answers *every* event a ``Connection`` can return, so no client command can
leave an event pending (a pending event makes ``next_event()`` return
``PAUSED`` for ever, and a loop that retries it spins).
"""

from __future__ import annotations

import hmac
import threading

from pop3proto import (
    Connection,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Err,
    Event,
    Login,
    LoginAccepted,
    Maildrop,
    MessageInfo,
    Ok,
    Response,
    RetrieveMessage,
    TopOfMessage,
    Update,
    wire_size,
)

USER, PASSWORD = "alice", "wonderland"
MESSAGES = {
    "m1": b"From: bob@example.org\nSubject: hello\n\nHi Alice.\n.A line with a dot.\n",
    "m2": b"From: carol@example.org\nSubject: second\n\nTwo.\n",
}


class MailApp:
    """One process's mail: a user, its messages, and who holds the maildrop lock."""

    def __init__(self) -> None:
        self.messages = dict(MESSAGES)
        self._mutex = threading.Lock()  # the blocking example answers from several threads
        self._locked = False

    def password_ok(self, user: str, password: str) -> bool:
        """Whether *password* is *user*'s (compared in constant time)."""
        given = password.encode("utf-8", "surrogateescape")
        return user == USER and hmac.compare_digest(given, PASSWORD.encode())

    def login(self, user: str, session: dict[str, bool]) -> Response:
        """Lock *user*'s maildrop and list it: the answer to a login that checked out."""
        with self._mutex:
            if self._locked:
                return Err(text="Maildrop in use.", code="IN-USE")
            self._locked = session["locked"] = True
            infos = [MessageInfo(key=k, size=wire_size(v), uid=k)
                     for k, v in self.messages.items()]
        return LoginAccepted(maildrop=Maildrop(infos), username=user)

    def answer(self, conn: Connection, event: Event, session: dict[str, bool]) -> None:
        """Answer *event* on *conn*; *session* is this connection's own state."""
        send = conn.send
        if isinstance(event, Login):
            if self.password_ok(event.username, event.password):
                send(self.login(event.username, session))
            else:
                send(Err(text="Authentication failed.", code="AUTH"))
        elif isinstance(event, (RetrieveMessage, TopOfMessage)):
            data = self.messages.get(event.key)
            if data is None:
                send(Err(text="Message gone.", code="SYS/TEMP"))
                return
            send(Ok())
            send(Data(data=data))  # any chunking; TOP is cut to size by the core
            send(EndOfMessage())
        elif isinstance(event, Update):  # QUIT in TRANSACTION: apply the deletions
            with self._mutex:
                for key in event.deleted:
                    self.messages.pop(key, None)
            self.closed(session)
            send(Ok(text="Logging out."))
        elif isinstance(event, ConnectionClosed):  # information only: no answer
            self.closed(session)
        else:  # ApopLogin, AuthStart, AuthResponse, StartTLS or anything newer: refuse
            send(Err(text="Not available here."))

    def closed(self, session: dict[str, bool]) -> None:
        """Release the lock if this connection holds it (QUIT, EOF, error or timeout)."""
        with self._mutex:
            if session.pop("locked", False):
                self._locked = False
