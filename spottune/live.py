"""Per-epoch metrics while a run trains, in DVCLive's layout, so `dvc exp show` and `dvc plots` follow it:

    LIVE/metrics.json                        the latest epoch: {"step": E, "train": {...}, "val": {...}, "lr": {...}}
    LIVE/plots/metrics/train/loss.tsv        one row per epoch: step<TAB>loss (and accuracy, val/*, lr/GROUP)

Every file is rewritten whole from the run's history after each epoch, each atomically: a reader
(DVC, a dashboard) sees the previous epoch's file or this one's, and a resumed run (whose history
comes back from its checkpoint) writes the same rows again. The run's metrics.json stays the final
record; these files only show progress. Standard library only (no dvclive dependency): the files
are plain JSON and TSV.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spottune.atomic import atomic_write, write_json

# history keys -> the scalars shown per epoch (timings are left out: the files stay deterministic)
SCALARS: dict[str, tuple[str, ...]] = {"train": ("loss", "accuracy"),
                                       "val": ("loss", "accuracy", "tuned_blocks_per_image")}


def epoch_scalars(entry: dict[str, Any]) -> dict[str, dict[str, float]]:
    """One history entry as {"train": {...}, "val": {...}, "lr": {group: lr}}: the numbers a live view plots."""
    out: dict[str, dict[str, float]] = {}
    for part, names in SCALARS.items():
        values = {n: float(entry[part][n]) for n in names if isinstance((entry.get(part) or {}).get(n), (int, float))}
        if values:
            out[part] = values
    lrs = {str(group): float(lr) for group, lr in (entry.get("lr") or {}).items()}
    if lrs:
        out["lr"] = lrs
    return out


def clear_live(live_dir: Path) -> None:
    """Remove what write_live writes (and nothing else): a run that starts over must not show the last run's epochs."""
    live_dir = Path(live_dir)
    (live_dir / "metrics.json").unlink(missing_ok=True)
    for tsv in (live_dir / "plots" / "metrics").glob("*/*.tsv"):
        tsv.unlink()


def write_live(live_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite LIVE/metrics.json and every LIVE/plots/metrics/PART/NAME.tsv from the run's history so far."""
    if not history:
        return
    live_dir = Path(live_dir)
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for entry in history:
        for part, values in epoch_scalars(entry).items():
            for name, value in values.items():
                series.setdefault((part, name), []).append((int(entry["epoch"]), value))
    for (part, name), rows in series.items():
        text = f"step\t{name}\n" + "".join(f"{step}\t{value!r}\n" for step, value in rows)
        atomic_write(live_dir / "plots" / "metrics" / part / f"{name}.tsv", lambda tmp, t=text: tmp.write_text(t))
    # written last: once it names epoch E, every plot file already holds E's row
    write_json(live_dir / "metrics.json", {"step": int(history[-1]["epoch"]), **epoch_scalars(history[-1])})
