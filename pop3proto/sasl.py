"""Server side of the SASL mechanisms used with POP3 AUTH (RFC 5034), pure.

The core frames the exchange (``AUTH``, ``+ `` challenges, ``*``, base64);
these classes decide what the bytes mean.  Each mechanism's ``step`` takes
the client's decoded data (None when AUTH came without an initial
response) and returns a ``Challenge`` to send, the ``Credentials`` the
application must check, or ``Failure``.  Nonces and clocks are arguments.

SCRAM-SHA-256 needs the user's stored keys between its two rounds: its
first step returns ``NeedSecret``; the caller looks the user up and calls
``ScramSha256.server_first``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field

from .auth import ScramSecret

__all__ = [
    "Challenge",
    "CramMd5",
    "Failure",
    "Login",
    "NeedSecret",
    "OAuth",
    "Plain",
    "ScramSha256",
    "TokenCredentials",
    "PasswordCredentials",
    "CramCredentials",
    "ScramDone",
    "mechanism_for",
]


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send this challenge and wait for the client's next line."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Failure:
    """The exchange failed; say why in the -ERR."""

    reason: str


@dataclass(frozen=True, slots=True)
class PasswordCredentials:
    """A user name and cleartext password (PLAIN, LOGIN)."""

    authcid: str
    #: Left out of the repr, like every secret here.
    password: str = field(repr=False)
    authzid: str = ""


@dataclass(frozen=True, slots=True)
class CramCredentials:
    """A CRAM-MD5 answer: check ``digest`` against cram_md5_digest(challenge, secret)."""

    username: str
    digest: str = field(repr=False)
    challenge: bytes


@dataclass(frozen=True, slots=True)
class TokenCredentials:
    """An OAuth 2.0 bearer token (OAUTHBEARER, XOAUTH2) for the application to check."""

    username: str
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class NeedSecret:
    """SCRAM: look up *username*'s ScramSecret and call ``server_first``."""

    username: str


@dataclass(frozen=True, slots=True)
class ScramDone:
    """SCRAM proof verified: send ``server_final`` as the last challenge, then accept."""

    username: str
    server_final: bytes


Step = Challenge | Failure | PasswordCredentials | CramCredentials | TokenCredentials
ScramStep = Step | NeedSecret | ScramDone


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class Plain:
    """PLAIN (RFC 4616): ``authzid NUL authcid NUL password`` in one message."""

    name = "PLAIN"

    def step(self, data: bytes | None) -> Step:
        """Ask for the message, then split it."""
        if data is None:
            return Challenge(b"")
        parts = data.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            return Failure("Invalid PLAIN message.")
        authzid, authcid = _text(parts[0]), _text(parts[1])
        if authzid is None or authcid is None:
            return Failure("Invalid UTF-8 in PLAIN message.")
        password = parts[2].decode("utf-8", "surrogateescape")
        return PasswordCredentials(authcid=authcid, password=password, authzid=authzid)


class Login:
    """LOGIN (draft-murchison-sasl-login): "Username:" then "Password:" prompts."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._user: str | None = None

    def step(self, data: bytes | None) -> Step:
        """Collect the user name and the password, one round each."""
        if self._user is None:
            if data is None:
                return Challenge(b"Username:")
            user = _text(data)
            if not user:
                return Failure("Invalid user name.")
            self._user = user
            return Challenge(b"Password:")
        if data is None:
            return Failure("Missing password.")
        return PasswordCredentials(
            authcid=self._user, password=data.decode("utf-8", "surrogateescape")
        )


class CramMd5:
    """CRAM-MD5 (RFC 2195): challenge ``<nonce@host>``, answer ``user hexdigest``."""

    name = "CRAM-MD5"

    def __init__(self, challenge: bytes) -> None:
        self.challenge = challenge

    def step(self, data: bytes | None) -> Step:
        """Send the challenge; then split the answer."""
        if data is None:
            return Challenge(self.challenge)
        text = _text(data)
        if text is None or " " not in text:
            return Failure("Invalid CRAM-MD5 answer.")
        user, _, digest = text.rpartition(" ")
        if len(digest) != 32 or not user:
            return Failure("Invalid CRAM-MD5 answer.")
        return CramCredentials(username=user, digest=digest.lower(), challenge=self.challenge)


class OAuth:
    """OAUTHBEARER (RFC 7628) and XOAUTH2 (Google's form): a bearer token and a user."""

    def __init__(self, name: str) -> None:
        self.name = name

    def step(self, data: bytes | None) -> Step:
        """Ask for the client's message, then parse it."""
        if data is None:
            return Challenge(b"")
        text = _text(data)
        if text is None:
            return Failure("Invalid UTF-8.")
        user = token = ""
        if self.name == "XOAUTH2":
            fields = text.split("\x01")
            for f in fields:
                if f.startswith("user="):
                    user = f[5:]
                elif f.lower().startswith("auth=bearer "):
                    token = f[12:]
        else:
            head, _, rest = text.partition("\x01")
            for part in head.split(","):
                if part.startswith("a="):
                    user = part[2:].replace("=2C", ",").replace("=3D", "=")
            for f in rest.split("\x01"):
                if f.lower().startswith("auth=bearer "):
                    token = f[12:]
        if not user or not token:
            return Failure("Invalid OAuth message.")
        return TokenCredentials(username=user, token=token)


class ScramSha256:
    """SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding."""

    name = "SCRAM-SHA-256"

    def __init__(self, nonce: str) -> None:
        self._snonce = nonce
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._gs2 = ""
        self._secret: ScramSecret | None = None
        self.username = ""
        self._stage = 0

    def step(self, data: bytes | None) -> ScramStep:
        """Drive the exchange; see the module docstring."""
        if data is None:
            return Challenge(b"") if self._stage == 0 else Failure("Unexpected empty answer.")
        text = _text(data)
        if text is None:
            return Failure("Invalid UTF-8.")
        if self._stage == 0:
            return self._client_first(text)
        if self._stage == 2:
            return self._client_final(text)
        return Failure("Unexpected SCRAM message.")

    def _client_first(self, text: str) -> ScramStep:
        parts = text.split(",", 2)
        if len(parts) != 3 or parts[0] not in ("n", "y"):
            return Failure("Channel binding is not supported.")
        self._gs2 = parts[0] + "," + parts[1] + ","
        bare = parts[2]
        attrs = dict(a.split("=", 1) for a in bare.split(",") if "=" in a)
        user, cnonce = attrs.get("n"), attrs.get("r")
        if not user or not cnonce or bare.startswith("m="):
            return Failure("Invalid SCRAM client-first message.")
        self.username = user.replace("=2C", ",").replace("=3D", "=")
        authzid = parts[1][2:].replace("=2C", ",").replace("=3D", "=")
        if parts[1] and (not parts[1].startswith("a=") or authzid != self.username):
            # Like PLAIN: acting as another user is not offered.
            return Failure("Authorization identity not allowed.")
        self._client_first_bare = bare
        self._nonce = cnonce + self._snonce
        self._stage = 1
        return NeedSecret(self.username)

    def server_first(self, secret: ScramSecret) -> Challenge:
        """The server-first message for the user's stored keys (or a decoy's)."""
        self._secret = secret
        salt = base64.b64encode(secret.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={secret.iterations}"
        self._stage = 2
        return Challenge(self._server_first.encode())

    def _client_final(self, text: str) -> ScramStep:
        secret = self._secret
        assert secret is not None
        without_proof, _, proof_b64 = text.rpartition(",p=")
        attrs = dict(a.split("=", 1) for a in without_proof.split(",") if "=" in a)
        expected_cbind = base64.b64encode(self._gs2.encode()).decode()
        if attrs.get("c") != expected_cbind or attrs.get("r") != self._nonce:
            return Failure("SCRAM nonce or channel binding mismatch.")
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError:
            return Failure("Invalid SCRAM proof.")
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = hmac.new(secret.stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(signature):
            return Failure("Authentication failed.")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), secret.stored_key):
            return Failure("Authentication failed.")
        server_sig = hmac.new(secret.server_key, auth_message, hashlib.sha256).digest()
        self._stage = 3
        return ScramDone(self.username, b"v=" + base64.b64encode(server_sig))


Mechanism = Plain | Login | CramMd5 | OAuth | ScramSha256


def mechanism_for(name: str, *, nonce: str, challenge: bytes) -> Mechanism | None:
    """A fresh mechanism object by name, or None if unknown."""
    if name == "PLAIN":
        return Plain()
    if name == "LOGIN":
        return Login()
    if name == "CRAM-MD5":
        return CramMd5(challenge)
    if name == "SCRAM-SHA-256":
        return ScramSha256(nonce)
    if name in ("OAUTHBEARER", "XOAUTH2"):
        return OAuth(name)
    return None
