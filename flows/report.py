"""The retrain report: a pure function of the compare stage's comparison and the gate stage's verdict.

No Prefect here, so the report's bytes can be tested (and reused) without a server. The report must
be deterministic (no timestamps, no run ids): re-publishing the same retrain after a failure has to
produce the same files, or the store would refuse it as different.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from spottune.store import Gate

SHADES = " ░▒▓█"


def routing_matrix(comparison: dict[str, Any]) -> tuple[list[str], list[list[float]]] | None:
    """Classes and, per class, the fraction of its test images that run each block's tuned copy."""
    per_class = comparison["candidate"].get("tuned_fraction_per_class_block")
    if not per_class:
        return None
    rows = [(name, fr) for name, fr in zip(comparison["classes"], per_class) if fr is not None]
    return [n for n, _ in rows], [list(map(float, fr)) for _, fr in rows]


def routing_block_table(classes: list[str], matrix: list[list[float]]) -> str:
    """A monospace heatmap (blocks across, classes down) that renders anywhere Markdown does."""
    width = max(len(c) for c in classes)
    n = len(matrix[0])
    header = " " * width + " | " + "".join(f"{b % 10}" for b in range(n))
    lines = [header, "-" * len(header)]
    for name, row in zip(classes, matrix):
        cells = "".join(SHADES[min(len(SHADES) - 1, round(v * (len(SHADES) - 1)))] for v in row)
        lines.append(f"{name:>{width}} | {cells}  ({sum(row):.1f} tuned)")
    legend = "  ".join(f"'{s}' ~{i / (len(SHADES) - 1):.2f}" for i, s in enumerate(SHADES))
    shade = (f"Shade = fraction of the class's test images that run the block's tuned copy: {legend}. "
             "Block digits are block index mod 10.")
    return "\n".join(["```text", *lines, "```", "", shade])


def routing_heatmap_png(classes: list[str], matrix: list[list[float]]) -> bytes | None:
    """The same picture as a PNG (matplotlib, Agg backend); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * len(matrix[0]), 0.8 + 0.35 * len(classes)), dpi=100)
    try:
        im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(matrix[0])))
        ax.set_yticks(range(len(classes)), labels=classes)
        ax.set_xlabel("block")
        ax.set_title("SpotTune: fraction of test images running the tuned block", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same input, same bytes
        return buf.getvalue()
    finally:
        plt.close(fig)


def retrain_report(comparison_md: str, comparison: dict[str, Any], gate: Gate, data_version: str,
                   overrides: dict[str, Any], png: bytes | None, data_docs: str | None = None) -> tuple[str, str]:
    """The published report (gate verdict, data version, the data validation's Data Docs, overrides, the
    comparison, then the routing per class and its picture) and its summary, everything before the routing
    (what a terminal shows). data_docs: the validate stage's Data Docs index, relative to the project."""
    summary = summary_section(comparison_md, gate, data_version, overrides, data_docs)
    return summary + routing_section(comparison, png), summary


def summary_section(comparison_md: str, gate: Gate, data_version: str, overrides: dict[str, Any],
                    data_docs: str | None = None) -> str:
    """The report's head. The Data Docs link is relative to reports/, where the report is written, so it
    opens from the checkout that ran the stages (and names the page there when the report travels)."""
    verdict = "passed" if gate.passed else "refused: not promoted"
    docs = ([f"- data validation: passed; Great Expectations Data Docs: [{data_docs}]({_relative_to_reports(data_docs)})"]
            if data_docs else [])
    lines = [
        "# Retrain report",
        "",
        f"- promotion gate: **{verdict}** ({gate.reason})",
        f"- data version (data.dvc md5): `{data_version}`",
        *docs,
        "- parameter overrides for this run: "
        + (", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(overrides.items())) if overrides else "none"),
        "",
        *("#" + line if line.startswith("#") else line for line in comparison_md.splitlines()),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _relative_to_reports(path: str) -> str:
    """A project-relative path as seen from reports/ (the report's folder)."""
    import posixpath

    return posixpath.relpath(path, "reports")


def routing_section(comparison: dict[str, Any], png: bytes | None) -> str:
    """Which blocks SpotTune tunes per class, as a table and (when drawn) a picture; empty without routing."""
    found = routing_matrix(comparison)
    if not found:
        return ""
    classes, matrix = found
    lines = ["", "## Which blocks SpotTune tunes, per class", "", routing_block_table(classes, matrix)]
    if png:
        lines += ["", f"![tuned fraction per class and block](data:image/png;base64,{base64.b64encode(png).decode()})"]
    return "\n".join(lines).rstrip() + "\n"
