"""Where commands write: output paths checked before any work, so a bad one fails at once in one line.

A file output must be a regular file or not exist yet (never a directory, a device such as
/dev/null, a FIFO or a socket: writing one by rename would replace it, as root even /dev/null); a
directory output must be a directory or not exist yet; every part of either must fit the file
system's name limit, and the nearest existing parent must be a directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from spottune.errors import ConfigError

_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(".")


def _check_names(path: Path, what: str) -> None:
    anchor = _nearest_existing(path.parent if path.parent != path else path)
    try:
        limit = os.pathconf(anchor if anchor.is_dir() else anchor.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.parts:
        n = len(os.fsencode(part))
        if n > limit:
            raise ConfigError(f"{what} {path}: the name {part[:40]}... is {n} bytes, over the file system's limit "
                              f"of {limit}")
    if not anchor.is_dir() and anchor != path:
        raise ConfigError(f"{what} {path}: {anchor} is not a directory")


def _named_path(path: Path | str, what: str) -> Path:
    """`path` as a Path whose every name a file system takes; ConfigError naming `what` otherwise."""
    path = Path(path)
    if "\x00" in str(path):
        raise ConfigError(f"{what} {str(path)!r}: the path holds a NUL byte")
    _check_names(path, what)
    return path


def output_file(path: Path | str | None, what: str) -> Path | None:
    """`path` when a file can be written there; ConfigError naming `what` (an option or key) otherwise."""
    if path is None:
        return None
    path = _named_path(path, what)
    try:
        mode = os.stat(path).st_mode  # follows a link: what a write would reach
    except FileNotFoundError:
        return path
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{what} {path} is {_kind(mode)}: give the path of a regular file (or of one to create)")
    return path


def output_dir(path: Path | str | None, what: str) -> Path | None:
    """`path` when a directory can be made or used there; ConfigError naming `what` otherwise."""
    if path is None:
        return None
    path = _named_path(path, what)
    if os.path.exists(path) and not path.is_dir():
        raise ConfigError(f"{what} {path} is {_kind(os.stat(path).st_mode)}, not a directory")
    return path
