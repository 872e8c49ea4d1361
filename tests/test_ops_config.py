"""The command's settings: flags and the TOML config file, both from ``OPTIONS``.

Each test runs the real command (``python -m pop3proto.transports.blocking``)
as a subprocess on 127.0.0.1, port 0, and stops it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from clients import MailEnv, Proc, Raw, make_env, module_argv, run_module
from tlsutil import TLSFiles

from pop3proto import __version__
from pop3proto.ops import config
from pop3proto.options import OPTIONS

LISTENING = r"listening on 127\.0\.0\.1:(\d+)"


@pytest.fixture
def env(tmp_path: Path) -> MailEnv:
    return make_env(tmp_path)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def one_error(*args: str) -> str:
    done = run_module("blocking", *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "listening" not in done.stdout
    return lines[0]


def test_version() -> None:
    done = run_module("blocking", "--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"pop3proto {__version__}"


def test_every_plain_option_has_a_flag_with_its_doc_and_default() -> None:
    done = run_module("blocking", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for name, option in OPTIONS.items():
        if option.cli and name != "transport":
            flag = "--" + name.replace("_", "-")
            assert flag in text, flag
            assert " ".join(option.doc.split()) in text, name
    assert "--max-connections N Live connections in all" in text
    assert "(default: 10000)" in text
    assert "(default: 100)" in text
    assert "--log-level DEBUG|INFO|WARNING|ERROR|CRITICAL Lowest level logged. (default: INFO)" \
        in text
    for flag in ("--config", "--check-config", "--user", "--group", "--log-format",
                 "--log-target", "--metrics-port", "--no-auth"):
        assert flag in text


def test_config_file_sets_options_and_flags_override_it(env: MailEnv, tmp_path: Path) -> None:
    conf = write(tmp_path / "pop3proto.toml", f"""
# every key is a flag's name with '_'
maildir_root = "{env.root}"
passwd_file = "{env.passwd}"
port = 0
greeting = "from the config file"
sasl_mechanisms = ["PLAIN"]
max_auth_failures = 5
cleartext_auth = "always"
""")
    proc = Proc(module_argv("blocking", "--config", conf, "--max-auth-failures", "7"))
    try:
        port = int(proc.expect(LISTENING).group(1))
        with Raw(port) as c:
            assert c.greeting.startswith(b"+OK from the config file")
            capa = c.multi("CAPA")[1]
            assert b"SASL PLAIN\r\n" in capa
        proc.p.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.kill()


def test_precedence_defaults_then_file_then_flags(tmp_path: Path) -> None:
    conf = write(tmp_path / "c.toml", 'greeting = "file"\nidle_timeout = 900\n'
                 'maildir_root = "mail"\n')
    s = config.resolve_settings({"config": conf, "idle_timeout": 1200.0})
    assert s["greeting"] == "file"
    assert s["idle_timeout"] == 1200.0
    assert s["login_timeout"] == OPTIONS["login_timeout"].default
    assert s["port"] == 1100
    assert s["maildir_root"] == str(tmp_path / "mail")  # relative to the file


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('port = 0\n\nprot = 110\n', ["line 3", "unknown key 'prot'"]),
        ('max_connections = -1\n', ["line 1", "max_connections", "non-negative integer"]),
        ('greeting = 5\n', ["greeting", "a string"]),
        ('idle_timeout = "long"\n', ["idle_timeout", "seconds"]),
        ('log_format = "xml"\n', ["log_format", "text, json"]),
        ('port = \n', ["config file"]),
        ('[server]\nport = 0\n', ["unknown key 'server'"]),
    ],
)
def test_config_errors_name_the_key_and_line(
    env: MailEnv, tmp_path: Path, text: str, words: list[str]
) -> None:
    conf = write(tmp_path / "bad.toml", text)
    line = one_error("--config", conf, "--maildir-root", str(env.root),
                     "--passwd-file", str(env.passwd))
    assert "error" in line
    for word in words:
        assert word in line


def test_missing_config_file(tmp_path: Path) -> None:
    line = one_error("--config", str(tmp_path / "nope.toml"))
    assert "nope.toml" in line
    assert "No such file" in line


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-connections", "-3"), ("--expire", "soon"), ("--trusted-proxies", "not-a-net"),
     ("--login-delay", "1.5"), ("--max-line-length", "9")],
)
def test_bad_flag_values_are_one_line(env: MailEnv, flag: str, value: str) -> None:
    line = one_error(flag, value, "--maildir-root", str(env.root),
                     "--passwd-file", str(env.passwd))
    assert flag in line


def test_flag_values_are_read_by_the_table() -> None:
    parser = config.build_parser("x", "0")
    ns = vars(parser.parse_args([
        "--expire", "NEVER", "--login-delay", "900", "--sasl-mechanisms", "PLAIN,SCRAM-SHA-256",
        "--cleartext-auth", "never", "--no-utf8", "--idle-timeout", "1.5", "--pop3s-port", "0",
    ]))
    assert ns == {"expire": "NEVER", "login_delay": 900,
                  "sasl_mechanisms": ("PLAIN", "SCRAM-SHA-256"), "cleartext_auth": False,
                  "utf8": False, "idle_timeout": 1.5, "pop3s_port": 0}


def test_no_authenticator_is_an_error_unless_asked_for(env: MailEnv) -> None:
    line = one_error("--port", "0", "--maildir-root", str(env.root))
    assert "--passwd-file" in line
    assert "--no-auth" in line
    done = run_module("blocking", "--port", "0", "--maildir-root", str(env.root), "--no-auth",
                      "--check-config")
    assert done.returncode == 0, done.stderr


def test_check_config_passes_and_fails_with_one_line(env: MailEnv, tmp_path: Path) -> None:
    tls = TLSFiles.create(tmp_path)
    good = ["--maildir-root", str(env.root), "--passwd-file", str(env.passwd),
            "--tls-cert", str(tls.cert_pem), "--tls-key", str(tls.key_pem), "--pop3s-port", "0"]
    done = run_module("blocking", *good, "--check-config")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("configuration OK")
    assert done.stderr == ""
    # a key that is not the certificate's
    line = one_error(*good, "--tls-key", str(tls.key_path(2)), "--check-config")
    assert "cannot start" in line
    line = one_error(*good, "--tls-cert", str(tmp_path / "none.pem"), "--check-config")
    assert "none.pem" in line
    line = one_error(*good, "--user", "no-such-user-here", "--check-config")
    assert "no-such-user-here" in line


def test_json_logs_from_the_command(env: MailEnv) -> None:
    proc = Proc(module_argv("blocking", "--port", "0", "--log-format", "json",
                            "--log-level", "DEBUG", "--maildir-root", str(env.root),
                            "--passwd-file", str(env.passwd)))
    try:
        proc.expect(LISTENING)
        proc.p.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.kill()
    records = [json.loads(line) for line in proc.stderr]
    limit = [r for r in records if r["message"].startswith("open-file limit: ")]
    assert len(limit) == 1
    assert limit[0]["level"] == "DEBUG"
    assert limit[0]["logger"] == "pop3proto"
    assert limit[0]["pid"] == proc.p.pid
