"""An example test a user of pop3proto.testing would write.

The code under test is ``fetch_and_delete``, a small mail fetcher built on
the stdlib ``poplib``: it downloads every message, parses it, and deletes
what it downloaded.  The tests run it against a real POP3 server started by
the ``pop3_server`` / ``pop3_server_factory`` fixtures, then ask the server
what was retrieved, what was deleted and what is left.

Run it with the plugin (installed packages load it by themselves)::

    python -m pytest -p pop3proto.testing examples/test_fetch_with_pop3proto.py
"""

from __future__ import annotations

import email
import email.policy
import poplib
import ssl
from email.message import EmailMessage

import pytest

from pop3proto.testing import Pop3ServerFactory, Pop3TestServer

# ---------------------------------------------------------------- the code under test


def fetch_and_delete(
    host: str,
    port: int,
    user: str,
    password: str,
    *,
    tls: ssl.SSLContext | None = None,
) -> list[EmailMessage]:
    """Download every message (over STLS when *tls* is given), then delete them all.

    Deletions happen only at QUIT, so a failure half-way loses nothing.
    """
    client = poplib.POP3(host, port, timeout=10)
    try:
        if tls is not None:
            client.stls(context=tls)
        client.user(user)
        client.pass_(password)
        count, _ = client.stat()
        fetched = []
        for n in range(1, count + 1):
            _, lines, _ = client.retr(n)
            raw = b"\r\n".join(lines) + b"\r\n"
            fetched.append(email.message_from_bytes(raw, policy=email.policy.default))
            client.dele(n)
        client.quit()
    finally:
        client.close()
    return [m for m in fetched if isinstance(m, EmailMessage)]


# ---------------------------------------------------------------- the tests


def make_message(subject: str) -> EmailMessage:
    """A short message with *subject*."""
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "bob@example.org"
    msg["Subject"] = subject
    msg.set_content(f"This is {subject}.\n")
    return msg


def test_fetches_and_deletes_everything(pop3_server: Pop3TestServer) -> None:
    bob = pop3_server.add_user("bob", "s3cret")
    first = bob.deliver(make_message("first"))
    second = bob.deliver(b"Subject: second\r\n\r\nraw bytes work too\r\n")

    got = fetch_and_delete(pop3_server.host, pop3_server.port, "bob", "s3cret")

    assert [m["Subject"] for m in got] == ["first", "second"]
    assert bob.retrieved() == [first, second]
    assert bob.deleted() == [first, second]
    assert bob.messages() == []


def test_a_dropped_connection_deletes_nothing(pop3_server: Pop3TestServer) -> None:
    bob = pop3_server.add_user("bob", "s3cret")
    bob.deliver(make_message("first"))
    bob.deliver(make_message("second"))
    bob.drop_during_retr(after_bytes=20, times=1)

    with pytest.raises(poplib.error_proto):
        fetch_and_delete(pop3_server.host, pop3_server.port, "bob", "s3cret")
    assert bob.deleted() == []
    assert len(bob.messages()) == 2

    # The fault fired once: the next run gets everything.
    assert len(fetch_and_delete(pop3_server.host, pop3_server.port, "bob", "s3cret")) == 2


def test_wrong_password_is_reported(pop3_server: Pop3TestServer) -> None:
    pop3_server.add_user("bob", "s3cret")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        fetch_and_delete(pop3_server.host, pop3_server.port, "bob", "wrong")


def test_over_stls(pop3_server_factory: Pop3ServerFactory) -> None:
    server = pop3_server_factory(tls="stls", cleartext_auth=False)  # no password before TLS
    bob = server.add_user("bob", "s3cret")
    bob.deliver(make_message("secret"))

    got = fetch_and_delete(
        server.host, server.port, "bob", "s3cret", tls=server.client_ssl_context()
    )

    assert [m["Subject"] for m in got] == ["secret"]
