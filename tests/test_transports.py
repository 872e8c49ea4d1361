"""One matrix for every transport: real sockets on 127.0.0.1:0, real clients, a real Maildir.

Each test runs once per transport (``blocking``, ``selectors``, ``anyio``); a
transport whose module is not written yet is skipped, one that fails to import
fails.  Clients: stdlib ``poplib``, a raw socket client, ``curl`` and ``mpop``.
Every message a client receives is compared byte for byte with the stored
file, CRLF-normalised.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import (
    MESSAGES,
    TRANSPORTS,
    MailEnv,
    Raw,
    curl,
    destroy,
    fetched,
    login,
    make_env,
    mpop,
    not_served,
    pop_error,
    port_of,
    require_transport,
    retr,
    running,
    top,
    top_of,
    try_login,
    wait_until,
    wire,
)

from pop3proto.server import Server

ALICE, ALICE_PW = "alice", "alice-Secret-1"
BOB, BOB_PW = "bob", "bob-Secret-2"
BIG = b"Subject: big\n\n" + b"".join(b"%07d " % i + b"y" * 120 + b"\n" for i in range(64_000))


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    require_transport(name)
    return name


@pytest.fixture
def env(tmp_path: Path) -> MailEnv:
    return make_env(tmp_path)


@pytest.fixture
def serve(transport: str, env: MailEnv) -> Iterator[Server]:
    with running(transport, **env.options()) as server:
        yield server


def big_env(tmp_path: Path) -> MailEnv:
    """alice and bob, each with an 8 MB message first and the small corpus after it."""
    return make_env(tmp_path, messages=(BIG, *MESSAGES))


# --------------------------------------------------------------------- poplib


def test_poplib_full_session(serve: Server, env: MailEnv) -> None:
    sizes = [len(wire(m)) for m in MESSAGES]
    client = login(port_of(serve), ALICE, ALICE_PW)
    try:
        assert client.getwelcome().startswith(b"+OK")
        assert client.stat() == (len(MESSAGES), sum(sizes))
        status, listing, _ = client.list()
        assert status.startswith(b"+OK")
        assert listing == [b"%d %d" % (n, s) for n, s in enumerate(sizes, 1)]
        _, uidls, _ = client.uidl()
        assert [int(line.split()[0]) for line in uidls] == list(range(1, len(MESSAGES) + 1))
        assert len({line.split()[1] for line in uidls}) == len(MESSAGES)
        for n, data in enumerate(MESSAGES, 1):
            status, body = retr(client, n)
            assert body == wire(data), f"RETR {n}"
            assert status == b"+OK %d octets" % sizes[n - 1]
            assert top_of(client, n, 0) == top(data, 0), f"TOP {n} 0"
            assert top_of(client, n, 2) == top(data, 2), f"TOP {n} 2"
        assert client.dele(1).startswith(b"+OK")
        assert client.dele(3).startswith(b"+OK")
        assert client.stat() == (len(MESSAGES) - 2, sum(sizes) - sizes[0] - sizes[2])
        with pop_error(b"-ERR"):
            client.retr(1)
        assert client.rset().startswith(b"+OK")
        assert client.stat() == (len(MESSAGES), sum(sizes))
        assert client.dele(2).startswith(b"+OK")
        assert client.noop().startswith(b"+OK")
        assert client.quit().startswith(b"+OK")
    finally:
        client.close()
    assert env.on_disk(ALICE) == [m for n, m in enumerate(MESSAGES, 1) if n != 2]
    assert env.on_disk(BOB) == list(MESSAGES)


def test_wrong_password_and_unknown_user_get_auth(transport: str, env: MailEnv) -> None:
    with running(transport, **env.options(auth_failure_delay=0)) as server:
        port = port_of(server)
        for user, pw in ((ALICE, BOB_PW), ("nobody", ALICE_PW)):
            with pop_error(b"-ERR [AUTH]"):
                login(port, user, pw)


# --------------------------------------------------------------------- curl


@pytest.mark.clients
@pytest.mark.parametrize("scheme", ["PLAIN", "SHA512-CRYPT"])
def test_curl_list_retr_top_uidl_dele(transport: str, tmp_path: Path, scheme: str) -> None:
    env = make_env(tmp_path, scheme=scheme)  # PLAIN: curl picks CRAM-MD5; hashed: LOGIN/PLAIN
    with running(transport, **env.options()) as server:
        url = f"pop3://{ALICE}:{ALICE_PW}@127.0.0.1:{port_of(server)}/"
        listing = curl(url)
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout == b"".join(
            b"%d %d\r\n" % (n, len(wire(m))) for n, m in enumerate(MESSAGES, 1)
        )
        for n, data in enumerate(MESSAGES, 1):
            got = curl(f"{url}{n}")
            assert got.returncode == 0, got.stderr
            assert got.stdout == wire(data), f"message {n}"
        got = curl("-X", "TOP 1 0", url)
        assert (got.returncode, got.stdout) == (0, top(MESSAGES[0], 0))
        got = curl("-X", "TOP 3 2", url)
        assert (got.returncode, got.stdout) == (0, top(MESSAGES[2], 2))
        uidl = curl("-X", "UIDL", url)
        assert uidl.returncode == 0
        uids = uidl.stdout.split(b"\r\n")[:-1]
        assert [int(line.split()[0]) for line in uids] == list(range(1, len(MESSAGES) + 1))
        assert curl("-X", "DELE 1", "-I", url).returncode == 0
        after = curl(url)
        assert after.stdout == b"".join(
            b"%d %d\r\n" % (n, len(wire(m))) for n, m in enumerate(MESSAGES[1:], 1)
        )
        assert curl("-X", "UIDL", url).stdout == b"".join(
            b"%d %s\r\n" % (n, line.split()[1]) for n, line in enumerate(uids[1:], 1)
        )
        bad = curl(f"pop3://{ALICE}:wrong@127.0.0.1:{port_of(server)}/1")
        assert bad.returncode != 0
        assert bad.stdout == b""
    assert env.on_disk(ALICE) == list(MESSAGES[1:])


# --------------------------------------------------------------------- mpop


@pytest.mark.clients
def test_mpop_fetches_every_message_and_a_second_run_nothing(
    transport: str, env: MailEnv, tmp_path: Path
) -> None:
    out, uidls = tmp_path / "fetched", tmp_path / "mpop" / "uidls"
    uidls.parent.mkdir()
    with running(transport, **env.options()) as server:
        port = port_of(server)
        first = mpop(port, ALICE, ALICE_PW, out, uidls, "--keep=on")
        assert first.returncode == 0, first.stdout + first.stderr
        got = fetched(out)
        assert [wire(m) for m in got] == [wire(m) for m in MESSAGES]
        with Raw(port) as c:  # mpop's UIDL file holds exactly the server's UIDLs
            assert c.login(ALICE, ALICE_PW).startswith(b"+OK")
            listing = c.multi("UIDL")[1].split(b"\r\n")[:-1]
            server_uids = {line.split()[1].decode() for line in listing}
            assert c.cmd("QUIT").startswith(b"+OK")
        assert server_uids <= set(uidls.read_text().split())

        for extra in (["--keep=on"], ["--keep=on", "--only-new=on"]):
            again = mpop(port, ALICE, ALICE_PW, out, uidls, *extra)
            assert again.returncode == 0, again.stdout + again.stderr
            assert b"new: no messages" in again.stdout
            assert len(fetched(out)) == len(MESSAGES)
        assert env.on_disk(ALICE) == list(MESSAGES)

        everything = mpop(port, ALICE, ALICE_PW, out, uidls, "--keep=off", "--only-new=off")
        assert everything.returncode == 0, everything.stdout + everything.stderr
        assert [wire(m) for m in fetched(out)] == [wire(m) for m in MESSAGES] * 2
    assert env.on_disk(ALICE) == []
    assert env.on_disk(BOB) == list(MESSAGES)


# --------------------------------------------------------------------- load and faults


@pytest.mark.slow
def test_200_concurrent_clients_all_succeed(transport: str, tmp_path: Path) -> None:
    users = {f"user{i:03d}": f"pw-{i:03d}-Secret" for i in range(200)}
    corpus = (MESSAGES[0], MESSAGES[1])
    env = make_env(tmp_path, users, messages=corpus)
    errors: list[str] = []
    barrier = threading.Barrier(len(users), timeout=60)

    def session(user: str, password: str) -> None:
        try:
            barrier.wait()
            client = login(port, user, password, timeout=30)
            try:
                assert client.stat() == (2, sum(len(wire(m)) for m in corpus))
                assert len(client.list()[1]) == 2
                assert len(client.uidl()[1]) == 2
                for n, data in enumerate(corpus, 1):
                    assert retr(client, n)[1] == wire(data)
                assert client.dele(1).startswith(b"+OK")
                assert client.quit().startswith(b"+OK")
            finally:
                client.close()
        except BaseException as exc:  # collected and asserted on below
            errors.append(f"{user}: {type(exc).__name__}: {exc}")

    with running(transport, **env.options()) as server:
        port = port_of(server)
        threads = [threading.Thread(target=session, args=kv, daemon=True) for kv in users.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not [t for t in threads if t.is_alive()], "clients still running after 90 s"
        assert errors == []
        assert wait_until(lambda: server.connections() == [], 10)
    for user in users:
        assert env.on_disk(user) == [MESSAGES[1]], user


def test_a_client_that_never_reads_does_not_stall_another(transport: str, tmp_path: Path) -> None:
    env = big_env(tmp_path)
    with running(transport, **env.options()) as server:
        port = port_of(server)
        hog = Raw(port)
        try:
            assert hog.login(ALICE, ALICE_PW).startswith(b"+OK")
            hog.send(b"RETR 1\r\n" * 20)  # 160 MB of replies that nobody reads
            time.sleep(0.3)
            t0 = time.monotonic()
            client = login(port, BOB, BOB_PW, timeout=5)
            try:
                assert client.stat()[0] == len(MESSAGES) + 1
                assert retr(client, 2)[1] == wire(MESSAGES[0])
                assert client.quit().startswith(b"+OK")
            finally:
                client.close()
            assert time.monotonic() - t0 < 2.0
        finally:
            hog.abort()


def test_two_clients_on_one_maildrop_get_in_use(serve: Server) -> None:
    port = port_of(serve)
    first = login(port, ALICE, ALICE_PW)
    try:
        with pop_error(b"-ERR [IN-USE]"):
            login(port, ALICE, ALICE_PW)
        other = login(port, BOB, BOB_PW)
        other.quit()
        assert first.stat()[0] == len(MESSAGES)
        first.quit()
    finally:
        first.close()
    login(port, ALICE, ALICE_PW).quit()


def test_a_client_dropping_mid_retr_deletes_nothing_and_unlocks(
    transport: str, tmp_path: Path
) -> None:
    env = big_env(tmp_path)
    with running(transport, **env.options()) as server:
        port = port_of(server)
        c = Raw(port)
        try:
            assert c.login(ALICE, ALICE_PW).startswith(b"+OK")
            assert c.cmd("DELE 2").startswith(b"+OK")
            assert c.cmd("RETR 1") == b"+OK %d octets" % len(wire(BIG))
            c.sock.recv(65536)
        finally:
            c.abort()
        client = try_login(port, ALICE, ALICE_PW)
        try:
            assert client.stat()[0] == len(MESSAGES) + 1
            assert retr(client, 1)[1] == wire(BIG)
            client.quit()
        finally:
            client.close()
        assert wait_until(lambda: server.connections() == [])
    assert env.on_disk(ALICE) == [BIG, *MESSAGES]


def test_a_client_dropping_after_quit_still_gets_its_update(serve: Server, env: MailEnv) -> None:
    c = Raw(port_of(serve))
    try:
        assert c.login(ALICE, ALICE_PW).startswith(b"+OK")
        assert c.cmd("DELE 1").startswith(b"+OK")
        assert c.cmd("DELE 4").startswith(b"+OK")
        c.send(b"QUIT\r\n")
    finally:
        c.abort()  # gone before the +OK to QUIT arrives
    assert wait_until(lambda: len(env.on_disk(ALICE)) == len(MESSAGES) - 2, 5)
    assert env.on_disk(ALICE) == [m for n, m in enumerate(MESSAGES, 1) if n not in (1, 4)]
    try_login(port_of(serve), ALICE, ALICE_PW).quit()  # and the lock is freed


def test_a_client_resetting_right_after_pipelining_deletes_and_quit_gets_its_update(
    serve: Server, env: MailEnv
) -> None:
    """The QUIT was received: the update runs even though the replies can no longer be sent."""
    c = Raw(port_of(serve))
    try:
        assert c.login(ALICE, ALICE_PW).startswith(b"+OK")
        c.send(b"DELE 1\r\nDELE 4\r\nQUIT\r\n")
    finally:
        c.abort()
    wait_until(lambda: len(env.on_disk(ALICE)) == len(MESSAGES) - 2, 3)
    assert env.on_disk(ALICE) == [m for n, m in enumerate(MESSAGES, 1) if n not in (1, 4)]
    try_login(port_of(serve), ALICE, ALICE_PW).quit()


def test_quit_pipelined_behind_deletes_then_close(serve: Server, env: MailEnv) -> None:
    c = Raw(port_of(serve))
    try:
        assert c.login(ALICE, ALICE_PW).startswith(b"+OK")
        c.send(b"DELE 2\r\nDELE 3\r\nQUIT\r\n")
        assert c.line().startswith(b"+OK")
        assert c.line().startswith(b"+OK")
        assert c.line() == b"+OK Logging out."
        assert c.closed() == b""
    finally:
        c.close()
    assert env.on_disk(ALICE) == [m for n, m in enumerate(MESSAGES, 1) if n not in (2, 3)]


def test_pipelining_1000_commands_answered_in_order(serve: Server, env: MailEnv) -> None:
    commands = ["STAT", "NOOP", "LIST", "UIDL", "LIST 2", "UIDL 3", "RETR 1", "TOP 5 1",
                "RETR 3", "TOP 2 0", "LIST 9", "RETR 0", "BOGUS", "RETR 4"]  # fmt: skip
    multi = {"LIST", "UIDL", "RETR 1", "TOP 5 1", "RETR 3", "TOP 2 0", "RETR 4"}
    with Raw(port_of(serve)) as c:
        assert c.login(ALICE, ALICE_PW).startswith(b"+OK")
        answers = {}
        for cmd in commands:  # one at a time first: what each answer is
            status = c.cmd(cmd)
            body = c.raw_block() if cmd in multi and status.startswith(b"+OK") else None
            answers[cmd] = (status, body)
        assert answers["RETR 0"][0].startswith(b"-ERR")
        script = [commands[(i * 7) % len(commands)] for i in range(1000)]
        received_before = c.received
        c.send(b"".join(cmd.encode() + b"\r\n" for cmd in script))
        for i, cmd in enumerate(script):
            status = c.line()
            body = c.raw_block() if cmd in multi and status.startswith(b"+OK") else None
            assert (status, body) == answers[cmd], f"reply {i} to {cmd!r}"
        assert c.cmd("QUIT").startswith(b"+OK")
        assert c.received > received_before
    assert env.on_disk(ALICE) == list(MESSAGES)


def test_idle_timeout_closes_without_applying_deletions(transport: str, env: MailEnv) -> None:
    with running(transport, **env.options(idle_timeout=0.5)) as server:
        port = port_of(server)
        with Raw(port) as c:
            assert c.login(ALICE, ALICE_PW).startswith(b"+OK")
            assert c.cmd("DELE 1").startswith(b"+OK")
            t0 = time.monotonic()
            rest = c.closed(10)
            elapsed = time.monotonic() - t0
        assert rest is not None, "not closed after the idle timeout"
        assert 0.4 <= elapsed < 5
        assert rest == b"" or rest.startswith(b"-ERR")
        assert env.on_disk(ALICE) == list(MESSAGES)
        login(port, ALICE, ALICE_PW).quit()


def test_login_timeout_closes_an_idle_unauthenticated_client(transport: str, env: MailEnv) -> None:
    with running(transport, **env.options(login_timeout=0.5)) as server, Raw(port_of(server)) as c:
        t0 = time.monotonic()
        assert c.closed(10) is not None
        assert 0.4 <= time.monotonic() - t0 < 5


def test_a_failed_login_delay_does_not_block_other_clients(transport: str, env: MailEnv) -> None:
    with running(transport, **env.options(auth_failure_delay=1.5)) as server:
        port = port_of(server)
        with Raw(port) as slow:
            assert slow.cmd(f"USER {ALICE}").startswith(b"+OK")
            slow.send(b"PASS wrong\r\n")
            time.sleep(0.1)
            t0 = time.monotonic()
            with Raw(port) as quick:  # another address would not wait; loopback shares it
                assert quick.greeting.startswith(b"+OK")
                assert quick.cmd("CAPA").startswith(b"+OK")
                quick.raw_block()
            assert time.monotonic() - t0 < 1.0
            assert slow.line().startswith(b"-ERR [AUTH]")


def test_a_line_too_long_is_refused_and_the_session_reads_on(serve: Server) -> None:
    with Raw(port_of(serve)) as c:
        c.send(b"USER " + b"a" * 5000 + b"\r\nCAPA\r\n")
        assert c.line() == b"-ERR Line too long."
        assert c.line().startswith(b"+OK")  # CAPA served after it


def test_input_that_never_ends_a_line_is_closed(serve: Server) -> None:
    with Raw(port_of(serve)) as c:
        c.send(b"USER " + b"a" * (2 << 20))
        rest = c.closed()
        assert rest is not None
        assert rest.startswith(b"-ERR")


def test_max_connections_refuses_the_next_client(transport: str, env: MailEnv) -> None:
    with running(transport, **env.options(max_connections=1)) as server:
        port = port_of(server)
        with Raw(port) as first:
            assert first.greeting.startswith(b"+OK")
            with Raw(port, greeting=False) as second:
                rest = second.closed()
            assert rest is not None
            assert rest.startswith(b"-ERR [SYS/TEMP]")
            assert first.login(ALICE, ALICE_PW).startswith(b"+OK")


def test_destroy_kill_ends_live_sessions_and_releases_locks(transport: str, env: MailEnv) -> None:
    require_transport(transport)
    server = Server(host="127.0.0.1", port=0, transport=transport, **env.options())
    server.up()
    try:
        port = port_of(server)
        with Raw(port) as c, Raw(port) as idle:
            assert c.login(ALICE, ALICE_PW).startswith(b"+OK")
            assert c.cmd("DELE 1").startswith(b"+OK")
            assert wait_until(lambda: len(server.connections()) == 2)
            t0 = time.monotonic()
            destroy(server)
            assert time.monotonic() - t0 < 5
            assert server.state == "down"
            assert server.connections() == []
            assert c.closed() is not None
            assert idle.closed() is not None
    finally:
        destroy(server)
    assert env.on_disk(ALICE) == list(MESSAGES)
    assert env.storage.lock(ALICE)
    env.storage.unlock(ALICE)


def test_down_keeps_the_live_session(transport: str, env: MailEnv) -> None:
    with running(transport, **env.options()) as server:
        port = port_of(server)
        with Raw(port) as c:
            assert c.login(ALICE, ALICE_PW).startswith(b"+OK")
            server.down()
            assert not_served(port)  # anyio may accept-then-reset right after down()
            assert len(server.connections()) == 1
            assert c.cmd("DELE 2").startswith(b"+OK")
            assert c.cmd("QUIT") == b"+OK Logging out."
    assert env.on_disk(ALICE) == [m for n, m in enumerate(MESSAGES, 1) if n != 2]


def test_destroy_defer_waits_for_the_live_session(transport: str, env: MailEnv) -> None:
    require_transport(transport)
    server = Server(host="127.0.0.1", port=0, transport=transport, **env.options())
    server.up()
    try:
        port = port_of(server)
        with Raw(port) as c:
            assert c.login(ALICE, ALICE_PW).startswith(b"+OK")
            destroyer = threading.Thread(
                target=server.destroy, args=("defer",), kwargs={"timeout": 20}, daemon=True
            )
            destroyer.start()
            assert wait_until(lambda: server.state == "exiting")
            destroyer.join(0.5)
            assert destroyer.is_alive(), "destroy('defer') returned while a session was live"
            assert not_served(port)
            assert c.cmd("DELE 3").startswith(b"+OK")
            assert c.cmd("QUIT") == b"+OK Logging out."
            destroyer.join(5)
            assert not destroyer.is_alive()
        assert server.state == "down"
    finally:
        destroy(server)
    assert env.on_disk(ALICE) == [m for n, m in enumerate(MESSAGES, 1) if n != 3]


def test_destroy_after_down_with_no_live_session(transport: str, env: MailEnv) -> None:
    require_transport(transport)
    for pause in (0, 0, 0, 0, 0.001, 0.01, 0.05):  # destroy() races with the loop's shutdown
        server = Server(host="127.0.0.1", port=0, transport=transport, **env.options())
        server.up()
        port = port_of(server)
        errors: list[BaseException] = []

        def down_then_destroy(
            server: Server = server, pause: float = pause, errors: list[BaseException] = errors
        ) -> None:
            try:
                server.down()
                time.sleep(pause)
                server.destroy("kill", timeout=10)
            except BaseException as exc:  # asserted on below
                errors.append(exc)

        worker = threading.Thread(target=down_then_destroy, daemon=True)
        worker.start()
        worker.join(15)
        try:
            assert not worker.is_alive(), f"down(); destroy() hung (pause {pause})"
            assert errors == [], f"pause {pause}"
            assert server.state == "down"
            assert not_served(port)
        finally:
            if server.state != "down" and not worker.is_alive():
                destroy(server)


def test_up_after_down_serves_again(transport: str, env: MailEnv) -> None:
    with running(transport, **env.options()) as server:
        server.down()
        server.up()
        assert server.state == "up"
        client = login(port_of(server), BOB, BOB_PW)
        assert client.stat()[0] == len(MESSAGES)
        client.quit()


def test_connection_state_counts_bytes(transport: str, env: MailEnv) -> None:
    with running(transport, **env.options()) as server, Raw(port_of(server)) as c:
        assert c.login(ALICE, ALICE_PW).startswith(b"+OK")
        assert c.multi("RETR 1")[1] == wire(MESSAGES[0])
        (sid,) = server.connections()
        st = server.connection_state(sid)
        assert (st["state"], st["user"], st["peer"], st["port"]) == (
            "transaction",
            ALICE,
            "127.0.0.1",
            c.local_port,
        )
        assert (st["bytes_in"], st["bytes_out"]) == (c.sent, c.received)
        assert ALICE_PW not in repr(st)
