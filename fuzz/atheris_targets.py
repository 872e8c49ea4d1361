"""Coverage-guided fuzz targets (atheris / libFuzzer) for the POP3 core, the SASL decoders and
the session logic.

Run one target::

    python fuzz/atheris_targets.py connection -max_total_time=60 WORKDIR fuzz/corpus/connection
    python fuzz/atheris_targets.py sasl ...
    python fuzz/atheris_targets.py session ...
    python fuzz/atheris_targets.py --make-corpus      # (re)write the seed files
    python fuzz/atheris_targets.py --replay TARGET FILE...   # run inputs once (no atheris)
    python fuzz/atheris_targets.py --hypothesis TARGET SECONDS  # fallback, not coverage-guided

Every target takes one ``bytes`` input and raises only on a real bug.  The
first bytes of an input choose the configuration and seed the choices (how
the rest is split into reads, how the application answers), so libFuzzer's
mutations of the protocol bytes keep their meaning.

* ``connection``: ``Connection`` after a greeting, optionally already in
  TRANSACTION, fed the rest in arbitrary splits, with plausible (randomly
  chosen) application answers.  Allowed: events, ``-ERR``, and
  ``RemoteProtocolError`` (after which the last reply line is an ``-ERR``).
  Checked: no bare LF on the wire, every status line is ``+OK``, ``-ERR`` or
  ``+ `` and fits in 512 octets.
* ``sasl``: ``mechanism_for(name).step(data)`` for every mechanism, several
  steps (SCRAM's ``server_first`` included): never raises, always returns
  one of the documented step types.
* ``session``: the session driver (``Server``'s policy) over ``MemoryStorage`` and
  ``DictAuthenticator``, its steps run synchronously: no exception but the
  core's ``RemoteProtocolError``.

atheris is optional here: the targets import without it (the pytest wrapper
falls back to hypothesis when it is missing).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"

try:
    if os.environ.get("POP3PROTO_FUZZ_NO_ATHERIS"):
        raise ImportError("atheris disabled by POP3PROTO_FUZZ_NO_ATHERIS")
    import atheris
except ImportError:  # the hypothesis fallback and --replay need no atheris
    atheris = None

_instrument: Any = (
    atheris.instrument_imports(include=["pop3proto"]) if atheris is not None
    else contextlib.nullcontext()
)  # fmt: skip
with _instrument:
    import pop3proto.sasl as sasl
    from pop3proto import (
        NEED_DATA,
        PAUSED,
        ApopLogin,
        AuthAborted,
        AuthResponse,
        AuthStart,
        Config,
        Connection,
        ConnectionClosed,
        Data,
        EndOfMessage,
        Err,
        Greeting,
        Login,
        LoginAccepted,
        Maildrop,
        MessageInfo,
        Ok,
        RemoteProtocolError,
        RetrieveMessage,
        SaslChallenge,
        StartTLS,
        TopOfMessage,
        Update,
    )
    from pop3proto.auth import ScramSecret
    from pop3proto.driver import CLOSE, RECEIVE, START_TLS, Call, SessionDriver, Write
    from pop3proto.memstore import MemoryStorage
    from pop3proto.passwd import DictAuthenticator
    from pop3proto.server import Server
    from pop3proto.transports._common import perform_call

HEADER = 4  # control bytes in front of every input


# --------------------------------------------------------------------- helpers

MESSAGES = [
    b"From: a@example.org\nSubject: one\n\n.dot\n..two\n.\nend\n",
    b"Subject: two\r\n\r\nbody\r\n.\r\n",
    b"Subject: no newline\n\nlast",
    b"",
    b".\r",
]


def maildrop() -> Maildrop:
    return Maildrop(
        tuple(
            MessageInfo(key=f"k{n}", size=len(m) + m.count(b"\n") + 2, uid=f"uid-{n}")
            for n, m in enumerate(MESSAGES, 1)
        )
    )


def check_output(out: bytes) -> None:
    """What every byte the server writes must satisfy."""
    assert b"\n" not in out.replace(b"\r\n", b""), f"bare LF on the wire: {out[-200:]!r}"


def check_status(line: bytes) -> None:
    assert line.startswith((b"+OK", b"-ERR", b"+ ")), f"not a status line: {line[:100]!r}"
    assert len(line) + 2 <= 512, f"status line of {len(line) + 2} octets"


def split(rng: random.Random, data: bytes) -> Iterator[bytes]:
    """*data* in reads of random sizes (mostly small, sometimes large)."""
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 1, 2, 3, 5, 8, 13, 64, 512, 1 << 16))
        yield data[pos : pos + size]
        pos += size


# --------------------------------------------------------------------- connection


def connection_config(flags: int, length: int) -> Config:
    return Config(
        max_line_length=16 + length % 240,
        apop=bool(flags & 1),
        stls=bool(flags & 2),
        cleartext_auth=not flags & 4,
        utf8=not flags & 8,
        user_command=not flags & 16,
        login_delay=30 if flags & 32 else None,
        expire="NEVER" if flags & 64 else None,
        trace=(lambda d, line: None) if flags & 128 else None,
        sasl_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "XOAUTH2"),
    )


class ConnectionDriver:
    """Plays the application for a Connection; checks every reply."""

    def __init__(self, conn: Connection, rng: random.Random) -> None:
        self.conn, self.rng = conn, rng
        self.wire = bytearray()

    def drain(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.wire += out

    def answer(self, event: Any) -> None:
        conn, rng = self.conn, self.rng
        choice = rng.random()
        if isinstance(event, (Login, ApopLogin)):
            conn.send(LoginAccepted(maildrop=maildrop()) if choice < 0.5 else
                      Err(text="Authentication failed.", code="AUTH"))  # fmt: skip
        elif isinstance(event, (AuthStart, AuthResponse)):
            if choice < 0.4:
                conn.send(SaslChallenge(data=rng.randbytes(rng.randrange(0, 40))))
            elif choice < 0.7:
                conn.send(LoginAccepted(maildrop=maildrop(), login_delay=rng.choice((None, 5))))
            else:
                conn.send(Err(code=rng.choice((None, "AUTH", "SYS/TEMP"))))
        elif isinstance(event, (RetrieveMessage, TopOfMessage)):
            if choice < 0.2:
                conn.send(Err(text="gone", code="SYS/TEMP"))
                return
            conn.send(Ok())
            data = MESSAGES[(int(event.key[1:]) - 1) % len(MESSAGES)]
            for chunk in split(rng, data * rng.randrange(1, 4)):
                if not conn.wants_more_data:
                    break
                conn.send(Data(data=chunk))
                self.drain()
            conn.send(EndOfMessage())
        elif isinstance(event, StartTLS):
            conn.send(Ok() if choice < 0.5 else Err(text="no TLS"))
        elif isinstance(event, Update):
            conn.send(Ok() if choice < 0.7 else Err(code="SYS/TEMP"))
        elif isinstance(event, AuthAborted):
            conn.send(Err(code=rng.choice((None, "AUTH"))))
        else:
            raise AssertionError(f"unexpected event {event!r}")

    def pump(self) -> bool:
        """Handle events until NEED_DATA; False once the session is over."""
        for _ in range(100_000):
            try:
                event = self.conn.next_event()
            except RemoteProtocolError:
                self.drain()
                last = bytes(self.wire).rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
                assert last.startswith(b"-ERR"), f"protocol error without -ERR: {last!r}"
                return False
            self.drain()
            if event is NEED_DATA:
                return True
            if event is PAUSED:
                assert self.conn.pending is None
                continue
            if isinstance(event, ConnectionClosed):
                return False
            self.answer(event)
            self.drain()
        raise AssertionError("next_event never asked for data")


def connection_target(data: bytes) -> None:
    if len(data) < HEADER:
        return
    flags, length, mode, seed = data[0], data[1], data[2], data[3]
    rng = random.Random(seed)
    conn = Connection(connection_config(flags, length), tls=bool(mode & 1))
    driver = ConnectionDriver(conn, rng)
    conn.send(Greeting(apop_timestamp="<1.2@fuzz>" if flags & 1 else None))
    driver.drain()
    if mode & 2:  # start in TRANSACTION (when this configuration offers USER/PASS)
        conn.receive_data(b"USER fuzz\r\nPASS x\r\n")
        event = conn.next_event()
        if isinstance(event, Login):
            conn.send(LoginAccepted(maildrop=maildrop()))
        else:
            assert event is NEED_DATA, event
        driver.drain()
    alive = driver.pump()
    for chunk in split(rng, data[HEADER:]):
        if not alive:
            break
        conn.receive_data(chunk)
        alive = driver.pump()
    if alive:
        conn.receive_data(b"")
        driver.pump()
    wire = bytes(driver.wire)
    check_output(wire)
    if not conn.sending_lines:
        for line in wire.split(b"\r\n"):
            if line[:1] in (b"+", b"-"):
                check_status(line)


# --------------------------------------------------------------------- SASL

MECHANISMS = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "OAUTHBEARER", "XOAUTH2", "X-NONE"]
SCRAM = ScramSecret.from_password("pencil", b"fuzz-salt", 16)
STEP_TYPES = (
    sasl.Challenge, sasl.Failure, sasl.PasswordCredentials, sasl.CramCredentials,
    sasl.TokenCredentials, sasl.NeedSecret, sasl.ScramDone,
)  # fmt: skip


def sasl_steps(data: bytes) -> Iterator[bytes | None]:
    """Length-prefixed steps: a length byte (255 = None), then that many bytes."""
    pos = 0
    while pos < len(data):
        n = data[pos]
        pos += 1
        if n == 255:
            yield None
            continue
        yield data[pos : pos + n]
        pos += n


def sasl_target(data: bytes) -> None:
    if len(data) < 1:
        return
    name = MECHANISMS[data[0] % len(MECHANISMS)]
    mech = sasl.mechanism_for(name, nonce="fuzznonce", challenge=b"<1.2@fuzz>")
    if mech is None:
        assert name == "X-NONE"
        return
    for step_data in sasl_steps(data[1:]):
        step = mech.step(step_data)
        assert isinstance(step, STEP_TYPES), step
        if isinstance(step, sasl.NeedSecret):
            assert isinstance(mech, sasl.ScramSha256)
            challenge = mech.server_first(SCRAM)
            assert isinstance(challenge, sasl.Challenge)
        elif not isinstance(step, (sasl.Challenge, sasl.ScramDone)):
            break  # a final answer: the server never steps the mechanism again


# --------------------------------------------------------------------- session

USERS = {"alice": "{PLAIN}pencil", "bob": "{PLAIN}secret"}


def make_server() -> Server:
    store = MemoryStorage()
    for m in MESSAGES:
        store.add("alice", m)
        store.add("bob", m)
    return Server(
        auth=DictAuthenticator(USERS),
        storage=store,
        auth_failure_delay=0,
        apop=True,
        cleartext_auth=True,
        sasl_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "XOAUTH2", "OAUTHBEARER"),
        oauth=lambda user, token: token == "good-token",
        hostname="fuzz",
    )


_SERVER: Server | None = None


def session_target(data: bytes) -> None:
    """The full server policy through the session driver, with a fake clock and no sockets."""
    global _SERVER
    if len(data) < HEADER:
        return
    if _SERVER is None:
        _SERVER = make_server()
    server = _SERVER
    rng = random.Random(data[3])
    now = 0.0
    driver = SessionDriver(server, ("192.0.2.1", 1000 + data[0]), tls=bool(data[2] & 1), now=now)
    chunks = [*split(rng, data[HEADER:]), b""]
    wire = bytearray()
    for _ in range(100_000):  # every action ends or asks for input; this only bounds a bug
        now += 0.001
        action = driver.next_action(now)
        if action is RECEIVE:
            if chunks:
                driver.receive_data(chunks.pop(0))
            else:  # nothing more will come: let the deadline pass
                now = (driver.deadline or now) + 1
        elif isinstance(action, Write):
            wire += action.data
        elif isinstance(action, Call):
            perform_call(driver, action)
        elif action is START_TLS:
            driver.tls_started()
        else:
            assert action is CLOSE
            break
    else:
        raise AssertionError("the driver never closed")
    check_output(bytes(wire))
    assert driver.policy.locked is False
    assert driver.id not in server.connections()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "connection": connection_target,
    "sasl": sasl_target,
    "session": session_target,
}


# --------------------------------------------------------------------- seeds


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _scram_seed() -> bytes:
    """A complete, correct SCRAM-SHA-256 exchange for the sasl target (nonce is fixed)."""
    cnonce = "clientnonce"
    first_bare = f"n=alice,r={cnonce}"
    nonce = cnonce + "fuzznonce"
    salt = base64.b64encode(SCRAM.salt).decode()
    server_first = f"r={nonce},s={salt},i={SCRAM.iterations}"
    without_proof = f"c={base64.b64encode(b'n,,').decode()},r={nonce}"
    auth_message = f"{first_bare},{server_first},{without_proof}".encode()
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", SCRAM.salt, SCRAM.iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    signature = hmac.new(SCRAM.stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
    first = f"n,,{first_bare}".encode()
    return bytes([3, len(first)]) + first + bytes([len(final)]) + final + b"\x00"


SESSION_SCRIPTS = [
    b"USER alice\r\nPASS pencil\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 2 1\r\nDELE 1\r\n"
    b"LIST 1\r\nRSET\r\nNOOP\r\nDELE 3\r\nQUIT\r\n",
    b"CAPA\r\nAUTH\r\nAUTH PLAIN " + _b64(b"\0alice\0pencil") + b"\r\nSTAT\r\nQUIT\r\n",
    b"AUTH PLAIN\r\n" + _b64(b"\0bob\0secret") + b"\r\nRETR 5\r\nQUIT\r\n",
    b"AUTH LOGIN\r\n" + _b64(b"alice") + b"\r\n" + _b64(b"pencil") + b"\r\nTOP 1 0\r\nQUIT\r\n",
    b"AUTH CRAM-MD5\r\n*\r\nAUTH SCRAM-SHA-256\r\n*\r\nAPOP alice 0123456789abcdef0123456789ab"
    b"cdef\r\nQUIT\r\n",
    b"AUTH XOAUTH2 " + _b64(b"user=alice\x01auth=Bearer good-token\x01\x01") + b"\r\nSTAT\r\n",
    b"AUTH OAUTHBEARER " + _b64(b"n,a=bob,\x01auth=Bearer good-token\x01\x01") + b"\r\nQUIT\r\n",
    b"UTF8\r\nUSER \xc3\xa9l\xc3\xa8ve\r\nPASS x\r\nSTLS\r\nCAPA\r\nQUIT\r\n",
    b"USER alice\r\nPASS wrong\r\nUSER ../etc\r\nPASS x\r\nUSER a\r\nPASS b\r\n",
    b"USER alice\r\nPASS pencil\r\nRETR 01\r\nRETR 0\r\nRETR -1\r\nTOP 1 -1\r\nLIST 1 2\r\n"
    b"DELE 18446744073709551617\r\nXXXX\r\nQUIT\r\n",
    b"NOOP\x00\r\n",
    b"X" * 300 + b"\r\n",
]

SASL_SEEDS = [
    bytes([0, 255, 13]) + b"\0alice\0pencil",
    bytes([0, 14]) + b"admin\0alice\0pw",
    bytes([1, 255, 5]) + b"alice" + bytes([6]) + b"pencil",
    bytes([2, 255, 38]) + b"alice 0123456789abcdef0123456789abcdef",
    _scram_seed(),
    bytes([3, 255, 20]) + b"y,,n=al=2Cice,r=abc,",
    bytes([4, 34]) + b"n,a=bob,\x01auth=Bearer tok\x01\x01" + bytes([1]) + b"x",
    bytes([5, 35]) + b"user=bob\x01auth=Bearer tok\x01\x01\x01",
    bytes([0, 3]) + b"\xff\xfe\x00",
]


def make_corpus() -> None:
    """Write the seed files under fuzz/corpus/<target>/ (deterministic names)."""
    seeds: dict[str, list[bytes]] = {"connection": [], "session": [], "sasl": SASL_SEEDS}
    for n, script in enumerate(SESSION_SCRIPTS):
        seeds["connection"].append(bytes([n * 37 % 256, 239, n % 4, n]) + script)
        seeds["session"].append(bytes([n, 0, n % 2, n]) + script)
    for target, inputs in seeds.items():
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            (d / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)


def replay(target: str, paths: list[str]) -> None:
    """Run each input file (or every file of a directory) once through *target*."""
    fn = TARGETS[target]
    for p in paths:
        files = sorted(Path(p).iterdir()) if Path(p).is_dir() else [Path(p)]
        for f in files:
            fn(f.read_bytes())
    print(f"replayed {target}: ok", flush=True)


def hypothesis_run(target: str, seconds: float) -> None:
    """The fallback without atheris: hypothesis inputs (random bytes and spliced seeds) for
    *seconds*.  Not coverage-guided; a failure raises with hypothesis's falsifying example."""
    import time

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fn = TARGETS[target]
    seeds = [p.read_bytes() for p in sorted((CORPUS / target).iterdir())]
    spliced = st.tuples(
        st.sampled_from(seeds), st.binary(max_size=64), st.integers(0, 4096), st.integers(0, 4096)
    ).map(lambda t: t[0][: t[2]] + t[1] + t[0][t[3] :])
    inputs = st.one_of(st.binary(max_size=2048), spliced)
    count = 0

    @settings(
        max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(inputs)
    def run(data: bytes) -> None:
        nonlocal count
        count += 1
        fn(data)

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        run()
    print(f"hypothesis: {count} inputs for {target}, no failure", flush=True)


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--hypothesis"]:
        hypothesis_run(argv[2], float(argv[3]))
        return 0
    if argv[1:2] == ["--make-corpus"]:
        make_corpus()
        return 0
    if argv[1:2] == ["--replay"]:
        replay(argv[2], argv[3:])
        return 0
    if len(argv) < 2 or argv[1] not in TARGETS:
        print(__doc__, file=sys.stderr)
        return 2
    if atheris is None:
        print("atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()
    return 0  # pragma: no cover - Fuzz() exits the process


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main(sys.argv))
