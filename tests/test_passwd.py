"""Tests for pop3proto.passwd (Dovecot passwd-file authentication) and ``python -m pop3proto``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import argon2
import bcrypt
import pytest

from pop3proto.__main__ import main
from pop3proto.auth import PlainVerifier, ScramSecret, Verifier, derived_scram_salt
from pop3proto.passwd import (
    HASH_SCHEMES,
    DictAuthenticator,
    HashVerifier,
    PasswdFile,
    ScramVerifier,
    default_secret,
    hash_password,
    sha_crypt,
    user_name_problem,
)
from pop3proto.storage import Authenticator

REPO = Path(__file__).resolve().parents[1]

# Drepper, "Unix crypt using SHA-256 and SHA-512", section "Test vectors".
LONG_TEXT = "a very much longer text to encrypt.  This one even stretches over morethan one line."
SHA_CRYPT_VECTORS = [
    ("$5$saltstring", "Hello world!",
     "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    ("$5$rounds=10000$saltstringsaltstring", "Hello world!",
     "$5$rounds=10000$saltstringsaltst$3xv.VbSHBb41AL9AvLeujZkZRBAwqFMz2.opqey6IcA"),
    ("$5$rounds=5000$toolongsaltstring", "This is just a test",
     "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5"),
    ("$5$rounds=1400$anotherlongsaltstring", LONG_TEXT,
     "$5$rounds=1400$anotherlongsalts$Rx.j8H.h8HjEDGomFU8bDkXm3XIUnzyxf12oP84Bnq1"),
    ("$5$rounds=77777$short", "we have a short salt string but not a short password",
     "$5$rounds=77777$short$JiO1O3ZpDAxGJeaDIuqCoEFysAe1mZNJRs3pw0KQRd/"),
    ("$5$rounds=123456$asaltof16chars..", "a short string",
     "$5$rounds=123456$asaltof16chars..$gP3VQ/6X7UUEW3HkBn2w1/Ptq2jxPyzV/cZKmF/wJvD"),
    ("$5$rounds=10$roundstoolow", "the minimum number is still observed",
     "$5$rounds=1000$roundstoolow$yfvwcWrQ8l/K0DAWyuPMDNHpIVlTQebY9l/gL972bIC"),
    ("$6$saltstring", "Hello world!",
     "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdc"
     "bYEdFCoEOfaS35inz1"),
    ("$6$rounds=10000$saltstringsaltstring", "Hello world!",
     "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0"
     "Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."),
    ("$6$rounds=5000$toolongsaltstring", "This is just a test",
     "$6$rounds=5000$toolongsaltstrin$lQ8jolhgVRVhY4b5pZKaysCLi0QBxGoNeKQzQ3glMhwllF7oGDZx"
     "Uhx1yxdYcz/e1JSbq3y6JMxxl8audkUEm0"),
    ("$6$rounds=1400$anotherlongsaltstring", LONG_TEXT,
     "$6$rounds=1400$anotherlongsalts$POfYwTEok97VWcjxIiSOjiykti.o/pQs.wPvMxQ6Fm7I6IoYN3Cm"
     "Ls66x9t0oSwbtEW7o7UmJEiDwGqd8p4ur1"),
    ("$6$rounds=77777$short", "we have a short salt string but not a short password",
     "$6$rounds=77777$short$WuQyW2YR.hBNpjjRhpYD/ifIw05xdfeEyQoMxIXbkvr0gge1a1x3yRULJ5CCaUe"
     "OxFmtlcGZelFl5CxtgfiAc0"),
    ("$6$rounds=123456$asaltof16chars..", "a short string",
     "$6$rounds=123456$asaltof16chars..$BtCwjqMJGx5hrJhZywWvt0RLE8uZ4oPwcelCjmw2kSYu.Ec6yc"
     "ULevoBK25fs2xXgMNrCzIMVcgEJAstJeonj1"),
    ("$6$rounds=10$roundstoolow", "the minimum number is still observed",
     "$6$rounds=1000$roundstoolow$kUMsbe306n21p9R.FRkW3IGn.S9NPN0x50YhH1xhLsPuWGsUSklZt58j"
     "aTfF4ZEQpyUNGc0dqbpBYYBaHHrsX."),
]  # fmt: skip


def argon2_hash(password: str, kind: argon2.Type = argon2.Type.ID) -> str:
    return argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=kind).hash(
        password
    )


def bcrypt_hash(password: str, prefix: str = "$2b$") -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    return prefix + hashed[4:]


def write(path: Path, text: str) -> Path:
    """Rewrite *path* in place and move its mtime on, so a reload cannot miss it."""
    path.write_text(text, encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    return path


def verifier(auth: PasswdFile | DictAuthenticator, user: str) -> Verifier:
    found = auth.lookup(user)
    assert found is not None, user
    assert found[1] == user  # the mailbox reference is the user name
    return found[0]


# --- SHA-crypt ---------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "password", "expected"), SHA_CRYPT_VECTORS)
def test_sha_crypt_spec_vectors(setting: str, password: str, expected: str) -> None:
    assert sha_crypt(password, setting) == expected
    scheme = "SHA256-CRYPT" if setting.startswith("$5$") else "SHA512-CRYPT"
    v = HashVerifier(scheme, expected)
    assert v.verify(password)
    assert not v.verify(password + "x")


def test_sha_crypt_setting_with_checksum_and_errors() -> None:
    _, password, expected = SHA_CRYPT_VECTORS[0]
    assert sha_crypt(password, expected) == expected  # the old checksum is ignored
    with pytest.raises(ValueError, match="not a SHA-crypt setting"):
        sha_crypt("x", "$1$md5salt$")


@pytest.mark.parametrize(
    "hashed",
    ["", "$6$", "$6$salt", "$6$salt$", "$6$rounds=x$salt$abc", "$6$salt$n\u00f6t-ascii",
     "$6$rounds=99999999999999$salt$abc", "$7$salt$abc", "plain text"],
)  # fmt: skip
def test_sha_crypt_garbage_never_verifies(hashed: str) -> None:
    assert not HashVerifier("SHA512-CRYPT", hashed).verify("")
    assert not HashVerifier("SHA512-CRYPT", hashed).verify("salt")


# --- every scheme through a passwd-file ----------------------------------------------


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    scram = ScramSecret.from_password("scram-pw", b"0123456789abcdef", 4096)
    lines = [
        "# Dovecot passwd-file",
        "",
        "plain:{PLAIN}plain-pw",
        "clear:{CLEAR}clear-pw:1000:1000::/home/clear:/bin/false:userdb_quota_rule=*:storage=1G",
        "cleartext:{cleartext}pw with spaces:::",
        f"argon2id:{{ARGON2ID}}{argon2_hash('argon-pw')}",
        f"argon2i:{{ARGON2I}}{argon2_hash('argon-i-pw', argon2.Type.I)}",
        f"blf2a:{{BLF-CRYPT}}{bcrypt_hash('bcrypt-pw', '$2a$')}",
        f"blf2b:{{BLF-CRYPT}}{bcrypt_hash('bcrypt-pw', '$2b$')}",
        f"blf2y:{{blf-crypt}}{bcrypt_hash('bcrypt-pw', '$2y$')}",
        f"sha512:{{SHA512-CRYPT}}{SHA_CRYPT_VECTORS[7][2]}",
        f"sha256:{{SHA256-CRYPT}}{SHA_CRYPT_VECTORS[0][2]}:1000:1000",
        f"scram:{{SCRAM-SHA-256}}{scram.dovecot()}",
        f"bare6:{SHA_CRYPT_VECTORS[7][2]}",
        f"bare5:{SHA_CRYPT_VECTORS[0][2]}",
        f"bare2y:{bcrypt_hash('bcrypt-pw', '$2y$')}",
        f"bareargon:{argon2_hash('argon-pw')}",
        "   # an indented comment",
        "crlf:{PLAIN}crlf-pw\r",
    ]
    return write(tmp_path / "users", "\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("user", "password"),
    [("plain", "plain-pw"), ("clear", "clear-pw"), ("cleartext", "pw with spaces"),
     ("argon2id", "argon-pw"), ("argon2i", "argon-i-pw"), ("blf2a", "bcrypt-pw"),
     ("blf2b", "bcrypt-pw"), ("blf2y", "bcrypt-pw"), ("sha512", "Hello world!"),
     ("sha256", "Hello world!"), ("scram", "scram-pw"), ("bare6", "Hello world!"),
     ("bare5", "Hello world!"), ("bare2y", "bcrypt-pw"), ("bareargon", "argon-pw"),
     ("crlf", "crlf-pw")],
)  # fmt: skip
def test_every_scheme_verifies(users_file: Path, user: str, password: str) -> None:
    auth = PasswdFile(users_file)
    assert auth.errors == []
    assert auth.exists(user)
    v = verifier(auth, user)
    assert isinstance(v, Verifier)
    assert v.verify(password)
    for wrong in ("", password.upper(), password + " ", password[:-1], "\udcff\udc80"):
        assert not v.verify(wrong)
    if not isinstance(v, PlainVerifier):  # auth.PlainVerifier raises on these (not ours)
        assert not v.verify("\ud800 lone surrogate")


def test_both_are_authenticators(users_file: Path) -> None:
    auths: list[Authenticator] = [PasswdFile(users_file), DictAuthenticator({"u": "pw"})]
    for auth in auths:
        assert isinstance(auth, Authenticator)
        assert auth.lookup("nobody") is None


def test_cleartext_and_scram_per_scheme(users_file: Path) -> None:
    auth = PasswdFile(users_file)
    plain = verifier(auth, "plain")
    assert plain.cleartext() == "plain-pw"
    salt = derived_scram_salt(default_secret(users_file.read_bytes()), "plain")
    assert plain.scram() == ScramSecret.from_password("plain-pw", salt)
    assert plain.scram() is plain.scram()  # derived once
    for user in ("argon2id", "blf2y", "sha512", "bare5"):
        v = verifier(auth, user)
        assert isinstance(v, HashVerifier)
        assert v.cleartext() is None
        assert v.scram() is None
        assert "$" not in repr(v)  # the hash stays out of logs
    scram = verifier(auth, "scram")
    assert scram.cleartext() is None
    assert scram.scram() == ScramSecret.from_password("scram-pw", b"0123456789abcdef", 4096)


def test_dovecot_scram_round_trip() -> None:
    secret = ScramSecret.from_password("pencil", b"\x00salt\xff", 8192)
    auth = DictAuthenticator({"u": "{SCRAM-SHA-256}" + secret.dovecot()})
    v = verifier(auth, "u")
    assert isinstance(v, ScramVerifier)
    assert v.scram() == secret
    assert v.verify("pencil")
    assert not v.verify("pencil2")
    field = hash_password("pencil", "scram-sha-256", rounds=4096)
    assert field.startswith("{SCRAM-SHA-256}4096,")
    keys = verifier(DictAuthenticator({"u": field}), "u").scram()
    assert keys is not None
    assert keys.dovecot() == field.removeprefix("{SCRAM-SHA-256}")
    assert keys == ScramSecret.from_password("pencil", keys.salt, 4096)


@pytest.mark.parametrize(
    "value",
    ["4096,c2FsdA==,AAAA,AAAA", "x,c2FsdA==,a,b", "4096,c2FsdA==", "0,c2FsdA==,{k},{k}",
     "4096,!!!,{k},{k}", "4096,,{k},{k}"],
)  # fmt: skip
def test_malformed_scram_is_reported(value: str) -> None:
    key = "A" * 43 + "="
    auth = DictAuthenticator({"u": "{SCRAM-SHA-256}" + value.format(k=key), "ok": "pw"})
    assert auth.errors == ["users['u']: malformed {SCRAM-SHA-256} value"]
    assert auth.lookup("u") is None
    assert verifier(auth, "ok").verify("pw")


@pytest.mark.parametrize(
    ("scheme", "hashed"),
    [("BLF-CRYPT", "$2b$04$short"), ("BLF-CRYPT", "$2b$04$" + "\u00e9" * 53),
     ("BLF-CRYPT", "$2b$99$" + "a" * 53), ("ARGON2ID", "$argon2id$garbage"),
     ("ARGON2ID", "$argon2id$v=19$m=8,t=1,p=1$!!!$!!!"), ("ARGON2I", "")],
)  # fmt: skip
def test_garbage_hashes_fail_without_raising(scheme: str, hashed: str) -> None:
    assert not HashVerifier(scheme, hashed).verify("anything")


def test_long_bcrypt_password_uses_72_bytes() -> None:
    password = "x" * 100
    v = verifier(DictAuthenticator({"u": hash_password(password, "BLF-CRYPT", rounds=4)}), "u")
    assert v.verify(password)
    assert v.verify("x" * 72 + "different tail")
    assert not v.verify("x" * 71)


# --- malformed lines and hostile names -----------------------------------------------


def test_malformed_lines_are_reported_and_others_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path / "users",
        "good:{PLAIN}pw\n"
        "nopassword\n"
        "empty::1000\n"
        "# comment\n"
        ":{PLAIN}nobody\n"
        "\n"
        "md9:{MD9}abc\n"
        "brace:{PLAIN\n"
        "bare:justtext\n"
        "badsha:{SHA512-CRYPT}$5$salt$abc\n"
        "badblf:{BLF-CRYPT}$2y$05$tooshort\n"
        "badargon:{ARGON2ID}$6$salt$abc\n"
        "emptyplain:{PLAIN}\n"
        "good:{PLAIN}second\n"
        "also-good:{SHA256-CRYPT}" + SHA_CRYPT_VECTORS[0][2] + "\n",
    )
    with caplog.at_level(logging.WARNING, logger="pop3proto.passwd"):
        auth = PasswdFile(path)
    p = str(path)
    assert auth.errors == [
        f"{p}:2: no password for user 'nopassword'",
        f"{p}:3: no password for user 'empty'",
        f"{p}:5: empty user name",
        f"{p}:7: unknown scheme {{MD9}}",
        f"{p}:8: unterminated {{SCHEME}} prefix",
        f"{p}:9: password without a {{SCHEME}} prefix is not a recognised hash",
        f"{p}:10: malformed {{SHA512-CRYPT}} hash",
        f"{p}:11: malformed {{BLF-CRYPT}} hash",
        f"{p}:12: malformed {{ARGON2ID}} hash",
        f"{p}:13: empty password",
        f"{p}:14: duplicate user 'good' (the entry at {p}:1 is used)",
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == auth.errors
    assert verifier(auth, "good").verify("pw")
    assert not verifier(auth, "good").verify("second")
    assert verifier(auth, "also-good").verify("Hello world!")
    for user in ("nopassword", "empty", "", "md9", "brace", "bare", "badsha", "emptyplain"):
        assert auth.lookup(user) is None
        assert not auth.exists(user)


def test_errors_use_the_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "users", "a:{PLAIN}x\n" * 6 + "b:{MD9}abc\n")
    monkeypatch.chdir(tmp_path)
    assert PasswdFile("users").errors[-1] == "users:7: unknown scheme {MD9}"


HOSTILE = ["..", "../etc", "a/../b", "a/b", "/abs", "a\\b", "..\\x", ".hidden", ".", "a..b",
           "nul\x00", "tab\tname", "bell\x07", "del\x7f", "c1\x85", "x" * 256, "\u00e9" * 128,
           "bad\udcffutf8"]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_user_names_are_rejected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"ok:{PLAIN}pw\n" + name.encode("utf-8", "surrogateescape") + b":{PLAIN}pw\n")
    with caplog.at_level(logging.WARNING, logger="pop3proto.passwd"):
        auth = PasswdFile(path)
    assert len(auth.errors) == 1
    assert auth.errors[0].startswith(f"{path}:2: ")
    assert any(f"{path}:2:" in r.getMessage() for r in caplog.records)
    assert auth.lookup(name) is None
    assert not auth.exists(name)
    assert verifier(auth, "ok").verify("pw")
    assert user_name_problem(name) is not None
    dict_auth = DictAuthenticator({name: "pw"})
    assert dict_auth.lookup(name) is None
    assert dict_auth.errors == [f"users[{name!r}]: {user_name_problem(name)}"]


@pytest.mark.parametrize("name", ["alice", "a.b", "x" * 255, "\u00e9" * 127, "user@example.org",
                                  "Ünïcödé", "a b", "a-b_c+d"])  # fmt: skip
def test_ordinary_user_names_are_accepted(name: str) -> None:
    assert user_name_problem(name) is None
    assert verifier(DictAuthenticator({name: "pw"}), name).verify("pw")
    assert user_name_problem(name + ":x") is not None


# --- reloading and unreadable files --------------------------------------------------


def test_reload_when_the_file_changes(tmp_path: Path) -> None:
    path = write(tmp_path / "users", "alice:{PLAIN}one\nbob:{PLAIN}two\n")
    auth = PasswdFile(path)
    assert verifier(auth, "alice").verify("one")
    write(path, "alice:{PLAIN}uno\ncarol:{MD9}x\n")  # same inode, new mtime
    assert verifier(auth, "alice").verify("uno")
    assert not auth.exists("bob")
    assert auth.errors == [f"{path}:2: unknown scheme {{MD9}}"]
    write(path, "alice:{PLAIN}ONE\n")  # the same size as the first version
    assert verifier(auth, "alice").verify("ONE")
    assert auth.errors == []
    replacement = tmp_path / "users.new"
    replacement.write_text("dave:{PLAIN}four\n")
    os.replace(replacement, path)  # a new inode, as editors and doveadm do
    assert auth.exists("dave")
    assert not auth.exists("alice")


def test_unchanged_file_is_not_reread(tmp_path: Path) -> None:
    path = write(tmp_path / "users", "alice:{PLAIN}one\n")
    auth = PasswdFile(path)
    first = verifier(auth, "alice")
    assert verifier(auth, "alice") is first


def test_missing_file_keeps_the_last_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "users", "alice:{PLAIN}one\n")
    auth = PasswdFile(path)
    path.unlink()
    with caplog.at_level(logging.INFO, logger="pop3proto.passwd"):
        assert verifier(auth, "alice").verify("one")
        assert auth.exists("alice")
        assert not auth.exists("bob")
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1  # once, not on every call
        assert str(path) in errors[0].getMessage()
        write(path, "bob:{PLAIN}two\n")
        assert auth.exists("bob")
        assert not auth.exists("alice")
    assert any("readable again" in r.getMessage() for r in caplog.records)


def test_file_replaced_by_a_directory_keeps_the_last_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "users", "alice:{PLAIN}one\n")
    auth = PasswdFile(path)
    path.unlink()
    path.mkdir()
    with caplog.at_level(logging.ERROR, logger="pop3proto.passwd"):
        assert verifier(auth, "alice").verify("one")
        assert verifier(auth, "alice").verify("one")
    assert len(caplog.records) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file_keeps_the_last_table(tmp_path: Path) -> None:
    path = write(tmp_path / "users", "alice:{PLAIN}one\n")
    auth = PasswdFile(path)
    write(path, "alice:{PLAIN}two\n")
    path.chmod(0)
    try:
        assert verifier(auth, "alice").verify("one")
    finally:
        path.chmod(0o600)
    assert verifier(auth, "alice").verify("two")


def test_constructor_raises_for_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        PasswdFile(tmp_path / "nope")


# --- dummy verifier ------------------------------------------------------------------


def test_dummy_verifier_copies_the_dearest_scheme_and_cost(tmp_path: Path) -> None:
    sha = [hash_password(f"pw{i}", "SHA512-CRYPT", rounds=r) for i, r in
           enumerate([1000, 1000, 2000])]  # fmt: skip
    lines = [f"s{i}:{h}" for i, h in enumerate(sha)] + ["p1:{PLAIN}a", "p2:{PLAIN}b"]
    path = write(tmp_path / "users", "\n".join(lines) + "\n")
    auth = PasswdFile(path)
    dummy = auth.dummy_verifier()
    assert isinstance(dummy, HashVerifier)
    assert dummy.scheme == "SHA512-CRYPT"
    assert dummy.hashed.startswith("$6$rounds=2000$")  # the dearest, not the most common
    assert dummy.cleartext() is None
    for password in ("pw0", "pw1", "pw2", "a", "b", ""):
        assert not dummy.verify(password)
    assert auth.dummy_verifier() is dummy  # cached until the file changes
    write(path, "p1:{PLAIN}a\n")
    plain_dummy = auth.dummy_verifier()
    assert isinstance(plain_dummy, PlainVerifier)
    assert plain_dummy.cleartext() not in ("a", "", None)


@pytest.mark.parametrize(
    ("entries", "scheme", "marker"),
    [({}, "SHA512-CRYPT", "$6$"),
     ({"u": hash_password("pw", "SHA256-CRYPT")}, "SHA256-CRYPT", "$5$"),
     ({"u": "{BLF-CRYPT}" + bcrypt_hash("pw", "$2y$")}, "BLF-CRYPT", "$2y$04$"),
     ({"u": "{ARGON2ID}" + argon2_hash("pw")}, "ARGON2ID", "$argon2id$v=19$m=8,t=1,p=1$"),
     ({"u": "{ARGON2I}" + argon2_hash("pw", argon2.Type.I)}, "ARGON2I", "$argon2i$v=19$m=8")],
)  # fmt: skip
def test_dummy_verifier_per_scheme(entries: dict[str, str], scheme: str, marker: str) -> None:
    dummy = DictAuthenticator(entries).dummy_verifier()
    assert isinstance(dummy, HashVerifier)
    assert dummy.scheme == scheme
    assert dummy.hashed.startswith(marker)
    assert not dummy.verify("pw")
    if scheme.startswith("ARGON2"):  # a well-formed hash: the library does the full work
        with pytest.raises(argon2.exceptions.VerifyMismatchError):
            argon2.PasswordHasher().verify(dummy.hashed, "pw")
    if scheme == "BLF-CRYPT":
        assert not bcrypt.checkpw(b"pw", dummy.hashed.encode())
    if not entries:
        assert "rounds=" not in dummy.hashed


def test_dummy_verifier_for_scram() -> None:
    secret = ScramSecret.from_password("pw", b"salt", 5000)
    dummy = DictAuthenticator({"u": "{SCRAM-SHA-256}" + secret.dovecot()}).dummy_verifier()
    assert isinstance(dummy, ScramVerifier)
    keys = dummy.scram()
    assert keys is not None
    assert keys.iterations == 5000
    assert not dummy.verify("pw")


# --- missing hash libraries ----------------------------------------------------------


def test_missing_libraries_fail_verification_and_log_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path / "users",
        f"a1:{{ARGON2ID}}{argon2_hash('pw')}\n"
        f"a2:{{ARGON2ID}}{argon2_hash('pw')}\n"
        f"b1:{{BLF-CRYPT}}{bcrypt_hash('pw')}\n"
        "p:{PLAIN}pw\n",
    )
    monkeypatch.setitem(sys.modules, "argon2", None)
    monkeypatch.setitem(sys.modules, "bcrypt", None)
    with caplog.at_level(logging.ERROR, logger="pop3proto.passwd"):
        auth = PasswdFile(path)
        assert not verifier(auth, "a1").verify("pw")
        assert not verifier(auth, "b1").verify("pw")
        assert verifier(auth, "p").verify("pw")
    messages = sorted(r.getMessage() for r in caplog.records)
    assert messages == [
        f"{path}: 1 {{BLF-CRYPT}} entries can never log in: bcrypt is not installed",
        f"{path}: 2 {{ARGON2ID}} entries can never log in: argon2-cffi is not installed",
    ]
    assert auth.errors == []
    with pytest.raises(RuntimeError, match="argon2-cffi"):
        hash_password("pw", "ARGON2ID")
    with pytest.raises(RuntimeError, match="bcrypt"):
        hash_password("pw", "BLF-CRYPT")


# --- hash_password and DictAuthenticator ---------------------------------------------

FAST_ROUNDS = {"BLF-CRYPT": 4, "ARGON2ID": 1, "ARGON2I": 1, "SHA512-CRYPT": 1000}


@pytest.mark.parametrize("scheme", HASH_SCHEMES)
def test_hash_password_round_trip(scheme: str) -> None:
    password = "s\u00e9cr\u00eat \U0001f511"
    field = hash_password(password, scheme.lower(), rounds=FAST_ROUNDS.get(scheme))
    assert field.startswith("{" + scheme + "}")
    v = verifier(DictAuthenticator({"u": field}), "u")
    assert v.verify(password)
    assert not v.verify(password[:-1])
    assert field != hash_password(password, scheme, rounds=FAST_ROUNDS.get(scheme)) or (
        scheme == "PLAIN"
    )


def test_hash_password_formats() -> None:
    assert hash_password("pw", "PLAIN") == "{PLAIN}pw"
    assert hash_password("pw").startswith("{SHA512-CRYPT}$6$")
    assert "rounds" not in hash_password("pw", "SHA256-CRYPT")
    sha256 = hash_password("pw", "SHA256-CRYPT", rounds=2000)
    assert sha256.startswith("{SHA256-CRYPT}$5$rounds=2000$")
    assert hash_password("pw", "BLF-CRYPT", rounds=4).startswith("{BLF-CRYPT}$2y$04$")
    assert ",t=2," in hash_password("pw", "ARGON2ID", rounds=2)


@pytest.mark.parametrize(
    ("args", "message"),
    [(("pw", "MD5"), "unknown scheme"), (("a:b", "PLAIN"), "PLAIN"), (("a\nb", "PLAIN"), "PLAIN")],
)
def test_hash_password_errors(args: tuple[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hash_password(*args)
    with pytest.raises(ValueError, match="PLAIN"):
        hash_password("pw", "PLAIN", rounds=5)


def test_dict_authenticator() -> None:
    auth = DictAuthenticator(
        {"alice": "wonderland", "bob": hash_password("builder", rounds=1000),
         "carol": "{MD9}x", "dave": "$6$looks-like-a-hash"}
    )  # fmt: skip
    assert verifier(auth, "alice").verify("wonderland")
    assert verifier(auth, "alice").cleartext() == "wonderland"
    assert verifier(auth, "bob").verify("builder")
    assert verifier(auth, "dave").verify("$6$looks-like-a-hash")  # no braces: plain
    assert auth.errors == ["users['carol']: unknown scheme {MD9}"]
    assert auth.lookup("carol") is None
    assert auth.lookup("eve") is None
    assert not auth.exists("eve")


# --- python -m pop3proto passwd --------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "pop3proto", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_cli_prints_a_hash_that_verifies(tmp_path: Path) -> None:
    result = run_cli("passwd", "-s", "SHA512-CRYPT", "-p", "secret")
    assert result.returncode == 0, result.stderr
    field = result.stdout.strip()
    assert field.startswith("{SHA512-CRYPT}$6$")
    assert verifier(DictAuthenticator({"u": field}), "u").verify("secret")
    result = run_cli("passwd", "-s", "scram-sha-256", "-u", "bob", "-p", "secret")
    assert result.returncode == 0, result.stderr
    path = write(tmp_path / "users", result.stdout)
    assert result.stdout.startswith("bob:{SCRAM-SHA-256}")
    assert verifier(PasswdFile(path), "bob").verify("secret")


def test_cli_bad_scheme_exits_2() -> None:
    result = run_cli("passwd", "-s", "MD9", "-p", "secret")
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "unknown scheme 'MD9'" in result.stderr


def test_cli_prompts_twice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter(["secret", "secret"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert main(["passwd", "-s", "sha256-crypt", "-u", "alice"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("alice:{SHA256-CRYPT}$5$")
    assert verifier(DictAuthenticator({"alice": out.strip().split(":", 1)[1]}), "alice").verify(
        "secret"
    )


@pytest.mark.parametrize(
    ("answers", "argv", "status", "message"),
    [(["one", "two"], [], 2, "passwords don't match"),
     (["", ""], [], 2, "empty password"),
     ([], ["-p", "x", "-u", "../root"], 2, "unsafe user name"),
     ([], ["-p", "x", "-s", "BLF-CRYPT", "-r", "99"], 2, "rounds"),
     ([], ["-p", "a:b", "-s", "PLAIN"], 2, "PLAIN"),
     ([], ["-p", "x", "-s", "des"], 2, "unknown scheme 'des'")],
)  # fmt: skip
def test_cli_errors(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answers: list[str],
    argv: list[str],
    status: int,
    message: str,
) -> None:
    replies = iter(answers)
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(replies))
    assert main(["passwd", *argv]) == status
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err
    assert len(captured.err.splitlines()) == 1


def test_cli_missing_library(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "bcrypt", None)
    assert main(["passwd", "-s", "BLF-CRYPT", "-p", "x"]) == 1
    assert "pip install 'pop3proto[hashes]'" in capsys.readouterr().err  # names the extra


def test_cli_no_password_on_eof(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("getpass.getpass", eof)
    assert main(["passwd"]) == 2
    assert "no password" in capsys.readouterr().err


def test_cli_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err
