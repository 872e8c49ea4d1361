"""Command-line tools: ``python -m pop3proto COMMAND ...``.

Each subcommand is a ``_add_<name>`` function that adds its parser and
registers its handler in ``_HANDLERS``; ``main`` parses and dispatches.  To
add a command, write both and call the ``_add_`` function in ``_parser``.
Handlers return the exit status; problems go to stderr as one line.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import sys
from collections.abc import Callable
from typing import Any

from .passwd import HASH_SCHEMES, hash_password, user_name_problem

__all__ = ["main"]

_PROG = "python -m pop3proto"
_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _error(command: str, message: str, status: int = 2) -> int:
    print(f"{_PROG} {command}: {message}", file=sys.stderr)
    return status


#: Hash schemes whose library comes with the "hashes" extra: scheme -> (module, package).
_HASH_LIBRARIES = {"BLF-CRYPT": ("bcrypt", "bcrypt"), "ARGON2ID": ("argon2", "argon2-cffi"),
                   "ARGON2I": ("argon2", "argon2-cffi")}  # fmt: skip


def _missing_extra(scheme: str) -> str | None:
    """What to install for *scheme*, or None when its library is importable."""
    module, package = _HASH_LIBRARIES.get(scheme, ("", ""))
    if not module:
        return None
    try:
        importlib.import_module(module)
    except ImportError:
        pass
    else:
        return None
    return f"{{{scheme}}} needs {package}: pip install 'pop3proto[hashes]'"


def _hash_from_args(command: str, args: argparse.Namespace) -> str | int:
    """The ``{SCHEME}hash`` field for ``--scheme``/``--password`` (asked twice if absent),
    or the exit status after one line on stderr."""
    scheme = str(args.scheme).upper()
    if scheme not in HASH_SCHEMES:
        return _error(command, f"unknown scheme {args.scheme!r}; use one of "
                               f"{', '.join(HASH_SCHEMES)}")  # fmt: skip
    if (missing := _missing_extra(scheme)) is not None:  # before asking for the password
        return _error(command, missing, 1)
    if args.user is not None and (problem := user_name_problem(args.user)) is not None:
        return _error(command, problem)
    password: str | None = args.password
    if password is None:
        try:
            password = getpass.getpass("Enter new password: ")
            again = getpass.getpass("Retype new password: ")
        except EOFError:
            return _error(command, "no password given")
        if password != again:
            return _error(command, "passwords don't match")
        if not password:
            return _error(command, "empty password")
    try:
        return hash_password(password, scheme, rounds=args.rounds)
    except ValueError as exc:
        return _error(command, str(exc))
    except RuntimeError as exc:
        return _error(command, str(exc), 1)


def _passwd(args: argparse.Namespace) -> int:
    """Print a passwd-file password field (or a whole ``user:field`` line), like doveadm pw."""
    field = _hash_from_args("passwd", args)
    if isinstance(field, int):
        return field
    print(field if args.user is None else f"{args.user}:{field}")
    return 0


def _add_passwd(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "passwd",
        help="hash a password for a Dovecot passwd-file (like doveadm pw)",
        description="Print {SCHEME}hash for a password, or user:{SCHEME}hash with -u. "
        "Without -p, the password is asked for twice.",
    )
    schemes = ", ".join(HASH_SCHEMES)
    parser.add_argument("-s", "--scheme", default="SHA512-CRYPT",
                        help=f"one of {schemes} (default SHA512-CRYPT)")  # fmt: skip
    parser.add_argument("-u", "--user", help="print a whole passwd-file line for this user")
    parser.add_argument("-p", "--password", help="the password (visible to other users: "
                        "prefer the prompt)")  # fmt: skip
    parser.add_argument("-r", "--rounds", type=int,
                        help="rounds, cost or iterations for the scheme")  # fmt: skip
    _HANDLERS["passwd"] = _passwd


# -- PostgreSQL (pop3proto.pgstore; needs the "postgres" extra) -------------------------

_DB_HELP = ("libpq connection string or URI; prefer 'service=NAME' or PGPASSFILE to "
            "putting a password on the command line")  # fmt: skip


def _pgstore(command: str) -> Any:
    """The pgstore module, or None after printing how to install psycopg."""
    try:
        from . import pgstore
    except ImportError as exc:
        _error(command, f"needs psycopg ({exc}): pip install 'pop3proto[postgres]'")
        return None
    return pgstore


def _pg_failure(command: str, exc: Exception) -> int:
    return _error(command, " ".join(str(exc).split()) or type(exc).__name__)


def _pg_migrate(args: argparse.Namespace) -> int:
    pg = _pgstore("pg-migrate")
    if pg is None:
        return 2
    try:
        before, after = pg.migrate(args.conninfo)
    except Exception as exc:  # psycopg errors, StorageError: one line, status 2
        return _pg_failure("pg-migrate", exc)
    print(f"schema at version {after}" + ("" if before == after else f" (was {before})"))
    return 0


def _add_pg_migrate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "pg-migrate",
        help="create or upgrade the PostgreSQL schema (users, messages)",
        description="Create the pop3proto tables in a PostgreSQL database, or bring them "
        "to this version's schema.  Safe to run again and from several hosts at once.",
    )
    parser.add_argument("conninfo", metavar="CONNINFO", help=_DB_HELP)
    _HANDLERS["pg-migrate"] = _pg_migrate


_MAX_SIZE = 100 * 1024 * 1024  # deliver's default cap on a message, bytes


def _deliver(args: argparse.Namespace) -> int:
    """Stream standard input into a maildrop; nothing is stored if it is over --max-size."""
    if args.max_size < 0:
        return _error("deliver", "--max-size must be at least 0")
    if args.maildir is not None:
        from .maildir import MaildirStorage, MessageTooBig

        try:
            name = MaildirStorage(args.maildir).deliver(
                args.user, sys.stdin.buffer, max_size=args.max_size
            )
        except MessageTooBig as exc:
            return _error("deliver", str(exc))
        except Exception as exc:  # StorageError, OSError: one line, status 2
            return _pg_failure("deliver", exc)
        print(name)
        return 0
    pg = _pgstore("deliver")
    if pg is None:
        return 2
    try:
        import psycopg

        with psycopg.connect(args.db, autocommit=True) as conn:
            known = conn.execute("SELECT 1 FROM users WHERE name = %s", (args.user,))
            if not args.any_user and known.fetchone() is None:
                return _error("deliver", f"no such user {args.user!r}")
            pg.deliver(conn, args.user, sys.stdin.buffer, max_size=args.max_size)
    except Exception as exc:
        return _pg_failure("deliver", exc)
    return 0


def _add_deliver(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "deliver",
        help="store a message from standard input in PostgreSQL or a Maildir (an MDA)",
        description="Read one message from standard input and store it in USER's maildrop, "
        "in PostgreSQL (--db) or under a Maildir root (--maildir: tmp/, then new/).  The "
        "input is streamed (memory stays flat); a message over --max-size is not stored.  "
        "Exit 0 when stored; on any error, one line on stderr and exit 2.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", metavar="CONNINFO", help=_DB_HELP)
    where.add_argument("--maildir", metavar="ROOT",
                       help="deliver to ROOT/USER/{tmp,new}; prints the file's name")  # fmt: skip
    parser.add_argument("--any-user", action="store_true",
                        help="deliver even if USER is not in the users table")  # fmt: skip
    parser.add_argument("--max-size", type=int, default=_MAX_SIZE, metavar="BYTES",
                        help=f"refuse a larger message (default {_MAX_SIZE})")  # fmt: skip
    parser.add_argument("user", metavar="USER")
    _HANDLERS["deliver"] = _deliver


def _pg_import(args: argparse.Namespace) -> int:
    pg = _pgstore("pg-import")
    if pg is None:
        return 2
    try:
        import psycopg

        with psycopg.connect(args.db, autocommit=True) as conn:
            if args.passwd_file:
                added, present, problems = pg.import_passwd_file(conn, args.passwd_file)
                for problem in problems:
                    print(f"skipped {problem}", file=sys.stderr)
                print(f"users: {added} added, {present} already present")
            results = pg.import_maildir(conn, args.maildir_root, args.user or None)
    except Exception as exc:
        return _pg_failure("pg-import", exc)
    for r in results:
        print(f"{r.user}: {r.imported} imported, {r.present} already present"
              + (f", {r.renamed} under a new UIDL" if r.renamed else "")
              + (f", {r.vanished} vanished" if r.vanished else ""))  # fmt: skip
    return 0


def _add_pg_import(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "pg-import",
        help="copy Maildirs (and a passwd-file) into PostgreSQL, keeping UIDLs",
        description="Copy every user's Maildir under MAILDIR_ROOT (new/ and cur/) into the "
        "messages table with the UIDLs pop3proto's Maildir storage gives them, so clients "
        "do not download again.  Running it again adds only what is new.  Nothing is "
        "deleted from the Maildirs.",
    )
    parser.add_argument("--db", required=True, metavar="CONNINFO", help=_DB_HELP)
    parser.add_argument("--passwd-file", help="also add this passwd-file's users "
                        "(existing users are kept)")  # fmt: skip
    parser.add_argument("-u", "--user", action="append",
                        help="import only this user (repeatable)")  # fmt: skip
    parser.add_argument("maildir_root", metavar="MAILDIR_ROOT")
    _HANDLERS["pg-import"] = _pg_import


def _pg_adduser(args: argparse.Namespace) -> int:
    pg = _pgstore("pg-adduser")
    if pg is None:
        return 2
    field = _hash_from_args("pg-adduser", args)
    if isinstance(field, int):
        return field
    try:
        stored = pg.add_user(args.db, args.user, field, replace=args.update)
    except Exception as exc:
        return _pg_failure("pg-adduser", exc)
    if not stored:
        return _error("pg-adduser", f"user {args.user!r} exists (use --update to change "
                                    "the password)")  # fmt: skip
    return 0


def _add_pg_adduser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "pg-adduser",
        help="add a user to the PostgreSQL users table",
        description="Hash a password (as the passwd command does) and store USER with it. "
        "Without -p, the password is asked for twice.",
    )
    parser.add_argument("--db", required=True, metavar="CONNINFO", help=_DB_HELP)
    schemes = ", ".join(HASH_SCHEMES)
    parser.add_argument("-s", "--scheme", default="SHA512-CRYPT",
                        help=f"one of {schemes} (default SHA512-CRYPT)")  # fmt: skip
    parser.add_argument("-p", "--password", help="the password (visible to other users: "
                        "prefer the prompt)")  # fmt: skip
    parser.add_argument("-r", "--rounds", type=int,
                        help="rounds, cost or iterations for the scheme")  # fmt: skip
    parser.add_argument("--update", action="store_true",
                        help="change the password of an existing user")  # fmt: skip
    parser.add_argument("user", metavar="USER")
    _HANDLERS["pg-adduser"] = _pg_adduser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG, description="pop3proto tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_passwd(commands)
    _add_pg_migrate(commands)
    _add_pg_adduser(commands)
    _add_pg_import(commands)
    _add_deliver(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command with *argv* (default ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    return _HANDLERS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
