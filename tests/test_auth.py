"""Credential helpers against the RFCs' own examples."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
import replies as R

from pop3proto.auth import (
    MAX_PASSWORD_OCTETS,
    PlainVerifier,
    ScramSecret,
    Verifier,
    apop_digest,
    cram_md5_digest,
    decoy_scram,
    derived_scram_salt,
    make_apop_timestamp,
    password_too_long,
    verify_apop,
)


def test_apop_digest_rfc1939_example() -> None:
    assert R.RFC_TIMESTAMP == "<1896.697170952@dbc.mtview.ca.us>"
    assert apop_digest(R.RFC_TIMESTAMP, R.RFC_SECRET) == R.RFC_DIGEST
    assert R.RFC_DIGEST == "c4c9334bac560ecc979e58001b3e22fb"


@pytest.mark.parametrize(
    ("timestamp", "secret", "digest", "ok"),
    [
        (R.RFC_TIMESTAMP, R.RFC_SECRET, R.RFC_DIGEST, True),
        (R.RFC_TIMESTAMP, R.RFC_SECRET, R.RFC_DIGEST.upper(), True),
        (R.RFC_TIMESTAMP, "tanstaa", R.RFC_DIGEST, False),
        ("<1896.697170953@dbc.mtview.ca.us>", R.RFC_SECRET, R.RFC_DIGEST, False),
        (R.RFC_TIMESTAMP, R.RFC_SECRET, R.RFC_DIGEST[:-1], False),
        (R.RFC_TIMESTAMP, R.RFC_SECRET, "", False),
        (R.RFC_TIMESTAMP, R.RFC_SECRET, "é" * 32, False),
        (R.RFC_TIMESTAMP, R.RFC_SECRET, "\ud800" * 32, False),
    ],
)
def test_verify_apop(timestamp: str, secret: str, digest: str, ok: bool) -> None:
    assert verify_apop(timestamp, secret, digest) is ok


def test_apop_secret_encodings() -> None:
    ts = "<1.2@h>"
    assert apop_digest(ts, "pässword") == hashlib.md5(ts.encode() + "pässword".encode()).hexdigest()
    # Undecodable octets (surrogate escapes) count as the octets they stand for...
    escaped = b"\xff\xfe".decode("utf-8", "surrogateescape")
    assert apop_digest(ts, escaped) == hashlib.md5(ts.encode() + b"\xff\xfe").hexdigest()
    # ...and a lone surrogate that is no escape still gives a digest instead of an error.
    assert apop_digest(ts, "\ud800") == hashlib.md5(ts.encode() + b"\xed\xa0\x80").hexdigest()


def test_make_apop_timestamp() -> None:
    assert make_apop_timestamp(1896, 697170952.9, 255, "dbc.mtview.ca.us") == (
        "<1896.697170952.ff@dbc.mtview.ca.us>"
    )


def test_cram_md5_rfc2195_example() -> None:
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    assert cram_md5_digest(challenge, "tanstaaftanstaaf") == "b913a602c7eda7a495b4e6e7334d3890"


# RFC 7677 section 3: SCRAM-SHA-256 for user "user", password "pencil".
SCRAM_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
SCRAM_AUTH_MESSAGE = (
    b"n=user,r=rOprNGfwEbeRWgbNEkqO,"
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
)
SCRAM_PROOF = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
SCRAM_SERVER_SIGNATURE = base64.b64decode("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_scram_secret_rfc7677_example() -> None:
    secret = ScramSecret.from_password("pencil", SCRAM_SALT, 4096)
    assert secret.salt == SCRAM_SALT
    assert secret.iterations == 4096
    server_sig = hmac.new(secret.server_key, SCRAM_AUTH_MESSAGE, hashlib.sha256).digest()
    assert server_sig == SCRAM_SERVER_SIGNATURE
    client_sig = hmac.new(secret.stored_key, SCRAM_AUTH_MESSAGE, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(SCRAM_PROOF, client_sig, strict=True))
    assert hashlib.sha256(client_key).digest() == secret.stored_key


def test_scram_secret_dovecot_form() -> None:
    secret = ScramSecret(salt=b"\x00\x01", iterations=4096, stored_key=b"s", server_key=b"k")
    assert secret.dovecot() == "4096,AAE=,cw==,aw=="


def test_plain_verifier() -> None:
    verifier = PlainVerifier(R.RFC_SECRET)
    assert isinstance(verifier, Verifier)
    assert verifier.verify(R.RFC_SECRET)
    assert not verifier.verify("tanstaa")
    assert not verifier.verify("")
    assert not verifier.verify("é")
    assert verifier.cleartext() == R.RFC_SECRET
    scram = verifier.scram()
    assert scram == ScramSecret.from_password(R.RFC_SECRET, b"pop3proto-plain", 4096)


def test_plain_verifier_scram_parameters() -> None:
    verifier = PlainVerifier("pencil", scram_salt=SCRAM_SALT, scram_iterations=4096)
    scram = verifier.scram()
    assert scram is not None
    server_sig = hmac.new(scram.server_key, SCRAM_AUTH_MESSAGE, hashlib.sha256).digest()
    assert server_sig == SCRAM_SERVER_SIGNATURE


def test_password_length_bound() -> None:
    assert not password_too_long("x" * MAX_PASSWORD_OCTETS)
    assert password_too_long("x" * (MAX_PASSWORD_OCTETS + 1))
    assert password_too_long("é" * (MAX_PASSWORD_OCTETS // 2 + 1))  # counted in UTF-8 octets
    assert not password_too_long("é" * (MAX_PASSWORD_OCTETS // 2))
    long = "p" * (MAX_PASSWORD_OCTETS + 1)
    assert not PlainVerifier(long).verify(long)  # refused even when it is the secret
    assert PlainVerifier("p" * MAX_PASSWORD_OCTETS).verify("p" * MAX_PASSWORD_OCTETS)


def test_plain_verifier_derives_scram_keys_once() -> None:
    verifier = PlainVerifier("pencil", scram_salt=SCRAM_SALT)
    first = verifier.scram()
    assert first is verifier.scram()
    assert verifier == PlainVerifier("pencil", scram_salt=SCRAM_SALT)  # the cache is no field
    assert "_scram" not in repr(verifier)


def test_decoy_scram_is_deterministic_per_name_and_secret() -> None:
    a = decoy_scram(b"k" * 32, "alice", 4096)
    assert a == decoy_scram(b"k" * 32, "alice", 4096)
    assert a.iterations == 4096
    assert a.salt == derived_scram_salt(b"k" * 32, "alice")
    assert len(a.salt) == 16
    assert len(a.stored_key) == 32
    assert len(a.server_key) == 32
    assert len({a.stored_key, a.server_key, a.salt[:16]}) == 3
    b = decoy_scram(b"k" * 32, "bob", 4096)
    other = decoy_scram(b"j" * 32, "alice", 4096)
    assert len({a.salt, b.salt, other.salt}) == 3
    assert len({a.stored_key, b.stored_key, other.stored_key}) == 3
    assert decoy_scram(b"k", "\udcff", 8192).iterations == 8192  # escaped bytes in a name
