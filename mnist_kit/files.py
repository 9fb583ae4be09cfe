"""Reading the user's files: regular files only, so that no FIFO, device or socket makes a run wait forever.

Imports no torch."""

import os
import stat
from pathlib import Path
from typing import BinaryIO

from mnist_kit.errors import RunError, shown

NOT_A_FILE = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket",
              stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}  # fmt: skip


def open_regular(path: str | Path, advice: str) -> BinaryIO:
    """A file opened for reading, or a RunError when path is not a regular file (a FIFO, a device,
    a socket, a folder), whose reading could wait forever or never end; advice says what to do."""
    # Checked before it is opened, since opening a FIFO waits for a writer and opening a socket
    # fails, and again once open (O_NONBLOCK changes nothing for a regular file), in case the
    # path was swapped in between. A missing file is an OSError, which names it.
    kind = stat.S_IFMT(os.stat(path).st_mode)
    if kind == stat.S_IFREG:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        kind = stat.S_IFMT(os.fstat(descriptor).st_mode)
        if kind == stat.S_IFREG:
            return os.fdopen(descriptor, "rb")
        os.close(descriptor)
    raise RunError(f"{shown(path)} is {NOT_A_FILE.get(kind, 'not a regular file')}, not a file. {advice}")
