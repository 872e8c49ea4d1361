"""The Server facade, pop3d's way: options, life cycle, live sessions, policy and defaults.

Sessions run over the blocking transport on 127.0.0.1 port 0 and are driven
with stdlib ``poplib`` or the raw line client in ``clients.py``; every
assertion is about bytes a client sees or about the facade's own answers.
"""

from __future__ import annotations

import base64
import hashlib
import io
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clients import (
    HOST,
    MESSAGES,
    MailEnv,
    Raw,
    destroy,
    login,
    make_env,
    pop_error,
    port_of,
    retr,
    running,
    stuff,
    top,
    try_login,
    wait_until,
    wire,
)

from pop3proto.memstore import MemoryStorage
from pop3proto.options import OPTIONS
from pop3proto.passwd import DictAuthenticator
from pop3proto.server import Server
from pop3proto.storage import StorageError

ALICE_PW = "alice-Secret-1"


@pytest.fixture
def env(tmp_path: Path) -> MailEnv:
    return make_env(tmp_path)


def memory(*messages: bytes, user: str = "alice") -> MemoryStorage:
    store = MemoryStorage()
    for data in messages:
        store.add(user, data)
    return store


# --------------------------------------------------------------------- options


def test_configure_without_arguments_returns_every_option_with_its_default() -> None:
    options = Server().configure()
    assert options is not None
    expected = {name: o.default for name, o in OPTIONS.items()}
    expected["hostname"] = options["hostname"]  # None means: the machine's name
    assert options == expected
    assert options["hostname"]
    # pop3d's defaults, and the limits DESIGN.md asks for
    assert options["port"] == 110
    assert options["host"] == "127.0.0.1"
    assert options["transport"] == "blocking"
    assert options["auth"] is None
    assert options["storage"] is None
    assert options["idle_timeout"] >= 600  # RFC 1939 autologout: at least 10 minutes
    assert options["max_line_length"] == 255  # RFC 2449
    assert options["cleartext_auth"] == "loopback"
    assert options["trace"] is None


def test_configure_sets_options_and_cget_reads_them() -> None:
    server = Server("mine")
    assert server.cget("name") == "mine"
    assert server.configure(port=0) is None
    assert server.cget("port") == 0
    server.configure(idle_timeout=30, greeting="Hi there.", max_connections=5)
    options = server.configure()
    assert options is not None
    assert options["port"] == 0
    assert (options["idle_timeout"], options["greeting"], options["max_connections"]) == (
        30,
        "Hi there.",
        5,
    )
    assert Server(port=0, max_line_length=512).cget("max_line_length") == 512


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.configure(bogus=1),
        lambda s: s.cget("bogus"),
        lambda s: Server(bogus=1),
    ],
    ids=["configure", "cget", "constructor"],
)
def test_unknown_option_is_a_type_error_naming_it(call: Callable[[Server], Any]) -> None:
    with pytest.raises(TypeError, match="'bogus'"):
        call(Server())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("port", "110"),
        ("port", True),
        ("port", -1),
        ("port", 65536),
        ("port", 1.5),
        ("host", None),
        ("idle_timeout", "10"),
        ("idle_timeout", -1),
        ("max_connections", 2.5),
        ("max_connections_per_address", -1),
        ("cleartext_auth", "yes"),
        ("limit_loopback", 1),
        ("apop", "no"),
        ("trace", 42),
        ("ssl_context", "ctx"),
        ("auth_failure_delay", -0.1),
        ("trusted_proxies", ("not a network",)),
        ("logger", "pop3proto"),
        ("expire", -3),
    ],
)
def test_wrong_type_is_a_type_error_naming_the_option(name: str, value: Any) -> None:
    server = Server()
    before = server.configure()
    with pytest.raises(TypeError, match=rf"'{name}'"):
        server.configure(**{name: value})
    with pytest.raises(TypeError, match=rf"'{name}'"):
        Server(**{name: value})
    assert server.configure() == before


def test_a_failed_configure_changes_nothing() -> None:
    server = Server()
    with pytest.raises(TypeError, match="'port'"):
        server.configure(idle_timeout=5, port="x")
    assert server.cget("idle_timeout") == 600


def test_cget_port_after_up_is_the_bound_port() -> None:
    with running() as server:
        port = server.cget("port")
        assert isinstance(port, int)
        assert port != 0
        options = server.configure()
        assert options is not None
        assert options["port"] == port
        with socket.create_connection((HOST, port), timeout=10) as sock:
            assert sock.recv(100).startswith(b"+OK")


@pytest.mark.parametrize(
    ("name", "value"),
    [("host", "127.0.0.2"), ("port", 1), ("transport", "selectors"), ("pop3s_port", 0)],
)
def test_listening_options_cannot_change_while_up(name: str, value: Any) -> None:
    with running() as server:
        with pytest.raises(RuntimeError, match=rf"'{name}'"):
            server.configure(**{name: value})
        assert server.cget(name) != value
        server.configure(idle_timeout=30, greeting="Still up.")  # the others can
        with Raw(port_of(server)) as c:
            assert c.greeting == b"+OK Still up."


def test_configure_round_trips_while_up() -> None:
    with running() as server:
        port = port_of(server)
        options = server.configure()
        assert options is not None
        server.configure(**options)
        assert server.cget("port") == port
        with pytest.raises(RuntimeError, match="'port'"):
            server.configure(port=port + 1 if port < 65535 else port - 1)


def test_up_twice_is_harmless() -> None:
    with running() as server:
        port = port_of(server)
        server.up()
        assert server.state == "up"
        assert port_of(server) == port


# --------------------------------------------------------------------- life cycle


def test_state_goes_down_up_down() -> None:
    server = Server(port=0)
    assert server.state == "down"
    with pytest.raises(AttributeError):
        server.state = "up"  # type: ignore[misc]
    server.up()
    try:
        assert server.state == "up"
        server.down()
        assert server.state == "down"
    finally:
        destroy(server)
    assert server.state == "down"


def test_down_refuses_new_connections_and_the_live_session_finishes(env: MailEnv) -> None:
    with running(**env.options()) as server:
        port = port_of(server)
        with Raw(port) as c:
            assert c.login("alice", ALICE_PW).startswith(b"+OK")
            server.down()
            assert server.state == "down"
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((HOST, port), timeout=5).close()
            assert c.cmd("STAT") == b"+OK %d %d" % (
                len(MESSAGES),
                sum(len(wire(m)) for m in MESSAGES),
            )
            assert c.cmd("DELE 1") == b"+OK Marked to be deleted."
            assert c.cmd("QUIT").startswith(b"+OK")
            assert c.closed() == b""
        assert env.on_disk("alice") == list(MESSAGES[1:])


def test_up_after_down_listens_again(env: MailEnv) -> None:
    with running(**env.options()) as server:
        server.down()
        server.up()
        assert server.state == "up"
        client = login(port_of(server), "alice", ALICE_PW)
        assert client.stat()[0] == len(MESSAGES)
        client.quit()


def test_destroy_kill_closes_sessions_without_update_and_releases_the_lock(
    env: MailEnv,
) -> None:
    server = Server(host=HOST, port=0, **env.options())
    server.up()
    try:
        port = port_of(server)
        with Raw(port) as c, Raw(port) as idle:
            assert c.login("alice", ALICE_PW).startswith(b"+OK")
            assert c.cmd("DELE 1").startswith(b"+OK")
            assert c.cmd("DELE 2").startswith(b"+OK")
            assert len(server.connections()) == 2
            t0 = time.monotonic()
            destroy(server)
            assert time.monotonic() - t0 < 5
            assert server.state == "down"
            assert server.connections() == []
            assert c.closed() is not None
            assert idle.closed() is not None
    finally:
        destroy(server)
    assert env.on_disk("alice") == list(MESSAGES)
    assert env.storage.lock("alice")  # released by the killed session
    env.storage.unlock("alice")


def test_destroy_defer_returns_after_the_live_session_quits(env: MailEnv) -> None:
    server = Server(host=HOST, port=0, **env.options())
    server.up()
    try:
        port = port_of(server)
        with Raw(port) as c:
            assert c.login("alice", ALICE_PW).startswith(b"+OK")
            done = threading.Event()

            def destroy_then_signal() -> None:
                server.destroy("defer", timeout=20)
                done.set()

            destroyer = threading.Thread(target=destroy_then_signal, daemon=True)
            destroyer.start()
            assert wait_until(lambda: server.state == "exiting", 5)
            assert not done.wait(0.5), "destroy('defer') returned while a session was live"
            assert server.state == "exiting"
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((HOST, port), timeout=5).close()
            # the live session is undisturbed and its QUIT applies its deletions
            assert c.cmd("DELE 1").startswith(b"+OK")
            assert c.cmd("QUIT") == b"+OK Logging out."
            assert done.wait(5), "destroy('defer') did not return after the last QUIT"
            destroyer.join(5)
        assert server.state == "down"
    finally:
        destroy(server)
    assert env.on_disk("alice") == list(MESSAGES[1:])


def test_destroy_needs_a_known_mode() -> None:
    with pytest.raises(ValueError, match="kill"):
        Server().destroy("later")


def test_up_while_exiting_is_refused(env: MailEnv) -> None:
    server = Server(host=HOST, port=0, **env.options())
    server.up()
    try:
        with Raw(port_of(server)) as c:
            assert c.login("alice", ALICE_PW).startswith(b"+OK")
            destroyer = threading.Thread(
                target=server.destroy, args=("defer",), kwargs={"timeout": 20}, daemon=True
            )
            destroyer.start()
            assert wait_until(lambda: server.state == "exiting", 5)
            with pytest.raises(RuntimeError):
                server.up()
            assert c.cmd("QUIT").startswith(b"+OK")
            destroyer.join(5)
            assert not destroyer.is_alive()
    finally:
        destroy(server)


# --------------------------------------------------------------------- connections


def test_connections_and_connection_state(env: MailEnv) -> None:
    with running(**env.options()) as server:
        assert server.connections() == []
        with Raw(port_of(server)) as c:
            assert wait_until(lambda: len(server.connections()) == 1)
            (sid,) = server.connections()
            st = server.connection_state(sid)
            assert st["state"] == "authorization"
            assert st["user"] is None
            assert (st["peer"], st["port"]) == (HOST, c.local_port)
            assert (st["messages"], st["size"]) == (0, 0)

            assert c.login("alice", ALICE_PW) == b"+OK Logged in."
            assert c.cmd("DELE 2").startswith(b"+OK")
            stat = c.cmd("STAT")
            st = server.connection_state(sid)
            assert st["state"] == "transaction"
            assert st["user"] == "alice"
            assert stat == b"+OK %d %d" % (st["messages"], st["size"])
            assert st["bytes_in"] == c.sent
            assert st["bytes_out"] == c.received
            assert ALICE_PW not in repr(st)
            assert ALICE_PW.lower() not in repr(st).lower()

            with Raw(port_of(server)) as other:
                assert wait_until(lambda: len(server.connections()) == 2)
                assert other.cmd("QUIT").startswith(b"+OK")
                assert wait_until(lambda: server.connections() == [sid])
        assert wait_until(lambda: server.connections() == [])
        with pytest.raises(KeyError):
            server.connection_state(sid)


def test_connection_state_lists_the_deletion_marks(env: MailEnv) -> None:
    with running(**env.options()) as server, Raw(port_of(server)) as c:
        assert c.login("alice", ALICE_PW).startswith(b"+OK")
        assert c.cmd("DELE 2").startswith(b"+OK")
        assert c.cmd("DELE 4").startswith(b"+OK")
        (sid,) = server.connections()
        assert server.connection_state(sid)["deleted"] == [2, 4]
        assert c.cmd("RSET").startswith(b"+OK")
        assert server.connection_state(sid)["deleted"] == []


def test_connection_state_never_holds_a_password_during_a_login(env: MailEnv) -> None:
    with running(**env.options(auth_failure_delay=0)) as server, Raw(port_of(server)) as c:
        assert c.cmd("USER alice").startswith(b"+OK")
        (sid,) = server.connections()
        assert c.cmd("PASS not-" + ALICE_PW).startswith(b"-ERR [AUTH]")
        st = server.connection_state(sid)
        assert st["auth_failures"] == 1
        assert "not-" + ALICE_PW not in repr(st)


# --------------------------------------------------------------------- trace


def test_trace_sees_commands_and_replies_with_secrets_redacted() -> None:
    secret = "Tr4ce-Secret-pw"
    seen: list[tuple[int, str, str]] = []
    lock = threading.Lock()

    def trace(sid: int, direction: str, line: str) -> None:
        with lock:
            seen.append((sid, direction, line))

    plain = base64.b64encode(f"\0alice\0{secret}".encode()).decode()
    user64 = base64.b64encode(b"alice").decode()
    pw64 = base64.b64encode(secret.encode()).decode()
    with running(
        auth=DictAuthenticator({"alice": secret}),
        storage=memory(*MESSAGES[:2]),
        trace=trace,
        auth_failure_delay=0,
        max_auth_failures=10,
    ) as server:
        port = port_of(server)
        with Raw(port) as c:  # USER/PASS, a wrong one first, and lower case
            assert c.cmd("USER alice").startswith(b"+OK")
            assert c.cmd(f"PASS x{secret}").startswith(b"-ERR")
            assert c.cmd("USER alice").startswith(b"+OK")
            assert c.cmd(f"pass {secret}") == b"+OK Logged in."
            assert c.cmd("STAT").startswith(b"+OK")
            assert c.cmd("QUIT").startswith(b"+OK")
        with Raw(port) as c:  # SASL PLAIN with an initial response
            assert c.cmd(f"AUTH PLAIN {plain}") == b"+OK Logged in."
            assert c.cmd("QUIT").startswith(b"+OK")
        with Raw(port) as c:  # SASL PLAIN in a continuation
            assert c.cmd("AUTH PLAIN").startswith(b"+ ")
            assert c.cmd(plain) == b"+OK Logged in."
            assert c.cmd("QUIT").startswith(b"+OK")
        with Raw(port) as c:  # SASL LOGIN: user and password in continuations
            assert c.cmd("AUTH LOGIN").startswith(b"+ ")
            assert c.cmd(user64).startswith(b"+ ")
            assert c.cmd(pw64) == b"+OK Logged in."
            assert c.cmd("QUIT").startswith(b"+OK")
        assert wait_until(lambda: server.connections() == [])
    lines = [line for _, _, line in seen]
    assert {d for _, d, _ in seen} == {"C", "S"}
    assert len({sid for sid, _, _ in seen}) == 4
    assert ("C", "USER alice") in [(d, line) for _, d, line in seen]
    assert "+OK Logged in." in lines
    assert any(line.startswith("STAT") for line in lines)
    assert any(line.startswith("AUTH PLAIN") for line in lines)
    blob = "\n".join(lines)
    for needle in (secret, plain, pw64, pw64.rstrip("=")):
        assert needle.lower() not in blob.lower(), f"{needle!r} leaked into the trace"


# --------------------------------------------------------------------- safe defaults


def test_no_auth_means_every_login_fails_with_auth_code() -> None:
    options: dict[str, Any] = {
        "auth_failure_delay": 0,
        "max_auth_failures": 10,
        "storage": memory(b"x\n"),
    }
    with running(**options) as server, Raw(port_of(server)) as c:
        for user, pw in (("alice", "pw"), ("root", "x"), ("demo", "demo")):
            assert c.cmd(f"USER {user}").startswith(b"+OK")
            assert c.cmd(f"PASS {pw}").startswith(b"-ERR [AUTH]")
        plain = base64.b64encode(b"\0alice\0pw").decode()
        assert c.cmd(f"AUTH PLAIN {plain}").startswith(b"-ERR [AUTH]")
        assert c.cmd("STAT").startswith(b"-ERR")
        assert c.cmd("QUIT").startswith(b"+OK")


def test_no_storage_means_an_empty_maildrop() -> None:
    with running(auth=DictAuthenticator({"alice": "pw"})) as server, Raw(port_of(server)) as c:
        assert c.login("alice", "pw") == b"+OK Logged in."
        assert c.cmd("STAT") == b"+OK 0 0"
        assert c.multi("LIST") == (b"+OK 0 messages (0 octets)", b"")
        status, block = c.multi("UIDL")
        assert status.startswith(b"+OK")
        assert block == b""
        assert c.cmd("RETR 1").startswith(b"-ERR")
        assert c.cmd("DELE 1").startswith(b"-ERR")
        assert c.cmd("QUIT").startswith(b"+OK")


# --------------------------------------------------------------------- pop3d-style callables


class Pop3dMailboxes:
    """A pop3d ``-storage`` command over dicts, recording every call."""

    def __init__(self, boxes: dict[str, list[bytes]], *, uidl: bool = True) -> None:
        self.boxes = boxes
        self.calls: list[tuple[Any, ...]] = []
        self.locked: set[str] = set()
        self.uidl = uidl

    def __call__(self, cmd: str, mbox: str, *args: Any) -> Any:
        self.calls.append((cmd, mbox, *args))
        box = self.boxes[mbox]
        if cmd == "lock":
            if mbox in self.locked:
                return False
            self.locked.add(mbox)
            return True
        if cmd == "unlock":
            self.locked.discard(mbox)
            return None
        if cmd == "stat":
            return len(box)
        if cmd == "size":
            return len(wire(box[args[0] - 1])) if args else sum(len(wire(m)) for m in box)
        if cmd == "get":
            return box[args[0] - 1]
        if cmd == "dele":
            for n in sorted(args[0], reverse=True):
                del box[n - 1]
            return None
        if cmd == "uidl" and self.uidl:
            return hashlib.sha1(box[args[0] - 1]).hexdigest()
        raise ValueError(f"unknown storage command {cmd!r}")


def test_pop3d_style_callables_work_end_to_end() -> None:
    users = {"alice": ("alice-pw", "box-a")}
    auth_calls: list[tuple[str, str]] = []

    def auth(cmd: str, name: str) -> Any:
        auth_calls.append((cmd, name))
        return {"exists": name in users, "lookup": users.get(name)}[cmd]

    store = Pop3dMailboxes({"box-a": list(MESSAGES[:3])})
    with running(auth=auth, storage=store, auth_failure_delay=0) as server:
        port = port_of(server)
        with pop_error(b"-ERR [AUTH]"):
            login(port, "alice", "wrong")
        with pop_error(b"-ERR [AUTH]"):
            login(port, "mallory", "alice-pw")
        client = login(port, "alice", "alice-pw")
        try:
            assert client.stat() == (3, sum(len(wire(m)) for m in MESSAGES[:3]))
            _, listing, _ = client.list()
            assert listing == [b"%d %d" % (n, len(wire(m))) for n, m in enumerate(MESSAGES[:3], 1)]
            _, uidls, _ = client.uidl()
            assert uidls == [
                b"%d %s" % (n, hashlib.sha1(m).hexdigest().encode())
                for n, m in enumerate(MESSAGES[:3], 1)
            ]
            for n, data in enumerate(MESSAGES[:3], 1):
                assert retr(client, n)[1] == wire(data)
            assert client.dele(2).startswith(b"+OK")
            assert client.quit().startswith(b"+OK")
        finally:
            client.close()
    assert ("lookup", "alice") in auth_calls
    assert ("lookup", "mallory") in auth_calls
    assert store.boxes["box-a"] == [MESSAGES[0], MESSAGES[2]]
    assert ("dele", "box-a", [2]) in store.calls
    assert [c[0] for c in store.calls if c[0] in ("lock", "unlock")] == ["lock", "unlock"]
    assert store.locked == set()


def test_pop3d_storage_without_uidl_gets_distinct_stable_uidls() -> None:
    store = Pop3dMailboxes({"box": list(MESSAGES[:3])}, uidl=False)
    with running(auth=lambda cmd, name: ("pw", "box") if cmd == "lookup" else True,
                 storage=store) as server:  # fmt: skip
        seen = []
        for _ in range(2):
            client = login(port_of(server), "alice", "pw")
            try:
                seen.append(client.uidl()[1])
                client.quit()
            finally:
                client.close()
    assert seen[0] == seen[1]
    uids = [line.split()[1] for line in seen[0]]
    assert len(set(uids)) == 3


def test_pop3d_storage_answering_none_to_uidl_still_gets_unique_uidls() -> None:
    inner = Pop3dMailboxes({"box": list(MESSAGES[:3])}, uidl=False)

    def storage(cmd: str, mbox: str, *args: Any) -> Any:
        if cmd == "uidl":  # the natural if/elif command that ignores the unknown
            return None
        return inner(cmd, mbox, *args)

    with running(auth=lambda cmd, name: ("pw", "box") if cmd == "lookup" else True,
                 storage=storage) as server:  # fmt: skip
        client = login(port_of(server), "alice", "pw")
        try:
            uids = [line.split()[1] for line in client.uidl()[1]]
            client.quit()
        finally:
            client.close()
    assert len(set(uids)) == 3


def test_pop3d_storage_reporting_file_sizes_still_lists_what_retr_sends() -> None:
    inner = Pop3dMailboxes({"box": [MESSAGES[0]]})

    def storage(cmd: str, mbox: str, *args: Any) -> Any:
        if cmd == "size" and args:  # Tcllib's mbox/dbox storages answer the file size
            return len(inner.boxes[mbox][args[0] - 1])
        return inner(cmd, mbox, *args)

    with running(auth=lambda cmd, name: ("pw", "box") if cmd == "lookup" else True,
                 storage=storage) as server, Raw(port_of(server)) as c:  # fmt: skip
        assert c.login("alice", "pw").startswith(b"+OK")
        listed = int(c.cmd("LIST 1").split()[2])
        _, body = c.multi("RETR 1")
        assert listed == len(body)


# --------------------------------------------------------------------- pop3d's defects, fixed


def test_stat_list_uidl_do_not_count_deleted_messages(env: MailEnv) -> None:
    sizes = [len(wire(m)) for m in MESSAGES]
    with running(**env.options()) as server, Raw(port_of(server)) as c:
        assert c.login("alice", ALICE_PW).startswith(b"+OK")
        assert c.cmd("STAT") == b"+OK %d %d" % (len(sizes), sum(sizes))
        status, uidl_before = c.multi("UIDL")
        assert c.cmd("DELE 2").startswith(b"+OK")
        assert c.cmd("DELE 2").startswith(b"-ERR")
        live = [n for n in range(1, len(sizes) + 1) if n != 2]
        assert c.cmd("STAT") == b"+OK %d %d" % (len(live), sum(sizes[n - 1] for n in live))
        status, listing = c.multi("LIST")
        assert status == b"+OK %d messages (%d octets)" % (
            len(live),
            sum(sizes[n - 1] for n in live),
        )
        assert listing == b"".join(b"%d %d\r\n" % (n, sizes[n - 1]) for n in live)
        assert c.cmd("LIST 2").startswith(b"-ERR")
        assert c.cmd("LIST 3") == b"+OK 3 %d" % sizes[2]
        status, uidl_after = c.multi("UIDL")
        assert uidl_after == b"".join(
            line + b"\r\n" for line in uidl_before.split(b"\r\n")[:-1] if not line.startswith(b"2 ")
        )
        assert c.cmd("UIDL 2").startswith(b"-ERR")
        assert c.cmd("RETR 2").startswith(b"-ERR")
        assert c.cmd("TOP 2 0").startswith(b"-ERR")
        assert c.cmd("RSET").startswith(b"+OK")
        assert c.cmd("STAT") == b"+OK %d %d" % (len(sizes), sum(sizes))
        assert c.cmd("QUIT").startswith(b"+OK")
    assert env.on_disk("alice") == list(MESSAGES)


@pytest.mark.parametrize("n", range(1, len(MESSAGES) + 1))
def test_top_sends_headers_and_only_the_lines_asked_for(env: MailEnv, n: int) -> None:
    data = MESSAGES[n - 1]
    with running(**env.options()) as server, Raw(port_of(server)) as c:
        assert c.login("alice", ALICE_PW).startswith(b"+OK")
        for lines in (0, 1, 2, 10_000):
            status, body = c.multi(f"TOP {n} {lines}")
            assert status.startswith(b"+OK")
            assert body == top(data, lines), f"TOP {n} {lines}"
        assert c.multi(f"TOP {n} 0")[1].endswith(b"\r\n\r\n")
        assert c.cmd(f"TOP {n}").startswith(b"-ERR")
        assert c.cmd(f"TOP {n} -1").startswith(b"-ERR")


def test_list_sizes_equal_what_retr_sends(env: MailEnv) -> None:
    with running(**env.options()) as server, Raw(port_of(server)) as c:
        assert c.login("alice", ALICE_PW).startswith(b"+OK")
        _, listing = c.multi("LIST")
        sizes = [int(line.split()[1]) for line in listing.split(b"\r\n")[:-1]]
        for n, data in enumerate(MESSAGES, 1):
            status = c.cmd(f"RETR {n}")
            raw = c.raw_block()
            assert raw == stuff(data), f"message {n} on the wire"
            unstuffed = b"".join(
                (line[1:] if line.startswith(b".") else line) + b"\r\n"
                for line in raw.split(b"\r\n")[:-1]
            )
            assert unstuffed == wire(data)
            assert sizes[n - 1] == len(unstuffed)
            assert status == b"+OK %d octets" % sizes[n - 1]


def test_uidl_is_offered_unique_valid_and_stable(env: MailEnv) -> None:
    with running(**env.options()) as server:
        port = port_of(server)
        client = login(port, "alice", ALICE_PW)
        try:
            assert "UIDL" in client.capa()
            first = client.uidl()[1]
            assert client.uidl(3).split()[1:] == first[2].split()
            client.quit()
        finally:
            client.close()
        client = login(port, "alice", ALICE_PW)
        try:
            assert client.uidl()[1] == first
            client.quit()
        finally:
            client.close()
    uids = [line.split()[1] for line in first]
    assert [int(line.split()[0]) for line in first] == list(range(1, len(MESSAGES) + 1))
    assert len(set(uids)) == len(uids)
    assert all(1 <= len(u) <= 70 and all(0x21 <= b <= 0x7E for b in u) for u in uids)


@pytest.mark.parametrize(
    "line",
    [
        b"RETR x",
        b"RETR 1 2",
        b"LIST -1",
        b"DELE 0",
        b"TOP 1",
        b"RETR 99999999999999999999999",
        b"\xff\xfe\xfd",
        b"BOGUS command",
        b"UIDL 1 2 3",
        b"",
    ],
    ids=repr,
)
def test_a_malformed_line_gets_err_and_the_session_goes_on(env: MailEnv, line: bytes) -> None:
    with running(**env.options()) as server, Raw(port_of(server)) as c:
        assert c.login("alice", ALICE_PW).startswith(b"+OK")
        assert c.cmd(line).startswith(b"-ERR")
        assert c.cmd("STAT").startswith(b"+OK %d " % len(MESSAGES))
        assert c.cmd("DELE 1").startswith(b"+OK")
        c.abort()  # the client then drops: nothing deleted, the maildrop unlocked
        client = try_login(port_of(server), "alice", ALICE_PW)
        try:
            assert client.stat()[0] == len(MESSAGES)
            client.quit()
        finally:
            client.close()
    assert env.on_disk("alice") == list(MESSAGES)


@pytest.mark.parametrize("line", [b"NO\x00OP", b"STAT \x00"], ids=["NUL", "NUL arg"])
def test_a_fatal_line_gets_err_then_close_and_the_maildrop_unlocked(
    env: MailEnv, line: bytes
) -> None:
    with running(**env.options()) as server:
        with Raw(port_of(server)) as c:
            assert c.login("alice", ALICE_PW).startswith(b"+OK")
            assert c.cmd("DELE 1").startswith(b"+OK")
            c.send(line + b"\r\nSTAT\r\n")
            rest = c.closed()
            assert rest is not None, "the server kept the connection open"
            assert rest.startswith(b"-ERR")
            assert rest.count(b"\r\n") == 1, rest
        client = try_login(port_of(server), "alice", ALICE_PW)
        try:
            assert client.stat()[0] == len(MESSAGES)
            client.quit()
        finally:
            client.close()
    assert env.on_disk("alice") == list(MESSAGES)


def test_a_line_over_the_limit_gets_err_and_the_session_reads_on(env: MailEnv) -> None:
    # As Dovecot does: the oversize line is skipped up to its end, the rest is served.
    with running(**env.options()) as server, Raw(port_of(server)) as c:
        assert c.login("alice", ALICE_PW).startswith(b"+OK")
        c.send(b"NOOP " + b"x" * 300 + b"\r\nSTAT\r\n")
        assert c.line() == b"-ERR Line too long."
        assert c.line().startswith(b"+OK " + str(len(MESSAGES)).encode())
        assert c.cmd("QUIT").startswith(b"+OK")


def test_a_second_session_on_the_same_maildrop_gets_in_use(env: MailEnv) -> None:
    with running(**env.options()) as server:
        port = port_of(server)
        first = login(port, "alice", ALICE_PW)
        try:
            with Raw(port) as second:
                assert second.login("alice", ALICE_PW).startswith(b"-ERR [IN-USE]")
                assert second.cmd("STAT").startswith(b"-ERR")  # still not logged in
                other = login(port, "bob", "bob-Secret-2")  # another maildrop is fine
                other.quit()
            first.quit()
        finally:
            first.close()
        again = login(port, "alice", ALICE_PW)
        again.quit()


def test_a_message_gone_is_sys_temp_and_the_session_goes_on() -> None:
    store = MemoryStorage()
    keys = [store.add("alice", data) for data in MESSAGES[:3]]
    auth = DictAuthenticator({"alice": "pw"})
    with running(auth=auth, storage=store) as server, Raw(port_of(server)) as c:
        assert c.login("alice", "pw").startswith(b"+OK")
        store.remove("alice", keys[1])  # vanishes behind the session's back
        assert c.cmd("RETR 2").startswith(b"-ERR [SYS/TEMP]")
        assert c.cmd("TOP 2 0").startswith(b"-ERR [SYS/TEMP]")
        status, body = c.multi("RETR 3")
        assert status.startswith(b"+OK")
        assert body == wire(MESSAGES[2])
        assert c.cmd("DELE 1").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")
    assert store.messages("alice") == [MESSAGES[2]]


class FailingStorage(MemoryStorage):
    """A MemoryStorage whose chosen verb raises."""

    def __init__(self, failing: str, exc: Exception) -> None:
        super().__init__()
        self.failing, self.exc = failing, exc

    def lock(self, mailbox: str) -> bool:
        if self.failing == "lock":
            raise self.exc
        return super().lock(mailbox)

    def scan(self, mailbox: str) -> Any:
        if self.failing == "scan":
            raise self.exc
        return super().scan(mailbox)

    def dele(self, mailbox: str, keys: Any) -> None:
        if self.failing == "dele":
            raise self.exc
        super().dele(mailbox, keys)


@pytest.mark.parametrize("verb", ["lock", "scan"])
@pytest.mark.parametrize("exc", [StorageError("disk on fire"), OSError(5, "EIO")], ids=repr)
def test_a_failing_login_storage_is_sys_temp(verb: str, exc: Exception) -> None:
    store = FailingStorage(verb, exc)
    store.add("alice", b"x\n")
    with running(auth=DictAuthenticator({"alice": "pw"}), storage=store) as server:
        with Raw(port_of(server)) as c:
            assert c.login("alice", "pw").startswith(b"-ERR [SYS/TEMP]")
            assert c.cmd("NOOP").startswith(b"-ERR")  # still in AUTHORIZATION
            assert c.cmd("QUIT").startswith(b"+OK")
        assert wait_until(lambda: server.connections() == [])
    if verb == "scan":
        assert store.lock("alice")  # a failed scan released the lock it had taken


def test_a_failing_update_is_sys_temp_and_unlocks() -> None:
    store = FailingStorage("dele", StorageError("read-only file system"))
    store.add("alice", b"x\n")
    with running(auth=DictAuthenticator({"alice": "pw"}), storage=store) as server:
        with Raw(port_of(server)) as c:
            assert c.login("alice", "pw").startswith(b"+OK")
            assert c.cmd("DELE 1").startswith(b"+OK")
            assert c.cmd("QUIT").startswith(b"-ERR [SYS/TEMP]")
            assert c.closed() == b""
        assert wait_until(lambda: server.connections() == [])
    assert store.lock("alice")
    assert store.messages("alice") == [b"x\n"]


# --------------------------------------------------------------------- failed-login delay


def _timed_failure(c: Raw, password: str = "wrong") -> float:
    assert c.cmd("USER alice").startswith(b"+OK")
    t0 = time.monotonic()
    reply = c.cmd(f"PASS {password}")
    elapsed = time.monotonic() - t0
    assert reply.startswith(b"-ERR [AUTH]"), reply
    return elapsed


def test_failed_login_delay_grows_per_address_and_a_success_does_not_reset_it() -> None:
    base = 0.1
    with running(
        auth=DictAuthenticator({"alice": "pw"}),
        storage=MemoryStorage(),
        auth_failure_delay=base,
        auth_failure_delay_max=10.0,
        max_auth_failures=10,
    ) as server:
        port = port_of(server)
        with Raw(port) as c:
            delays = [_timed_failure(c) for _ in range(3)]
        assert delays[0] >= base * 0.95
        assert delays[1] >= 2 * base * 0.95
        assert delays[2] >= 4 * base * 0.95
        assert delays[0] < delays[2]
        # another address starts from the first step (127.0.0.2 is loopback on Linux)
        try:
            other = Raw(port, source="127.0.0.2")
        except OSError:
            other = None
        if other is not None:
            with other:
                assert _timed_failure(other) < 4 * base
        # a success from the same address does not reset its count (an attacker
            # with one account must not guess faster): penalties decay with time only
            with Raw(port) as c:
                assert c.login("alice", "pw").startswith(b"+OK")
                assert c.cmd("QUIT").startswith(b"+OK")
            with Raw(port) as c:
                after = _timed_failure(c)
            assert after >= 4 * base * 0.95  # not back to the first step


def test_failed_login_delay_is_capped() -> None:
    with (
        running(
            auth=DictAuthenticator({"alice": "pw"}),
            auth_failure_delay=0.05,
            auth_failure_delay_max=0.1,
            max_auth_failures=10,
        ) as server,
        Raw(port_of(server)) as c,
    ):
        delays = [_timed_failure(c) for _ in range(4)]
    assert delays[3] < 0.5


# --------------------------------------------------------------------- connection limits


def _refused(port: int) -> bytes:
    with Raw(port, greeting=False) as c:
        rest = c.closed()
    assert rest is not None, "an over-limit client was not closed"
    return rest


def test_max_connections_refuses_with_sys_temp_and_closes(env: MailEnv) -> None:
    with running(**env.options(max_connections=1)) as server:
        port = port_of(server)
        with Raw(port) as first:
            assert first.greeting.startswith(b"+OK")
            rest = _refused(port)
            assert rest.startswith(b"-ERR [SYS/TEMP]")
            assert rest.count(b"\r\n") == 1
            assert first.login("alice", ALICE_PW).startswith(b"+OK")  # the first goes on
            assert first.cmd("QUIT").startswith(b"+OK")
        assert wait_until(lambda: server.connections() == [])
        with Raw(port) as again:  # a slot is free again
            assert again.greeting.startswith(b"+OK")


def test_max_connections_per_address_counts_loopback_when_asked(env: MailEnv) -> None:
    with running(**env.options(max_connections_per_address=1, limit_loopback=True)) as server:
        port = port_of(server)
        with Raw(port) as first:
            assert first.greeting.startswith(b"+OK")
            assert _refused(port).startswith(b"-ERR [SYS/TEMP]")
            assert first.cmd("USER alice") == b"+OK"
        assert wait_until(lambda: server.connections() == [])
        with Raw(port) as again:
            assert again.greeting.startswith(b"+OK")


def test_loopback_is_not_counted_per_address_by_default(env: MailEnv) -> None:
    with running(**env.options(max_connections_per_address=1)) as server:
        port = port_of(server)
        with Raw(port) as first, Raw(port) as second:
            assert first.greeting.startswith(b"+OK")
            assert second.greeting.startswith(b"+OK")


# --------------------------------------------------------------------- cleartext policy


def test_no_cleartext_auth_hides_user_and_plain_and_refuses_them(env: MailEnv) -> None:
    with running(**env.options(cleartext_auth=False)) as server, Raw(port_of(server)) as c:
        status, capa = c.multi("CAPA")
        assert status.startswith(b"+OK")
        caps = capa.split(b"\r\n")[:-1]
        assert b"USER" not in caps
        sasl = next((line.split()[1:] for line in caps if line.startswith(b"SASL")), [])
        assert b"PLAIN" not in sasl
        assert b"LOGIN" not in sasl
        assert c.cmd("USER alice").startswith(b"-ERR")
        assert c.cmd(f"PASS {ALICE_PW}").startswith(b"-ERR")
        plain = base64.b64encode(f"\0alice\0{ALICE_PW}".encode()).decode()
        assert c.cmd(f"AUTH PLAIN {plain}").startswith(b"-ERR")
        assert c.cmd("STAT").startswith(b"-ERR")  # not logged in


def test_cleartext_auth_on_loopback_by_default(env: MailEnv) -> None:
    with running(**env.options()) as server, Raw(port_of(server)) as c:
        _, capa = c.multi("CAPA")
        caps = capa.split(b"\r\n")
        assert b"USER" in caps
        assert any(line.startswith(b"SASL") and b"PLAIN" in line.split() for line in caps)


# --------------------------------------------------------------------- misc facade


def test_pop3d_storage_get_may_return_a_stream() -> None:
    inner = Pop3dMailboxes({"box": [MESSAGES[0]]})

    def storage(cmd: str, mbox: str, *args: Any) -> Any:
        if cmd == "get":
            return io.BytesIO(inner.boxes[mbox][args[0] - 1])
        return inner(cmd, mbox, *args)

    with running(auth=lambda cmd, name: ("pw", "box") if cmd == "lookup" else True,
                 storage=storage) as server:  # fmt: skip
        client = login(port_of(server), "alice", "pw")
        try:
            assert retr(client, 1)[1] == wire(MESSAGES[0])
            client.quit()
        finally:
            client.close()


def test_trace_does_not_show_a_sasl_response_sent_after_a_refused_auth() -> None:
    seen: list[str] = []
    plain = base64.b64encode(b"\0alice\0Secret-pw").decode()
    with (
        running(
            auth=DictAuthenticator({"alice": "Secret-pw"}),
            cleartext_auth=False,
            trace=lambda sid, d, line: seen.append(line),
        ) as server,
        Raw(port_of(server)) as c,
    ):
        c.send(f"AUTH PLAIN\r\n{plain}\r\n".encode())  # a pipelining client
        assert c.line().startswith(b"-ERR")
        assert c.line().startswith(b"-ERR")
    assert plain.lower() not in "\n".join(seen).lower()
