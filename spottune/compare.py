"""SpotTune against its baseline on the same test images: each run's predictions (`evaluate_run`, also
`spottune evaluate` for one run), the paired comparison (`spottune compare`, the DVC stage `compare`),
its Markdown report and its files for `dvc metrics` and `dvc plots`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spottune.config import DataParams
from spottune.data.loaders import build_datasets, make_loader
from spottune.engine import DeviceSetup, predict, summarise_predictions
from spottune.errors import DataError
from spottune.models.backbones import input_normalization
from spottune.settings import RuntimeSettings
from spottune.stats import bootstrap_difference, mcnemar_exact, mixed_blocks
from spottune.training import load_model


def evaluate_run(run_dir: Path, runtime: RuntimeSettings, *, data_root: Path | None = None, split: str = "test",
                 images_of: DataParams | None = None) -> dict[str, Any]:
    """Predictions and metrics of a finished run on `split` of its own data (or of `data_root`).

    images_of: another run's data section; its images (root, manifest) with this model's own
    preprocessing (image size), so two models trained apart are compared on the same test images.
    """
    model, params, classes = load_model(run_dir)
    if data_root is not None:  # another ImageFolder tree: the run's manifest does not describe it
        params = params.model_copy(update={"data": params.data.model_copy(update={"root": Path(data_root), "manifest": None})})
    elif images_of is not None:
        same = {"root": images_of.root, "manifest": images_of.manifest, "val_fraction": images_of.val_fraction}
        params = params.model_copy(update={"data": params.data.model_copy(update=same)})
    setup = DeviceSetup.resolve(runtime.device, params.optim.amp, params.optim.channels_last,
                                input_normalization(params.model.backbone))
    model = model.to(setup.device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    splits = build_datasets(params.data, params.optim.seed)
    if splits.classes != classes:
        raise DataError(f"{params.data.root}: classes {splits.classes} differ from the model's {classes}")
    loader = make_loader(getattr(splits, split), params.data.eval_batch_size, shuffle=False,
                         num_workers=params.data.num_workers, generator=torch.Generator())
    p = predict(model, loader, setup, progress=runtime.progress)
    return {"run": str(run_dir), "method": params.model.method, "predictions": p,
            "metrics": summarise_predictions(p, len(classes)), "classes": classes}


def compare_runs(baseline_dir: Path, candidate_dir: Path, runtime: RuntimeSettings, *, data_root: Path | None = None) -> dict[str, Any]:
    """Candidate (SpotTune) against baseline (fine-tuning) on the identical test images."""
    base = evaluate_run(baseline_dir, runtime, data_root=data_root)
    cand = evaluate_run(candidate_dir, runtime, data_root=data_root)
    if not torch.equal(base["predictions"]["labels"], cand["predictions"]["labels"]) or base["classes"] != cand["classes"]:
        raise DataError("the two runs were not evaluated on the same test images: compare runs trained on one dataset")
    a = base["predictions"]["predictions"] == base["predictions"]["labels"]
    b = cand["predictions"]["predictions"] == cand["predictions"]["labels"]
    return {
        "classes": base["classes"],
        "baseline": {"run": base["run"], "method": base["method"], **base["metrics"]},
        "candidate": {"run": cand["run"], "method": cand["method"], **cand["metrics"]},
        "mcnemar": mcnemar_exact(a, b),
        "bootstrap": bootstrap_difference(a, b),
    }


def comparison_markdown(c: dict[str, Any]) -> str:
    """A short report a person can read in a terminal or a browser."""
    base, cand, boot, mc = c["baseline"], c["candidate"], c["bootstrap"], c["mcnemar"]
    lines = [
        f"# {cand['method']} vs {base['method']}",
        "",
        f"| | {base['method']} | {cand['method']} |",
        "|---|---|---|",
        f"| test top-1 | {base['accuracy']:.4f} | {cand['accuracy']:.4f} |",
        f"| test loss | {base['loss']:.4f} | {cand['loss']:.4f} |",
        "",
        (f"Difference ({cand['method']} - {base['method']}): {boot['difference']:+.4f}, "
         f"{boot['level']:.0%} paired bootstrap CI [{boot['ci_low']:+.4f}, {boot['ci_high']:+.4f}]; "
         f"exact McNemar p = {mc['p_value']:.3g} ({mc['b_only']} images only {cand['method']} gets right, "
         f"{mc['a_only']} only {base['method']}); {base['images']} test images."),
        "",
        "| class | " + " | ".join(c["classes"]) + " |",
        "|---|" + "---|" * len(c["classes"]),
        f"| {base['method']} | " + " | ".join(f"{x:.2f}" for x in base["per_class_accuracy"]) + " |",
        f"| {cand['method']} | " + " | ".join(f"{x:.2f}" for x in cand["per_class_accuracy"]) + " |",
    ]
    if "tuned_fraction_per_block" in cand:
        fr = cand["tuned_fraction_per_block"]
        lines += [
            "",
            f"Routing: {cand['tuned_blocks_per_image']:.2f} of {len(fr)} blocks run their tuned copy per image on average.",
            (f"Per image: {mixed_blocks(fr)} of {len(fr)} blocks send between 5% and 95% of the test images to their "
             "tuned copy (mixed blocks; none means a per-block choice, the same for every image)."),
            "",
            "| block | " + " | ".join(str(i) for i in range(len(fr))) + " |",
            "|---|" + "---|" * len(fr),
            "| tuned fraction | " + " | ".join(f"{x:.2f}" for x in fr) + " |",
            "| less common branch | " + " | ".join(f"{min(x, 1 - x):.2f}" for x in fr) + " |",
        ]
    return "\n".join(lines) + "\n"


# Files for `dvc metrics` and `dvc plots`: small, flat, deterministic (no timings, which differ per run).


def comparison_metrics(c: dict[str, Any]) -> dict[str, Any]:
    """Both methods' test accuracy and loss, the paired difference with its CI, McNemar's p, routing."""
    base, cand = c["baseline"], c["candidate"]
    out: dict[str, Any] = {
        base["method"]: {"accuracy": base["accuracy"], "loss": base["loss"]},
        cand["method"]: {"accuracy": cand["accuracy"], "loss": cand["loss"]},
        "difference": c["bootstrap"]["difference"],
        "difference_ci_low": c["bootstrap"]["ci_low"],
        "difference_ci_high": c["bootstrap"]["ci_high"],
        "mcnemar_p": c["mcnemar"]["p_value"],
        "test_images": base["images"],
    }
    if "tuned_blocks_per_image" in cand:
        out[cand["method"]]["tuned_blocks_per_image"] = cand["tuned_blocks_per_image"]
        out[cand["method"]]["mixed_blocks"] = mixed_blocks(cand["tuned_fraction_per_block"])
    return out


def routing_rows(c: dict[str, Any]) -> list[dict[str, Any]]:
    """Per block: the fraction of test images that ran the tuned copy (overall and per class)."""
    cand = c["candidate"]
    if "tuned_fraction_per_block" not in cand:
        return []
    rows = []
    for block, frac in enumerate(cand["tuned_fraction_per_block"]):
        row: dict[str, Any] = {"block": block, "tuned_fraction": frac}
        for name, per_block in zip(c["classes"], cand.get("tuned_fraction_per_class_block") or []):
            if per_block is not None:
                row[name] = per_block[block]
        rows.append(row)
    return rows


def per_class_rows(c: dict[str, Any]) -> list[dict[str, Any]]:
    """Per class: test accuracy of baseline and candidate."""
    base, cand = c["baseline"], c["candidate"]
    return [{"class": name, base["method"]: a, cand["method"]: b}
            for name, a, b in zip(c["classes"], base["per_class_accuracy"], cand["per_class_accuracy"])]
