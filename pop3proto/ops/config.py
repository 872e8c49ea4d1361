"""The command's settings: flags and TOML config keys, both generated from ``OPTIONS``.

Every ``cli`` option of ``pop3proto.options.OPTIONS`` (but ``transport``,
which the command names) is a flag ``--name-with-dashes`` and a config key
``name``, with the table's one-line doc and default as help.  The command's
own settings (``passwd_file``, ``maildir_root``, logging, ``user``/``group``,
metrics) are ``Option`` rows of the same shape in ``COMMAND_OPTIONS``.
Precedence: the table's default, then the config file, then the flags.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from ..options import OPTIONS, Option
from .logfmt import FORMATS, TARGETS

__all__ = [
    "COMMAND_OPTIONS",
    "SETTINGS",
    "ConfigError",
    "build_parser",
    "convert",
    "load_config",
    "resolve_settings",
    "server_options",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_PATH_KEYS = ("tls_cert", "tls_key", "passwd_file", "maildir_root")


def _opt_str(v: Any) -> bool:
    return v is None or (isinstance(v, str) and bool(v))


def _one_of(*values: str) -> Callable[[Any], bool]:
    return lambda v: v in values


def _opt_port(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535)


#: The command's own settings (not ``Server`` options), in the shape of ``OPTIONS``.
COMMAND_OPTIONS: dict[str, Option] = {o.name: o for o in [
    Option("passwd_file", None, "Dovecot passwd-file with the users.", "a path", _opt_str),
    Option("maildir_root", None, "Directory holding ROOT/<user>/{cur,new,tmp} (required).",
           "a directory path", _opt_str),
    Option("no_auth", False, "Start without --passwd-file: every login is refused.",
           "a bool", lambda v: isinstance(v, bool)),
    Option("log_level", "INFO", "Lowest level logged.", "one of " + ", ".join(LOG_LEVELS),
           _one_of(*LOG_LEVELS)),
    Option("log_format", "text", "Log lines as text or as JSON objects, one a line.",
           "one of " + ", ".join(FORMATS), _one_of(*FORMATS)),
    Option("log_target", "stderr", "Where logs go: stderr, syslog (/dev/log, facility mail) or "
           "the systemd journal.", "one of " + ", ".join(TARGETS), _one_of(*TARGETS)),
    Option("user", None, "User to run as once the ports are bound (with its groups).",
           "a user name or uid", _opt_str),
    Option("group", None, "Group to run as once the ports are bound (default: the user's).",
           "a group name or gid", _opt_str),
    Option("metrics_port", None, "Serve Prometheus metrics on this port (needs the "
           "'metrics' extra: prometheus_client).", "a port number 0-65535", _opt_port),
    Option("metrics_host", "127.0.0.1", "Address of the metrics endpoint.", "a string",
           lambda v: isinstance(v, str) and bool(v)),
]}

#: Options the command fixes itself, and defaults the command changes (an unprivileged port).
_NOT_SETTINGS = ("transport",)
_COMMAND_DEFAULTS = {"port": 1100}
#: Extra spellings accepted for a value.
_ALIASES: dict[str, dict[str, Any]] = {"cleartext_auth": {"always": True, "never": False}}

#: Every setting a flag or config key can give: the server's plain options, then the command's.
SETTINGS: dict[str, Option] = {
    **{k: o for k, o in OPTIONS.items() if o.cli and k not in _NOT_SETTINGS},
    **COMMAND_OPTIONS,
}


class ConfigError(ValueError):
    """A config file or flag value that cannot be used; the message names the key."""


def default(name: str) -> Any:
    """The command's default for setting *name*."""
    return _COMMAND_DEFAULTS.get(name, SETTINGS[name].default)


def _is_list(option: Option) -> bool:
    return option.check([])


def _is_flag(option: Option) -> bool:
    return isinstance(option.default, bool)


def convert(option: Option, text: str) -> Any:
    """The value of *option* spelled *text* on the command line (the first reading it accepts).

    Lists are comma-separated; ``none`` is None where None is accepted.

    Raises:
        argparse.ArgumentTypeError: no reading is accepted (the message says what is).
    """
    if _is_list(option):
        value: Any = tuple(part.strip() for part in text.split(",") if part.strip())
        if option.check(value):
            return value
        raise argparse.ArgumentTypeError(f"must be {option.accepts}, got {text!r}")
    candidates: list[Any] = []
    alias = _ALIASES.get(option.name, {})
    if text in alias:
        candidates.append(alias[text])
    low = text.strip().lower()
    if low == "none":
        candidates.append(None)
    if low in ("true", "yes", "on"):
        candidates.append(True)
    if low in ("false", "no", "off"):
        candidates.append(False)
    for number in (int, float):
        try:
            candidates.append(number(text))
        except ValueError:
            pass
    candidates.append(text)
    for value in candidates:
        if option.check(value):
            return value
    raise argparse.ArgumentTypeError(f"must be {option.accepts}, got {text!r}")


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _help(name: str, option: Option) -> str:
    text = f"{option.doc} (default: {_show(default(name))})"
    return text.replace("%", "%%")


def _metavar(option: Option) -> str:
    if _is_list(option):
        return "A,B,..."
    if isinstance(option.default, float):
        return "SECONDS"
    if isinstance(option.default, int) or "port" in option.accepts:
        return "N"
    if "directory" in option.accepts:
        return "DIR"
    if "path" in option.accepts:
        return "FILE"
    return "VALUE"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str, version: str) -> argparse.ArgumentParser:
    """The flags: one per setting (help and default from its row), plus the command's own.

    Settings not given on the command line are absent from the namespace, so
    a config file can supply them.
    """
    p = _Parser(prog=prog, description="Serve Maildirs over POP3 (RFC 1939).",
                argument_default=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=f"pop3proto {version}")
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of settings (the flag names with '_'); flags override it")
    p.add_argument("--check-config", action="store_true",
                   help="check the settings, files and TLS certificate, print one line, exit "
                        "0 (good) or 2")
    p.add_argument("--demo", action="store_true",
                   help="serve a throwaway Maildir with a demo user and print how to try it")
    for name, option in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        if _is_flag(option):
            negative = name.startswith("no_")  # --no-auth, not --no-no-auth
            p.add_argument(flag, dest=name, help=_help(name, option),
                           action="store_true" if negative else argparse.BooleanOptionalAction)
            continue
        choices = None
        if name in ("log_level", "log_format", "log_target"):
            choices = {"log_level": LOG_LEVELS, "log_format": FORMATS,
                       "log_target": TARGETS}[name]
        metavar = "|".join(choices) if choices else _metavar(option)
        p.add_argument(flag, dest=name, metavar=metavar,
                       choices=choices, help=_help(name, option),
                       type=functools.partial(convert, option))
    return p


# ------------------------------------------------------------------ the config file


def _toml() -> tuple[Callable[[str], dict[str, Any]], type[Exception]]:
    module = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    return module.loads, module.TOMLDecodeError


def _line_of(text: str, key: str) -> int | None:
    m = re.search(rf"^[ \t]*[\"']?{re.escape(key)}[\"']?[ \t]*=", text, re.MULTILINE)
    return text.count("\n", 0, m.start()) + 1 if m else None


def load_config(path: str) -> dict[str, Any]:
    """The settings in the TOML file *path*, checked; relative paths are resolved against it.

    Raises:
        ConfigError: the file cannot be read or parsed, a key is unknown or a
            value is not accepted (the message names the file, line and key).
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"config file {path!r}: {why}") from None
    loads, decode_error = _toml()
    try:
        data = loads(text)
    except decode_error as exc:
        raise ConfigError(f"config file {path!r}: {exc}") from None
    base = os.path.dirname(os.path.abspath(path))
    out: dict[str, Any] = {}
    for key, value in data.items():
        line = _line_of(text, key)
        where = f"config file {path!r}" + (f", line {line}" if line else "")
        option = SETTINGS.get(key)
        if option is None:
            raise ConfigError(f"{where}: unknown key {key!r}")
        if isinstance(value, str) and value in _ALIASES.get(key, {}):
            value = _ALIASES[key][value]
        if isinstance(value, list):
            value = tuple(value)
        if not option.check(value):
            raise ConfigError(f"{where}: {key} must be {option.accepts}, got {value!r}")
        if key in _PATH_KEYS and isinstance(value, str):
            value = os.path.join(base, os.path.expanduser(value))
        out[key] = value
    return out


def resolve_settings(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting: the defaults, then ``flags['config']``'s file, then the flags given.

    Raises:
        ConfigError: see ``load_config``.
    """
    settings = {name: default(name) for name in SETTINGS}
    if flags.get("config"):
        settings.update(load_config(flags["config"]))
    settings.update({k: v for k, v in flags.items() if k in SETTINGS})
    return settings


def server_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Server`` options among *settings* (without the TLS files, loaded separately)."""
    return {k: v for k, v in settings.items()
            if k in OPTIONS and k not in ("tls_cert", "tls_key")}


def level(settings: Mapping[str, Any]) -> int:
    """The logging level *settings* name."""
    value: int = getattr(logging, settings["log_level"])
    return value
