"""ArtifactStore: publish, verify, list and fetch model versions on any Backend (promotion and
rollback come from spottune.store.promotion); open_store and load_production_model."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spottune.errors import StoreError
from spottune.rundir import MODEL_FORMAT, RUN_FILES
from spottune.settings import StoreSettings
from spottune.store.backends import Backend, open_backend
from spottune.store.cards import build_card, model_card_markdown
from spottune.store.errors import IntegrityError, ObjectMissing, PromotionRefused, WriteConflict
from spottune.store.hashing import sha256_bytes, sha256_file, sha256_stream
from spottune.store.promotion import PromotionMixin
from spottune.store.values import (
    GATE,
    LATER_FILES,
    LINEAGE,
    LINEAGE_FILES,
    MANIFEST,
    MODEL_CARD_JSON,
    STORE_FORMAT,
    VERSION_FILES,
    WEIGHTS,
    Gate,
    Lineage,
    PublishResult,
    VersionInfo,
    _check_name,
    _dump,
    _now,
    check_gate_for,
    check_prefix,
    check_safetensors,
    content_version,
    default_actor,
    lineage_identity,
)


class ArtifactStore(PromotionMixin):
    """Publish, verify, promote, roll back and fetch model versions on any Backend."""

    def __init__(self, backend: Backend, prefix: str = "") -> None:
        self.backend = backend
        self.prefix = check_prefix(prefix)

    # keys -------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def model_key(self, name: str, *rest: str) -> str:
        return self._key("models", _check_name("model name", name), *rest)

    def version_key(self, name: str, version: str, filename: str = "") -> str:
        return self.model_key(name, "versions", _check_name("version", version), filename)

    # verification -----------------------------------------------------------------------
    def _stored_sha256(self, key: str) -> str:
        return sha256_stream(self.backend.iter_chunks(key))[0]

    def _upload_verified(self, key: str, src: Path, sha256: str) -> None:
        """Upload, then read the object back and hash it: download-and-hash, not ETag or HEAD.

        Why: an S3 ETag is an MD5 only for single-part unencrypted uploads; a multipart ETag is an
        MD5 of part MD5s, and S3's own SHA256 checksums of multipart objects are composite (per
        part), so neither equals the manifest's full-object sha256. Metadata from HEAD is only what
        we sent. Reading the bytes back is the one check that proves the store holds exactly the
        file the manifest describes; it costs one extra read of each file per publish.
        """
        self.backend.put_file(key, src, sha256)
        got = self._stored_sha256(key)
        if got != sha256:
            raise IntegrityError(f"upload of {src.name} to {self.backend.url(key)} did not verify: "
                                 f"sha256 {got} stored, {sha256} sent")

    def read_manifest(self, name: str, version: str) -> tuple[dict[str, Any], str]:
        """The version's manifest and the sha256 of its bytes; PromotionRefused when absent or malformed."""
        key = self.version_key(name, version, MANIFEST)
        got = self.backend.get_bytes(key)
        if got is None:
            raise PromotionRefused(f"{name} {version} is incomplete: {self.backend.url(key)} does not exist")
        data, _ = got
        try:
            manifest = json.loads(data)
            files = manifest["files"]
            for fname, entry in files.items():
                if fname not in VERSION_FILES and fname not in LINEAGE_FILES:
                    raise ValueError(f"unexpected file {fname!r}")
                if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) or int(entry["size"]) < 0:
                    raise ValueError(f"bad entry for {fname!r}")
            required = set(VERSION_FILES) - set(LATER_FILES)
            if not required <= set(files):
                raise ValueError(f"files {sorted(files)} lack {sorted(required - set(files))}")
            if set(files) & set(LINEAGE_FILES) and LINEAGE not in files:
                raise ValueError(f"lineage files {sorted(set(files) & set(LINEAGE_FILES))} without {LINEAGE}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"{self.backend.url(key)} is not a valid manifest: {e}") from None
        return manifest, sha256_bytes(data)

    def verify_version(self, name: str, version: str,
                       expected_manifest_sha256: str | None = None) -> tuple[dict[str, Any], str]:
        """Hash every stored file of the version against its manifest; return the manifest and its sha256.

        IntegrityError names the first file whose bytes differ (or whose manifest was swapped after
        promotion, when expected_manifest_sha256 is given).
        """
        manifest, manifest_sha = self.read_manifest(name, version)
        self._check_manifest_sha(name, version, manifest_sha, expected_manifest_sha256)
        for fname, entry in sorted(manifest["files"].items()):
            key = self.version_key(name, version, fname)
            try:
                got = self._stored_sha256(key)
            except ObjectMissing:
                raise PromotionRefused(f"{name} {version} is incomplete: {self.backend.url(key)} is missing") from None
            if got != entry["sha256"]:
                raise IntegrityError(f"{self.backend.url(key)} does not match its manifest: sha256 {got}, "
                                     f"manifest says {entry['sha256']}")
        return manifest, manifest_sha

    def _check_manifest_sha(self, name: str, version: str, got: str, expected: str | None) -> None:
        if expected is not None and got != expected:
            raise IntegrityError(f"the manifest of {name} {version} changed after it was promoted: "
                                 f"sha256 {got}, production pointer says {expected}")

    # publish ----------------------------------------------------------------------------
    def publish(
        self,
        run_dir: Path,
        name: str,
        version: str | None = None,
        *,
        gate: Gate,
        data_version: str | None = None,
        report: Path | None = None,
        lineage: Lineage | None = None,
        actor: str | None = None,
        log: Callable[[str], None] = lambda _: None,
    ) -> PublishResult:
        """Upload a finished run as NAME/VERSION, each file verified, MANIFEST.json last.

        Idempotent: files already stored with the right sha256 are skipped, so re-running after a
        failure mid-upload only sends what is missing. A version whose manifest already exists is
        left as it is when its files are the same, and refused when they differ. The version
        defaults to `content_version`: 12 hex of the weights' sha256 and 6 of every published file,
        so the same files always map to the same version and other content never clashes with it. The gate's
        verdict is one of the files: a failed gate makes a candidate that `promote` will always refuse; a
        pass must carry the gate stage's record for these weights (check_gate_for), and no verdict
        (passed None) makes a version that only a forced promotion moves to production. With a lineage,
        lineage.json and its files (dvc.lock, data.dvc, git.diff) are stored and listed in the manifest like
        the rest; publishing the same run again from another flow run (only lineage's flow_run differs) is a
        no-op that keeps the first record.
        """
        from tempfile import TemporaryDirectory

        _check_name("model name", name)
        with TemporaryDirectory(prefix="spottune-publish-") as tmp:
            files = self._stage(Path(run_dir), Path(tmp), name, gate, data_version, report, lineage)
            files |= _stage_lineage(Path(tmp), lineage)
            entries = {f: {"sha256": sha256_file(p), "size": p.stat().st_size} for f, p in files.items()}
            check_gate_for(gate, entries[WEIGHTS]["sha256"], str(run_dir))
            record = lineage.record if lineage is not None else None
            version = _check_name("version", version or content_version(entries, record))
            existing = self._existing_manifest(name, version)
            if existing is not None:
                return self._same_or_refuse(name, version, existing, entries, record)

            stored = self.backend.list_sizes(self.version_key(name, version) + "/")
            uploaded, skipped = [], []
            for fname in [*VERSION_FILES, *(f for f in LINEAGE_FILES if f in files)]:
                key = self.version_key(name, version, fname)
                entry = entries[fname]
                if stored.get(key) == entry["size"] and self._stored_sha256(key) == entry["sha256"]:
                    skipped.append(fname)
                    continue
                self._upload_verified(key, files[fname], entry["sha256"])
                uploaded.append(fname)
                log(f"uploaded {fname} -> {self.backend.url(key)}")

            manifest = {"format": STORE_FORMAT, "name": name, "version": version, "created_at": _now(),
                        "created_by": actor or default_actor(), "gate_passed": gate.passed, "files": entries}
            data = _dump(manifest)
            key = self.version_key(name, version, MANIFEST)
            try:
                self.backend.put_bytes(key, data, if_absent=True)
            except WriteConflict:  # a concurrent publisher finished first
                existing = self._existing_manifest(name, version)
                assert existing is not None
                return self._same_or_refuse(name, version, existing, entries, record)
            if self.read_manifest(name, version)[1] != sha256_bytes(data):
                raise IntegrityError(f"{self.backend.url(key)} did not verify after upload")
            log(f"published {name} {version} -> {self.backend.url(key)}")
            return PublishResult(version, sha256_bytes(data), uploaded, skipped, already_published=False)

    def _existing_manifest(self, name: str, version: str) -> tuple[dict[str, Any], str] | None:
        try:
            return self.read_manifest(name, version)
        except PromotionRefused:
            return None

    def _same_or_refuse(self, name: str, version: str, existing: tuple[dict[str, Any], str],
                        entries: dict[str, dict[str, Any]], lineage: dict[str, Any] | None) -> PublishResult:
        manifest, manifest_sha = existing
        differ = sorted(f for f in set(entries) | set(manifest["files"]) if manifest["files"].get(f) != entries.get(f))
        if differ == [LINEAGE] and lineage is not None and self._stored_lineage_identity(name, version) == \
                lineage_identity(lineage):
            differ = []  # published before by another flow run: the first record stays
        if differ:
            raise StoreError(f"{name} {version} is already published with other content ({', '.join(differ)} "
                             f"differ in {self.backend.url(self.version_key(name, version, MANIFEST))}): "
                             "publish under a new version")
        return PublishResult(version, manifest_sha, [], sorted(manifest["files"]), already_published=True)

    def _stored_lineage_identity(self, name: str, version: str) -> dict[str, Any] | None:
        try:
            return lineage_identity(json.loads(self.read_verified(name, version, LINEAGE)))
        except (StoreError, ValueError, AttributeError):
            return None

    def read_verified(self, name: str, version: str, fname: str) -> bytes:
        """One file of a complete version, its bytes checked against the manifest (IntegrityError if not).

        For the small files (lineage, metrics, gate) that `models show` reads without fetching the weights.
        """
        manifest, _ = self.read_manifest(name, version)
        entry = manifest["files"].get(fname)
        key = self.version_key(name, version, fname)
        if entry is None:
            raise ObjectMissing(f"{name} {version} has no {fname} (its manifest does not list it)")
        got = self.backend.get_bytes(key)
        if got is None:
            raise PromotionRefused(f"{name} {version} is incomplete: {self.backend.url(key)} is missing")
        if len(got[0]) != entry["size"] or sha256_bytes(got[0]) != entry["sha256"]:
            raise IntegrityError(f"{self.backend.url(key)} does not match its manifest: sha256 {sha256_bytes(got[0])}, "
                                 f"manifest says {entry['sha256']}")
        return got[0]

    def _stage(self, run_dir: Path, tmp: Path, name: str, gate: Gate, data_version: str | None,
               report: Path | None, lineage: Lineage | None) -> dict[str, Path]:
        """Collect the version's files: the run's own, plus generated ones with deterministic content."""
        weights, model_json, metrics_json = (run_dir / f for f in RUN_FILES)
        for p in (weights, model_json, metrics_json):
            if not p.is_file():
                raise StoreError(f"{run_dir} is not a finished run: {p.name} is missing")
        check_safetensors(weights)
        try:
            card = json.loads(model_json.read_text())
            metrics = json.loads(metrics_json.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{run_dir}: unreadable model.json or metrics.json: {e}") from None
        if not isinstance(card, dict) or card.get("format") != MODEL_FORMAT:
            got = card.get("format") if isinstance(card, dict) else card
            raise StoreError(f"{model_json}: unknown format {got!r}, expected {MODEL_FORMAT}")
        if not isinstance(metrics, dict):
            raise StoreError(f"{metrics_json}: expected a JSON object")
        if report is not None and not Path(report).is_file():
            raise StoreError(f"report file not found: {report}")
        dv = (data_version or "").strip()
        if dv and not re.fullmatch(r"[0-9a-fA-F]{6,64}(\.dir)?", dv):
            raise StoreError(f"data version {dv!r} is not a DVC hash (hex digits, optionally ending in .dir)")

        files = {WEIGHTS: weights, "model.json": model_json, "metrics.json": metrics_json}
        model_card = build_card(name, card, metrics, dv or "unknown", gate, lineage)
        generated = {
            "params.json": _dump(card.get("params", {})),
            "data_version.txt": ((dv or "unknown") + "\n").encode(),
            "report.md": Path(report).read_bytes() if report else b"No evaluation report was supplied at publish time.\n",
            "model_card.md": model_card_markdown(model_card).encode(),
            MODEL_CARD_JSON: _dump(model_card),
            GATE: _dump(gate.to_json()),
        }
        for fname, data in generated.items():
            (tmp / fname).write_bytes(data)
            files[fname] = tmp / fname
        return files

    # list / fetch ---------------------------------------------------------------------------
    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every version stored under NAME, complete or not, with gate, metrics summary and production flag.

        Complete means: a valid manifest and every listed file present with its size (sizes only:
        hashing is left to promote and fetch, which must read the bytes anyway).
        """
        base = self.model_key(name, "versions") + "/"
        sizes = self.backend.list_sizes(base)
        versions = sorted({k[len(base):].split("/", 1)[0] for k in sizes})
        pointer = self.production(name)
        rows = []
        for v in versions:
            rows.append(self._version_info(name, v, sizes, pointer))
        return sorted(rows, key=lambda r: (r.created_at is None, r.created_at or "", r.version))

    def _version_info(self, name: str, version: str, sizes: dict[str, int], pointer: dict[str, Any] | None) -> VersionInfo:
        is_prod = pointer is not None and pointer["version"] == version
        try:
            manifest, _ = self.read_manifest(name, version)
        except PromotionRefused:
            return VersionInfo(version, False, None, is_prod, problem="no MANIFEST.json (upload unfinished)")
        except IntegrityError as e:
            return VersionInfo(version, False, None, is_prod, problem=str(e))
        missing = [f for f, e in manifest["files"].items() if sizes.get(self.version_key(name, version, f)) != e["size"]]
        metrics = self._json_or_none(self.version_key(name, version, "metrics.json")) or {}
        dv = self.backend.get_bytes(self.version_key(name, version, "data_version.txt"))
        return VersionInfo(
            version, complete=not missing, gate_passed=manifest.get("gate_passed"), production=is_prod,
            created_at=manifest.get("created_at"), method=metrics.get("method"), backbone=metrics.get("backbone"),
            test_accuracy=(metrics.get("test") or {}).get("accuracy"),
            data_version=dv[0].decode(errors="replace").strip() if dv else None,
            problem=f"missing or wrong size: {', '.join(missing)}" if missing else None,
        )

    def _json_or_none(self, key: str) -> Any:
        got = self.backend.get_bytes(key)
        try:
            return json.loads(got[0]) if got else None
        except ValueError:
            return None

    def fetch_version(self, name: str, version: str, dest: Path, *, expected_manifest_sha256: str | None = None) -> Path:
        """Download every file of the version into dest (new or empty), each checked against the manifest.

        Files are hashed while they stream to a temporary name and renamed only when they verify;
        on any mismatch dest is emptied again and IntegrityError names the file.
        """
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise StoreError(f"fetch destination {dest} is not empty")
        manifest, manifest_sha = self.read_manifest(name, version)
        self._check_manifest_sha(name, version, manifest_sha, expected_manifest_sha256)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            for fname, entry in sorted(manifest["files"].items()):
                self._download_verified(self.version_key(name, version, fname), dest / fname, entry)
            (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        except BaseException:
            for p in dest.iterdir():
                p.unlink()
            raise
        return dest

    def _download_verified(self, key: str, target: Path, entry: dict[str, Any]) -> None:
        tmp = target.with_name(f".{target.name}.part")
        try:
            with open(tmp, "wb") as f:  # an oversized object is not streamed to its end
                digest, size = sha256_stream(self.backend.iter_chunks(key), write=f.write, max_size=entry["size"])
            if size != entry["size"] or digest != entry["sha256"]:
                raise IntegrityError(f"{self.backend.url(key)} does not match its manifest "
                                     f"(sha256 {digest if size == entry['size'] else '-'}, size {size}; "
                                     f"manifest: {entry['sha256']}, {entry['size']} bytes): refused")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _stage_lineage(tmp: Path, lineage: Lineage | None) -> dict[str, Path]:
    """lineage.json (canonical JSON, so the same record gives the same bytes) and its files, as files in tmp."""
    if lineage is None:
        return {}
    unknown = sorted(set(lineage.files) - set(LINEAGE_FILES[1:]))
    if unknown:
        raise StoreError(f"lineage files {unknown} are not among {list(LINEAGE_FILES[1:])}")
    out = {}
    for fname, data in {LINEAGE: _dump(lineage.record), **lineage.files}.items():
        (tmp / fname).write_bytes(data)
        out[fname] = tmp / fname
    return out


def open_store(settings: StoreSettings, *, check: bool = True) -> ArtifactStore:
    """The store the settings describe; with check, fail now (clear StoreError) if it is unreachable."""
    backend = open_backend(settings)
    if check:
        backend.check()
    return ArtifactStore(backend, settings.store_prefix)


def load_production_model(store: ArtifactStore, name: str, dest: Path | None = None):
    """Fetch NAME's production version, verify every file, and rebuild the model from safetensors.

    Returns (model, params, classes, pointer). The manifest must be the one the pointer recorded,
    so swapping a promoted version's files and manifest afterwards is detected too. With dest None
    the files go to a new temporary directory that the caller owns (it is not removed).
    """
    from spottune.training import load_model

    pointer = store.production(name)
    if pointer is None:
        raise StoreError(f"{name} has no production version in {store.backend.url(store.model_key(name))}")
    if dest is None:
        dest = Path(tempfile.mkdtemp(prefix=f"spottune-{name}-"))
    store.fetch_version(name, pointer["version"], dest, expected_manifest_sha256=pointer["manifest_sha256"])
    check_safetensors(Path(dest) / WEIGHTS)  # a clear message first; load_model never unpickles either way
    model, params, classes = load_model(dest)
    return model, params, classes, pointer
