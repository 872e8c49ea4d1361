"""The storage contract as a pytest test suite that any ``Storage`` backend can run.

Subclass :class:`StorageContract` in a test module of your own (the class
name must start with ``Test`` for pytest to collect it), give it a ``store``
fixture that makes a fresh store with empty maildrops, and a ``deliver``
method that puts a message into a maildrop the way your mail delivery does::

    import pytest
    from pop3proto.contract import StorageContract

    class TestMyStorage(StorageContract):
        @pytest.fixture
        def store(self, tmp_path):
            return MyStorage(tmp_path)

        def deliver(self, store, mailbox, data):
            store.put(mailbox, data)

Every case then runs against your store: ``lock`` is exclusive per maildrop
and ``unlock`` idempotent; ``scan`` lists keys, sizes as
``pop3proto.wire_size`` counts them and valid, unique UIDLs that stay the
same across sessions; ``get`` returns what was delivered (LF or CRLF line
ends) and raises ``MessageGone`` for a message that is not there; ``dele``
removes exactly the keys it is given and nothing when a key was never
listed; a delivery during a session leaves the session's listing alone; and
whole POP3 sessions, run through ``SessionDriver`` with no sockets, list the
sizes RETR then sends.  Optional hooks widen the suite: ``vanish`` (take a
message away behind a session's back) and ``another`` (a second front end or
a restart over the same maildrops).

Storage methods may be coroutine functions: their results are awaited on one
event loop per test.  pytest is the only requirement.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import pytest

from ._maildrop import MessageInfo
from ._writers import DotStuffer, wire_size
from .driver import CLOSE, RECEIVE, START_TLS, Call, SessionDriver, Write
from .passwd import DictAuthenticator
from .server import Server
from .storage import MailboxLocked, MessageGone, Storage, StorageError

__all__ = ["BODIES", "StorageContract", "retr_bytes"]

#: Messages every store must hold byte for byte (up to LF versus CRLF).
BODIES: dict[str, bytes] = {
    "lf": b"Subject: x\n\nline one\nline two\n",
    "crlf": b"Subject: x\r\n\r\nline one\r\nline two\r\n",
    "no-final-newline": b"Subject: x\n\nno newline at the end",
    "dots": b"Subject: x\n\n.leading dot\n..two dots\n.\nend\n",
    "empty": b"",
    "eight-bit-and-nul": b"Subject: \xff\xfe\n\n\x00\x01\x80 binary\n",
    "crlf-across-64k": b"x" * (64 * 1024 - 1) + b"\r\n" + b"y\n" * 10,
}

_PASSWORD = "contract-pw"
_MAX_ACTIONS = 100_000


def retr_bytes(data: bytes) -> bytes:
    """What RETR sends for a message of *data* (dot-stuffed, CRLF, with the final ``.``)."""
    stuffer = DotStuffer()
    return stuffer.feed(data) + stuffer.end()


class _Host:
    """Runs a ``SessionDriver``: scripted input, a clock that never moves, calls inline."""

    def __init__(self, server: Server, call: Callable[[Call], Any]) -> None:
        self.driver = SessionDriver(server, ("192.0.2.1", 110), tls=False, now=0.0)
        self._call = call

    def run(self, data: bytes | None = None) -> bytes:
        """Feed *data* (None: nothing; b"": the client hangs up); return what the server wrote."""
        pending = [] if data is None else [data]
        out = bytearray()
        driver = self.driver
        for _ in range(_MAX_ACTIONS):
            action = driver.next_action(0.0)
            if action is RECEIVE:
                if not pending:
                    return bytes(out)
                driver.receive_data(pending.pop())
            elif isinstance(action, Write):
                out += action.data
            elif isinstance(action, Call):
                try:
                    result = self._call(action)
                except Exception as exc:
                    driver.call_failed(exc)
                else:
                    driver.call_done(result)
            elif action is START_TLS:  # pragma: no cover - STLS is never offered here
                raise AssertionError("no TLS in the contract sessions")
            else:
                assert action is CLOSE
                return bytes(out)
        raise AssertionError(f"the session did not settle in {_MAX_ACTIONS} actions")

    def command(self, line: str) -> bytes:
        """Send one command; its whole response."""
        return self.run(line.encode() + b"\r\n")

    def hang_up(self) -> None:
        """The client goes away without QUIT."""
        self.driver.connection_lost()
        self.run()
        assert self.driver.closed


class StorageContract:
    """The storage contract; subclass it as ``TestSomething`` and provide the hooks below.

    Required: the ``store`` fixture and ``deliver``.  Optional: ``vanish``
    and ``another`` (the cases that need them skip, saying so, where they are
    not provided), and the class attributes below.
    """

    #: The maildrop the cases use, and a second one that must never be touched.
    mailbox: ClassVar[str] = "alice"
    other: ClassVar[str] = "bob"
    #: Whether ``scan`` lists in delivery order (oldest first), as POP3 clients expect.
    keeps_delivery_order: ClassVar[bool] = True
    #: Whether ``scan``, ``get`` and ``dele`` raise ``StorageError`` without the lock
    #: (the server never calls them so; the shipped stores refuse anyway).
    refuses_unlocked: ClassVar[bool] = True

    _loop: asyncio.AbstractEventLoop | None = None

    # -- the hooks ---------------------------------------------------------------

    @pytest.fixture
    def store(self) -> Any:
        """A fresh store with empty maildrops (override; tear it down after ``yield``)."""
        raise NotImplementedError("override the store fixture")

    def deliver(self, store: Any, mailbox: str, data: bytes) -> None:
        """Put message *data* into *mailbox*, as mail delivery would (override)."""
        raise NotImplementedError("override deliver(store, mailbox, data)")

    def vanish(self, store: Any, mailbox: str, key: str) -> None:
        """Remove message *key* behind the session's back, as another program would (optional)."""
        pytest.skip(f"{type(self).__name__} has no vanish(store, mailbox, key)")

    @contextmanager
    def another(self, store: Any) -> Iterator[Any]:
        """A second store over the same maildrops: another front end, or a restart (optional).

        The default is the same store, so the cases that use it still run.
        """
        yield store

    # -- helpers -------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _event_loop(self) -> Iterator[None]:
        yield
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, awaited (on this test's event loop) if it returns an awaitable."""
        result = fn(*args)
        if inspect.isawaitable(result):
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(_wait(result))
        return result

    def lock(self, store: Any, mailbox: str | None = None) -> bool:
        """``store.lock``, with ``MailboxLocked`` counted as False."""
        try:
            return bool(self.call(store.lock, mailbox or self.mailbox))
        except MailboxLocked:
            return False

    def unlock(self, store: Any, mailbox: str | None = None) -> None:
        self.call(store.unlock, mailbox or self.mailbox)

    def scan(self, store: Any, mailbox: str | None = None) -> list[MessageInfo]:
        infos = list(self.call(store.scan, mailbox or self.mailbox))
        assert all(isinstance(m, MessageInfo) for m in infos), infos
        return infos

    def read(self, store: Any, key: str, mailbox: str | None = None) -> bytes:
        """The whole message *key*, read in pieces as the server reads it, then closed."""
        stream = self.call(store.get, mailbox or self.mailbox, key)
        parts: list[bytes] = []
        try:
            for _ in range(1 << 20):
                chunk = stream.read(65536)
                if not chunk:
                    return b"".join(parts)
                parts.append(bytes(chunk))
            raise AssertionError("the stream never ended")
        finally:
            stream.close()

    def dele(self, store: Any, keys: Sequence[str], mailbox: str | None = None) -> None:
        self.call(store.dele, mailbox or self.mailbox, list(keys))

    def session(self, store: Any, mailbox: str | None = None) -> list[MessageInfo]:
        """Lock and scan, as a login does."""
        assert self.lock(store, mailbox), "the maildrop could not be locked"
        return self.scan(store, mailbox)

    def listing(self, store: Any, mailbox: str | None = None) -> list[bytes]:
        """The messages now in *mailbox* (a whole session: lock, scan, read, unlock)."""
        try:
            return [self.read(store, m.key, mailbox) for m in self.session(store, mailbox)]
        finally:
            self.unlock(store, mailbox)

    def fill(self, store: Any, bodies: Sequence[bytes], mailbox: str | None = None) -> None:
        for data in bodies:
            self.deliver(store, mailbox or self.mailbox, data)

    def same(self, got: Sequence[bytes], delivered: Sequence[bytes]) -> None:
        """*got* holds the messages *delivered*, up to line ends (and order, if not kept)."""
        sent = [retr_bytes(d) for d in got]
        want = [retr_bytes(d) for d in delivered]
        if self.keeps_delivery_order:
            assert sent == want
        else:
            assert sorted(sent) == sorted(want)

    # -- the store is a Storage ---------------------------------------------------------

    def test_is_a_storage(self, store: Any) -> None:
        assert isinstance(store, Storage)

    def test_an_empty_maildrop_lists_nothing(self, store: Any) -> None:
        assert self.session(store, "nobody") == []
        self.unlock(store, "nobody")

    # -- lock and unlock --------------------------------------------------------------

    def test_lock_is_exclusive_per_maildrop_and_unlock_idempotent(self, store: Any) -> None:
        assert self.lock(store)
        assert not self.lock(store)
        assert self.lock(store, self.other)  # another maildrop is independent
        self.unlock(store)
        self.unlock(store)  # already released: no error
        assert self.lock(store)
        self.unlock(store)
        self.unlock(store, self.other)
        self.unlock(store, "never-locked")

    def test_lock_holds_against_another_front_end(self, store: Any) -> None:
        with self.another(store) as second:
            assert self.lock(store)
            assert not self.lock(second)
            self.unlock(store)
            assert self.lock(second)
            assert not self.lock(store)
            self.unlock(second)

    def test_a_lock_race_has_one_winner(self, store: Any) -> None:
        if inspect.iscoroutinefunction(store.lock):

            async def race() -> list[bool]:
                async def one() -> bool:
                    try:
                        return bool(await store.lock(self.mailbox))
                    except MailboxLocked:
                        return False

                return list(await asyncio.gather(*(one() for _ in range(16))))

            wins = self.call(race)
        else:
            barrier = threading.Barrier(16, timeout=30)
            wins = []

            def grab() -> None:
                barrier.wait()
                wins.append(self.lock(store))

            threads = [threading.Thread(target=grab) for _ in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert sorted(wins) == [False] * 15 + [True]
        self.unlock(store)

    # -- scan -------------------------------------------------------------------------

    def test_scan_lists_every_message_with_its_wire_size(self, store: Any) -> None:
        self.fill(store, list(BODIES.values()))
        self.deliver(store, self.other, b"Subject: not alice's\n\n")
        infos = self.session(store)
        got = [self.read(store, m.key) for m in infos]
        self.same(got, list(BODIES.values()))
        for info, data in zip(infos, got, strict=True):
            assert info.size == wire_size(data)
        self.unlock(store)

    def test_an_empty_message_lists_as_two_octets(self, store: Any) -> None:
        self.deliver(store, self.mailbox, b"")
        (info,) = self.session(store)
        assert info.size == 2
        assert self.read(store, info.key) in (b"", b"\r\n", b"\n")
        self.unlock(store)

    def test_keys_and_uidls_are_unique_even_for_identical_messages(self, store: Any) -> None:
        self.fill(store, [b"Subject: same\n\nsame\n"] * 3 + [b"Subject: other\n\n"])
        infos = self.session(store)
        assert len(infos) == 4
        assert len({m.key for m in infos}) == 4
        assert len({m.uid for m in infos}) == 4
        self.unlock(store)

    def test_uidls_are_stable_across_sessions_and_restarts(self, store: Any) -> None:
        self.fill(store, [b"Subject: %d\n\nbody\n" % i for i in range(3)])
        first = [(m.uid, m.size) for m in self.session(store)]
        self.unlock(store)
        assert [(m.uid, m.size) for m in self.session(store)] == first
        self.unlock(store)
        with self.another(store) as second:
            assert [(m.uid, m.size) for m in self.session(second)] == first
            self.unlock(second)

    def test_uidls_of_the_rest_survive_a_deletion(self, store: Any) -> None:
        self.fill(store, [b"Subject: %d\n\nbody\n" % i for i in range(3)])
        infos = self.session(store)
        self.dele(store, [infos[1].key])
        self.unlock(store)
        kept = {m.uid for m in self.session(store)}
        assert kept == {infos[0].uid, infos[2].uid}
        self.unlock(store)

    def test_a_uidl_is_never_given_out_again(self, store: Any) -> None:
        self.fill(store, [b"Subject: 1\n\n", b"Subject: 2\n\n"])
        infos = self.session(store)
        self.dele(store, [infos[-1].key])  # the newest: an id counter may step back
        self.unlock(store)
        self.deliver(store, self.mailbox, b"Subject: 3\n\n")
        now = self.session(store)
        self.unlock(store)
        new = {m.uid for m in now} - {infos[0].uid}
        assert len(new) == 1
        assert not new & {m.uid for m in infos}

    # -- get ----------------------------------------------------------------------------

    def test_get_of_a_key_never_listed_is_message_gone(self, store: Any) -> None:
        self.deliver(store, self.other, b"Subject: bob's\n\n")
        other_keys = [m.key for m in self.session(store, self.other)]
        self.unlock(store, self.other)
        self.deliver(store, self.mailbox, b"Subject: alice's\n\n")
        self.session(store)
        for key in ("no-such-key", *other_keys):
            with pytest.raises(MessageGone):
                self.call(store.get, self.mailbox, key)
        self.unlock(store)

    def test_get_of_a_vanished_message_is_message_gone(self, store: Any) -> None:
        self.fill(store, [b"Subject: one\n\n1\n", b"Subject: two\n\n2\n"])
        gone, kept = self.session(store)
        self.vanish(store, self.mailbox, gone.key)
        with pytest.raises(MessageGone):
            self.call(store.get, self.mailbox, gone.key)
        assert retr_bytes(self.read(store, kept.key)) == retr_bytes(b"Subject: two\n\n2\n")
        self.unlock(store)

    # -- dele -------------------------------------------------------------------------------

    def test_nothing_is_removed_without_dele(self, store: Any) -> None:
        self.fill(store, [b"Subject: 1\n\n", b"Subject: 2\n\n"])
        for m in self.session(store):
            self.read(store, m.key)
        self.unlock(store)
        self.same(self.listing(store), [b"Subject: 1\n\n", b"Subject: 2\n\n"])

    def test_dele_removes_exactly_the_keys_given(self, store: Any) -> None:
        bodies = [b"Subject: %d\n\n" % i for i in range(4)]
        self.fill(store, bodies)
        self.deliver(store, self.other, b"Subject: bob's\n\n")
        infos = self.session(store)
        by_body = {retr_bytes(self.read(store, m.key)): m.key for m in infos}
        self.dele(store, [by_body[retr_bytes(bodies[1])], by_body[retr_bytes(bodies[3])]])
        self.dele(store, [])
        self.unlock(store)
        self.same(self.listing(store), [bodies[0], bodies[2]])
        self.same(self.listing(store, self.other), [b"Subject: bob's\n\n"])

    def test_dele_skips_a_message_already_gone(self, store: Any) -> None:
        self.fill(store, [b"Subject: 1\n\n", b"Subject: 2\n\n", b"Subject: 3\n\n"])
        infos = self.session(store)
        self.vanish(store, self.mailbox, infos[0].key)
        self.dele(store, [infos[0].key, infos[1].key])
        self.unlock(store)
        assert len(self.listing(store)) == 1

    def test_dele_with_a_key_never_listed_deletes_nothing(self, store: Any) -> None:
        self.fill(store, [b"Subject: 1\n\n", b"Subject: 2\n\n"])
        keys = [m.key for m in self.session(store)]
        with pytest.raises(StorageError):
            self.dele(store, [keys[0], "no-such-key", keys[1]])
        self.unlock(store)
        assert len(self.listing(store)) == 2

    def test_dele_never_touches_another_maildrop(self, store: Any) -> None:
        self.deliver(store, self.other, b"Subject: bob's\n\n")
        (bobs,) = self.session(store, self.other)
        self.unlock(store, self.other)
        self.deliver(store, self.mailbox, b"Subject: alice's\n\n")
        (alices,) = self.session(store)
        try:
            self.dele(store, [alices.key, bobs.key])
        except StorageError:  # refused: then nothing at all is deleted
            self.unlock(store)
            assert len(self.listing(store)) == 1
        else:
            self.unlock(store)
        self.same(self.listing(store, self.other), [b"Subject: bob's\n\n"])

    # -- a delivery during a session ------------------------------------------------------

    def test_a_delivery_during_a_session_leaves_its_listing_alone(self, store: Any) -> None:
        self.fill(store, [b"Subject: 1\n\n", b"Subject: 2\n\n"])
        infos = self.session(store)
        self.deliver(store, self.mailbox, b"Subject: late\n\n")
        for m in infos:
            self.read(store, m.key)
        self.dele(store, [m.key for m in infos])
        self.unlock(store)
        self.same(self.listing(store), [b"Subject: late\n\n"])

    # -- without the lock -------------------------------------------------------------------

    def test_scan_get_and_dele_need_the_lock(self, store: Any) -> None:
        if not self.refuses_unlocked:
            pytest.skip(f"{type(self).__name__}.refuses_unlocked is False")
        self.deliver(store, self.mailbox, b"Subject: 1\n\n")
        (info,) = self.session(store)
        self.unlock(store)
        for fn, args in ((store.scan, ()), (store.get, (info.key,)), (store.dele, ([info.key],))):
            with pytest.raises(StorageError):
                self.call(fn, self.mailbox, *args)
        assert len(self.listing(store)) == 1

    # -- whole POP3 sessions (SessionDriver, no sockets) ----------------------------------

    def pop3(self, store: Any) -> _Host:
        """A logged-in POP3 session for ``mailbox`` over *store*."""
        server = Server(auth=DictAuthenticator({self.mailbox: _PASSWORD}), storage=store,
                        cleartext_auth=True, auth_failure_delay=0.0)  # fmt: skip
        host = _Host(server, lambda c: self.call(c.fn, *c.args))
        assert host.run().startswith(b"+OK")
        assert host.command(f"USER {self.mailbox}").startswith(b"+OK")
        reply = host.command(f"PASS {_PASSWORD}")
        assert reply.startswith(b"+OK"), reply
        return host

    def test_retr_sends_what_list_announced(self, store: Any) -> None:
        self.fill(store, list(BODIES.values()))
        host = self.pop3(store)
        sizes = [int(line.split()[1]) for line in _lines(host.command("LIST"))]
        uids = [line.split()[1] for line in _lines(host.command("UIDL"))]
        assert len(sizes) == len(uids) == len(BODIES)
        sent = []
        for n, size in enumerate(sizes, 1):
            reply = host.command(f"RETR {n}")
            head, _, body = reply.partition(b"\r\n")
            assert head.startswith(b"+OK"), head
            sent.append(body)
            assert len(_unstuff(body)) == size
        assert host.command("QUIT").startswith(b"+OK")
        want = [retr_bytes(d) for d in BODIES.values()]
        assert sent == want if self.keeps_delivery_order else sorted(sent) == sorted(want)
        host = self.pop3(store)  # UIDLs hold in the next session
        assert [line.split()[1] for line in _lines(host.command("UIDL"))] == uids
        host.command("QUIT")

    def test_dele_takes_effect_at_quit_only(self, store: Any) -> None:
        self.fill(store, [b"Subject: 1\n\n", b"Subject: 2\n\n"])
        host = self.pop3(store)
        assert host.command("STAT").startswith(b"+OK 2 ")
        self.deliver(store, self.mailbox, b"Subject: late\n\n")
        assert host.command("STAT").startswith(b"+OK 2 ")  # the listing of the login
        assert host.command("DELE 1").startswith(b"+OK")
        host.hang_up()  # no QUIT: no update, and the lock is released
        host = self.pop3(store)
        assert host.command("STAT").startswith(b"+OK 3 ")
        assert host.command("DELE 1").startswith(b"+OK")
        assert host.command("QUIT").startswith(b"+OK")
        assert host.driver.closed
        assert len(self.listing(store)) == 2


async def _wait(awaitable: Any) -> Any:
    return await awaitable


def _lines(reply: bytes) -> list[bytes]:
    """The lines of a multi-line ``+OK`` reply, without the status line and the final dot."""
    head, *lines = reply.split(b"\r\n")
    assert head.startswith(b"+OK"), head
    assert lines[-2:] == [b".", b""], reply[-40:]
    return lines[:-2]


def _unstuff(body: bytes) -> bytes:
    """A RETR body without its dot-stuffing and final ``.CRLF``: the octets LIST counts."""
    assert body.endswith(b"\r\n.\r\n") or body == b".\r\n", body[-20:]
    lines = body[: -len(b".\r\n")].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
