"""A model from the artifact store by name: NAME@production, NAME@latest or NAME@VERSION, fetched once.

Each version is kept in CACHE/NAME/VERSION (the files the store verified on fetch, and its
MANIFEST.json). Before a cached version is used, its manifest must equal the store's and every file
must hash to it; a cached copy that does not is fetched again. A version is fetched into a
temporary folder beside its place and renamed there only when complete, so a reader never sees a
half-written version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spottune.errors import ConfigError, StoreError

REFS = ("production", "latest")


@dataclass(frozen=True)
class Resolved:
    """What a model reference names in the store, right now."""

    name: str
    ref: str  # production, latest or the version asked for
    version: str
    manifest_sha256: str
    pointer: dict[str, Any] | None = None  # the production pointer, when ref is production


def parse_model_ref(text: str, option: str = "--model") -> tuple[str, str]:
    """'NAME@production' -> (NAME, 'production'); a bare NAME means NAME@production. option names the
    argument in the error."""
    from spottune.store import _check_name

    name, _, ref = text.partition("@")
    ref = ref or "production"
    try:
        _check_name("model name", name)
        if ref not in REFS:
            _check_name("version", ref)
    except StoreError as e:
        raise ConfigError(f"{option} {text!r}: {e}; expected NAME@production, NAME@latest or NAME@VERSION") from None
    return name, ref


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spottune" / "models"


def resolve(store, name: str, ref: str) -> Resolved:
    """The version NAME@ref stands for, and the sha256 of its manifest (its identity)."""
    from spottune.store import PromotionRefused

    if ref == "production":
        pointer = store.production(name)
        if pointer is None:
            raise StoreError(f"{name} has no production version in {store.backend.url(store.model_key(name))}")
        return Resolved(name, ref, pointer["version"], pointer["manifest_sha256"], pointer)
    if ref == "latest":
        complete = [r for r in store.list_versions(name) if r.complete]
        if not complete:
            raise StoreError(f"{name} has no complete version in {store.backend.url(store.model_key(name))}")
        ref_version = complete[-1].version  # list_versions sorts by creation time
    else:
        ref_version = ref
    try:
        _, manifest_sha = store.read_manifest(name, ref_version)
    except PromotionRefused:
        raise StoreError(f"{name}@{ref}: no such version in the store "
                         f"({store.backend.url(store.version_key(name, ref_version))} has no manifest)") from None
    return Resolved(name, ref, ref_version, manifest_sha)


def cached_problem(folder: Path, manifest: dict[str, Any]) -> str | None:
    """Why a cached version cannot be used (a file missing or changed, another manifest), or None."""
    from spottune.store import MANIFEST, sha256_file

    try:
        cached = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"{folder / MANIFEST} is missing or unreadable"
    if cached != manifest:
        return f"{folder / MANIFEST} differs from the store's manifest"
    for fname, entry in sorted(manifest["files"].items()):
        path = folder / fname
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            return f"{path} does not match its manifest (sha256 {entry['sha256']})"
    return None


def fetch_cached(store, resolved: Resolved, cache_dir: Path | None = None,
                 log: Callable[[str], None] = lambda _: None) -> Path:
    """The folder holding the resolved version's verified files: the cache's copy, or a new fetch."""
    from spottune.store import WEIGHTS, check_safetensors

    name, version = resolved.name, resolved.version
    manifest, manifest_sha = store.read_manifest(name, version)
    if manifest_sha != resolved.manifest_sha256:
        raise StoreError(f"the manifest of {name} {version} changed after it was resolved: sha256 {manifest_sha}, "
                         f"expected {resolved.manifest_sha256}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / name / version
    if folder.exists():
        problem = cached_problem(folder, manifest)
        if problem is None:
            log(f"{name} {version}: using the cached copy in {folder}")
            return folder
        log(f"{name} {version}: cached copy refused ({problem}); fetching it again")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{version}.", suffix=".part"))
    except OSError as e:
        raise StoreError(f"cannot write the model cache {root}: {e.strerror}") from None
    try:
        store.fetch_version(name, version, tmp, expected_manifest_sha256=resolved.manifest_sha256)
        check_safetensors(tmp / WEIGHTS)
        old = None
        if folder.exists():
            old = folder.with_name(f".{version}.{os.getpid()}.old")
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process put a copy there meanwhile: use it if it verifies
            if cached_problem(folder, manifest) is not None:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{name} {version}: fetched and verified into {folder}")
    return folder


def version_metadata(folder: Path) -> dict[str, Any]:
    """What the store records beside a version's weights: manifest, gate, data version, params, test metrics,
    lineage (None for a version published without one)."""
    from spottune.store import GATE, LINEAGE, MANIFEST

    def read_json(fname: str) -> Any:
        try:
            return json.loads((folder / fname).read_text())
        except (OSError, ValueError):
            return None

    manifest = read_json(MANIFEST) or {}
    metrics = read_json("metrics.json") or {}
    try:
        data_version = (folder / "data_version.txt").read_text().strip()
    except OSError:
        data_version = None
    return {
        "created_at": manifest.get("created_at"), "created_by": manifest.get("created_by"),
        "gate": read_json(GATE), "data_version": data_version,
        "files": manifest.get("files"), "params": read_json("params.json"),
        "metrics": {k: metrics.get(k) for k in ("method", "backbone", "test") if k in metrics},
        "lineage": read_json(LINEAGE),
    }
