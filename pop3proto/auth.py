"""Pure credential helpers: APOP, CRAM-MD5, SCRAM-SHA-256 and the Verifier contract.

Nothing here reads a clock, random numbers or files; timestamps, nonces and
salts are arguments.  The facade uses these to answer the core's login events.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

__all__ = [
    "PlainVerifier",
    "ScramSecret",
    "Verifier",
    "apop_digest",
    "cram_md5_digest",
    "make_apop_timestamp",
    "verify_apop",
]


def _secret_bytes(secret: str) -> bytes:
    try:
        return secret.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return secret.encode("utf-8", "surrogatepass")


def apop_digest(timestamp: str, secret: str) -> str:
    """The APOP digest (RFC 1939 section 7): lowercase hex MD5 of timestamp + secret."""
    return hashlib.md5(timestamp.encode("ascii") + _secret_bytes(secret)).hexdigest()


def verify_apop(timestamp: str, secret: str, digest: str) -> bool:
    """Whether *digest* is right for *timestamp* and *secret* (constant time)."""
    # Compared as bytes: compare_digest raises TypeError on non-ASCII str.
    given = digest.lower().encode("utf-8", "replace")
    return hmac.compare_digest(apop_digest(timestamp, secret).encode("ascii"), given)


def make_apop_timestamp(pid: int, clock: float, nonce: int, host: str) -> str:
    """An RFC 1939 greeting timestamp ``<pid.clock.nonce@host>``; every part injected."""
    return f"<{pid}.{int(clock)}.{nonce:x}@{host}>"


def cram_md5_digest(challenge: bytes, secret: str) -> str:
    """The CRAM-MD5 response digest (RFC 2195): hex HMAC-MD5 of the challenge."""
    return hmac.new(_secret_bytes(secret), challenge, hashlib.md5).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class ScramSecret:
    """The stored SCRAM-SHA-256 keys of one user (RFC 5802 section 3)."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(cls, password: str, salt: bytes, iterations: int = 4096) -> ScramSecret:
        """Derive the stored keys from a cleartext password (SASLprep is not applied)."""
        salted = hashlib.pbkdf2_hmac("sha256", _secret_bytes(password), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        return cls(
            salt=salt,
            iterations=iterations,
            stored_key=hashlib.sha256(client_key).digest(),
            server_key=hmac.new(salted, b"Server Key", hashlib.sha256).digest(),
        )

    def dovecot(self) -> str:
        """Dovecot's ``{SCRAM-SHA-256}`` form: ``iter,salt,stored,server`` in base64."""
        b64 = base64.b64encode
        return (
            f"{self.iterations},{b64(self.salt).decode()},"
            f"{b64(self.stored_key).decode()},{b64(self.server_key).decode()}"
        )


@runtime_checkable
class Verifier(Protocol):
    """What an authenticator's ``lookup`` returns: checks a password without revealing it.

    ``cleartext()`` returns the stored secret only where the store holds it in
    clear (needed for APOP and CRAM-MD5), ``scram()`` the SCRAM-SHA-256 keys
    where they can be had; both return None otherwise, and the server then
    does not offer those mechanisms for this user.
    """

    def verify(self, password: str) -> bool:
        """Whether *password* is right.  May be slow (a password hash)."""

    def cleartext(self) -> str | None:
        """The secret in clear, or None."""

    def scram(self) -> ScramSecret | None:
        """The SCRAM-SHA-256 keys, or None."""


@dataclass(frozen=True, slots=True)
class PlainVerifier:
    """A verifier over a cleartext secret (``{PLAIN}`` entries, tests, examples)."""

    #: A comparison, no hashing: safe to run on an event loop.
    nonblocking: ClassVar[bool] = True

    secret: str
    scram_salt: bytes = b"pop3proto-plain"
    scram_iterations: int = 4096

    def verify(self, password: str) -> bool:
        """Constant-time comparison with the stored secret."""
        return hmac.compare_digest(_secret_bytes(self.secret), _secret_bytes(password))

    def cleartext(self) -> str | None:
        """The stored secret."""
        return self.secret

    def scram(self) -> ScramSecret | None:
        """SCRAM keys derived from the secret with a fixed salt."""
        return ScramSecret.from_password(self.secret, self.scram_salt, self.scram_iterations)
