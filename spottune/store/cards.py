"""The human-readable model card published with every version (model_card.md)."""

from __future__ import annotations

from typing import Any

from spottune.store.values import Gate


def model_card_markdown(name: str, card: dict[str, Any], metrics: dict[str, Any], data_version: str, gate: Gate) -> str:
    """A short human-readable card; deterministic (no timestamps) so re-publishing yields the same bytes."""
    model = card.get("params", {}).get("model", {})
    test = metrics.get("test") or {}
    acc = test.get("accuracy")
    lines = [
        f"# {name}",
        "",
        f"- method: {model.get('method', '?')} on {model.get('backbone', '?')}",
        f"- classes ({len(card.get('classes', []))}): {', '.join(map(str, card.get('classes', [])))}",
        f"- test top-1 accuracy: {acc:.4f}" if isinstance(acc, (int, float)) else "- test top-1 accuracy: n/a",
        f"- data version (data.dvc md5): {data_version}",
        f"- promotion gate: {verdict(gate.passed)}"
        + (f" ({gate.reason})" if gate.reason else ""),
        "- weights: model.safetensors (loads without executing code); every file's sha256 is in MANIFEST.json",
        "",
    ]
    return "\n".join(lines)


def verdict(passed: bool | None) -> str:
    """A gate verdict in words: passed, failed, or none (published by hand)."""
    if passed is None:
        return "none (published by hand: production only through a forced, audited promotion)"
    return "passed" if passed else "FAILED (candidate only)"
