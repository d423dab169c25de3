"""One training per run folder at a time: an OS lock on RUN/.lock, held while the run writes RUN.

Why: two `spottune train --out RUN` at once would interleave their checkpoints, and the second one's
`--overwrite` would delete the first one's files mid-run. `flock` belongs to the open file: the
operating system releases it when the holder ends in any way (kill -9, OOM, a lost container), so a
lock left by a dead process never blocks the next run. The file also names the holder (pid and host)
for the error message; it is removed when the run ends (and the folder too, when this lock made it
and the run wrote nothing into it).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Self

from spottune.errors import RunLocked

LOCK_NAME = ".lock"


class RunLock:
    """`with RunLock(folder):` holds folder/.lock exclusively or raises RunLocked naming the holder at once."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._made_folder = False

    def __enter__(self) -> Self:
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunLocked(f"{self.folder} is in use by another training (pid {holder}): wait for it to end, "
                                "or give another --out") from None
            if self._still_the_file(fd):
                break
            os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def _still_the_file(self, fd: int) -> bool:
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # still locked: a waiter that opened it sees it gone and retries
            os.close(self._fd)
            self._fd = None
            if self._made_folder:  # a run that failed before writing anything leaves no empty folder behind
                try:
                    self.folder.rmdir()
                except OSError:  # not empty (the run wrote files), or another run uses it now
                    pass
