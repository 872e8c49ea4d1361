"""Command-line tools: ``python -m pop3proto COMMAND ...``.

Each subcommand is a ``_add_<name>`` function that adds its parser and
registers its handler in ``_HANDLERS``; ``main`` parses and dispatches.  To
add a command, write both and call the ``_add_`` function in ``_parser``.
Handlers return the exit status; problems go to stderr as one line.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

from .passwd import HASH_SCHEMES, hash_password, user_name_problem

__all__ = ["main"]

_PROG = "python -m pop3proto"
_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _error(command: str, message: str, status: int = 2) -> int:
    print(f"{_PROG} {command}: {message}", file=sys.stderr)
    return status


def _passwd(args: argparse.Namespace) -> int:
    """Print a passwd-file password field (or a whole ``user:field`` line), like doveadm pw."""
    scheme = str(args.scheme).upper()
    if scheme not in HASH_SCHEMES:
        return _error("passwd", f"unknown scheme {args.scheme!r}; use one of "
                                f"{', '.join(HASH_SCHEMES)}")  # fmt: skip
    if args.user is not None and (problem := user_name_problem(args.user)) is not None:
        return _error("passwd", problem)
    password: str | None = args.password
    if password is None:
        try:
            password = getpass.getpass("Enter new password: ")
            again = getpass.getpass("Retype new password: ")
        except EOFError:
            return _error("passwd", "no password given")
        if password != again:
            return _error("passwd", "passwords don't match")
        if not password:
            return _error("passwd", "empty password")
    try:
        field = hash_password(password, scheme, rounds=args.rounds)
    except ValueError as exc:
        return _error("passwd", str(exc))
    except RuntimeError as exc:
        return _error("passwd", str(exc), 1)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_PROG, description="pop3proto tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_passwd(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command with *argv* (default ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    return _HANDLERS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
