"""Credential helpers against the RFCs' own examples."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
import replies as R

from pop3proto.auth import (
    PlainVerifier,
    ScramSecret,
    Verifier,
    apop_digest,
    cram_md5_digest,
    make_apop_timestamp,
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
