"""A read-only ``Storage`` over mbox files, served by ``pop3proto.server.Server``.

Each user's maildrop is ``DIRECTORY/<user>.mbox``.  Messages are listed
and streamed straight from the file (``mailbox.mbox.get_file``); deleting is
refused, so QUIT after DELE answers ``-ERR [SYS/TEMP]`` and the file stays
as it was.  Run ``python examples/mbox_storage.py --port 1100 --mbox-dir DIR
--user alice:wonderland`` (a demo mbox is written when DIR is omitted).
"""

from __future__ import annotations

import argparse
import hashlib
import mailbox
import os
import signal
import tempfile
import threading
from collections.abc import Sequence
from typing import BinaryIO

from pop3proto import MessageInfo, wire_size
from pop3proto.passwd import DictAuthenticator
from pop3proto.server import Server
from pop3proto.storage import MessageGone, StorageError


class MboxStorage:
    """The Storage contract (lock, unlock, scan, get, dele) over read-only mbox files."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._mutex = threading.Lock()
        self._open: dict[str, mailbox.mbox | None] = {}  # locked mailbox -> its file

    def lock(self, mailbox_name: str) -> bool:
        with self._mutex:
            if mailbox_name in self._open:
                return False  # another session has it: the client sees -ERR [IN-USE]
            self._open[mailbox_name] = None
            return True

    def unlock(self, mailbox_name: str) -> None:
        with self._mutex:
            box = self._open.pop(mailbox_name, None)
        if box is not None:
            box.close()

    def scan(self, mailbox_name: str) -> Sequence[MessageInfo]:
        path = os.path.join(self.directory, f"{mailbox_name}.mbox")
        if not os.path.isfile(path):
            return []  # no file: an empty maildrop
        box = mailbox.mbox(path, create=False)  # opens read-only if it cannot write
        self._open[mailbox_name] = box
        infos, seen = [], set()
        for key in box.iterkeys():
            data = box.get_bytes(key)  # one message at a time, to measure it
            uid = hashlib.sha1(data).hexdigest()
            while uid in seen:  # two identical messages still need two UIDLs
                uid = hashlib.sha1(uid.encode()).hexdigest()
            seen.add(uid)
            infos.append(MessageInfo(key=str(key), size=wire_size(data), uid=uid))
        return infos

    def get(self, mailbox_name: str, key: str) -> BinaryIO:
        box = self._open.get(mailbox_name)
        if box is None:
            raise StorageError(f"{mailbox_name!r} is not locked")
        try:
            # Streamed from the file; mbox keys are ints (typeshed says str).
            return box.get_file(int(key))  # type: ignore[arg-type,return-value]
        except KeyError as exc:
            raise MessageGone(key) from exc

    def dele(self, mailbox_name: str, keys: Sequence[str]) -> None:
        raise StorageError("this mbox gateway is read-only")


def demo_directory() -> str:
    """A temporary directory with alice.mbox holding two messages."""
    directory = tempfile.mkdtemp(prefix="mbox-example-")
    box = mailbox.mbox(os.path.join(directory, "alice.mbox"))
    box.add(b"From: bob@example.org\nSubject: from an mbox\n\nHello from mbox.\n")
    box.add(b"From: carol@example.org\nSubject: second\n\n.dot line\n")
    box.close()
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=1100, help="0 lets the OS pick")
    parser.add_argument("--mbox-dir", help="directory of <user>.mbox files (default: a demo)")
    parser.add_argument("--user", default="alice:wonderland", help="name:password")
    args = parser.parse_args()
    name, _, password = args.user.partition(":")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    server = Server(host="127.0.0.1", port=args.port, transport="selectors",
                    auth=DictAuthenticator({name: password}),
                    storage=MboxStorage(args.mbox_dir or demo_directory()))
    server.up()
    print(server.cget("port"), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.destroy("kill", timeout=10)


if __name__ == "__main__":
    main()
