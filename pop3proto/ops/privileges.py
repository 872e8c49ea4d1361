"""Process rights: drop to a mail user after binding; raise the open-file limit.

``drop_privileges(user, group)`` runs after the listening sockets are open
and before any mail is read.  It sets the supplementary groups, then the
group, then the user, and checks that root cannot be regained.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource

__all__ = ["drop_privileges", "raise_nofile", "resolve"]


def resolve(user: str | None, group: str | None) -> tuple[int | None, int | None, str | None]:
    """(uid, gid, user name) for *user*/*group* (names or numbers); the user's group by default.

    Raises:
        ValueError: no such user or group.
    """
    uid: int | None = None
    gid: int | None = None
    name: str | None = None
    if user is not None:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise ValueError(f"no such user {user!r}") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"no such group {group!r}") from None
    return uid, gid, name


def drop_privileges(user: str | None, group: str | None) -> tuple[int, int]:
    """Become *user* (and *group*) with the user's supplementary groups; the new (uid, gid).

    Raises:
        ValueError: no such user or group.
        PermissionError: not allowed to change (not root), or root could be regained.
    """
    uid, gid, name = resolve(user, group)
    if gid is not None:
        groups = os.getgrouplist(name, gid) if name is not None else [gid]
        os.setgroups(groups)
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
        if uid != 0:
            try:
                os.setuid(0)
            except PermissionError:
                pass
            else:
                raise PermissionError("could regain root after dropping privileges")
    return os.getuid(), os.getgid()


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard
