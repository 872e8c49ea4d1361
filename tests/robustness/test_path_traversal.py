"""3. Path traversal through user names: nothing outside the Maildir root is read or created.

Hostile names (``..``, ``/``, ``\\``, NUL, control characters, 1000
characters, lookalikes) go in through USER/PASS, APOP, AUTH PLAIN and AUTH
LOGIN, and are also present in the passwd-file with a known password.  Every
attempt must get ``-ERR``; a decoy maildrop beside ROOT (what ``../decoy``
would reach) and the whole temporary tree must be unchanged afterwards.  A
second authenticator that accepts *any* name shows that the storage layer
refuses the names on its own.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clients import Raw, running

from pop3proto.auth import PlainVerifier
from pop3proto.maildir import MaildirStorage
from pop3proto.passwd import PasswdFile, hash_password
from pop3proto.server import Server

from .conftest import Figure, body, fill, tree

PW = "Decoy-Secret-9"

HOSTILE = [
    "../decoy",
    "..",
    "../../outside",
    "a/../../decoy",
    "decoy/..",
    "/etc",
    "/tmp",
    "..\\decoy",
    "x\\y",
    "nul\x00x",
    "ctl\x01x",
    "tab\tx",
    "cr\rx",
    "del\x7fx",
    "esc\x1b[0m",
    "c1\x85x",
    "a" * 1000,
    ".",
    ".hidden",
    "\uff0e\uff0e\uff0fdecoy",  # fullwidth: NFKC turns it into ../decoy
    "..\u2215decoy",  # division slash
]
IDS = [re.sub(r"[^A-Za-z0-9]", "_", n)[:20] or "x" for n in HOSTILE]


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """tmp/mail/root (ROOT), tmp/mail/decoy and tmp/outside (decoys), a passwd-file."""
    root = tmp_path / "mail" / "root"
    root.mkdir(parents=True)
    fill(root, "alice", [body(1)])
    decoy = tmp_path / "mail" / "decoy"
    fill(tmp_path / "mail", "decoy", [body(100), body(101)])
    (decoy / "new" / "1700000999.M1P1Q1.decoy").write_bytes(body(102))  # scan would move it
    fill(tmp_path, "outside", [body(200)])
    passwd = tmp_path / "users"
    lines = [f"alice:{hash_password('alice-Secret-1', 'PLAIN')}::::::"]
    lines += [f"{name}:{hash_password(PW, 'PLAIN')}::::::" for name in HOSTILE]
    passwd.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    return {"base": tmp_path, "root": root, "decoy": decoy, "passwd": passwd}


@pytest.fixture
def served(transport: str, layout: dict[str, Path]) -> Iterator[Server]:
    options = {
        "auth": PasswdFile(layout["passwd"]),
        "storage": MaildirStorage(layout["root"]),
        "apop": True,
        "cleartext_auth": True,
        "auth_failure_delay": 0,
    }
    with running(transport, **options) as server:
        yield server


def reply(client: Raw) -> bytes:
    try:
        return client.line()
    except (EOFError, ConnectionError):
        return b"<closed>"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def attempt(port: int, method: str, name: str, password: str = PW) -> list[bytes]:
    """One login try on a fresh connection; every reply line (``<closed>`` if it closed)."""
    raw = name.encode("utf-8", "surrogateescape")
    out: list[bytes] = []
    with Raw(port) as c:
        if method == "user":
            c.send(b"USER " + raw + b"\r\n")
            out.append(reply(c))
            if out[-1].startswith(b"+OK"):
                c.send(f"PASS {password}\r\n".encode())
                out.append(reply(c))
        elif method == "utf8-user":
            assert c.cmd("UTF8").startswith(b"+OK")
            c.send(b"USER " + raw + b"\r\n")
            out.append(reply(c))
            if out[-1].startswith(b"+OK"):
                c.send(f"PASS {password}\r\n".encode())
                out.append(reply(c))
        elif method == "apop":
            m = re.search(rb"<[^>]+>", c.greeting)
            assert m is not None, c.greeting
            digest = hashlib.md5(m.group(0) + password.encode()).hexdigest()
            c.send(b"APOP " + raw + b" " + digest.encode() + b"\r\n")
            out.append(reply(c))
        elif method == "auth-plain":
            message = b"\0" + raw + b"\0" + password.encode()
            c.send(f"AUTH PLAIN {b64(message)}\r\n".encode())
            out.append(reply(c))
        elif method == "auth-login":
            c.send(b"AUTH LOGIN\r\n")
            out.append(reply(c))
            c.send(f"{b64(raw)}\r\n".encode())
            out.append(reply(c))
            if out[-1].startswith(b"+ "):
                c.send(f"{b64(password.encode())}\r\n".encode())
                out.append(reply(c))
        else:  # pragma: no cover
            raise AssertionError(method)
        if out[-1].startswith(b"+OK"):
            c.send(b"STAT\r\n")
            out.append(reply(c))
    return out


METHODS = ["user", "utf8-user", "apop", "auth-plain", "auth-login"]


#: A lookalike that is a legal single path component: the passwd loader accepts it, but
#: every login path normalises (NFKC) it to "../decoy" and refuses it.
LOOKALIKE = "\uff0e\uff0e\uff0fdecoy"


def test_hostile_names_in_the_passwd_file_are_refused_at_load(layout: dict[str, Path]) -> None:
    auth = PasswdFile(layout["passwd"])
    assert auth.exists("alice")
    accepted = [n for n in HOSTILE if auth.exists(n) or auth.lookup(n) is not None]
    assert accepted == [LOOKALIKE]
    assert len(auth.errors) == len(HOSTILE) - 1, auth.errors


@pytest.mark.parametrize("method", METHODS)
def test_hostile_user_names_get_err_and_touch_nothing_outside_root(
    served: Server, layout: dict[str, Path], method: str, figure: Figure
) -> None:
    base = layout["base"]
    before = tree(base)
    port = served.cget("port")
    refused = 0
    for name in HOSTILE:
        last = attempt(port, method, name)[-1]
        assert last.startswith(b"-ERR") or last == b"<closed>", (name, last)
        refused += 1
    assert tree(base) == before, "something outside (or inside) ROOT changed"
    # The server still serves the real user.
    assert attempt(port, "user", "alice", "alice-Secret-1")[-1].startswith(b"+OK 1 ")
    figure(f"hostile_names_refused_{method}", f"{refused}/{len(HOSTILE)}")


class AnyName:
    """An authenticator that accepts every name with password PW; mailbox = the name as given."""

    has_cleartext = True

    def exists(self, name: str) -> bool:
        return True

    def lookup(self, name: str) -> tuple[PlainVerifier, str]:
        return PlainVerifier(PW), name


@pytest.mark.parametrize("method", ["user", "auth-plain", "auth-login"])
def test_storage_refuses_hostile_mailboxes_even_when_auth_accepts_them(
    transport: str, layout: dict[str, Path], method: str
) -> None:
    base = layout["base"]
    before = tree(base)
    options: dict[str, Any] = {
        "auth": AnyName(),
        "storage": MaildirStorage(layout["root"]),
        "cleartext_auth": True,
        "auth_failure_delay": 0,
    }
    outcomes: dict[str, bytes] = {}
    with running(transport, **options) as server:
        for name in HOSTILE:
            outcomes[name] = attempt(server.cget("port"), method, name)[-1]
    # Only names that stay a single component inside ROOT may log in, to an empty maildrop.
    for name, last in outcomes.items():
        if last.startswith(b"+OK"):
            assert last == b"+OK 0 0", (name, last)
            assert not any(bad in name for bad in ("/", "\\", "..")), name
            assert not name.startswith("."), name
            assert name.isprintable(), name
        else:
            assert last.startswith(b"-ERR") or last == b"<closed>", (name, last)
    assert tree(base) == before, "something outside (or inside) ROOT changed"


class Recording(AnyName):
    """AnyName that remembers every name the server asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def lookup(self, name: str) -> tuple[PlainVerifier, str]:
        self.asked.append(name)
        return super().lookup(name)


CONTROL_NAMES = ["ctl\x01x", "tab\tx", "lf\nFAKE: log line", "cr\rx", "del\x7fx", "c1\x85x"]


@pytest.mark.parametrize("method", ["user", "auth-plain", "auth-login"])
def test_no_name_with_control_characters_reaches_the_authenticator(
    transport: str, layout: dict[str, Path], method: str
) -> None:
    """Every login path should apply USER's name rule (printable, no controls)."""
    auth = Recording()
    options: dict[str, Any] = {
        "auth": auth,
        "storage": MaildirStorage(layout["root"]),
        "cleartext_auth": True,
        "auth_failure_delay": 0,
    }
    with running(transport, **options) as server:
        for name in CONTROL_NAMES:
            attempt(server.cget("port"), method, name)
    assert [n for n in auth.asked if not n.isprintable()] == []
