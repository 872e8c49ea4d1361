"""--user/--group: the serving process runs as the mail user, after binding, with its groups."""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import MESSAGES, Proc, Raw, make_env, module_argv, wire

from pop3proto.ops import privileges


def _ids(pid: int) -> tuple[list[int], list[int], list[int]]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split(":", 1)[1].split() for line in status}
    return ([int(x) for x in fields["Uid"]], [int(x) for x in fields["Gid"]],
            [int(x) for x in fields["Groups"]])


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory the unprivileged user can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="pop3proto-priv-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_drop_to_the_mail_user_after_binding(world_dir: Path) -> None:
    if os.geteuid() != 0 or not Path("/proc/self/status").exists():
        pytest.skip("changing the user needs root and /proc")
    nobody = pwd.getpwnam("nobody")
    env = make_env(world_dir)
    for dirpath, _dirs, files in os.walk(env.root):
        os.chown(dirpath, nobody.pw_uid, nobody.pw_gid)
        os.chmod(dirpath, 0o700)
        for name in files:
            os.chown(os.path.join(dirpath, name), nobody.pw_uid, nobody.pw_gid)
    os.chmod(env.root, 0o700)
    proc = Proc(module_argv("blocking", "--port", "0", "--user", "nobody",
                            "--maildir-root", str(env.root), "--passwd-file", str(env.passwd)))
    try:
        port = int(proc.expect(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        uids, gids, groups = _ids(proc.p.pid)
        assert uids == [nobody.pw_uid] * 4
        assert gids == [nobody.pw_gid] * 4
        assert set(groups) == set(os.getgrouplist("nobody", nobody.pw_gid))
        with Raw(port) as c:
            assert c.login("alice", "alice-Secret-1").startswith(b"+OK")
            assert c.multi("RETR 1")[1] == wire(MESSAGES[0])
            assert c.cmd("QUIT").startswith(b"+OK")
        proc.p.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.kill()
    assert not any("running as root" in line for line in proc.stderr)
    assert any(f"running as uid {nobody.pw_uid}" in line for line in proc.stderr)


def test_running_as_root_without_user_warns(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the warning is about running as root")
    env = make_env(tmp_path)
    proc = Proc(module_argv("blocking", "--port", "0", "--maildir-root", str(env.root),
                            "--passwd-file", str(env.passwd)))
    try:
        proc.expect(r"listening on")
        proc.p.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.kill()
    warning = [line for line in proc.stderr if "running as root" in line]
    assert len(warning) == 1
    assert "WARNING" in warning[0]
    assert "--user" in warning[0]
    assert "--group" in warning[0]


def test_unknown_names_are_errors() -> None:
    with pytest.raises(ValueError, match="no such user"):
        privileges.resolve("no-such-user-here", None)
    with pytest.raises(ValueError, match="no such group"):
        privileges.resolve(None, "no-such-group-here")


def test_nofile_soft_limit_reaches_the_hard_limit() -> None:
    soft, hard = privileges.raise_nofile()
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
    if hard != resource.RLIM_INFINITY:
        assert soft == hard
