"""The store's values and checks: file names and formats, Gate, VersionInfo, PublishResult,
name and prefix checks, canonical JSON, content_version and the safetensors header check."""

from __future__ import annotations

import getpass
import json
import re
import socket
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spottune.errors import StoreError
from spottune.rundir import WEIGHTS
from spottune.store.errors import IntegrityError
from spottune.store.hashing import sha256_bytes

STORE_FORMAT = "spottune-store/1"
MANIFEST = "MANIFEST.json"
GATE = "gate.json"
MODEL_CARD_JSON = "model_card.json"
VERSION_FILES: tuple[str, ...] = (
    WEIGHTS, "model.json", "params.json", "metrics.json", "data_version.txt", "report.md", "model_card.md",
    MODEL_CARD_JSON, GATE,
)
# Published with every new version, absent from versions published before the card had its sections: a
# manifest may lack them (spottune.store.artifacts.read_manifest).
LATER_FILES: tuple[str, ...] = (MODEL_CARD_JSON,)
# Lineage (spottune.lineage): stored with versions published with it, each listed in the manifest like the
# files above; versions published before lineage existed have none of them.
LINEAGE = "lineage.json"
DVC_LOCK = "dvc.lock"
DATA_DVC = "data.dvc"
GIT_DIFF = "git.diff"
LINEAGE_FILES: tuple[str, ...] = (LINEAGE, DVC_LOCK, DATA_DVC, GIT_DIFF)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always fullmatch: `$` also matches before a final newline
HISTORY_LIMIT = 100
CAS_ATTEMPTS = 20


GATE_RECORD_FORMAT = "spottune-gate/1"  # metrics/gate.json, as the `gate` stage (spottune/gate.py) writes it


@dataclass(frozen=True)
class Gate:
    """The promotion gate's verdict for one version, recorded in its gate.json (and so in its manifest).

    passed: True or False as the `gate` stage decided (details then hold its record, metrics/gate.json);
    None when no gate ran (a version published by hand): promoting it needs force and a reason.
    """

    passed: bool | None
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "details": self.details}

    @classmethod
    def from_record(cls, record: Any, source: str = "gate record") -> Gate:
        """The verdict of a `gate` stage record (metrics/gate.json); StoreError naming SOURCE when it is not one."""
        if not is_gate_record(record):
            raise StoreError(f"{source} is not a record of the gate stage (format {GATE_RECORD_FORMAT}, "
                             "decision promote|refuse, reason): run `dvc repro gate` or `spottune gate`")
        return cls(record["decision"] == "promote", record["reason"], dict(record))


def is_gate_record(record: Any) -> bool:
    """Whether RECORD has the shape of what the `gate` stage writes (metrics/gate.json)."""
    return (isinstance(record, dict) and record.get("format") == GATE_RECORD_FORMAT
            and record.get("decision") in ("promote", "refuse") and isinstance(record.get("reason"), str))


def gated_by_pipeline(gate_json: Any) -> bool:
    """A version's gate.json holds the gate stage's record, and its verdict agrees with the record's decision."""
    if not isinstance(gate_json, dict) or not is_gate_record(gate_json.get("details")):
        return False
    return gate_json.get("passed") is (gate_json["details"]["decision"] == "promote")


def check_gate_for(gate: Gate, weights_sha256: str, where: str) -> None:
    """Refuse a verdict that cannot belong to these weights: a pass without the gate stage's record, or a
    record made for other weights (the candidate's sha256 that the stage records)."""
    if gate.passed is True and not is_gate_record(gate.details):
        raise StoreError(f"{where}: a passed gate must carry the gate stage's record (metrics/gate.json); "
                         "publish without one and promote with --force --reason, or run the gate")
    if is_gate_record(gate.details) and gate.passed is not (gate.details["decision"] == "promote"):
        raise StoreError(f"{where}: the verdict (passed {gate.passed}) disagrees with the gate record's decision "
                         f"{gate.details['decision']!r}")
    recorded = (gate.details.get("candidate") or {}).get("weights_sha256") if is_gate_record(gate.details) else None
    if recorded is not None and recorded != weights_sha256:
        raise StoreError(f"{where}: the gate record is for weights {str(recorded)[:12]}..., these are "
                         f"{weights_sha256[:12]}...: use the gate.json of this run")


@dataclass(frozen=True)
class Lineage:
    """What a version was built from (spottune.lineage collects it): lineage.json's record, and the files
    stored beside it (dvc.lock, data.dvc, git.diff: name -> bytes)."""

    record: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


def lineage_identity(record: dict[str, Any]) -> dict[str, Any]:
    """The part of a lineage record that names what was built: all but flow_run, which names who asked.

    Why: a flow run that retrains nothing publishes the same files again; its own flow run id must not
    make them a new version (or a refused one), so versions are named and compared without it.
    """
    return {k: v for k, v in record.items() if k != "flow_run"}


@dataclass(frozen=True)
class VersionInfo:
    """One row of `list_versions`."""

    version: str
    complete: bool
    gate_passed: bool | None
    production: bool
    created_at: str | None = None
    method: str | None = None
    backbone: str | None = None
    test_accuracy: float | None = None
    data_version: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class PublishResult:
    version: str
    manifest_sha256: str
    uploaded: list[str]
    skipped: list[str]
    already_published: bool


def content_version(entries: dict[str, dict[str, Any]], lineage: dict[str, Any] | None = None) -> str:
    """The default version of a set of files: 12 hex of the weights' sha256, then 6 hex of the sha256 of
    every published file (metrics.json with its timings, model.json, gate, report, data version, ...).

    The same files always give the same version (re-publishing is a no-op), while identical weights
    published with anything else (a forced retrain's new timings, another clone's run) get a version of
    their own instead of clashing with the one already stored. With a lineage record, lineage.json
    counts by its identity (lineage_identity), so the flow run that published it does not.
    """
    digests = {f: e["sha256"] for f, e in sorted(entries.items())}
    if lineage is not None:
        digests[LINEAGE] = sha256_bytes(_dump(lineage_identity(lineage)))
    return f"{entries[WEIGHTS]['sha256'][:12]}-{sha256_bytes(_dump(digests))[:6]}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_actor() -> str:
    """user@host of this process: who promoted, for the audit trail."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        raise StoreError(f"invalid {kind} {value!r}: use letters, digits, '.', '_' or '-' (at most 128)")
    return value


def check_prefix(prefix: str) -> str:
    """A key prefix: '/'-separated names, no leading '/', no empty, '.' or '..' segment (S3 keys would
    otherwise read as paths that climb out of the prefix for any tool that maps them to folders)."""
    if prefix and (prefix.startswith("/") or any(p in ("", ".", "..") for p in prefix.split("/"))
                   or not all(re.fullmatch(r"[A-Za-z0-9._-]+", p) for p in prefix.split("/"))):
        raise StoreError(f"invalid store prefix {prefix!r}: use names of letters, digits, '.', '_' or '-' separated "
                         "by '/', without a leading '/', empty parts, '.' or '..'")
    return prefix


def _dump(obj: Any) -> bytes:
    """Canonical JSON: the same content always gives the same bytes, hence the same sha256."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file (a pickle renamed, a truncated file) before upload.

    Reads only the header: 8-byte little-endian length, then that many bytes of JSON. No torch needed.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise IntegrityError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or 8 + n > size:
            raise IntegrityError(f"{path} is not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise IntegrityError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{path} is not a safetensors file (header is not a mapping)")
