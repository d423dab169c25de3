"""The model card published with every version: model_card.json (the facts) and model_card.md (the same, to read).

Sections: intended use, training data and its version, metrics overall and per class, the comparison
with the baseline and the gate's reasoning, the routing summary (SpotTune), limitations. Every value
comes from the version's own files (model.json, metrics.json, the gate record, the lineage); a fact
that is not known is null (JSON) or "unknown" (Markdown), never guessed. Deterministic: no timestamps,
so publishing the same run again yields the same bytes.
"""

from __future__ import annotations

from typing import Any

from spottune.store.values import Gate, Lineage

CARD_FORMAT = "spottune-model-card/1"
MIXED_LOW, MIXED_HIGH = 0.05, 0.95  # a block is mixed when this share of images tunes it (spottune.stats.mixed_blocks)


def build_card(name: str, card: dict[str, Any], metrics: dict[str, Any], data_version: str, gate: Gate,
               lineage: Lineage | None = None) -> dict[str, Any]:
    """model_card.json: the card's sections from a run's model.json and metrics.json, the gate and the lineage."""
    params = card.get("params") or {}
    model, data = params.get("model") or {}, params.get("data") or {}
    classes = [str(c) for c in card.get("classes") or []]
    test = metrics.get("test") or {}
    return {
        "format": CARD_FORMAT,
        "model": {"name": name, "method": model.get("method"), "backbone": model.get("backbone"),
                  "pretrained_weights": model.get("weights"), "image_size": data.get("image_size"),
                  "classes": classes},
        "intended_use": intended_use(name, classes, data.get("image_size")),
        "training_data": training_data(data, metrics, data_version, lineage),
        "metrics": {"test_accuracy": test.get("accuracy"), "test_loss": test.get("loss"),
                    "test_images": test.get("images"), "epochs": len(metrics.get("history") or []),
                    "per_class_accuracy": dict(zip(classes, test.get("per_class_accuracy") or [], strict=False))},
        "comparison": comparison(gate),
        "routing": routing(test),
        "limitations": limitations(classes, test, gate, metrics),
    }


def intended_use(name: str, classes: list[str], image_size: Any) -> dict[str, str]:
    return {
        "use": f"classifying single images into one of these {len(classes)} classes: {', '.join(classes)}; "
               f"through `spottune predict` or `spottune serve` on {name}@production",
        "not_for": "images of other classes (every image gets one of the classes above, with no 'none of these'); "
                   f"decisions about people; images unlike the training data (it was trained at {image_size} px)",
    }


def training_data(data: dict[str, Any], metrics: dict[str, Any], data_version: str,
                  lineage: Lineage | None) -> dict[str, Any]:
    """Where the data came from and which version: data.dvc's md5 and, from the lineage's dvc.lock, the manifest's."""
    history = metrics.get("history") or []
    last = history[-1] if history else {}
    record = lineage.record if lineage is not None else {}
    return {
        "root": data.get("root"), "manifest": data.get("manifest"),
        "data_version": None if data_version in ("", "unknown") else data_version,
        "manifest_md5": manifest_md5(lineage, data.get("manifest")),
        "git_commit": record.get("git_commit"), "dvc_lock_sha256": record.get("dvc_lock_sha256"),
        "train_images_per_epoch": (last.get("train") or {}).get("images"),
        "val_images": (last.get("val") or {}).get("images"),
        "augment": data.get("augment"),
    }


def manifest_md5(lineage: Lineage | None, manifest: str | None) -> str | None:
    """The md5 dvc.lock records for the manifest the run was trained on (an output of the prepare stage)."""
    if lineage is None or not manifest or "dvc.lock" not in lineage.files:
        return None
    import yaml

    try:
        lock = yaml.safe_load(lineage.files["dvc.lock"])
    except yaml.YAMLError:
        return None
    for stage in ((lock or {}).get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, dict) and out.get("path") == manifest:
                return out.get("md5")
    return None


def comparison(gate: Gate) -> dict[str, Any]:
    """The baseline comparison and the gate's reasoning, from the gate record (empty for a version published by hand)."""
    d = gate.details or {}
    vs = d.get("vs_baseline") or {}
    champion = d.get("champion") or {}
    return {
        "baseline": d.get("baseline"), "candidate": {k: v for k, v in (d.get("candidate") or {}).items()
                                                     if k != "weights_sha256"} or None,
        "difference": vs.get("difference"), "ci_low": vs.get("ci_low"), "ci_high": vs.get("ci_high"),
        "ci_level": vs.get("level"), "mcnemar_p": vs.get("mcnemar_p"),
        "gate": {"passed": gate.passed, "reason": gate.reason, "rule": d.get("rule"), "margin": d.get("margin"),
                 "floor": d.get("floor"), "vs_baseline": vs.get("reason"),
                 "floor_check": (d.get("floor_check") or {}).get("reason"),
                 "vs_production": champion.get("reason")},
    }


def routing(test: dict[str, Any]) -> dict[str, Any] | None:
    """SpotTune's routing on the test images: tuned fraction per block, mixed blocks; None for other methods."""
    fractions = test.get("tuned_fraction_per_block")
    if fractions is None:
        return None
    mixed = [i for i, f in enumerate(fractions) if MIXED_LOW <= f <= MIXED_HIGH]
    return {"tuned_blocks_per_image": test.get("tuned_blocks_per_image"), "blocks": len(fractions),
            "tuned_fraction_per_block": fractions, "mixed_blocks": len(mixed), "mixed_block_indices": mixed,
            "mixed_means": f"{MIXED_LOW:.0%} to {MIXED_HIGH:.0%} of test images tune the block"}


def limitations(classes: list[str], test: dict[str, Any], gate: Gate, metrics: dict[str, Any]) -> list[str]:
    """What a user should know before trusting it, from the numbers themselves."""
    notes = []
    images = test.get("images")
    if isinstance(images, int):
        notes.append(f"measured on {images} test images from the same source as the training data; "
                     "accuracy on other images is unknown")
    per_class = [(c, a) for c, a in zip(classes, test.get("per_class_accuracy") or [], strict=False)
                 if isinstance(a, (int, float))]
    if per_class:
        worst, acc = min(per_class, key=lambda p: p[1])
        notes.append(f"weakest class: {worst} ({acc:.4f} top-1); errors are not spread evenly over the classes")
    vs = (gate.details or {}).get("vs_baseline") or {}
    if isinstance(vs.get("ci_low"), float) and isinstance(vs.get("ci_high"), float):
        notes.append(f"the difference from the baseline is known only to within its CI "
                     f"[{vs['ci_low']:+.4f}, {vs['ci_high']:+.4f}]")
    if gate.passed is not True:
        notes.append("not passed by the promotion gate: a candidate, not for production")
    notes.append(f"trained on {metrics.get('device') or 'an unknown device'} with {metrics.get('threads') or '?'} "
                 "threads; results are bit-identical only on the same device and thread count")
    return notes


def _num(value: Any, fmt: str = ".4f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "unknown"


def model_card_markdown(card: dict[str, Any]) -> str:
    """model_card.md: the JSON card's sections as Markdown."""
    m, data, met, cmp, route = card["model"], card["training_data"], card["metrics"], card["comparison"], card["routing"]
    gate = cmp["gate"]
    lines = [
        f"# {m['name']}", "",
        (f"{m.get('method') or '?'} on {m.get('backbone') or '?'} ({m.get('pretrained_weights') or '?'} weights), "
        f"{m.get('image_size') or '?'} px, {len(m['classes'])} classes."), "",
        "## Intended use", "", f"- for: {card['intended_use']['use']}", f"- not for: {card['intended_use']['not_for']}", "",
        "## Training data", "",
        f"- data: {data.get('root') or 'unknown'} (manifest {data.get('manifest') or 'none'})",
        f"- data version (data.dvc md5): {data.get('data_version') or 'unknown'}",
        f"- manifest md5 (dvc.lock): {data.get('manifest_md5') or 'unknown'}",
        f"- git commit: {data.get('git_commit') or 'unknown'}; dvc.lock sha256 {data.get('dvc_lock_sha256') or 'unknown'}",
        (f"- images per epoch: {data.get('train_images_per_epoch') or 'unknown'} train, "
        f"{data.get('val_images') or 'unknown'} validation; augmentation {data.get('augment')}"), "",
        "## Metrics", "",
        (f"- test top-1 accuracy: {_num(met.get('test_accuracy'))} on {met.get('test_images') or 'unknown'} images "
        f"(loss {_num(met.get('test_loss'))}), after {met.get('epochs')} epochs"), "",
        "| class | test top-1 |", "|---|---|",
        *(f"| {c} | {_num(a)} |" for c, a in met["per_class_accuracy"].items()), "",
        "## Comparison with the baseline and the gate", "",
    ]
    if cmp.get("baseline"):
        base, cand = cmp["baseline"], cmp.get("candidate") or {}
        lines += [(f"- baseline {base.get('method')}: {_num(base.get('accuracy'))}; this model "
                  f"({cand.get('method')}): {_num(cand.get('accuracy'))}"),
                  (f"- difference {_num(cmp.get('difference'), '+.4f')}, {_num(cmp.get('ci_level'), '.0%')} CI "
                  f"[{_num(cmp.get('ci_low'), '+.4f')}, {_num(cmp.get('ci_high'), '+.4f')}], "
                  f"McNemar p {_num(cmp.get('mcnemar_p'))}")]
    else:
        lines.append("- no comparison recorded (published by hand)")
    lines += [f"- gate: {verdict(gate.get('passed'))}"
              + (f"; rule {gate['rule']}, margin {_num(gate.get('margin'))}, floor {_num(gate.get('floor'))}" if gate.get("rule") else "")]
    lines += [f"  - {k.replace('_', ' ')}: {gate[k]}" for k in ("vs_baseline", "floor_check", "vs_production") if gate.get(k)]
    if gate.get("reason"):
        lines.append(f"- reason: {gate['reason']}")
    lines += ["", "## Routing", ""]
    if route:
        mixed = route["mixed_block_indices"]
        lines += [f"- tuned blocks per image: {_num(route.get('tuned_blocks_per_image'), '.2f')} of {route['blocks']}",
                  f"- mixed blocks ({route['mixed_means']}): {len(mixed)}"
                  + (f" (blocks {', '.join(map(str, mixed))})" if mixed else ""),
                  "- tuned fraction per block: "
                  + ", ".join(f"{i}: {_num(f, '.2f')}" for i, f in enumerate(route["tuned_fraction_per_block"]))]
    else:
        lines.append(f"- none: a {m.get('method') or '?'} model runs every image through the same blocks")
    lines += ["", "## Limitations", "", *(f"- {n}" for n in card["limitations"]), "",
              "Weights: model.safetensors (loads without executing code); every file's sha256 is in MANIFEST.json.", ""]
    return "\n".join(lines)


def verdict(passed: bool | None) -> str:
    """A gate verdict in words: passed, failed, or none (published by hand)."""
    if passed is None:
        return "none (published by hand: production only through a forced, audited promotion)"
    return "passed" if passed else "FAILED (candidate only)"
