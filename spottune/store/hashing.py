"""sha256 of bytes, files and streams: the one place the store hashes (manifests, verification, tags)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_chunks(path: Path) -> Iterator[bytes]:
    """A file's bytes, CHUNK at a time."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def sha256_stream(chunks: Iterable[bytes], *, write: Callable[[bytes], object] | None = None,
                  max_size: int | None = None) -> tuple[str, int]:
    """The sha256 and size in bytes of a stream of chunks; each chunk also goes to write, when given.

    With max_size, reading stops at the chunk that takes the size past it (hashed and counted, not
    written), so an oversized object is not streamed to its end.
    """
    h = hashlib.sha256()
    size = 0
    for chunk in chunks:
        h.update(chunk)
        size += len(chunk)
        if max_size is not None and size > max_size:
            break
        if write is not None:
            write(chunk)
    return h.hexdigest(), size


def sha256_file(path: Path) -> str:
    return sha256_stream(file_chunks(path))[0]
