"""Promotion: the production pointer (compare-and-swap), promote, rollback and the audit trail.

A mixin of ArtifactStore (spottune.store.artifacts), which supplies the backend, the keys and
version verification; these methods are ArtifactStore's own as far as callers can tell.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from spottune.errors import StoreError
from spottune.store.errors import IntegrityError, PromotionRefused, WriteConflict
from spottune.store.values import (
    CAS_ATTEMPTS,
    GATE,
    HISTORY_LIMIT,
    STORE_FORMAT,
    _check_name,
    _dump,
    default_actor,
    gated_by_pipeline,
)

if TYPE_CHECKING:
    from spottune.store.backends import Backend


class PromotionMixin:
    """production, promote, rollback and audit_trail of ArtifactStore."""

    backend: Backend

    if TYPE_CHECKING:
        def model_key(self, name: str, *rest: str) -> str: ...

        def version_key(self, name: str, version: str, filename: str = "") -> str: ...

        def verify_version(self, name: str, version: str,
                           expected_manifest_sha256: str | None = None) -> tuple[dict[str, Any], str]: ...

    def production(self, name: str) -> dict[str, Any] | None:
        """The production pointer of NAME, or None when nothing was ever promoted."""
        got = self._read_pointer(name)
        return got[0] if got else None

    def _read_pointer(self, name: str) -> tuple[dict[str, Any], str] | None:
        key = self.model_key(name, "production.json")
        got = self.backend.get_bytes(key)
        if got is None:
            return None
        try:
            pointer = json.loads(got[0])
            _check_pointer_entry(pointer, "")
            history = pointer.get("history", [])
            if not isinstance(history, list):
                raise TypeError(f"history is a {type(history).__name__}, not a list")
            for i, entry in enumerate(history):
                _check_pointer_entry(entry, f"history[{i}]: ")
        except (ValueError, KeyError, TypeError, AttributeError, StoreError) as e:
            raise IntegrityError(f"{self.backend.url(key)} is not a valid production pointer: "
                                 f"{type(e).__name__ + ' ' if isinstance(e, KeyError) else ''}{e}") from None
        return pointer, got[1]

    def _gate_of(self, name: str, version: str) -> dict[str, Any]:
        data = self.backend.get_bytes(self.version_key(name, version, GATE))
        return json.loads(data[0]) if data else {"passed": False, "reason": "no gate.json"}

    def promote(self, name: str, version: str, *, reason: str = "", actor: str | None = None,
                force: bool = False) -> dict[str, Any]:
        """Make VERSION production: verify manifest, files and gate first; write the pointer last.

        Refuses (PromotionRefused) an incomplete version, one whose files do not hash to its
        manifest, or one whose recorded gate failed (force or not). A version without the gate
        stage's record (published by hand, or before the gate was a stage) needs force and a
        reason; the pointer and its audit record then say forced: true. Promoting the current
        production version is a no-op. The pointer is replaced by compare-and-swap, so concurrent
        promotions serialise; each success appends one audit record.
        """
        manifest, manifest_sha = self.verify_version(name, version)
        gate = self._gate_of(name, version)
        if gate.get("passed") is False or manifest.get("gate_passed") is False:
            raise PromotionRefused(f"{name} {version} failed its promotion gate ({gate.get('reason') or 'no reason'}): "
                                   "it stays a candidate and never becomes production")
        gated = gate.get("passed") is True and manifest.get("gate_passed") is True and gated_by_pipeline(gate)
        if not gated and not force:
            raise PromotionRefused(f"{name} {version} has no record of the pipeline's gate ({gate.get('reason') or 'none'}): "
                                   "promote it with --force --reason TEXT (kept in the audit trail)")
        if not gated and not reason.strip():
            raise PromotionRefused(f"{name} {version}: a forced promotion needs a reason (--reason TEXT)")

        def update(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is not None and current["version"] == version:
                return None
            history = ([*current.get("history", []), _history_entry(current)] if current else [])[-HISTORY_LIMIT:]
            return {"version": version, "manifest_sha256": manifest_sha, "history": history, "forced": not gated}

        return self._swap_pointer(name, "promote", update, reason, actor)

    def rollback(self, name: str, *, reason: str = "", actor: str | None = None,
                 expect_current: str | None = None) -> dict[str, Any]:
        """Make the previous production version (top of the pointer's history) production again, verified.

        expect_current makes a retry safe: roll back only from that version. When production already
        is what rolling back from it gave (an outage hid the answer), nothing moves again; the audit
        record is written if it is missing. When production is something else, nothing is done.
        """
        def update(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if expect_current is not None and current is not None and current["version"] != expect_current:
                if current.get("action") == "rollback" and current.get("previous_version") == expect_current:
                    return None  # this rollback already happened
                raise PromotionRefused(f"{name}: production is {current['version']}, not {expect_current}; "
                                       "nothing rolled back")
            if current is None or not current.get("history"):
                raise PromotionRefused(f"{name} has no earlier production version to roll back to")
            previous = current["history"][-1]
            self.verify_version(name, previous["version"], previous["manifest_sha256"])
            return {"version": previous["version"], "manifest_sha256": previous["manifest_sha256"],
                    "history": current["history"][:-1], "forced": False}

        return self._swap_pointer(name, "rollback", update, reason, actor)

    def _swap_pointer(self, name: str, action: str, update: Callable[[dict[str, Any] | None], dict[str, Any] | None],
                      reason: str, actor: str | None) -> dict[str, Any]:
        """Read-modify-write of production.json with a condition on what was read; retry on conflict."""
        key = self.model_key(name, "production.json")
        for _ in range(CAS_ATTEMPTS):
            got = self._read_pointer(name)
            current, tag = got if got else (None, None)
            new = update(current)
            if new is None:
                assert current is not None
                self._audit(name, current)  # a retry after an outage between pointer and audit record
                return current
            now = datetime.now(UTC)
            new = {"format": STORE_FORMAT, "name": name, **new, "action": action,
                   "previous_version": current["version"] if current else None,
                   "by": actor or default_actor(), "at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "reason": reason,
                   "audit_id": f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex}"}
            try:
                self.backend.put_bytes(key, _dump(new), if_match=tag, if_absent=tag is None)
            except WriteConflict:
                continue
            self._audit(name, new)
            return new
        raise WriteConflict(f"{self.backend.url(key)} kept changing: gave up after {CAS_ATTEMPTS} attempts")

    def _audit(self, name: str, pointer: dict[str, Any]) -> None:
        """Write the audit record of a pointer unless it is there: one object per pointer, never overwritten.

        Why keyed by the pointer's audit_id (UTC timestamp, then a uuid): the pointer is written
        first, so an outage between the two writes leaves a production version without its record.
        The retry (promoting the same version again) finds the pointer unchanged and writes the
        missing record under the same key; create-only, so a record never appears twice.
        Pointers written before audit ids existed got their record with them and are skipped.
        """
        audit_id = pointer.get("audit_id")
        if audit_id is None:
            return
        key = self.model_key(name, "audit", f"{_check_name('audit id', str(audit_id))}.json")
        record = {"format": STORE_FORMAT, "action": pointer.get("action"), "name": name,
                  "version": pointer["version"], "manifest_sha256": pointer.get("manifest_sha256"),
                  "previous_version": pointer.get("previous_version"), "by": pointer.get("by"),
                  "at": pointer.get("at"), "reason": pointer.get("reason", ""),
                  "forced": pointer.get("forced", False)}
        try:
            self.backend.put_bytes(key, _dump(record), if_absent=True)
        except WriteConflict:
            pass  # recorded already (by the first attempt, or by a request the outage delayed)

    def audit_trail(self, name: str) -> list[dict[str, Any]]:
        """Every promotion and rollback of NAME, oldest first (by key: UTC timestamp, then uuid)."""
        out = []
        for key in sorted(self.backend.list_sizes(self.model_key(name, "audit") + "/")):
            got = self.backend.get_bytes(key)
            if got is not None:
                out.append(json.loads(got[0]))
        return out


def _check_pointer_entry(entry: Any, where: str) -> None:
    """A pointer, or one entry of its history: a valid version and a sha256 (what promote and rollback use)."""
    if not isinstance(entry, dict):
        raise TypeError(f"{where}expected an object, got {type(entry).__name__}")
    _check_name("version", entry["version"])
    if not isinstance(entry.get("manifest_sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["manifest_sha256"]):
        raise ValueError(f"{where}manifest_sha256 of {entry['version']} is not a sha256")


def _history_entry(pointer: dict[str, Any]) -> dict[str, Any]:
    return {k: pointer.get(k) for k in ("version", "manifest_sha256", "by", "at", "action", "forced")}
