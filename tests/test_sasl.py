"""The server side of each SASL mechanism (pop3proto._sasl), with RFC test vectors."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from pop3proto import sasl as _sasl
from pop3proto.auth import ScramSecret, cram_md5_digest
from pop3proto.sasl import (
    Challenge,
    CramCredentials,
    Failure,
    NeedSecret,
    PasswordCredentials,
    ScramDone,
    TokenCredentials,
    mechanism_for,
)


def mech(name: str) -> _sasl.Mechanism:
    m = mechanism_for(name, nonce="SERVERNONCE", challenge=b"<1896.697170952@postoffice>")
    assert m is not None
    return m


def test_unknown_mechanism_is_none() -> None:
    assert mechanism_for("GSSAPI", nonce="n", challenge=b"c") is None


def test_mechanism_names() -> None:
    for name in ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "OAUTHBEARER", "XOAUTH2"):
        assert mech(name).name == name


# ------------------------------------------------------------------ PLAIN


def test_plain_without_initial_response_asks_for_it() -> None:
    assert mech("PLAIN").step(None) == Challenge(b"")


@pytest.mark.parametrize(
    ("data", "creds"),
    [
        (b"\0tim\0tanstaaftanstaaf", PasswordCredentials("tim", "tanstaaftanstaaf", "")),
        (b"Ursel\0Kurt\0xipj3plmq", PasswordCredentials("Kurt", "xipj3plmq", "Ursel")),
        (b"\0j\xc3\xb6rg\0p w", PasswordCredentials("jörg", "p w", "")),
    ],
)
def test_plain_rfc4616_messages(data: bytes, creds: PasswordCredentials) -> None:
    assert mech("PLAIN").step(data) == creds


@pytest.mark.parametrize("data", [b"", b"\0only-two", b"a\0b\0c\0d", b"\0\0password"])
def test_plain_malformed(data: bytes) -> None:
    assert isinstance(mech("PLAIN").step(data), Failure)


def test_plain_invalid_utf8_name() -> None:
    assert mech("PLAIN").step(b"\0\xff\0pw") == Failure("Invalid UTF-8 in PLAIN message.")


def test_plain_password_keeps_undecodable_octets() -> None:
    step = mech("PLAIN").step(b"\0bob\0\xffpw")
    assert isinstance(step, PasswordCredentials)
    assert step.password.encode("utf-8", "surrogateescape") == b"\xffpw"


# ------------------------------------------------------------------ LOGIN


def test_login_two_prompts() -> None:
    m = mech("LOGIN")
    assert m.step(None) == Challenge(b"Username:")
    assert m.step(b"bob") == Challenge(b"Password:")
    assert m.step(b"s3cret") == PasswordCredentials("bob", "s3cret")


def test_login_with_initial_response_skips_the_first_prompt() -> None:
    m = mech("LOGIN")
    assert m.step(b"bob") == Challenge(b"Password:")
    assert m.step(None) == Failure("Missing password.")


@pytest.mark.parametrize("user", [b"", b"\xff"])
def test_login_bad_user(user: bytes) -> None:
    assert mech("LOGIN").step(user) == Failure("Invalid user name.")


# ------------------------------------------------------------------ CRAM-MD5


def test_cram_md5_rfc2195_example() -> None:
    m = _sasl.CramMd5(b"<1896.697170952@postoffice.reston.mci.net>")
    assert m.step(None) == Challenge(b"<1896.697170952@postoffice.reston.mci.net>")
    step = m.step(b"tim b913a602c7eda7a495b4e6e7334d3890")
    assert step == CramCredentials(
        "tim", "b913a602c7eda7a495b4e6e7334d3890", b"<1896.697170952@postoffice.reston.mci.net>"
    )
    assert cram_md5_digest(step.challenge, "tanstaaftanstaaf") == step.digest


@pytest.mark.parametrize(
    "data", [b"\xff 0123", b"nospace", b"tim short", b" b913a602c7eda7a495b4e6e7334d3890"]
)
def test_cram_md5_malformed(data: bytes) -> None:
    assert isinstance(mech("CRAM-MD5").step(data), Failure)


def test_cram_md5_digest_is_lowercased() -> None:
    step = mech("CRAM-MD5").step(b"a b B913A602C7EDA7A495B4E6E7334D3890")
    assert isinstance(step, CramCredentials)
    assert step.username == "a b"
    assert step.digest == "b913a602c7eda7a495b4e6e7334d3890"


# ------------------------------------------------------------------ OAuth


def test_xoauth2() -> None:
    m = mech("XOAUTH2")
    assert m.step(None) == Challenge(b"")
    data = (
        b"user=someuser@example.com\x01"
        b"auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
    )
    assert m.step(data) == TokenCredentials(
        "someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
    )


def test_oauthbearer_rfc7628_example() -> None:
    data = (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
        b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    )
    assert mech("OAUTHBEARER").step(data) == TokenCredentials(
        "user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
    )


def test_oauthbearer_escaped_authzid() -> None:
    data = b"n,a=we=2Cird=3D,\x01auth=Bearer tok\x01\x01"
    assert mech("OAUTHBEARER").step(data) == TokenCredentials("we,ird=", "tok")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("XOAUTH2", b"user=u\x01\x01"),
        ("XOAUTH2", b"auth=Bearer t\x01\x01"),
        ("OAUTHBEARER", b"n,,\x01auth=Bearer t\x01\x01"),
        ("OAUTHBEARER", b"\xff"),
    ],
)
def test_oauth_malformed(name: str, data: bytes) -> None:
    assert isinstance(mech(name).step(data), Failure)


# ------------------------------------------------------------------ SCRAM-SHA-256


def _client_final(secret_pw: str, salt: bytes, iters: int, cfirst_bare: str, sfirst: str,
                  nonce: str, gs2: str = "n,,") -> tuple[str, bytes]:
    salted = hashlib.pbkdf2_hmac("sha256", secret_pw.encode(), salt, iters)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored = hashlib.sha256(client_key).digest()
    without = f"c={base64.b64encode(gs2.encode()).decode()},r={nonce}"
    auth_message = f"{cfirst_bare},{sfirst},{without}".encode()
    sig = hmac.new(stored, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    server_sig = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    return f"{without},p={base64.b64encode(proof).decode()}", server_sig


def test_scram_rfc7677_example() -> None:
    # RFC 7677 section 3: user "user", password "pencil".
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    m = _sasl.ScramSha256("%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    assert m.step(None) == Challenge(b"")
    assert m.step(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO") == NeedSecret("user")
    secret = ScramSecret.from_password("pencil", salt, 4096)
    first = m.server_first(secret)
    assert first.data == (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    final = (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    assert m.step(final) == ScramDone("user", b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    assert m.step(b"") == Failure("Unexpected SCRAM message.")


def _scram_to_final(m: _sasl.ScramSha256, user: str = "bob") -> tuple[str, str, str]:
    cfirst_bare = f"n={user},r=cnonce"
    assert isinstance(m.step(f"n,,{cfirst_bare}".encode()), NeedSecret)
    first = m.server_first(ScramSecret.from_password("pw", b"salt", 4096)).data.decode()
    return cfirst_bare, first, "cnonceSERVERNONCE"


def test_scram_roundtrip_and_escaped_name() -> None:
    m = mech("SCRAM-SHA-256")
    assert isinstance(m, _sasl.ScramSha256)
    cfirst_bare, sfirst, nonce = _scram_to_final(m, "a=2Cb")
    assert m.username == "a,b"
    final, server_sig = _client_final("pw", b"salt", 4096, cfirst_bare, sfirst, nonce)
    assert m.step(final.encode()) == ScramDone("a,b", b"v=" + base64.b64encode(server_sig))


def test_scram_wrong_password() -> None:
    m = mech("SCRAM-SHA-256")
    assert isinstance(m, _sasl.ScramSha256)
    cfirst_bare, sfirst, nonce = _scram_to_final(m)
    final, _ = _client_final("wrong", b"salt", 4096, cfirst_bare, sfirst, nonce)
    assert m.step(final.encode()) == Failure("Authentication failed.")


@pytest.mark.parametrize(
    ("final", "reason"),
    [
        ("c=biws,r=othernonce,p=AAAA", "SCRAM nonce or channel binding mismatch."),
        ("c=eSws,r=cnonceSERVERNONCE,p=AAAA", "SCRAM nonce or channel binding mismatch."),
        ("c=biws,r=cnonceSERVERNONCE,p=!!!!", "Invalid SCRAM proof."),
        ("c=biws,r=cnonceSERVERNONCE,p=AAAA", "Authentication failed."),
    ],
)
def test_scram_bad_final(final: str, reason: str) -> None:
    m = mech("SCRAM-SHA-256")
    assert isinstance(m, _sasl.ScramSha256)
    _scram_to_final(m)
    assert m.step(final.encode()) == Failure(reason)


@pytest.mark.parametrize(
    "first",
    [b"p=tls-unique,,n=bob,r=x", b"n,,r=x", b"n,,n=bob", b"n,,m=ext,n=bob,r=x", b"garbage"],
)
def test_scram_bad_client_first(first: bytes) -> None:
    assert isinstance(mech("SCRAM-SHA-256").step(first), Failure)


def test_scram_invalid_utf8_and_out_of_order() -> None:
    assert mech("SCRAM-SHA-256").step(b"\xff") == Failure("Invalid UTF-8.")
    m = mech("SCRAM-SHA-256")
    assert m.step(b"n,,n=bob,r=x") == NeedSecret("bob")
    assert m.step(None) == Failure("Unexpected empty answer.")
    assert m.step(b"c=biws") == Failure("Unexpected SCRAM message.")


def test_scram_accepts_y_gs2_flag() -> None:
    m = mech("SCRAM-SHA-256")
    assert isinstance(m, _sasl.ScramSha256)
    assert m.step(b"y,,n=bob,r=cnonce") == NeedSecret("bob")
    sfirst = m.server_first(ScramSecret.from_password("pw", b"salt", 4096)).data.decode()
    final, sig = _client_final("pw", b"salt", 4096, "n=bob,r=cnonce", sfirst,
                               "cnonceSERVERNONCE", gs2="y,,")
    assert m.step(final.encode()) == ScramDone("bob", b"v=" + base64.b64encode(sig))


@pytest.mark.parametrize(
    ("first", "ok"),
    [
        (b"n,a=bob,n=bob,r=x", True),
        (b"n,a=b=2Cb,n=b=2Cb,r=x", True),
        (b"n,a=alice,n=bob,r=x", False),
        (b"n,x=bob,n=bob,r=x", False),
    ],
)
def test_scram_authzid_must_be_the_user(first: bytes, ok: bool) -> None:
    step = mech("SCRAM-SHA-256").step(first)
    if ok:
        assert isinstance(step, NeedSecret)
    else:
        assert step == Failure("Authorization identity not allowed.")


def test_credential_reprs_hide_secrets() -> None:
    shown = repr(
        [
            _sasl.PasswordCredentials(authcid="mrose", password="hunter2"),
            _sasl.CramCredentials(username="mrose", digest="d" * 32, challenge=b"<1@x>"),
            _sasl.TokenCredentials(username="mrose", token="ya29.token"),
        ]
    )
    assert "mrose" in shown
    for secret in ("hunter2", "d" * 32, "ya29.token"):
        assert secret not in shown
