"""Run Dovecot's POP3 server on the benchmark fixture, for comparison.

This module installs nothing: install Dovecot first with
``DEBIAN_FRONTEND=noninteractive apt-get install -y dovecot-pop3d`` (the package's
postinst may try to start a system Dovecot; stop it with ``service dovecot stop``
if one runs).  ``Dovecot(fixture).start()`` writes a minimal ``dovecot.conf`` into
a fresh temporary directory (``base_dir``, ``state_dir`` and the log live there),
runs ``dovecot -F -c CONF`` as a child process listening on 127.0.0.1 only, waits
for the greeting, and ``stop()`` ends it by PID.

The configuration is tuned for speed, as a site serving many POP3 users would:

* ``pop3-login`` in high-performance mode (``service_count = 0``, long-lived
  login processes, each serving many clients);
* ``pop3`` processes reused across sessions (``service_count = 0``) and each
  serving up to ``client_limit`` sessions (every fixture user has the same uid,
  the condition for that), so 10,000 idle sessions need a dozen processes, not
  10,000;
* an auth cache; ``{PLAIN}`` secrets; no fsync tuning beyond the defaults;
* ``pop3_no_flag_updates = yes`` so RETR does not rename files to ``:2,S``
  (pop3proto never sets flags either: both do the same work);
* ``INDEX=``/``CONTROL=`` under ``FIXTURE/dovecot/`` so the Maildirs pop3proto
  reads carry no ``dovecot-uidlist`` (which pop3proto would otherwise honour);
* ``pop3_uidl_format = %08Xu%08Xv`` (what pop3proto reproduces from a uidlist).

Dovecot will not run mail processes as root (``userdb returned 0 as uid``), so
mail is accessed as the ``mail`` system user (uid 8 on Debian; ``MAIL_USER``)
and ``start()`` chowns the fixture's ``mail/`` and ``dovecot/`` trees to it
when needed; pop3proto runs as root and reads them either way.  The
unprivileged ``dovecot``/``dovenull`` users the package creates run the
internal and login processes (root when they are missing).

Dovecot 2.3 is what this was run with (``disable_plaintext_auth = no``); for
2.4 a translated configuration is written (``auth_allow_cleartext = yes`` and
the new block syntax), which has not been tried here.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from procstat import descendants

__all__ = ["Dovecot", "DovecotMissing", "dovecot_version", "free_port", "wait_greeting"]

MAIL_USER = "mail"
INSTALL_HINT = "DEBIAN_FRONTEND=noninteractive apt-get install -y dovecot-pop3d"


class DovecotMissing(RuntimeError):
    """No ``dovecot`` binary on PATH (or in /usr/sbin)."""


def dovecot_binary() -> str:
    found = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise DovecotMissing(f"dovecot is not installed; run: {INSTALL_HINT}")
    return found


def dovecot_version(binary: str | None = None) -> tuple[int, int, str]:
    """(major, minor, full version string) of the installed Dovecot."""
    out = subprocess.run(
        [binary or dovecot_binary(), "--version"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()
    m = re.match(r"(\d+)\.(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot parse `dovecot --version`: {out!r}")
    return int(m.group(1)), int(m.group(2)), out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_greeting(host: str, port: int, timeout: float = 20.0, proc: Any = None) -> None:
    """Wait until *host*:*port* answers with ``+OK`` (raise if *proc* exits first)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(5)
                line = s.recv(512)
                if line.startswith(b"+OK"):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    return
                last = RuntimeError(f"greeting {line!r}")
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"no POP3 greeting on {host}:{port} within {timeout}s: {last}")


def _user_or_root(name: str) -> str:
    try:
        pwd.getpwnam(name)
        return name
    except KeyError:
        return "root"


def config_23(
    *,
    root: str,
    tmp: str,
    port: int,
    passwd: str,
    index: str,
    control: str,
    uid: int,
    gid: int,
    pop3s_port: int | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> str:
    """dovecot.conf for Dovecot 2.3."""
    location = f"maildir:{root}/%u:INDEX={index}/%u:CONTROL={control}/%u"
    ssl = "no"
    ssl_lines = ""
    pop3s = "  inet_listener pop3s {\n    port = 0\n  }\n"
    if cert and key:
        ssl = "yes"
        ssl_lines = f"ssl_cert = <{cert}\nssl_key = <{key}\nssl_min_protocol = TLSv1.2\n"
        pop3s = (
            f"  inet_listener pop3s {{\n    address = 127.0.0.1\n    port = {pop3s_port}\n"
            "    ssl = yes\n  }\n"
        )
    return f"""# written by bench/dovecot.py for the pop3proto benchmarks (Dovecot 2.3)
base_dir = {tmp}/run
state_dir = {tmp}/state
log_path = {tmp}/dovecot.log
info_log_path = {tmp}/dovecot.log
instance_name = pop3proto-bench-{port}
protocols = pop3
listen = 127.0.0.1
shutdown_clients = yes
verbose_proctitle = no

ssl = {ssl}
{ssl_lines}disable_plaintext_auth = no
auth_mechanisms = plain login
auth_cache_size = 10M
auth_cache_ttl = 1 hour
auth_cache_negative_ttl = 1 hour

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/%u mail={location}
}}
mail_location = {location}
first_valid_uid = {uid}
first_valid_gid = {gid}
default_internal_user = {_user_or_root("dovecot")}
default_login_user = {_user_or_root("dovenull")}
maildir_very_dirty_syncs = yes

pop3_uidl_format = %08Xu%08Xv
pop3_no_flag_updates = yes

default_process_limit = 200
default_client_limit = 20000
default_vsz_limit = 1G

service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
{pop3s}  service_count = 0
  process_min_avail = 1
  client_limit = 20000
}}
service pop3 {{
  service_count = 0
  client_limit = 1000
  process_limit = 100
}}
service auth {{
  client_limit = 15000
}}
service anvil {{
  client_limit = 15000
}}
protocol pop3 {{
  mail_max_userip_connections = 20000
}}
"""


def config_24(
    *,
    root: str,
    tmp: str,
    port: int,
    passwd: str,
    index: str,
    control: str,
    uid: int,
    gid: int,
    pop3s_port: int | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> str:
    """dovecot.conf for Dovecot 2.4 (untested translation of ``config_23``)."""
    ssl = "no"
    ssl_lines = ""
    pop3s = "  inet_listener pop3s {\n    port = 0\n  }\n"
    if cert and key:
        ssl = "yes"
        ssl_lines = f"ssl_server_cert_file = {cert}\nssl_server_key_file = {key}\n"
        pop3s = (
            f"  inet_listener pop3s {{\n    listen = 127.0.0.1\n    port = {pop3s_port}\n"
            "    ssl = yes\n  }\n"
        )
    return f"""# written by bench/dovecot.py for the pop3proto benchmarks (Dovecot 2.4, untested)
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
base_dir = {tmp}/run
state_dir = {tmp}/state
log_path = {tmp}/dovecot.log
info_log_path = {tmp}/dovecot.log
instance_name = pop3proto-bench-{port}
protocols = pop3
listen = 127.0.0.1
shutdown_clients = yes
verbose_proctitle = no

ssl = {ssl}
{ssl_lines}auth_allow_cleartext = yes
auth_mechanisms = plain login
auth_cache_size = 10M
auth_cache_ttl = 1 hour

passdb passwd-file {{
  passwd_file_path = {passwd}
  default_password_scheme = PLAIN
}}
userdb static {{
  fields {{
    uid = {uid}
    gid = {gid}
    home = {root}/%{{user}}
  }}
}}
mail_driver = maildir
mail_path = {root}/%{{user}}
mail_index_path = {index}/%{{user}}
mail_control_path = {control}/%{{user}}
first_valid_uid = {uid}
first_valid_gid = {gid}
default_internal_user = {_user_or_root("dovecot")}
default_login_user = {_user_or_root("dovenull")}
maildir_very_dirty_syncs = yes

pop3_uidl_format = %{{uid | hex(8)}}%{{uidvalidity | hex(8)}}
pop3_no_flag_updates = yes

default_process_limit = 200
default_client_limit = 20000

service pop3-login {{
  inet_listener pop3 {{
    listen = 127.0.0.1
    port = {port}
  }}
{pop3s}  restart_request_count = unlimited
  process_min_avail = 1
  client_limit = 20000
}}
service pop3 {{
  restart_request_count = unlimited
  client_limit = 1000
  process_limit = 100
}}
protocol pop3 {{
  mail_max_userip_connections = 20000
}}
"""


class Dovecot:
    """One Dovecot instance on the fixture: ``start()``, ``pid``, ``port``, ``stop()``.

    Args:
        fixture: a ``bench.fixture.Fixture`` (its ``mail``, ``passwd`` and ``dovecot_dir``).
        port: the plain POP3 port (default: a free one).
        cpus: CPUs the server processes are confined to (inherited by every child).
        tls: (cert, key) PEM paths to also listen with implicit TLS on ``pop3s_port``.
    """

    name = "dovecot"

    def __init__(
        self,
        fixture: Any,
        *,
        port: int | None = None,
        cpus: set[int] | None = None,
        tls: tuple[str, str] | None = None,
    ) -> None:
        self.binary = dovecot_binary()
        self.major, self.minor, self.version = dovecot_version(self.binary)
        self.fixture = fixture
        self.port = port or free_port()
        self.pop3s_port: int | None = free_port() if tls else None
        self.tls = tls
        self.cpus = cpus
        self.tmp = ""
        self.conf = ""
        self.proc: subprocess.Popen[bytes] | None = None
        entry = pwd.getpwnam(MAIL_USER)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> str:
        return os.path.join(self.tmp, "dovecot.log")

    def write_config(self) -> str:
        self.tmp = tempfile.mkdtemp(prefix="pop3proto-bench-dovecot-")
        os.chmod(self.tmp, 0o755)  # login processes chroot below base_dir
        for sub in ("run", "state"):
            os.makedirs(os.path.join(self.tmp, sub), mode=0o755)
        fx = self.fixture
        make = config_24 if (self.major, self.minor) >= (2, 4) else config_23
        cert, key = self.tls or (None, None)
        text = make(
            root=fx.mail,
            tmp=self.tmp,
            port=self.port,
            passwd=fx.passwd,
            index=os.path.join(fx.dovecot_dir, "index"),
            control=os.path.join(fx.dovecot_dir, "control"),
            uid=self.uid,
            gid=self.gid,
            pop3s_port=self.pop3s_port,
            cert=cert,
            key=key,
        )
        self.conf = os.path.join(self.tmp, "dovecot.conf")
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write(text)
        return self.conf

    def own_fixture(self) -> None:
        """chown the fixture's mail and Dovecot trees to the mail user (once; cheap after)."""
        fx = self.fixture
        os.makedirs(fx.dovecot_dir, exist_ok=True)
        for top in (fx.mail, fx.dovecot_dir):
            st = os.stat(top)
            if (st.st_uid, st.st_gid) == (self.uid, self.gid):
                continue
            for d, dirs, files in os.walk(top):
                for name in dirs + files:
                    os.lchown(os.path.join(d, name), self.uid, self.gid)
            os.lchown(top, self.uid, self.gid)

    def start(self, timeout: float = 30.0) -> Dovecot:
        self.own_fixture()
        self.write_config()
        check = subprocess.run(
            [self.binary, "-c", self.conf, "-n"], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise RuntimeError(f"dovecot rejects {self.conf}: {check.stderr.strip()}")
        out = open(os.path.join(self.tmp, "stdout.log"), "wb")  # noqa: SIM115
        self.proc = _spawn(
            [self.binary, "-F", "-c", self.conf], self.cpus, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()
        try:
            wait_greeting("127.0.0.1", self.port, timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the master by PID (it stops its children), then SIGKILL leftovers by PID."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        children = descendants(proc.pid)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        deadline = time.monotonic() + 5
        for pid in children:
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(argv: list[str], cpus: set[int] | None, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Popen in a new session, with the child's CPU affinity set at fork.

    The affinity is inherited, so there is no race with the server's own children.
    A new session is a new scheduler autogroup (when the kernel has them): every
    server then competes for its CPU as one group, whatever its number of threads
    or processes, and the load generator's group does not share with it.
    """
    kwargs.setdefault("start_new_session", True)
    if not cpus:
        return subprocess.Popen(argv, **kwargs)
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        return subprocess.Popen(argv, **kwargs)
    finally:
        os.sched_setaffinity(0, mine)


def get_nice(pid: int) -> int:
    """*pid*'s autogroup niceness when the kernel groups by session, else its own."""
    try:
        with open(f"/proc/{pid}/autogroup", encoding="ascii") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return os.getpriority(os.PRIO_PROCESS, pid)


def set_nice(pid: int, nice: int) -> str:
    """Give *pid* niceness *nice*: its autogroup's when the kernel groups by session, else its own.

    Returns how it was applied.  Needs root for a negative value.
    """
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled", encoding="ascii") as f:
            autogroup = f.read().strip() == "1"
    except OSError:
        autogroup = False
    if autogroup:
        with open(f"/proc/{pid}/autogroup", "w", encoding="ascii") as f:
            f.write(str(nice))
        return "autogroup"
    os.setpriority(os.PRIO_PROCESS, pid, nice)
    return "process"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


if __name__ == "__main__":
    # python bench/dovecot.py FIXTURE_DIR: serve the fixture until Ctrl-C (for poking at it).
    import fixture as _fixture

    fx = _fixture.Fixture(sys.argv[1])
    dc = Dovecot(fx).start()
    print(f"{dc.version} pid {dc.pid} on 127.0.0.1:{dc.port}; conf {dc.conf}", flush=True)
    try:
        while dc.proc is not None and dc.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        dc.stop()
        dc.cleanup()
