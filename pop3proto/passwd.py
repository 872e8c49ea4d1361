"""Dovecot passwd-file authentication: ``user:{SCHEME}secret:uid:gid:gecos:home:shell:extra``.

``PasswdFile`` is an ``Authenticator`` over such a file; ``DictAuthenticator``
is the same over a mapping, for tests and examples.  The first two fields
matter, and of the extra fields (the eighth column, Dovecot's space-separated
``key=value`` list) the per-user POP3 settings ``userdb_pop3_login_delay``
and ``userdb_pop3_expire`` (see ``user_settings``); the rest are optional
and ignored.  The mailbox reference
``lookup`` returns is the user name, so names that could escape a directory
are refused when the table is loaded.

Theory of operation:

* A bad entry (no password, unknown scheme or malformed hash, unsafe name,
  duplicate user) costs that user only: it is logged as a warning naming the
  line and listed in ``errors``; every other user still logs in.
* Verifiers never raise on bad input: a malformed hash, a missing hash
  library and a wrong password all simply fail.  A missing library is logged
  as one error per load rather than on every login.
* SHA-crypt is implemented here from Drepper's specification (the ``crypt``
  module is gone in Python 3.13); bcrypt and Argon2 are imported lazily, so
  those libraries stay optional (the ``hashes`` extra).
* The file is re-read when its (mtime_ns, size, inode) changes, checked on
  every call.  A file that cannot be read leaves the last good table in place.
* Cost parameters are bounded both ways (``COST_BOUNDS``): an entry that is
  too cheap to resist guessing, or so expensive that one login would stall
  the server, is refused like a malformed one.  Passwords longer than
  ``auth.MAX_PASSWORD_OCTETS`` fail at once in every verifier.
* Unknown users must look like real ones.  ``dummy_verifier`` costs what a
  real user of the table's most expensive scheme and cost costs, and
  ``decoy_scram(name)`` gives SCRAM keys whose salt is derived from a server
  secret and the name, exactly as the salts of ``{PLAIN}`` users are, with
  the iteration count most real users have.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import importlib
import importlib.util
import logging
import os
import re
import secrets
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .auth import (
    PlainVerifier,
    ScramSecret,
    Verifier,
    decoy_scram,
    derived_scram_salt,
    password_too_long,
)
from .storage import nonblocking

__all__ = [
    "COST_BOUNDS",
    "DictAuthenticator",
    "HASH_SCHEMES",
    "HashVerifier",
    "PasswdFile",
    "ScramVerifier",
    "dearest_dummy",
    "default_secret",
    "dummy_for",
    "hash_cost",
    "hash_password",
    "parse_secret",
    "parse_user_settings",
    "sha_crypt",
    "typical_scram_iterations",
    "user_name_problem",
]

_log = logging.getLogger(__name__)


def _b(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate outside U+DC80..U+DCFF
        return text.encode("utf-8", "surrogatepass")


# --- SHA-crypt (https://www.akkadia.org/drepper/SHA-crypt.txt) ------------------------

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# prefix: (hash, the digest bytes behind each 4-character group, the short last group)
_SHA_CRYPT = {
    "$5$": (
        hashlib.sha256,
        [(0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14),
         (15, 25, 5), (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29)],
        ((-1, 31, 30), 3),
    ),
    "$6$": (
        hashlib.sha512,
        [((k, k + 21, k + 42), (k + 21, k + 42, k), (k + 42, k, k + 21))[k % 3]
         for k in range(21)],
        ((-1, -1, 63), 2),
    ),
}
_SETTING = re.compile(r"(\$[56]\$)(?:rounds=([0-9]{1,10})\$)?([^$]*)(?:\$(.*))?\Z", re.DOTALL)


def _parse_setting(setting: str) -> tuple[str, int | None, str, str] | None:
    """(prefix, rounds or None, salt, checksum or "") of a ``$5$``/``$6$`` string, or None."""
    m = _SETTING.match(setting)
    if m is None:
        return None
    return m[1], None if m[2] is None else int(m[2]), m[3][:16], m[4] or ""


def sha_crypt(password: str, setting: str) -> str:
    """Drepper's SHA-256/SHA-512 crypt of *password* with the salt and rounds of *setting*.

    *setting* is ``$5$`` or ``$6$``, optionally ``rounds=N$`` (clamped to
    1000..999999999), a salt (cut to 16 characters), and optionally ``$``
    and a checksum, which is ignored.  Returns the whole hash as glibc's
    ``crypt`` would.  Raises ValueError if *setting* is none of these.
    """
    parsed = _parse_setting(setting)
    if parsed is None:
        raise ValueError(f"not a SHA-crypt setting: {setting!r}")
    prefix, rounds, salt, _ = parsed
    head = prefix if rounds is None else f"{prefix}rounds={min(max(rounds, 1000), 999_999_999)}$"
    return f"{head}{salt}${_sha_crypt(_b(password), prefix, rounds, _b(salt))}"


def _sha_crypt(pw: bytes, prefix: str, rounds: int | None, salt: bytes) -> str:
    """The checksum part of a SHA-crypt hash (steps 1-22 of the specification)."""
    h, order, last = _SHA_CRYPT[prefix]
    size = h().digest_size

    def stretch(digest: bytes, length: int) -> bytes:
        return digest * (length // size) + digest[: length % size]

    b = h(pw + salt + pw).digest()
    a = h(pw + salt + stretch(b, len(pw)))
    i = len(pw)
    while i:
        a.update(b if i & 1 else pw)
        i >>= 1
    c = a.digest()
    p = stretch(h(pw * len(pw)).digest(), len(pw))
    s = stretch(h(salt * (16 + c[0])).digest(), len(salt))
    # Round r hashes C after (r odd) or before (r even) a mix of P and S that
    # depends only on r % 42, so the 42 mixes are built once.
    before = [p + (s if r % 3 else b"") + (p if r % 7 else b"") for r in range(42)]
    after = [(s if r % 3 else b"") + (p if r % 7 else b"") + p for r in range(42)]
    for r in range(5000 if rounds is None else min(max(rounds, 1000), 999_999_999)):
        c = h(before[r % 42] + c).digest() if r & 1 else h(c + after[r % 42]).digest()
    out: list[str] = []
    for (i2, i1, i0), width in [*((t, 4) for t in order), last]:
        w = (c[i2] if i2 >= 0 else 0) << 16 | (c[i1] if i1 >= 0 else 0) << 8 | c[i0]
        out.extend(_ITOA64[(w >> 6 * k) & 63] for k in range(width))
    return "".join(out)


# --- the schemes: checkers, shape tests, libraries -------------------------------------


def _check_sha_crypt(password: bytes, hashed: str) -> bool:
    parsed = _parse_setting(hashed)
    if parsed is None or not parsed[3]:
        return False
    prefix, rounds, salt, checksum = parsed
    computed = _sha_crypt(password, prefix, rounds, _b(salt))
    return hmac.compare_digest(computed.encode("ascii"), _b(checksum))


def _check_bcrypt(password: bytes, hashed: str) -> bool:
    try:
        import bcrypt
    except ImportError:
        return False
    try:  # bcrypt reads at most 72 bytes, and the library refuses longer input
        return bool(bcrypt.checkpw(password[:72], hashed.encode("ascii")))
    except ValueError:
        return False


def _check_argon2(password: bytes, hashed: str) -> bool:
    try:
        import argon2
        from argon2.exceptions import VerificationError
    except ImportError:
        return False
    try:
        return bool(argon2.PasswordHasher().verify(hashed, password))
    except (VerificationError, ValueError):
        return False


def _sha_shape(prefix: str) -> Callable[[str], bool]:
    def ok(value: str) -> bool:
        parsed = _parse_setting(value)
        return parsed is not None and parsed[0] == prefix and parsed[3] != ""

    return ok


_BCRYPT = re.compile(r"\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}\Z")
_ARGON2_PREFIXES = ("$argon2id$", "$argon2i$")
_Lib = tuple[str, str] | None
_A2 = ("argon2", "argon2-cffi")
# scheme: (checker, whether a hash is well formed, (module, package) or None)
_SCHEMES: dict[str, tuple[Callable[[bytes, str], bool], Callable[[str], bool], _Lib]] = {
    "SHA512-CRYPT": (_check_sha_crypt, _sha_shape("$6$"), None),
    "SHA256-CRYPT": (_check_sha_crypt, _sha_shape("$5$"), None),
    "BLF-CRYPT": (_check_bcrypt, lambda v: _BCRYPT.match(v) is not None, ("bcrypt", "bcrypt")),
    "ARGON2ID": (_check_argon2, lambda v: v.startswith(_ARGON2_PREFIXES), _A2),
    "ARGON2I": (_check_argon2, lambda v: v.startswith(_ARGON2_PREFIXES), _A2),
}
#: Other names of schemes.
SCHEME_ALIASES = _ALIASES = {"CLEAR": "PLAIN", "CLEARTEXT": "PLAIN"}
#: The scheme of a bare hash (no ``{SCHEME}``) by its prefix.
BARE_PREFIXES = _BARE = {
         "$6$": "SHA512-CRYPT", "$5$": "SHA256-CRYPT", "$2y$": "BLF-CRYPT", "$2b$": "BLF-CRYPT",
         "$2a$": "BLF-CRYPT", "$argon2id$": "ARGON2ID", "$argon2i$": "ARGON2I"}  # fmt: skip


# --- verifiers ------------------------------------------------------------------------


class _NoSecrets:
    __slots__ = ()

    def cleartext(self) -> str | None:
        """Always None: the store does not hold the password in clear."""
        return None

    def scram(self) -> ScramSecret | None:
        """Always None: SCRAM keys cannot be derived from this store."""
        return None


@dataclass(frozen=True, slots=True)
class HashVerifier(_NoSecrets):
    """A verifier over a one-way hash (SHA-crypt, bcrypt, Argon2): no cleartext, no SCRAM."""

    scheme: str  #: the canonical scheme name, such as ``"SHA512-CRYPT"``
    hashed: str = field(repr=False)  #: the hash, without the ``{SCHEME}`` prefix

    def verify(self, password: str) -> bool:
        """Whether *password* matches, in constant time.  False for a malformed hash or
        when the scheme's library (bcrypt, argon2-cffi) is not installed, and at
        once for a password longer than ``MAX_PASSWORD_OCTETS``."""
        if password_too_long(password):
            return False
        return _SCHEMES[self.scheme][0](_b(password), self.hashed)


@dataclass(frozen=True, slots=True)
class ScramVerifier(_NoSecrets):
    """A verifier over Dovecot ``{SCRAM-SHA-256}`` keys: serves SCRAM and plain logins."""

    secret: ScramSecret = field(repr=False)

    def verify(self, password: str) -> bool:
        """Derive the stored key from *password* and compare it in constant time."""
        s = self.secret
        if password_too_long(password):
            return False
        try:
            derived = ScramSecret.from_password(password, s.salt, s.iterations)
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(derived.stored_key, s.stored_key)

    def scram(self) -> ScramSecret | None:
        """The stored keys."""
        return self.secret


def _parse_scram(value: str) -> ScramSecret | None:
    """Dovecot's ``iterations,salt,stored_key,server_key`` (base64), or None if malformed."""
    parts = value.split(",")
    if len(parts) != 4 or not parts[0].isascii() or not parts[0].isdigit():
        return None
    try:
        salt, stored, server = (base64.b64decode(p, validate=True) for p in parts[1:])
    except (binascii.Error, ValueError):
        return None
    iterations = int(parts[0]) if len(parts[0]) <= 10 else 0
    if not iterations or not salt or len(stored) != 32 or len(server) != 32:
        return None
    return ScramSecret(salt=salt, iterations=iterations, stored_key=stored, server_key=server)


#: The accepted range of each scheme's cost parameter: SCRAM iterations,
#: SHA-crypt rounds (when the hash names them; the default is 5000), bcrypt's
#: cost, Argon2's time cost (passes) and memory (KiB).  Below it an entry is
#: too cheap to resist guessing; above it one login would hold a worker for
#: seconds (pure-Python SHA-crypt: about 1.8 s per million rounds).  Entries
#: outside are refused with a warning naming the line.
COST_BOUNDS: dict[str, tuple[int, int]] = {
    "SCRAM-SHA-256": (4096, 1_000_000),  # RFC 7677: at least 4096
    "SHA-CRYPT": (1000, 1_000_000),  # Drepper: below 1000 means 1000
    "BLF-CRYPT": (4, 16),  # 2**16 expansions: seconds
    "ARGON2-T": (1, 64),
    "ARGON2-M": (8, 1 << 20),  # 1 GiB
}
_ARGON2_PARAMS = re.compile(r"\$argon2i?d?\$(?:v=[0-9]+\$)?m=([0-9]{1,10}),t=([0-9]{1,10}),p=")


def _cost_problem(canon: str, v: Verifier) -> str | None:
    """Why the cost of an entry is out of ``COST_BOUNDS``, or None."""
    checks: list[tuple[str, str, int]] = []
    if isinstance(v, ScramVerifier):
        checks.append(("SCRAM-SHA-256", "iteration count", v.secret.iterations))
    elif isinstance(v, HashVerifier) and canon.endswith("-CRYPT") and canon != "BLF-CRYPT":
        rounds = (_parse_setting(v.hashed) or ("", None))[1]
        if rounds is not None:
            checks.append(("SHA-CRYPT", "rounds", rounds))
    elif isinstance(v, HashVerifier) and canon == "BLF-CRYPT":
        checks.append(("BLF-CRYPT", "cost", int(v.hashed[4:6])))
    elif isinstance(v, HashVerifier):
        m = _ARGON2_PARAMS.match(v.hashed)
        if m is not None:
            checks.append(("ARGON2-M", "memory (KiB)", int(m[1])))
            checks.append(("ARGON2-T", "time cost", int(m[2])))
    for key, what, value in checks:
        low, high = COST_BOUNDS[key]
        if not low <= value <= high:
            return f"{{{canon}}} {what} {value} is outside {low}..{high}"
    return None


def parse_secret(secret: str, *, bare_is_plain: bool) -> Verifier | str:
    """The verifier for a password field, or what is wrong with it."""
    scheme, value = "PLAIN", secret
    if secret.startswith("{"):
        scheme, brace, value = secret[1:].partition("}")
        if not brace:
            return "unterminated {SCHEME} prefix"
    elif not bare_is_plain:
        scheme = next((s for p, s in _BARE.items() if secret.startswith(p)), "")
        if not scheme:
            return "password without a {SCHEME} prefix is not a recognised hash"
    canon = _ALIASES.get(scheme.upper(), scheme.upper())
    if canon == "PLAIN":  # an empty password would let anyone in
        return PlainVerifier(value) if value else "empty password"
    if canon == "SCRAM-SHA-256":
        keys = _parse_scram(value)
        if keys is None:
            return f"malformed {{{scheme}}} value"
        verifier: Verifier = ScramVerifier(keys)
    elif canon not in _SCHEMES:
        return f"unknown scheme {{{scheme}}}"
    elif not _SCHEMES[canon][1](value):
        return f"malformed {{{scheme}}} hash"
    else:
        verifier = HashVerifier(canon, value)
    return _cost_problem(canon, verifier) or verifier


def user_name_problem(name: str) -> str | None:
    """Why *name* cannot be a user (it could escape a mailbox directory), or None if it can.

    Refused: empty names, names starting with ``.``, containing ``..``,
    ``/``, ``\\``, ``:``, NUL or other control characters or bytes that
    are not UTF-8, and names longer than 255 bytes.
    """
    if not name:
        return "empty user name"
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        return f"user name with control characters or invalid UTF-8: {name!r}"
    if name.startswith(".") or ".." in name or any(c in name for c in "/\\:"):
        return f"unsafe user name {name!r}"
    if len(name.encode()) > 255:
        return "user name longer than 255 bytes"
    return None


#: Extra-field names (without Dovecot's ``userdb_`` prefix) -> ``user_settings`` keys.
USER_SETTINGS = {"pop3_login_delay": "login_delay", "pop3_expire": "expire"}
_MAX_SETTING = 10**9  # seconds or days: more is a typo, not a policy


def parse_user_settings(extra: str) -> dict[str, int | str] | str:
    """The POP3 settings in a passwd-file entry's extra fields, or the problem with them.

    *extra* is Dovecot's space-separated ``key=value`` list.  Recognized, with
    or without the ``userdb_`` prefix: ``pop3_login_delay`` (LOGIN-DELAY
    seconds, a non-negative integer) and ``pop3_expire`` (EXPIRE days, a
    non-negative integer, or ``NEVER``).  Other fields are Dovecot's business
    and are ignored.
    """
    out: dict[str, int | str] = {}
    for item in extra.split():
        key, _, value = item.partition("=")
        name = USER_SETTINGS.get(key.removeprefix("userdb_"))
        if name is None:
            continue
        if name == "expire" and value.upper() == "NEVER":
            out[name] = "NEVER"
        elif value.isascii() and value.isdigit() and int(value) <= _MAX_SETTING:
            out[name] = int(value)
        else:
            what = "days or NEVER" if name == "expire" else "seconds"
            return f"bad {key} value {value!r} (expected {what})"
    return out


# --- dummy verifiers for unknown users ------------------------------------------------

_FAKE_SALT = "pRxZ3kd9Qw7LmT2v"  # 12 bytes in base64
_FAKE_B64 = "Kq8vN3xR0tYc5WmJ2hLs9dFgP6bZaE4uQ1oIyT7nVwE"  # 32 bytes, unpadded base64
_FAKE_BCRYPT = "oh1vq.G/cwmYZa6c6jSIp.2CRvcoy9HUI/DbqEG.8T4ImJ8w0NP1K"  # of a lost random key


def hash_cost(v: Verifier) -> tuple[str, str]:
    """(scheme, cost parameters) of an entry: what a dummy must copy to take as long."""
    if isinstance(v, ScramVerifier):
        return "SCRAM-SHA-256", str(v.secret.iterations)
    if not isinstance(v, HashVerifier):
        return "PLAIN", ""
    if v.scheme == "BLF-CRYPT":
        return v.scheme, v.hashed[4:6]
    if v.scheme.startswith("ARGON2"):
        return v.scheme, v.hashed.rsplit("$", 2)[0]  # $argon2id$v=19$m=..,t=..,p=..
    parsed = _parse_setting(v.hashed)
    return v.scheme, "" if parsed is None or parsed[1] is None else str(parsed[1])


def dummy_for(scheme: str, params: str) -> Verifier:
    """A verifier of *scheme* with the cost *params* (from ``hash_cost``) that matches nothing."""
    if scheme == "SCRAM-SHA-256":
        key = hashlib.sha256(_FAKE_B64.encode()).digest()
        keys = ScramSecret(salt=_FAKE_SALT.encode(), iterations=int(params),
                           stored_key=key, server_key=key)  # fmt: skip
        return ScramVerifier(keys)
    if scheme == "BLF-CRYPT":
        return HashVerifier(scheme, f"$2y${params}${_FAKE_BCRYPT}")
    if scheme.startswith("ARGON2"):
        return HashVerifier(scheme, f"{params}${_FAKE_SALT}${_FAKE_B64}")
    if scheme.endswith("-CRYPT"):
        prefix, width = ("$6$", 86) if scheme == "SHA512-CRYPT" else ("$5$", 43)
        rounds = f"rounds={params}$" if params else ""
        return HashVerifier(scheme, f"{prefix}{rounds}{_FAKE_SALT}${(_FAKE_B64 * 2)[:width]}")
    return PlainVerifier(secrets.token_urlsafe(24))


def cost_in_bounds(scheme: str, params: str) -> bool:
    """Whether a ``hash_cost`` pair is within ``COST_BOUNDS`` (what a dummy may copy)."""
    if scheme == "PLAIN":
        return True
    if scheme == "SCRAM-SHA-256" and (not params.isdigit() or len(params) > 10):
        return False
    return _cost_problem(scheme, dummy_for(scheme, params)) is None


def _rank(scheme: str, params: str) -> int:
    """How costly (scheme, params) is within its scheme: what is compared to find the dearest."""
    if scheme.startswith("ARGON2"):
        m = _ARGON2_PARAMS.match(params)
        return 0 if m is None else int(m[1]) * int(m[2])
    if scheme.endswith("-CRYPT") and not params:
        return 5000  # SHA-crypt's default rounds
    return int(params) if params.isdigit() else 0


def _seconds(v: Verifier) -> float:
    """The fastest of a few timed checks of a typical 16-character password by *v*."""
    best = float("inf")
    spent = 0.0
    for _ in range(5):
        start = time.perf_counter()
        v.verify("not-the-password")
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > 0.05:
            break
    return best


def dearest_dummy(costs: Iterable[tuple[str, str]]) -> Verifier:
    """A dummy (``dummy_for``) that costs what the most expensive of *costs* does.

    *costs* are ``hash_cost`` pairs.  Within a scheme the largest parameter
    wins (SCRAM iterations, SHA-crypt rounds, bcrypt cost, Argon2 memory x
    passes); between schemes, whose costs cannot be compared on paper, each
    candidate is timed once here and the slowest kept.  SHA512-CRYPT with
    5000 rounds when *costs* is empty.
    """
    top: dict[str, str] = {}
    for scheme, params in costs:
        if scheme not in top or _rank(scheme, params) > _rank(scheme, top[scheme]):
            top[scheme] = params
    candidates = [dummy_for(scheme, params) for scheme, params in sorted(top.items())]
    if not candidates:
        return dummy_for("SHA512-CRYPT", "")
    if len(candidates) == 1:
        return candidates[0]
    return max(candidates, key=_seconds)


def typical_scram_iterations(verifiers: Iterable[Verifier]) -> int:
    """The SCRAM iteration count most entries that can answer SCRAM have (4096 if none)."""
    counts = Counter(
        v.secret.iterations if isinstance(v, ScramVerifier) else v.scram_iterations
        for v in verifiers
        if isinstance(v, (ScramVerifier, PlainVerifier))
    )
    return counts.most_common(1)[0][0] if counts else 4096


def default_secret(seed: bytes) -> bytes:
    """A server secret derived from *seed* (the source's contents): see ``PasswdFile``."""
    return hashlib.sha256(b"pop3proto server secret\0" + seed).digest()


# --- authenticators -------------------------------------------------------------------


class _Users:
    """The user table and the Authenticator methods both authenticators share."""

    def __init__(self, source: str, logger: logging.Logger | None, secret: bytes | None) -> None:
        self._source = source
        self._log = logger or _log
        self._secret = secret  # None until the first load derives the default
        self._users: dict[str, Verifier] = {}
        self._settings: dict[str, dict[str, int | str]] = {}
        self._dummy: Verifier | None = None
        self._scram_iterations = 4096
        self._has_cleartext = False
        self._has_scram = False
        #: What was wrong in the last load: one ``"where: problem"`` per bad entry.
        self.errors: list[str] = []

    def _refresh(self) -> None:
        """Bring the table up to date (PasswdFile re-reads its file)."""

    def _install(
        self, rows: Iterable[tuple[str, str, str, str]], *, bare_is_plain: bool, seed: bytes
    ) -> None:
        """Build a table from (where, user, password field, extra fields) rows and swap it in.

        *seed* (the source's contents) gives the server secret if none was
        given and this is the first load; it is then kept for good.
        """
        if self._secret is None:
            self._secret = default_secret(seed)
        users: dict[str, Verifier] = {}
        settings: dict[str, dict[str, int | str]] = {}
        first: dict[str, str] = {}
        errors: list[str] = []
        for where, user, secret, extra in rows:
            parsed = parse_secret(secret, bare_is_plain=bare_is_plain)
            # A bad setting refuses the entry: guessing it could delete mail early.
            options = parse_user_settings(extra)
            problem = user_name_problem(user)
            if problem is None and not secret:
                problem = f"no password for user {user!r}"
            elif problem is None and user in users:
                problem = f"duplicate user {user!r} (the entry at {first[user]} is used)"
            if problem is None and isinstance(parsed, str):
                problem = parsed
            elif problem is None and isinstance(options, str):
                problem = options
            elif problem is None and not isinstance(parsed, str):
                if isinstance(parsed, PlainVerifier):  # its own salt, as a decoy has
                    parsed = PlainVerifier(parsed.secret, derived_scram_salt(self._secret, user))
                users[user], first[user] = parsed, where
                if options and not isinstance(options, str):
                    settings[user] = options
                continue
            errors.append(f"{where}: {problem}")
            self._log.warning("%s: %s", where, problem)
        schemes = Counter(v.scheme for v in users.values() if isinstance(v, HashVerifier))
        for scheme, count in schemes.items():
            library = _SCHEMES[scheme][2]
            if library is not None and importlib.util.find_spec(library[0]) is None:
                self._log.error("%s: %d {%s} entries can never log in: %s is not installed",
                                self._source, count, scheme, library[1])  # fmt: skip
        self._users, self.errors, self._dummy = users, errors, None
        self._settings = settings
        self._scram_iterations = typical_scram_iterations(users.values())
        self._has_cleartext = any(v.cleartext() is not None for v in users.values())
        self._has_scram = any(
            isinstance(v, (ScramVerifier, PlainVerifier)) for v in users.values()
        )

    @property
    def has_cleartext(self) -> bool:
        """Whether some entry holds its secret in clear (so APOP and CRAM-MD5 can work)."""
        self._refresh()
        return self._has_cleartext

    @property
    def has_scram(self) -> bool:
        """Whether some entry can answer SCRAM-SHA-256 ({SCRAM-SHA-256} or cleartext)."""
        self._refresh()
        return self._has_scram

    @nonblocking  # a stat of the file and a dict lookup
    def exists(self, name: str) -> bool:
        """Whether *name* is a user with a usable entry."""
        self._refresh()
        return name in self._users

    @nonblocking
    def lookup(self, name: str) -> tuple[Verifier, str] | None:
        """(verifier, mailbox reference = the user name) for *name*, or None if unknown."""
        self._refresh()
        verifier = self._users.get(name)
        return None if verifier is None else (verifier, name)

    @nonblocking
    def user_settings(self, name: str) -> dict[str, int | str]:
        """*name*'s POP3 overrides from its extra fields: ``login_delay``, ``expire`` (or none)."""
        self._refresh()
        return dict(self._settings.get(name, {}))

    def dummy_verifier(self) -> Verifier:
        """A verifier that costs what a real one of the dearest kind does, for unknown users.

        When ``lookup`` returns None, the facade should still call
        ``dummy_verifier().verify(password)`` and ignore the answer, so that a
        client cannot tell unknown users from wrong passwords by how long the
        reply takes.  The dummy has the most expensive scheme and cost in the
        table (``dearest_dummy``: SHA-crypt rounds, bcrypt cost, Argon2
        parameters, SCRAM iterations), over a fixed hash of no known password
        (a random secret for ``{PLAIN}``), so it matches no password.  It is
        chosen (timing the candidate schemes once) on the first call after a
        load.  An empty table gives a SHA512-CRYPT dummy with 5000 rounds.
        """
        self._refresh()
        dummy = self._dummy
        if dummy is None:
            dummy = dearest_dummy({hash_cost(v) for v in self._users.values()})
            self._dummy = dummy
        return dummy

    def decoy_scram(self, name: str) -> ScramSecret:
        """SCRAM-SHA-256 keys for *name*, an unknown user: answer the exchange with these.

        Cheap (three HMACs) and the same for the same name every time.  The
        salt is derived from the server secret and the name exactly as a
        ``{PLAIN}`` user's is; the iteration count is the one most entries
        that can answer SCRAM have (4096 if none).  They match no password.
        """
        assert self._secret is not None  # set by the first load
        return decoy_scram(self._secret, name, self._scram_iterations)


class DictAuthenticator(_Users):
    """An in-memory Authenticator: user -> ``{SCHEME}secret``, or a plain password if no braces.

    Entries are checked as passwd-file lines are; bad ones are logged and
    listed in ``errors`` as ``users['name']: problem``.  *extra* gives users
    passwd-file extra fields (``{"alice": "userdb_pop3_expire=30"}``).
    """

    def __init__(
        self,
        users: Mapping[str, str],
        *,
        secret: bytes | None = None,
        logger: logging.Logger | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__("DictAuthenticator", logger, secret)
        fields = extra or {}
        rows = [
            (f"users[{user!r}]", user, secret, fields.get(user, ""))
            for user, secret in users.items()
        ]
        seed = "\n".join(f"{user}:{field}" for _, user, field, _ in sorted(rows)).encode(
            "utf-8", "surrogatepass"
        )
        self._install(rows, bare_is_plain=True, seed=seed)


class PasswdFile(_Users):
    """An Authenticator over a Dovecot passwd-file, re-read whenever it changes.

    Args:
        path: the file.  It is read at once and raises OSError if it cannot
            be.  Messages name lines ``path:number``, with *path* as given.
        secret: the server secret (any bytes, 32 random ones are plenty) from
            which the SCRAM salts of ``{PLAIN}`` users and of the decoys for
            unknown users are derived.  Default: a hash of the file's
            contents at the first load, kept for the life of the object.
        logger: where load problems go; default ``logging.getLogger("pop3proto.passwd")``.

    The default secret is stable across restarts and across workers that read
    the same file, and unknown to clients (the file holds password hashes or
    passwords).  But it changes when the file is edited and the server is
    restarted: every derived salt (of ``{PLAIN}`` users and of unknown names)
    changes then while the salts of stored ``{SCRAM-SHA-256}`` keys do not,
    so a client that watched a name before and after learns which kind it
    is.  Pass ``secret`` (read from a file of its own) where that matters.  A
    random secret per process would be worse: every restart and every worker
    would give unknown names new salts.

    A UTF-8 byte order mark before the first line is ignored, with a warning.

    Every ``exists``/``lookup``/``dummy_verifier`` call stats the file and
    re-reads it if its (mtime_ns, size, inode) changed.  If it cannot be
    read, the last good table stays in use and one error is logged until it
    can be read again.  Safe to call from several threads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        secret: bytes | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.path = os.fspath(path)
        super().__init__(self.path, logger, secret)
        self._key: tuple[int, int, int] | None = None
        self._failing = False
        self._lock = threading.Lock()
        self._load()

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._failed(exc)
            return
        if (st.st_mtime_ns, st.st_size, st.st_ino) != self._key:
            with self._lock:
                try:
                    self._load()
                except OSError as exc:
                    self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        if not self._failing:
            self._failing = True
            self._log.error("cannot read passwd-file %s (%s); keeping the %d users loaded before",
                            self.path, exc.strerror or exc, len(self._users))  # fmt: skip

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if key == self._key:  # another thread has just loaded it
                return
            raw = f.read()
        text = raw.decode("utf-8", "surrogateescape")
        if text.startswith("\ufeff"):  # an editor's byte order mark is no part of a name
            text = text[1:]
            self._log.warning("%s:1: UTF-8 byte order mark ignored", self.path)
        rows = []
        for number, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")
            if line.strip() and not line.lstrip().startswith("#"):
                user, _, rest = line.partition(":")
                # user:password:uid:gid:gecos:home:shell:extra (the last may hold ':')
                fields = rest.split(":", 6)
                extra = fields[6] if len(fields) > 6 else ""
                rows.append((f"{self.path}:{number}", user, fields[0], extra))
        self._install(rows, bare_is_plain=False, seed=raw)
        self._key = key
        if self._failing:
            self._failing = False
            self._log.info("passwd-file %s is readable again", self.path)


# --- hashing --------------------------------------------------------------------------

#: The schemes ``hash_password`` can produce.
HASH_SCHEMES = (
    "PLAIN", "SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2ID", "ARGON2I", "SCRAM-SHA-256"
)  # fmt: skip


def hash_password(password: str, scheme: str = "SHA512-CRYPT", *, rounds: int | None = None) -> str:
    """A passwd-file password field ``{SCHEME}...`` for *password*, with a fresh random salt.

    Args:
        password: the cleartext.  bcrypt uses only its first 72 bytes, as Dovecot does.
        scheme: one of ``HASH_SCHEMES``, in any case.
        rounds: SHA-crypt rounds (default 5000, as glibc and ``doveadm pw``),
            bcrypt cost (12), Argon2 time cost (argon2-cffi's default) or
            SCRAM iterations (4096).

    Raises:
        ValueError: an unknown scheme, rounds for PLAIN, a PLAIN password a
            passwd-file cannot hold (``:`` or a line break), or rounds
            outside ``COST_BOUNDS`` (which a passwd-file would refuse).
        RuntimeError: the scheme needs bcrypt or argon2-cffi, which is not installed.
    """
    name = scheme.upper()
    if name not in HASH_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(HASH_SCHEMES)}")
    bounds = {"SCRAM-SHA-256": "SCRAM-SHA-256", "BLF-CRYPT": "BLF-CRYPT",
              "ARGON2ID": "ARGON2-T", "ARGON2I": "ARGON2-T",
              "SHA512-CRYPT": "SHA-CRYPT", "SHA256-CRYPT": "SHA-CRYPT"}  # fmt: skip
    if rounds is not None and name in bounds:
        low, high = COST_BOUNDS[bounds[name]]
        if not low <= rounds <= high:
            raise ValueError(f"rounds for {name} must be in {low}..{high}, not {rounds}")
    if name == "PLAIN":
        if rounds is not None or any(c in password for c in ":\r\n"):
            raise ValueError("PLAIN takes no rounds, and no ':' or line break in the password")
        return f"{{PLAIN}}{password}"
    if name == "SCRAM-SHA-256":
        keys = ScramSecret.from_password(password, os.urandom(16), rounds or 4096)
        return f"{{{name}}}{keys.dovecot()}"
    if name in ("SHA512-CRYPT", "SHA256-CRYPT"):
        salt = "".join(secrets.choice(_ITOA64) for _ in range(16))
        head = "$6$" if name == "SHA512-CRYPT" else "$5$"
        head += "" if rounds is None else f"rounds={rounds}$"
        return f"{{{name}}}{sha_crypt(password, head + salt)}"
    module, package = _SCHEMES[name][2] or ("", "")
    try:
        lib = importlib.import_module(module)
    except ImportError:
        raise RuntimeError(f"{{{name}}} needs {package}: pip install {package}") from None
    if name == "BLF-CRYPT":  # Dovecot writes $2y$, the same algorithm as $2b$
        hashed: str = lib.hashpw(_b(password)[:72], lib.gensalt(rounds or 12)).decode("ascii")
        return f"{{{name}}}$2y${hashed[4:]}"
    options = {} if rounds is None else {"time_cost": rounds}
    kind = lib.Type.ID if name == "ARGON2ID" else lib.Type.I
    argon2_hash: str = lib.PasswordHasher(type=kind, **options).hash(_b(password))
    return f"{{{name}}}{argon2_hash}"
