"""The pytest plugin ``pop3proto.testing``, used as its users would use it.

Each test writes a small test file that uses the fixtures with the stdlib
``poplib`` client, runs it with ``pytester`` (in this process, with
``filterwarnings = error``) and checks the outcomes; what the server did is
asserted inside those files, through the plugin's inspection methods, as a
user's test would.  A few tests drive ``Pop3TestServer`` directly (its use
outside pytest), and one runs ``examples/test_fetch_with_pop3proto.py`` in a
child pytest the way a user would.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import trustme  # noqa: F401  (imported here, outside the runs: see below)
from clients import curl

from pop3proto.testing import Pop3TestServer

pytest_plugins = ["pytester"]

# pytester's in-process runs unload the modules a run imported; cryptography's
# compiled core cannot be imported twice, so trustme is imported by this module.

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "test_fetch_with_pop3proto.py"
DOC = REPO / "docs" / "testing.md"


def _plugin_args() -> list[str]:
    """``-p pop3proto.testing`` unless the installed package registers the plugin itself."""
    installed = any(ep.value == "pop3proto.testing" for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "pop3proto.testing"]


PLUGIN = _plugin_args()

#: Put before every generated test file.
PRELUDE = """\
from __future__ import annotations

import email
import email.policy
import poplib
import socket
import ssl
import sys
from email.message import EmailMessage

import pytest

MSG1 = b"From: a@example.org\\nSubject: one\\n\\nfirst body\\n.dot line\\n"
MSG2 = b"From: b@example.org\\r\\nSubject: two\\r\\n\\r\\nsecond body\\r\\n"


def login(host, port, user="alice", password="pw"):
    client = poplib.POP3(host, port, timeout=10)
    try:
        client.user(user)
        client.pass_(password)
    except BaseException:
        client.close()
        raise
    return client
"""


def run(pytester: pytest.Pytester, body: str, *args: str, passed: int) -> pytest.RunResult:
    """Run *body* (after PRELUDE) as a test file with the plugin; expect *passed* passes only."""
    # This process imported the plugin already, so pytest cannot rewrite its asserts
    # (it has none) and says so; every other warning is an error.
    pytester.makeini(
        "[pytest]\nfilterwarnings =\n    error\n"
        "    ignore:Module already imported:pytest.PytestAssertRewriteWarning\n"
    )
    pytester.makepyfile(test_user=PRELUDE + textwrap.dedent(body))
    result = pytester.runpytest(*PLUGIN, "-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=passed)
    return result


def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:*port* is refused now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


# ---------------------------------------------------------------- plain sessions


def test_login_stat_retr_dele_quit_and_the_records(pytester: pytest.Pytester) -> None:
    run(
        pytester,
        """
        def test_session(pop3_server):
            alice = pop3_server.add_user("alice", "pw")
            k1 = alice.deliver(MSG1)
            msg = EmailMessage()
            msg["Subject"] = "three"
            msg.set_content("an EmailMessage\\n")
            k2 = alice.deliver(MSG2, uid="uid-two")
            k3 = alice.deliver(msg)
            assert alice.message(k3).startswith(b"Subject: three\\r\\n")

            client = login(pop3_server.host, pop3_server.port)
            assert client.stat()[0] == 3
            assert client.uidl(2) == b"+OK 2 uid-two"
            _, lines, _ = client.retr(1)
            assert lines == [b"From: a@example.org", b"Subject: one", b"", b"first body",
                             b".dot line"]
            _, lines, _ = client.retr(3)
            got = email.message_from_bytes(b"\\r\\n".join(lines), policy=email.policy.default)
            assert got["Subject"] == "three"
            client.top(2, 0)  # TOP is not a retrieval
            client.dele(1)
            client.dele(2)
            assert alice.deleted() == []  # nothing happens before QUIT
            assert client.quit().startswith(b"+OK")
            client.close()

            assert alice.retrieved() == [k1, k3]
            assert alice.deleted() == [k1, k2]
            assert alice.messages() == [alice.message(k3)]
            assert pop3_server.mailbox("alice") is alice
        """,
        passed=1,
    )


def test_retr_again_and_a_session_that_ends_without_quit(pytester: pytest.Pytester) -> None:
    run(
        pytester,
        """
        def test_session(pop3_server):
            alice = pop3_server.add_user("alice", "pw")
            key = alice.deliver(MSG1)
            client = login(pop3_server.host, pop3_server.port)
            client.retr(1)
            client.retr(1)
            client.dele(1)
            client.rset()
            client.dele(1)
            client.close()  # no QUIT: no deletion
            assert alice.retrieved() == [key, key]

            client = login(pop3_server.host, pop3_server.port)  # the lock was released
            assert client.stat()[0] == 1
            client.quit()
            client.close()
            assert alice.deleted() == []
        """,
        passed=1,
    )


def test_unknown_user_and_duplicate_user(pytester: pytest.Pytester) -> None:
    run(
        pytester,
        """
        def test_users(pop3_server):
            pop3_server.add_user("alice", "pw")
            with pytest.raises(ValueError, match="exists"):
                pop3_server.add_user("alice", "other")
            with pytest.raises(KeyError):
                pop3_server.mailbox("nobody")
            with pytest.raises(poplib.error_proto, match=r"\\[AUTH\\]"):
                login(pop3_server.host, pop3_server.port, user="nobody")
        """,
        passed=1,
    )


@pytest.mark.parametrize("transport", ["blocking", "selectors", "anyio"])
def test_every_transport(pytester: pytest.Pytester, transport: str) -> None:
    run(
        pytester,
        f"""
        def test_session(pop3_server_factory):
            server = pop3_server_factory(transport={transport!r})
            alice = server.add_user("alice", "pw")
            key = alice.deliver(MSG2)
            client = login(server.host, server.port)
            client.retr(1)
            client.dele(1)
            client.quit()
            client.close()
            assert alice.retrieved() == [key]
            assert alice.deleted() == [key]
            assert server.server.cget("transport") == {transport!r}
        """,
        passed=1,
    )


# ---------------------------------------------------------------- TLS


def test_stls_with_the_handed_out_context(pytester: pytest.Pytester) -> None:
    run(
        pytester,
        """
        def test_stls(pop3_server_factory):
            server = pop3_server_factory(tls="stls", cleartext_auth=False)
            alice = server.add_user("alice", "pw")
            key = alice.deliver(MSG1)
            client = poplib.POP3(server.host, server.port, timeout=10)
            with pytest.raises(poplib.error_proto):  # no password in clear
                client.user("alice")
                client.pass_("pw")
            client.stls(context=server.client_ssl_context())
            client.user("alice")
            client.pass_("pw")
            client.retr(1)
            client.quit()
            client.close()
            assert alice.retrieved() == [key]
            with pytest.raises(RuntimeError, match="implicit"):
                server.pop3s_port

        def test_the_ca_file_is_what_other_clients_trust(pop3_server_factory):
            server = pop3_server_factory(tls="stls")
            server.add_user("alice", "pw")
            ctx = ssl.create_default_context(cafile=server.ca_file)
            client = poplib.POP3(server.host, server.port, timeout=10)
            client.stls(context=ctx)
            client.user("alice")
            client.pass_("pw")
            client.quit()
            client.close()

        def test_an_untrusting_client_fails(pop3_server_factory):
            server = pop3_server_factory(tls="stls")
            with socket.create_connection((server.host, server.port), timeout=10) as sock:
                assert sock.recv(512).startswith(b"+OK")
                sock.sendall(b"STLS\\r\\n")
                assert sock.recv(512).startswith(b"+OK")
                with pytest.raises(ssl.SSLCertVerificationError):
                    ssl.create_default_context().wrap_socket(sock, server_hostname=server.host)
        """,
        passed=3,
    )


def test_implicit_tls(pytester: pytest.Pytester) -> None:
    run(
        pytester,
        """
        def test_pop3s(pop3_server_factory):
            server = pop3_server_factory(tls="implicit", transport="selectors")
            alice = server.add_user("alice", "pw")
            key = alice.deliver(MSG1)
            client = poplib.POP3_SSL(server.host, server.pop3s_port,
                                     context=server.client_ssl_context(), timeout=10)
            client.user("alice")
            client.pass_("pw")
            client.retr(1)
            client.dele(1)
            client.quit()
            client.close()
            assert alice.deleted() == [key]
            assert server.pop3s_port != server.port
        """,
        passed=1,
    )


def test_plain_server_has_no_tls_settings(pytester: pytest.Pytester) -> None:
    run(
        pytester,
        """
        def test_no_ca(pop3_server):
            with pytest.raises(RuntimeError, match="tls="):
                pop3_server.client_ssl_context()
            with pytest.raises(RuntimeError, match="tls="):
                pop3_server.ca_file
            client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
            with pytest.raises(poplib.error_proto):
                client.stls()
            client.close()
        """,
        passed=1,
    )


def test_tls_without_trustme_names_the_extra(pytester: pytest.Pytester) -> None:
    run(
        pytester,
        """
        def test_no_trustme(pop3_server_factory, monkeypatch):
            monkeypatch.setitem(sys.modules, "trustme", None)
            with pytest.raises(ImportError, match=r"trustme.*pop3proto\\[test\\]"):
                pop3_server_factory(tls="stls")
        """,
        passed=1,
    )


# ---------------------------------------------------------------- faults


def test_fail_login(pytester: pytest.Pytester) -> None:
    run(
        pytester,
        """
        def test_once(pop3_server):
            alice = pop3_server.add_user("alice", "pw")
            alice.fail_login(times=1)
            with pytest.raises(poplib.error_proto, match=r"\\[AUTH\\]"):
                login(pop3_server.host, pop3_server.port)
            client = login(pop3_server.host, pop3_server.port)
            client.quit()
            client.close()

        def test_until_cleared(pop3_server):
            alice = pop3_server.add_user("alice", "pw")
            alice.fail_login()
            for _ in range(3):
                with pytest.raises(poplib.error_proto, match=r"\\[AUTH\\]"):
                    login(pop3_server.host, pop3_server.port)
            alice.clear_faults()
            login(pop3_server.host, pop3_server.port).quit()

        def test_bad_times(pop3_server):
            with pytest.raises(ValueError, match="times"):
                pop3_server.add_user("alice", "pw").fail_login(times=0)
        """,
        passed=3,
    )


def test_hold_lock(pytester: pytest.Pytester) -> None:
    run(
        pytester,
        """
        def test_in_use(pop3_server):
            alice = pop3_server.add_user("alice", "pw")
            alice.deliver(MSG1)
            alice.hold_lock()
            with pytest.raises(poplib.error_proto, match=r"\\[IN-USE\\]"):
                login(pop3_server.host, pop3_server.port)
            alice.release_lock()
            client = login(pop3_server.host, pop3_server.port)
            assert client.stat()[0] == 1
            client.quit()
            client.close()

        def test_a_real_session_holds_it_too(pop3_server):
            pop3_server.add_user("alice", "pw")
            first = login(pop3_server.host, pop3_server.port)
            with pytest.raises(poplib.error_proto, match=r"\\[IN-USE\\]"):
                login(pop3_server.host, pop3_server.port)
            first.quit()
            first.close()
        """,
        passed=2,
    )


def test_drop_during_retr(pytester: pytest.Pytester) -> None:
    run(
        pytester,
        """
        def test_drop_once(pop3_server):
            alice = pop3_server.add_user("alice", "pw")
            key = alice.deliver(MSG1)
            alice.drop_during_retr(after_bytes=12, times=1)
            client = login(pop3_server.host, pop3_server.port)
            client.top(1, 0)  # TOP does not trip the fault
            with pytest.raises(poplib.error_proto, match="EOF"):
                client.retr(1)
            client.close()
            assert alice.retrieved() == []
            assert alice.deleted() == []
            assert alice.messages() == [MSG1]

            client = login(pop3_server.host, pop3_server.port)  # unlocked; fault used up
            client.retr(1)
            client.quit()
            client.close()
            assert alice.retrieved() == [key]

        def test_partial_bytes_arrive(pop3_server):
            alice = pop3_server.add_user("alice", "pw")
            alice.deliver(MSG1)
            alice.drop_during_retr(after_bytes=12)
            sock = socket.create_connection((pop3_server.host, pop3_server.port), timeout=10)
            sock.sendall(b"USER alice\\r\\nPASS pw\\r\\n")
            f = sock.makefile("rb")
            assert f.readline().startswith(b"+OK")
            assert f.readline().startswith(b"+OK")
            assert f.readline().startswith(b"+OK")
            sock.sendall(b"RETR 1\\r\\n")
            assert f.readline().startswith(b"+OK")
            assert f.read() == MSG1[:12].replace(b"\\n", b"\\r\\n")  # then EOF
            f.close()
            sock.close()

        def test_bad_arguments(pop3_server):
            alice = pop3_server.add_user("alice", "pw")
            with pytest.raises(ValueError, match="after_bytes"):
                alice.drop_during_retr(after_bytes=-1)
            with pytest.raises(ValueError, match="times"):
                alice.drop_during_retr(times=0)
        """,
        passed=3,
    )


# ---------------------------------------------------------------- teardown


def test_servers_are_down_after_the_test(pytester: pytest.Pytester) -> None:
    ports = pytester.path / "ports.txt"
    run(
        pytester,
        f"""
        PORTS = {str(ports)!r}
        LEFT_OPEN = []

        def refused(port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except ConnectionRefusedError:
                return True
            return False

        def test_leaves_a_session_open(pop3_server, pop3_server_factory):
            tls = pop3_server_factory(tls="implicit")
            pop3_server.add_user("alice", "pw")
            client = login(pop3_server.host, pop3_server.port)  # never quits
            client.stat()
            LEFT_OPEN.append(client)
            with open(PORTS, "w") as f:
                f.write(f"{{pop3_server.port}} {{tls.port}} {{tls.pop3s_port}}")

        def test_the_next_test_finds_them_down():
            client = LEFT_OPEN.pop()
            with pytest.raises((poplib.error_proto, OSError)):  # the session was aborted
                client.stat()
            client.close()
            with open(PORTS) as f:
                assert all(refused(int(port)) for port in f.read().split())
        """,
        passed=2,
    )
    for port in ports.read_text().split():
        assert refused(int(port))


# ---------------------------------------------------------------- without pytest


def test_context_manager_and_close_twice() -> None:
    with Pop3TestServer(tls="implicit") as server:
        assert server.running
        ca_file = Path(server.ca_file)
        assert ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        port, pop3s = server.port, server.pop3s_port
        assert "127.0.0.1" in repr(server)
    assert not server.running
    assert not ca_file.exists()  # its own temporary directory is removed
    assert refused(port)
    assert refused(pop3s)
    server.close()
    assert "stopped" in repr(server)
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.port


def test_options_the_plugin_owns_are_refused() -> None:
    with pytest.raises(TypeError, match="storage"):
        Pop3TestServer(storage=object())
    with pytest.raises(ValueError, match="tls"):
        Pop3TestServer(tls="starttls")  # type: ignore[arg-type]


def test_a_user_trace_still_sees_commands(pytester: pytest.Pytester) -> None:
    run(
        pytester,
        """
        def test_trace(pop3_server_factory):
            seen = []
            server = pop3_server_factory(trace=lambda sid, d, line: seen.append((d, line)))
            server.add_user("alice", "pw")
            login(server.host, server.port).quit()
            assert ("C", "USER alice") in seen
            assert ("C", "QUIT") in seen
        """,
        passed=1,
    )


@pytest.mark.clients
def test_curl_trusts_the_ca_file(tmp_path: Path) -> None:
    with Pop3TestServer(tls="implicit", directory=tmp_path) as server:
        alice = server.add_user("alice", "pw")
        key = alice.deliver(b"Subject: hi\r\n\r\nover pop3s\r\n")
        url = f"pop3s://alice:pw@127.0.0.1:{server.pop3s_port}/1"
        got = curl("--cacert", server.ca_file, url)
        assert got.returncode == 0, got.stderr
        assert got.stdout == b"Subject: hi\r\n\r\nover pop3s\r\n"
        starttls = curl(
            "--ssl-reqd", "--cacert", server.ca_file, f"pop3://alice:pw@127.0.0.1:{server.port}/1"
        )
        assert starttls.returncode == 0, starttls.stderr
        assert alice.retrieved() == [key, key]
        assert curl(f"pop3s://alice:pw@127.0.0.1:{server.pop3s_port}/1").returncode != 0
    assert Path(server.ca_file).exists()  # a directory it was given is left alone


# ---------------------------------------------------------------- the example


def test_the_example_runs_as_a_user_would_run_it(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "pop3proto.testing", "-p", "no:cacheprovider",
         "-q", str(EXAMPLE)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, out
    assert "4 passed" in out


def doc_blocks() -> list[str]:
    """The Python code blocks of docs/testing.md, dedented."""
    pattern = re.compile(r"^( *)```python\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(m.group(2)) for m in pattern.finditer(DOC.read_text())]


def test_the_documentation_blocks_run(pytester: pytest.Pytester) -> None:
    blocks = doc_blocks()
    assert len(blocks) >= 6
    for n, block in enumerate(blocks):
        pytester.makepyfile(**{f"test_doc_{n}": block})
    tests = sum(len(re.findall(r"^def test_", b, re.MULTILINE)) for b in blocks)
    pytester.makeini(
        "[pytest]\nfilterwarnings =\n    error\n"
        "    ignore:Module already imported:pytest.PytestAssertRewriteWarning\n"
    )
    result = pytester.runpytest(*PLUGIN, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=tests)
