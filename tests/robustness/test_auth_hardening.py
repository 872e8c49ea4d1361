"""Issue 15, findings 3, 5, 9, 12 and 15 at the authenticator level (no server).

What a facade gets from ``PasswdFile``/``DictAuthenticator`` (and
``PgAuthenticator``, against a throwaway PostgreSQL when one can be
started): decoy SCRAM keys per unknown name that are stable and look like a
real user's, per-user salts for ``{PLAIN}`` users, a dummy verifier of the
dearest scheme, a bound on password length, cost bounds and a byte order
mark in a passwd-file, and database failures that raise rather than answer
"unknown user".  How long things take is printed by ``bench/auth_costs.py``,
not asserted here.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pop3proto.auth
from pop3proto.auth import PlainVerifier, ScramSecret
from pop3proto.passwd import (
    DictAuthenticator,
    HashVerifier,
    PasswdFile,
    ScramVerifier,
    hash_password,
    parse_secret,
)
from pop3proto.storage import StorageError

# Looked up softly so that, before the bound existed, each test fails on its own.
MAX_PASSWORD_OCTETS: int = getattr(pop3proto.auth, "MAX_PASSWORD_OCTETS", 1024)
SCRAM_5000 = ScramSecret.from_password("s-pw", b"0123456789abcdef", 5000).dovecot()


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


def mixed_file(tmp_path: Path) -> Path:
    """Mostly SCRAM users (5000 iterations), two {PLAIN} users, one dear SHA512-CRYPT user."""
    lines = [f"scram{i}:{{SCRAM-SHA-256}}{SCRAM_5000}" for i in range(3)]
    lines += ["plain1:{PLAIN}one", "plain2:{PLAIN}two"]
    lines.append("sha:" + hash_password("sha-pw", "SHA512-CRYPT", rounds=20000))
    return write(tmp_path / "users", "\n".join(lines) + "\n")


# --- finding 3: SCRAM decoys and the salts of {PLAIN} users ------------------------------


def test_decoy_salts_differ_per_name_and_survive_a_restart(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    auth = PasswdFile(path)
    assert auth.lookup("mallory") is None
    decoys = {name: auth.decoy_scram(name) for name in ("mallory", "trudy", "eve", "x" * 200)}
    assert len({d.salt for d in decoys.values()}) == 4
    assert len({d.stored_key for d in decoys.values()}) == 4
    # The same name, asked again or by another process over the same file: the same answer.
    restarted = PasswdFile(path)
    for name, decoy in decoys.items():
        assert auth.decoy_scram(name) == decoy
        assert restarted.decoy_scram(name) == decoy
    # As long as a real user's salt, with the iteration count most real users have.
    real = auth.lookup("scram0")
    assert real is not None
    keys = real[0].scram()
    assert keys is not None
    for decoy in decoys.values():
        assert len(decoy.salt) == 16
        assert decoy.iterations == keys.iterations == 5000
        assert not ScramVerifier(decoy).verify("")


def test_plain_users_get_their_own_salt_like_a_decoy(tmp_path: Path) -> None:
    auth = PasswdFile(mixed_file(tmp_path))
    salts = []
    for name in ("plain1", "plain2"):
        found = auth.lookup(name)
        assert found is not None
        keys = found[0].scram()
        assert keys is not None
        assert keys is found[0].scram()  # derived once, then as cheap as a stored key
        assert len(keys.salt) == 16
        salts.append(keys.salt)
    assert salts[0] != salts[1]
    assert auth.decoy_scram("plain3").salt not in salts


def test_an_explicit_secret_fixes_the_salts_whatever_the_file_says(tmp_path: Path) -> None:
    one = PasswdFile(write(tmp_path / "a", "alice:{PLAIN}x\n"), secret=b"s" * 32)
    two = PasswdFile(write(tmp_path / "b", "alice:{PLAIN}y\nbob:{PLAIN}z\n"), secret=b"s" * 32)
    assert one.decoy_scram("eve") == two.decoy_scram("eve")
    a1, a2 = one.lookup("alice"), two.lookup("alice")
    assert a1 is not None
    assert a2 is not None
    assert a1[0].scram().salt == a2[0].scram().salt  # type: ignore[union-attr]
    # The default secret is a hash of the contents: another file, other salts.
    default_a, default_b = PasswdFile(tmp_path / "a"), PasswdFile(tmp_path / "b")
    assert default_a.decoy_scram("eve") != default_b.decoy_scram("eve")
    same = DictAuthenticator({"u": "pw"}), DictAuthenticator({"u": "pw"})
    assert same[0].decoy_scram("eve") == same[1].decoy_scram("eve")


# --- finding 9: the dummy costs what the dearest real user does ---------------------------


def test_dummy_verifier_has_the_dearest_scheme_not_the_usual_one(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    dummy = PasswdFile(path).dummy_verifier()
    assert isinstance(dummy, HashVerifier)
    assert dummy.scheme == "SHA512-CRYPT"
    assert dummy.hashed.startswith("$6$rounds=20000$")
    assert not dummy.verify("sha-pw")
    # Without the SHA-crypt user, the SCRAM users are the dearest.
    write(path, "\n".join(path.read_text().splitlines()[:-1]) + "\n")
    dummy = PasswdFile(path).dummy_verifier()
    assert isinstance(dummy, ScramVerifier)
    assert dummy.secret.iterations == 5000


# --- finding 5: bounded password length ----------------------------------------------------


@pytest.mark.parametrize("scheme", ["PLAIN", "SHA512-CRYPT", "SHA256-CRYPT", "SCRAM-SHA-256",
                                    "BLF-CRYPT", "ARGON2ID"])  # fmt: skip
def test_a_password_over_the_bound_fails_even_when_right(scheme: str) -> None:
    fast = {"BLF-CRYPT": 4, "ARGON2ID": 1, "SHA512-CRYPT": 1000, "SHA256-CRYPT": 1000}
    at_bound = "a" * MAX_PASSWORD_OCTETS
    over = "a" * (MAX_PASSWORD_OCTETS + 1)
    for password, expected in ((at_bound, True), (over, False)):
        field = hash_password(password, scheme, rounds=fast.get(scheme))
        found = DictAuthenticator({"u": field}).lookup("u")
        assert found is not None
        # bcrypt reads 72 bytes: before the bound, any long password with the same
        # first 72 bytes was accepted.
        assert found[0].verify(password) is expected, (scheme, len(password))
    auth = DictAuthenticator({"u": hash_password("é" * 600, scheme, rounds=fast.get(scheme))})
    assert not auth.lookup("u")[0].verify("é" * 600)  # type: ignore[index]  # 1200 octets


# --- finding 15: byte order mark, cost bounds ----------------------------------------------


def test_byte_order_mark_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"\xef\xbb\xbfalice:{PLAIN}pw\nbob:{PLAIN}pw2\n")
    with caplog.at_level(logging.WARNING, logger="pop3proto.passwd"):
        auth = PasswdFile(path)
    found = auth.lookup("alice")
    assert found is not None
    assert found[0].verify("pw")
    assert auth.lookup("\ufeffalice") is None
    assert auth.errors == []
    assert f"{path}:1: UTF-8 byte order mark ignored" in caplog.text


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        ("{SCRAM-SHA-256}" + ScramSecret.from_password("pw", b"salt", 1).dovecot(),
         "{SCRAM-SHA-256} iteration count 1 is outside 4096..1000000"),
        ("{SCRAM-SHA-256}" + ScramSecret.from_password("pw", b"salt", 4095).dovecot(),
         "{SCRAM-SHA-256} iteration count 4095 is outside 4096..1000000"),
        ("{SCRAM-SHA-256}1000001," + ScramSecret.from_password("pw", b"s", 4096).dovecot()
         .split(",", 1)[1], "{SCRAM-SHA-256} iteration count 1000001 is outside"),
        ("{SHA512-CRYPT}$6$rounds=999999999$salt$" + "a" * 86,
         "{SHA512-CRYPT} rounds 999999999 is outside 1000..1000000"),
        ("{SHA256-CRYPT}$5$rounds=10$salt$" + "a" * 43,
         "{SHA256-CRYPT} rounds 10 is outside 1000..1000000"),
        ("$6$rounds=1000001$salt$" + "a" * 86, "{SHA512-CRYPT} rounds 1000001 is outside"),
        ("{BLF-CRYPT}$2y$17$" + "a" * 53, "{BLF-CRYPT} cost 17 is outside 4..16"),
        ("{ARGON2ID}$argon2id$v=19$m=2097152,t=1,p=1$c2FsdHNhbHQ$" + "a" * 43,
         "{ARGON2ID} memory (KiB) 2097152 is outside 8..1048576"),
        ("{ARGON2ID}$argon2id$v=19$m=8,t=65,p=1$c2FsdHNhbHQ$" + "a" * 43,
         "{ARGON2ID} time cost 65 is outside 1..64"),
    ],
    ids=["scram-i1", "scram-i4095", "scram-i1000001", "sha512-rounds999999999",
         "sha256-rounds10", "bare-sha512-rounds1000001", "bcrypt-17", "argon2-2GiB", "argon2-t65"],
)  # fmt: skip
def test_cost_parameters_out_of_bounds_are_refused_with_the_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, problem: str
) -> None:
    path = write(tmp_path / "users", f"# users\nok:{{PLAIN}}pw\nbad:{field}\n")
    with caplog.at_level(logging.WARNING, logger="pop3proto.passwd"):
        auth = PasswdFile(path)
    assert auth.lookup("bad") is None
    assert len(auth.errors) == 1
    assert auth.errors[0].startswith(f"{path}:3: {problem}")
    assert f"{path}:3: {problem}" in caplog.text
    assert auth.lookup("ok") is not None


def test_cost_parameters_at_the_bounds_are_accepted() -> None:
    for field in (
        "{SCRAM-SHA-256}" + ScramSecret.from_password("pw", b"salt", 4096).dovecot(),
        "{SHA512-CRYPT}$6$rounds=1000$salt$" + "a" * 86,
        "{SHA512-CRYPT}$6$rounds=1000000$salt$" + "a" * 86,
        "{SHA512-CRYPT}$6$salt$" + "a" * 86,  # the default, 5000
        "{BLF-CRYPT}$2y$16$" + "a" * 53,
    ):
        assert not isinstance(parse_secret(field, bare_is_plain=False), str), field


def test_hash_password_refuses_what_a_passwd_file_would() -> None:
    with pytest.raises(ValueError, match=r"4096\.\.1000000"):
        hash_password("pw", "SCRAM-SHA-256", rounds=1)
    with pytest.raises(ValueError, match=r"1000\.\.1000000"):
        hash_password("pw", "SHA512-CRYPT", rounds=999)  # cheap if it were computed


def test_plain_verifier_type_is_unchanged_for_callers() -> None:
    found = DictAuthenticator({"u": "pw"}).lookup("u")
    assert found is not None
    assert isinstance(found[0], PlainVerifier)


# --- finding 12 and the decoys of PgAuthenticator -------------------------------------------


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[object]:
    pytest.importorskip("psycopg")
    pytest.importorskip("psycopg_pool")
    import pgserver

    if pgserver.find_bindir() is None:
        pytest.skip("PostgreSQL server binaries are not installed")
    try:
        cluster = pgserver.PgCluster.start()
    except pgserver.PgUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_db(pg_cluster: Any) -> str:
    from pop3proto.pgstore import migrate

    conninfo: str = pg_cluster.createdb(f"hardening_{os.getpid()}_{next(_dbs)}")
    migrate(conninfo)
    return conninfo


_dbs = itertools.count(1)


def test_pg_decoys_and_plain_salts(pg_db: str) -> None:
    from pop3proto.pgstore import PgAuthenticator, add_user

    add_user(pg_db, "plain1", "{PLAIN}one")
    add_user(pg_db, "plain2", "{PLAIN}two")
    add_user(pg_db, "scram", "{SCRAM-SHA-256}" + SCRAM_5000)
    add_user(pg_db, "scram2", "{SCRAM-SHA-256}" + SCRAM_5000)
    add_user(pg_db, "scram3", "{SCRAM-SHA-256}" + SCRAM_5000)
    with PgAuthenticator(pg_db, cache_ttl=0) as auth, PgAuthenticator(pg_db) as other:
        assert auth.lookup("mallory") is None
        decoy = auth.decoy_scram("mallory")
        assert decoy == auth.decoy_scram("mallory") == other.decoy_scram("mallory")
        assert decoy.salt != auth.decoy_scram("trudy").salt
        assert decoy.iterations == 5000  # what most users have
        assert len(decoy.salt) == 16
        keys = []
        for name in ("plain1", "plain2"):
            found = auth.lookup(name)
            assert found is not None
            first = found[0].scram()
            assert first is not None
            assert len(first.salt) == 16
            again = auth.lookup(name)
            assert again is not None
            assert again[0].scram() is first  # derived once per user, not per login
            keys.append(first)
        assert keys[0].salt != keys[1].salt
        assert auth.decoy_scram("plain1").salt == keys[0].salt  # the same derivation


def test_pg_dummy_is_the_dearest_within_bounds(pg_db: str) -> None:
    from pop3proto.pgstore import PgAuthenticator, add_user

    for i in range(3):
        add_user(pg_db, f"scram{i}", "{SCRAM-SHA-256}" + SCRAM_5000)
    add_user(pg_db, "sha", hash_password("pw", "SHA512-CRYPT", rounds=20000))
    add_user(pg_db, "bare", hash_password("pw", "SHA256-CRYPT").removeprefix("{SHA256-CRYPT}"))
    import psycopg

    evil = "{SHA512-CRYPT}$6$rounds=999999999$salt$" + "a" * 86
    with psycopg.connect(pg_db, autocommit=True) as conn:  # add_user refuses such a line
        for name in ("evil1", "evil2", "evil3", "evil4"):  # lookup too: no model for a dummy
            conn.execute("INSERT INTO users VALUES (%s, %s)", (name, evil))
    with PgAuthenticator(pg_db) as auth:
        assert auth.lookup("evil1") is None
        dummy = auth.dummy_verifier()
        assert isinstance(dummy, HashVerifier)
        assert dummy.scheme == "SHA512-CRYPT"
        assert dummy.hashed.startswith("$6$rounds=20000$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_pg_lookup_raises_when_the_database_is_down() -> None:
    pytest.importorskip("psycopg_pool")
    from pop3proto.pgstore import PgAuthenticator

    dead = f"host=127.0.0.1 port={free_port()} dbname=x user=x connect_timeout=2"
    with PgAuthenticator(dead, timeout=0.5, min_size=0) as auth:
        with pytest.raises(StorageError):
            auth.lookup("alice")
        with pytest.raises(StorageError):
            auth.exists("alice")
        # The summary never raises: the defaults stand in.
        assert not auth.has_cleartext
        assert not auth.has_scram
        assert isinstance(auth.dummy_verifier(), HashVerifier)
        assert auth.decoy_scram("alice") == auth.decoy_scram("alice")


def test_pg_summary_does_not_wait_for_a_hung_database() -> None:
    """A server that accepts TCP and never answers: the flags answer, lookup raises."""
    pytest.importorskip("psycopg_pool")
    from pop3proto.pgstore import PgAuthenticator

    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # connections complete in the backlog; nothing is ever read
        conninfo = f"host=127.0.0.1 port={hung.getsockname()[1]} dbname=x connect_timeout=3"
        auth = PgAuthenticator(conninfo, timeout=30, min_size=0)
        try:
            answers: list[object] = []

            def ask() -> None:
                answers.extend([auth.has_cleartext, auth.has_scram, auth.dummy_verifier(),
                                auth.decoy_scram("x")])  # fmt: skip

            asker = threading.Thread(target=ask, daemon=True)
            asker.start()
            # Not a speed measurement: the pool waits 30 s for a connection, the
            # summary answers from its defaults (after at most refresh_wait).
            asker.join(timeout=10)
            assert not asker.is_alive()
            assert answers[:2] == [False, False]
        finally:
            hung.close()
            auth.close()
