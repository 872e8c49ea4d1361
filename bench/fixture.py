"""The benchmark fixture: a Maildir tree and a Dovecot passwd-file, built deterministically.

Layout under the fixture directory::

    passwd                 Dovecot passwd-file, one ``user:{PLAIN}secret::::::`` line per user
    mail/<user>/{cur,new,tmp}
    dovecot/index/<user>   Dovecot's INDEX= and CONTROL= directories (made by Dovecot),
    dovecot/control/<user> kept out of the Maildirs so pop3proto never reads dovecot-uidlist
    manifest.json          what was built (the build is skipped when it matches)

Users (``password(user)`` gives each one's password):

* ``user001``..``userNNN``: 20 messages each, 2-50 KB (the ``sessions`` and
  ``pipelined`` workloads);
* ``big1``..``big8``: one 50 MB message each, hard links to one file (``retr-large``;
  eight users because pop3proto locks a maildrop per session);
* ``many``: 10,000 messages of 1-6 KB named as ``MaildirStorage.deliver`` names them,
  with Dovecot's ``,S=`` (file size) and ``,W=`` (CRLF size) fields (``login``);
* ``many-nosize``: the same 10,000 messages with bare names, so a cold login must
  read every file to learn its size (``login``, the harder case);
* ``idle00001``..: one 1 KB message each (``idle``: one user per connection,
  again because of the maildrop lock).

Secrets are ``{PLAIN}``: both servers verify them with a string compare, so the
benchmarks measure the protocol and the storage, not a password hash.  Message
files go straight into ``cur/`` with ``:2,`` and fixed, seeded names, so two
builds with the same parameters are identical and neither server renames
anything (Dovecot runs with ``pop3_no_flag_updates``).  Messages use LF line
ends, as Maildir stores them, and about one line in 40 starts with ``.`` so
dot-stuffing is exercised.

Run ``python bench/fixture.py DIR`` to build one by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import random
import shutil
import sys
import time

__all__ = [
    "BIG_USERS",
    "IDLE_PREFIX",
    "MANY",
    "MANY_NOSIZE",
    "Fixture",
    "clear_caches",
    "ensure",
    "password",
]

VERSION = 3
SEED = 1939  # RFC 1939
MANY = "many"
MANY_NOSIZE = "many-nosize"
BIG_USERS = 8
IDLE_PREFIX = "idle"
_BASE_TIME = 1_700_000_000  # the delivery time written into the unique names
_HOST = "bench"

_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when "
    "what will more if no out so said can who about them some could him into its then two "
    "time only do may other than these first now any new like our over such well very "
    "mailbox server client message protocol maildrop session octets retrieve listing"
)
_WORDS = _WORD_TEXT.split()


def password(user: str) -> str:
    """The password of *user* in every fixture."""
    return f"pw-{user}"


def wire_size(data: bytes) -> int:
    """POP3 size of an LF-only message: each LF counts as CRLF (the data ends with LF)."""
    return len(data) + data.count(b"\n")


class _Text:
    """Seeded message bodies: a pool of lines picked at random (fast even for 50 MB)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        pool = []
        for i in range(4096):
            n = rng.randint(4, 14)
            line = " ".join(rng.choice(_WORDS) for _ in range(n))
            if i % 40 == 0:
                line = "." + line  # a line dot-stuffing has to double
            elif i % 97 == 0:
                line = ""
            pool.append(line.encode("ascii") + b"\n")
        self.pool = pool

    def body(self, size: int) -> bytes:
        """About *size* bytes of whole lines (at least one line)."""
        parts: list[bytes] = []
        total = 0
        while total < size:
            lines = self.rng.choices(self.pool, k=max(1, (size - total) // 60 + 1))
            for line in lines:
                parts.append(line)
                total += len(line)
                if total >= size:
                    break
        return b"".join(parts)

    def message(self, user: str, n: int, size: int) -> bytes:
        head = (
            f"Return-Path: <sender{n % 17}@example.org>\n"
            f"Delivered-To: {user}@bench.example\n"
            f"From: Sender {n % 17} <sender{n % 17}@example.org>\n"
            f"To: {user} <{user}@bench.example>\n"
            f"Subject: Benchmark message {n} for {user}\n"
            f"Date: Tue, 14 Nov 2023 22:13:{n % 60:02d} +0000\n"
            f"Message-ID: <{user}.{n}@bench.example>\n"
            "MIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=us-ascii\n"
            "\n"
        ).encode("ascii")
        return head + self.body(max(64, size - len(head)))


def _name(user_no: int, n: int, data: bytes | None) -> str:
    """A Maildir file name in ``deliver``'s format (fixed time, pid and sequence), in cur/."""
    base = f"{_BASE_TIME + n}.M{(user_no * 7919 + n) % 1_000_000}P{1000 + user_no}Q{n + 1}.{_HOST}"
    if data is not None:
        base += f",S={len(data)},W={wire_size(data)}"
    return base + ":2,"


def _write_maildir(root: str, user: str, files: list[tuple[str, bytes]]) -> None:
    d = os.path.join(root, user)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    for name, data in files:
        with open(os.path.join(d, "cur", name), "wb") as f:
            f.write(data)


class Fixture:
    """A built fixture: paths, user lists and passwords."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        with open(os.path.join(self.path, "manifest.json"), encoding="utf-8") as f:
            self.manifest = json.load(f)
        self.passwd = os.path.join(self.path, "passwd")
        self.mail = os.path.join(self.path, "mail")
        self.dovecot_dir = os.path.join(self.path, "dovecot")
        self.users: list[str] = self.manifest["users"]
        self.big_users: list[str] = self.manifest["big_users"]
        self.idle_users: list[str] = self.manifest["idle_users"]
        self.big_size: int = self.manifest["big_wire_size"]

    def password(self, user: str) -> str:
        return password(user)

    def maildir(self, user: str) -> str:
        return os.path.join(self.mail, user)


def _params(users: int, idle_users: int, big_mb: int, many: int) -> dict[str, int]:
    return {
        "version": VERSION,
        "seed": SEED,
        "users": users,
        "idle_users": idle_users,
        "big_mb": big_mb,
        "many": many,
    }


def build(
    path: str,
    *,
    users: int = 32,
    idle_users: int = 10_000,
    big_mb: int = 50,
    many: int = 10_000,
    log: bool = True,
) -> Fixture:
    """Build the fixture into *path* (replaced if it exists) and return it."""
    t0 = time.monotonic()
    path = os.path.abspath(path)
    tmp = path + ".building"
    shutil.rmtree(tmp, ignore_errors=True)
    mail = os.path.join(tmp, "mail")
    os.makedirs(mail)
    rng = random.Random(SEED)
    text = _Text(rng)
    secrets: dict[str, str] = {}

    names = [f"user{i:03d}" for i in range(1, users + 1)]
    for no, user in enumerate(names, 1):
        files = []
        for n in range(20):
            data = text.message(user, n, rng.randint(2_000, 50_000))
            files.append((_name(no, n, data), data))
        _write_maildir(mail, user, files)
        secrets[user] = password(user)

    big = text.message("big", 0, big_mb * 1_000_000)
    big_name = _name(900, 0, big)
    big_users = [f"big{i}" for i in range(1, BIG_USERS + 1)]
    _write_maildir(mail, big_users[0], [(big_name, big)])
    first = os.path.join(mail, big_users[0], "cur", big_name)
    for user in big_users:
        secrets[user] = password(user)
        if user == big_users[0]:
            continue
        _write_maildir(mail, user, [])
        try:
            os.link(first, os.path.join(mail, user, "cur", big_name))
        except OSError:
            shutil.copyfile(first, os.path.join(mail, user, "cur", big_name))

    many_files = []
    for n in range(many):
        data = text.message(MANY, n, rng.randint(1_000, 6_000))
        many_files.append((n, data))
    _write_maildir(mail, MANY, [(_name(901, n, d), d) for n, d in many_files])
    _write_maildir(mail, MANY_NOSIZE, [(_name(902, n, None), d) for n, d in many_files])
    secrets[MANY] = password(MANY)
    secrets[MANY_NOSIZE] = password(MANY_NOSIZE)

    idle = [f"{IDLE_PREFIX}{i:05d}" for i in range(1, idle_users + 1)]
    for no, user in enumerate(idle, 1000):
        data = text.message(user, 0, 1_000)
        _write_maildir(mail, user, [(_name(no, 0, data), data)])
        secrets[user] = password(user)

    with open(os.path.join(tmp, "passwd"), "w", encoding="ascii") as f:
        f.write("# pop3proto benchmark users; {PLAIN} so neither server spends time hashing\n")
        for user, secret in secrets.items():
            f.write(f"{user}:{{PLAIN}}{secret}::::::\n")
    os.chmod(os.path.join(tmp, "passwd"), 0o644)
    manifest = {
        "params": _params(users, idle_users, big_mb, many),
        "users": names,
        "big_users": big_users,
        "idle_users": idle,
        "big_wire_size": wire_size(big),
        "many": many,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)
    if log:
        print(f"fixture built in {time.monotonic() - t0:.1f}s: {path}", file=sys.stderr)
    return Fixture(path)


def ensure(path: str, **params: int) -> Fixture:
    """The fixture at *path*, built first unless one with the same parameters is there."""
    want = _params(**{"users": 32, "idle_users": 10_000, "big_mb": 50, "many": 10_000, **params})
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            if json.load(f).get("params") == want:
                return Fixture(path)
    except (OSError, ValueError):
        pass
    kwargs = {k: v for k, v in want.items() if k not in ("version", "seed")}
    return build(path, **kwargs)


def clear_caches(fx: Fixture, user: str) -> list[str]:
    """Remove both servers' per-maildrop caches for *user*; the paths removed.

    pop3proto: ``pop3proto-cache``.  Dovecot: ``dovecot.index*``,
    ``dovecot.list.index*``, ``dovecot-uidlist`` and ``dovecot-uidvalidity*``,
    wherever they are (the Maildir itself or the fixture's INDEX/CONTROL dirs).
    """
    removed = []
    dirs = [
        fx.maildir(user),
        os.path.join(fx.dovecot_dir, "index", user),
        os.path.join(fx.dovecot_dir, "control", user),
    ]
    patterns = [
        "pop3proto-cache",
        "dovecot.index*",
        "dovecot.list.index*",
        "dovecot-uidlist",
        "dovecot-uidvalidity*",
    ]
    for top in dirs:
        # os.walk, not glob("**"): Dovecot keeps INBOX's files in a hidden ".INBOX" directory.
        for d, subdirs, files in os.walk(top):
            if d == top:
                subdirs[:] = [x for x in subdirs if x not in ("cur", "new", "tmp")]
            for name in files:
                if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(d, name))
                        removed.append(os.path.join(d, name))
    return removed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the benchmark fixture.")
    p.add_argument("dir")
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--idle-users", type=int, default=10_000)
    p.add_argument("--big-mb", type=int, default=50)
    p.add_argument("--many", type=int, default=10_000)
    args = p.parse_args(argv)
    build(
        args.dir, users=args.users, idle_users=args.idle_users, big_mb=args.big_mb, many=args.many
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
