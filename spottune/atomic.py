"""Atomic file writes: readers see the old file or the new one, never half of either.

Needs only the standard library, so that stages which never import torch (validate, prepare) write
their outputs the same way as training does.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any


def _temporary_prefix(path: Path) -> str:
    """Temporary names carry host and pid, so a later writer can tell which ones were left by a dead process."""
    name = path.name
    if len(os.fsencode(name)) > 120:  # a long (valid) name must still leave room for ".tmp-host-pid"
        name = f"{name[:30]}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:12]}"
    return f".{name}.tmp-{socket.gethostname()[:60]}-"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporary files of `path` left by writers on this host that were killed mid-write (kill -9, OOM).

    Why: a killed writer cannot clean up, and a checkpoint-sized leftover per preemption would fill
    the disk. Only this host's files of processes that no longer run are touched: a live writer's
    file, or one from another host sharing the folder, is left alone.
    """
    prefix = _temporary_prefix(path)
    removed = []
    for tmp in path.parent.glob(glob.escape(prefix) + "*"):
        pid = tmp.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """`obj` as indented JSON (and a final newline) at `path`, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent) + "\n"))


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: readers see the old file or the new one.

    A writer killed at any point leaves `path` as it was (its temporary file is removed by the next
    write); the directory is fsynced after the rename so the new name also survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f"{_temporary_prefix(path)}{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(new: Path, path: Path) -> None:
    """Put the finished folder `new` (on the same filesystem) at `path` by renames: readers see the old
    folder, then the new one whole, never a half-written one. The old folder is deleted afterwards."""
    import shutil

    new, path = Path(new), Path(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)
