"""Reading the user's files: regular files only, so that no FIFO, device or socket makes a run wait forever.

Imports no torch."""

import os
import stat
from pathlib import Path
from typing import BinaryIO

from mnist_kit.errors import RunError, shown


class FileRefused(RunError):
    """A file refused before or while it was read; reason is what it was said to be, without its name."""

    def __init__(self, path: str | Path, reason: str, advice: str) -> None:
        self.reason = reason
        super().__init__(f"{shown(path)} {reason}. {advice}".strip())


NOT_A_FILE = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket",
              stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}  # fmt: skip


def open_regular(path: str | Path, advice: str) -> BinaryIO:
    """A file opened for reading, or FileRefused when path is not a regular file (a FIFO, a device,
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
    raise FileRefused(path, f"is {NOT_A_FILE.get(kind, 'not a regular file')}, not a file", advice)


def read_whole(path: str | Path, advice: str, limit: int) -> bytes:
    """The bytes of a regular file, read to the size it had when opened and no further, or
    FileRefused when it is larger than limit, or grows or shrinks while it is read."""
    # A regular file can still be endless: one being written as it is read, or one the system
    # makes up as it is read (the files of /proc say they hold 0 bytes).
    with open_regular(path, advice) as file:
        size = os.fstat(file.fileno()).st_size
        if size > limit:
            raise FileRefused(path, f"is {size:,} bytes, more than the {limit:,} it can be", advice)
        content = file.read(size)
        if len(content) != size or file.read(1):
            reason = "changed size while it was read: it is still being written, or is not a file on a disk"
            raise FileRefused(path, reason, advice)
    return content


def memory_size() -> int:
    """This machine's memory in bytes, the most any file read whole can be (2**63 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**63
