"""Every program in examples/ runs, serves real clients (poplib, curl) and stops on SIGTERM."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import mailbox
import os
import poplib
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = 10.0
CURL = shutil.which("curl")


@contextlib.contextmanager
def example(name: str, *args: str) -> Iterator[int]:
    """Start examples/<name> on port 0; yield the port it prints; SIGTERM it, expect exit 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's pop3proto
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / name), "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )
    lines: queue.Queue[bytes] = queue.Queue()
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None
    assert stderr is not None
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        try:
            first = lines.get(timeout=TIMEOUT)
        except queue.Empty:
            pytest.fail(f"{name} printed no port within {TIMEOUT} s")
        assert first.strip().isdigit(), (first, stderr.read() if proc.poll() else b"")
        yield int(first)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
            pytest.fail(f"{name} did not stop on SIGTERM")
    assert proc.returncode == 0, err.decode(errors="replace")


def login(port: int, user: str = "alice", password: str = "wonderland") -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
    client.user(user)
    client.pass_(password)
    return client


def raw(port: int, *commands: bytes) -> list[bytes]:
    """Send each command and read one reply line for it (multi-line replies not expected)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        f = sock.makefile("rb")
        replies = [f.readline()]
        for command in commands:
            sock.sendall(command + b"\r\n")
            replies.append(f.readline())
        return replies


CONNECTION_EXAMPLES = ["asyncio_protocol.py", "trio_server.py", "blocking_server.py",
                       "sasl_plain_scram.py"]


@pytest.mark.parametrize("name", CONNECTION_EXAMPLES)
def test_poplib_session_with_deletion(name: str) -> None:
    with example(name) as port:
        client = login(port)
        assert client.stat() == (2, 123)
        assert client.list()[1] == [b"1 73", b"2 50"]
        lines = client.retr(1)[1]
        assert lines[-1] == b".A line with a dot."
        assert client.top(2, 0)[1] == [b"From: carol@example.org", b"Subject: second", b""]
        assert client.uidl()[1] == [b"1 m1", b"2 m2"]
        client.dele(1)
        assert client.quit().startswith(b"+OK")
        client = login(port)
        assert client.uidl()[1] == [b"1 m2"]
        client.quit()


@pytest.mark.parametrize("name", CONNECTION_EXAMPLES)
def test_refusals_and_events_the_example_does_not_serve(name: str) -> None:
    with example(name) as port:
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            login(port, password="wrong")
        holder = login(port)
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            login(port)
        holder.quit()
        # Each gets one -ERR and the session goes on: no event is left pending.
        digest = b"0123456789abcdef" * 2
        replies = raw(port, b"AUTH CRAM-MD5", b"STLS", b"APOP alice " + digest, b"NOOP", b"QUIT")
        assert [r[:4] for r in replies] == [b"+OK ", b"-ERR", b"-ERR", b"-ERR", b"-ERR", b"+OK "]
        login(port).quit()  # the lock was released


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("name", CONNECTION_EXAMPLES)
def test_curl_retrieves(name: str) -> None:
    with example(name) as port:
        assert CURL is not None
        out = subprocess.run([CURL, "-sS", f"pop3://alice:wonderland@127.0.0.1:{port}/2"],
                             capture_output=True, timeout=TIMEOUT, check=True).stdout
        assert out == b"From: carol@example.org\r\nSubject: second\r\n\r\nTwo.\r\n"


# ---------------------------------------------------------------- SASL


def cmd(client: poplib.POP3, line: str) -> bytes:
    """Send one raw command with poplib (it has no AUTH); raises error_proto on -ERR."""
    reply: bytes = client._shortcmd(line)  # type: ignore[attr-defined]
    return reply


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_sasl_plain_with_an_initial_response() -> None:
    with example("sasl_plain_scram.py") as port:
        client = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
        assert "SASL PLAIN SCRAM-SHA-256" in [f"SASL {' '.join(v)}" if k == "SASL" else k
                                              for k, v in client.capa().items()]
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            cmd(client, "AUTH PLAIN " + b64(b"\0alice\0wrong"))
        assert cmd(client, "AUTH PLAIN " + b64(b"\0alice\0wonderland")).startswith(b"+OK")
        assert client.stat()[0] == 2
        client.quit()


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_sasl_plain_with_curl() -> None:
    with example("sasl_plain_scram.py") as port:
        assert CURL is not None
        out = subprocess.run(
            [CURL, "-sS", "--login-options", "AUTH=PLAIN",
             f"pop3://alice:wonderland@127.0.0.1:{port}/"],
            capture_output=True, timeout=TIMEOUT, check=True).stdout
        assert out.split(b"\r\n")[:2] == [b"1 73", b"2 50"]


def scram_login(client: poplib.POP3, user: str, password: str) -> bytes:
    """A client-side SCRAM-SHA-256 exchange (RFC 5802) over poplib's raw commands."""
    cnonce = b64(os.urandom(18))
    first_bare = f"n={user},r={cnonce}"
    reply = cmd(client, "AUTH SCRAM-SHA-256 " + b64(f"n,,{first_bare}".encode()))
    server_first = base64.b64decode(reply[2:]).decode()
    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    assert attrs["r"].startswith(cnonce)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                 int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    without_proof = f"c=biws,r={attrs['r']}"
    message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    reply = cmd(client, b64(f"{without_proof},p={b64(proof)}".encode()))
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    expected = b"v=" + base64.b64encode(hmac.new(server_key, message, hashlib.sha256).digest())
    assert base64.b64decode(reply[2:]) == expected  # the server proved it knows the keys
    return cmd(client, "")


def test_sasl_scram_sha_256() -> None:
    with example("sasl_plain_scram.py") as port:
        client = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
        assert scram_login(client, "alice", "wonderland").startswith(b"+OK")
        assert client.list()[1] == [b"1 73", b"2 50"]
        client.quit()
        client = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
            scram_login(client, "alice", "wrong")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            scram_login(client, "mallory", "wonderland")  # a decoy: looks the same
        client.close()


def test_sasl_cancelled_exchange_leaves_the_session_usable() -> None:
    with example("sasl_plain_scram.py") as port:
        client = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
        assert cmd(client, "AUTH PLAIN").startswith(b"+ ")
        with pytest.raises(poplib.error_proto, match="aborted"):
            cmd(client, "*")
        client.user("alice")
        client.pass_("wonderland")
        client.quit()


# ---------------------------------------------------------------- mbox


def test_mbox_storage_serves_and_refuses_deletion(tmp_path: Path) -> None:
    box = mailbox.mbox(str(tmp_path / "bob.mbox"))
    box.add(b"Subject: one\n\nfirst\n")
    box.add(b"Subject: two\n\n.second\n")
    box.add(b"Subject: one\n\nfirst\n")  # identical to the first: its own UIDL still
    box.close()
    before = (tmp_path / "bob.mbox").read_bytes()
    with example("mbox_storage.py", "--mbox-dir", str(tmp_path), "--user", "bob:pw") as port:
        client = login(port, "bob", "pw")
        assert client.stat()[0] == 3
        assert client.retr(2)[1] == [b"Subject: two", b"", b".second"]
        uids = [line.split()[1] for line in client.uidl()[1]]
        assert len(set(uids)) == 3
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            login(port, "bob", "pw")
        client.dele(1)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.quit()
        client.close()
        client = login(port, "bob", "pw")
        assert [line.split()[1] for line in client.uidl()[1]] == uids
        client.quit()
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            login(port, "bob", "wrong")
    assert (tmp_path / "bob.mbox").read_bytes() == before


def test_mbox_storage_demo_directory() -> None:
    with example("mbox_storage.py") as port:
        client = login(port)
        assert client.retr(1)[1][-1] == b"Hello from mbox."
        client.quit()
        empty = login(port, "alice", "wonderland")
        assert empty.stat()[0] == 2
        empty.quit()


# ------------------------------------------------- the full server policy in your own loop

EMBED_EXAMPLES = ["embed_asyncio.py", "embed_trio.py"]


@pytest.fixture
def maildir_and_users(tmp_path: Path) -> tuple[Path, Path]:
    """A Maildir root with alice's two messages, and a passwd-file with her {PLAIN} password."""
    root = tmp_path / "mail"
    for sub in ("cur", "new", "tmp"):
        (root / "alice" / sub).mkdir(parents=True)
    (root / "alice" / "new" / "1.m1.host").write_bytes(b"Subject: one\n\n.dot line\n")
    (root / "alice" / "new" / "2.m2.host").write_bytes(b"Subject: two\n\nbody\n")
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}wonderland\n")
    return root, users


@pytest.mark.parametrize("name", EMBED_EXAMPLES)
def test_embedded_policy_serves_a_maildir_with_sasl_and_limits(
    name: str, maildir_and_users: tuple[Path, Path]
) -> None:
    root, users = maildir_and_users
    with example(name, "--maildir-root", str(root), "--passwd-file", str(users)) as port:
        client = login(port)
        assert client.stat() == (2, len(b"Subject: one\r\n\r\n.dot line\r\n")
                                 + len(b"Subject: two\r\n\r\nbody\r\n"))
        assert client.retr(1)[1][-1] == b".dot line"
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            login(port)  # the Maildir lock holds across sessions
        client.dele(2)
        assert client.quit().startswith(b"+OK")
        assert len(list((root / "alice" / "cur").iterdir())) == 1
        # SASL PLAIN with an initial response, and CAPA from the server's policy
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            f = sock.makefile("rb")
            assert f.readline().startswith(b"+OK")
            token = base64.b64encode(b"\0alice\0wonderland")
            sock.sendall(b"AUTH PLAIN " + token + b"\r\nSTAT\r\nQUIT\r\n")
            assert f.readline().startswith(b"+OK")
            assert f.readline() == b"+OK 1 27\r\n"
            assert f.readline().startswith(b"+OK")
        # a wrong password gets [AUTH] (after the failed-login delay)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            login(port, password="wrong")


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("name", EMBED_EXAMPLES)
def test_embedded_policy_does_stls_for_curl(
    name: str, maildir_and_users: tuple[Path, Path], tmp_path: Path
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    root, users = maildir_and_users
    args = ("--maildir-root", str(root), "--passwd-file", str(users),
            "--tls-cert", str(cert_file), "--tls-key", str(key_file))
    with example(name, *args) as port:
        out = subprocess.run(
            [CURL or "curl", "-s", "--ssl-reqd", "--cacert", str(ca_file), "--max-time", "10",
             f"pop3://alice:wonderland@127.0.0.1:{port}/1"],
            capture_output=True, timeout=20, check=False,
        )
        assert out.returncode == 0, out.stderr
        assert b".dot line" in out.stdout
