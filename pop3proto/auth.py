"""Pure credential helpers: APOP, CRAM-MD5, SCRAM-SHA-256 and the Verifier contract.

Nothing here reads a clock, random numbers or files; timestamps, nonces and
salts are arguments.  The facade uses these to answer the core's login events.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

__all__ = [
    "MAX_PASSWORD_OCTETS",
    "PlainVerifier",
    "ScramSecret",
    "Verifier",
    "apop_digest",
    "cram_md5_digest",
    "decoy_scram",
    "derived_scram_salt",
    "make_apop_timestamp",
    "password_too_long",
    "verify_apop",
]


#: The longest password, in octets after UTF-8 encoding, that any verifier checks.  A
#: longer one fails at once, for known and unknown users alike, so it tells nothing
#: and cannot make a password hash (whose cost grows with the length) run long.
MAX_PASSWORD_OCTETS = 1024


def password_too_long(password: str) -> bool:
    """Whether *password* is longer than ``MAX_PASSWORD_OCTETS`` (so no verifier checks it)."""
    return len(password) > MAX_PASSWORD_OCTETS or len(_secret_bytes(password)) > MAX_PASSWORD_OCTETS


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
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

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


def _keyed(server_secret: bytes, label: bytes, name: str) -> bytes:
    return hmac.new(server_secret, label + b"\0" + _secret_bytes(name), hashlib.sha256).digest()


def derived_scram_salt(server_secret: bytes, name: str) -> bytes:
    """The 16-byte SCRAM salt of *name* derived from a server secret (HMAC-SHA-256).

    Used both for users whose SCRAM keys are derived from a cleartext
    password and for the decoys of unknown users, so the two cannot be told
    apart, and both look like the random 16-byte salts of stored SCRAM keys.
    """
    return _keyed(server_secret, b"pop3proto scram salt", name)[:16]


def decoy_scram(server_secret: bytes, name: str, iterations: int) -> ScramSecret:
    """Deterministic SCRAM-SHA-256 keys for an unknown user *name*, cheap to make.

    The salt is ``derived_scram_salt``; the stored and server keys are
    further HMACs of the name, so they look random and match no password
    (finding them is inverting HMAC-SHA-256).  The same name always gets the
    same decoy, so repeating an exchange reveals nothing; *iterations*
    should be what real users of the source typically have.
    """
    return ScramSecret(
        salt=derived_scram_salt(server_secret, name),
        iterations=iterations,
        stored_key=_keyed(server_secret, b"pop3proto decoy stored key", name),
        server_key=_keyed(server_secret, b"pop3proto decoy server key", name),
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
        """Whether *password* is right.  May be slow (a password hash).

        False at once for a password longer than ``MAX_PASSWORD_OCTETS``.
        """

    def cleartext(self) -> str | None:
        """The secret in clear, or None."""

    def scram(self) -> ScramSecret | None:
        """The SCRAM-SHA-256 keys, or None."""


@dataclass(frozen=True, slots=True)
class PlainVerifier:
    """A verifier over a cleartext secret (``{PLAIN}`` entries, tests, examples).

    The SCRAM keys are derived once, on the first ``scram()`` call, and kept:
    PBKDF2 then costs only the first exchange of each user.  Authenticators
    give each user its own ``scram_salt`` (``derived_scram_salt``).
    """

    #: A comparison, no hashing: safe to run on an event loop.
    nonblocking: ClassVar[bool] = True

    secret: str = field(repr=False)
    scram_salt: bytes = b"pop3proto-plain"
    scram_iterations: int = 4096
    _scram: list[ScramSecret] = field(default_factory=list, init=False, repr=False, compare=False)

    def verify(self, password: str) -> bool:
        """Constant-time comparison with the stored secret."""
        if password_too_long(password):
            return False
        return hmac.compare_digest(_secret_bytes(self.secret), _secret_bytes(password))

    def cleartext(self) -> str | None:
        """The stored secret."""
        return self.secret

    def scram(self) -> ScramSecret | None:
        """SCRAM keys derived from the secret with ``scram_salt`` (computed once)."""
        if not self._scram:  # two threads may both derive it: the same value
            self._scram.append(
                ScramSecret.from_password(self.secret, self.scram_salt, self.scram_iterations)
            )
        return self._scram[0]
