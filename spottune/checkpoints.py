"""Resuming from a checkpoint: only onto the run it came from (the same params and the same data), and
never with a traceback.

A checkpoint (spottune/training.py) is a dict: model, optimizer and scheduler state_dicts, the epoch,
the RNG states, the history, the params and the data it was trained on (`DataSplits.identity()`: a
sha256 of the manifest, or of every image's path and size, with the classes and image counts).
Resuming onto other data would silently mix two datasets in one run (images added under the same
`data.root`), or fail deep inside torch (a class removed: the head no longer fits). Checkpoints
written before the data was recorded still resume; their data cannot be checked, and the log says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spottune.engine import load_checkpoint, set_rng_state
from spottune.errors import CheckpointError

# key -> (type, what it must be): the shape a resume relies on
_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "model": (dict, "a state_dict"), "optimizer": (dict, "a state_dict"), "scheduler": (dict, "a state_dict"),
    "epoch": (int, "an epoch number"), "rng": (dict, "the RNG states"), "history": (list, "a list of epochs"),
    "params": (dict, "the params"),
}


def checkpoint_problem(ckpt: Any) -> str | None:
    """Why `ckpt` is not a training checkpoint this code wrote, or None."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not a mapping"
    for key, (kind, what) in _FIELDS.items():
        if key not in ckpt:
            return f"the key {key!r} is missing"
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            return f"{key!r} is a {type(ckpt[key]).__name__}, not {what}"
    if ckpt["epoch"] < 0:
        return f"'epoch' is {ckpt['epoch']}"
    if not isinstance(ckpt["rng"].get("torch"), torch.Tensor) or not isinstance(ckpt["rng"].get("python"), tuple):
        return "'rng' lacks the torch and python generator states"
    data = ckpt.get("data")
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("sha256"), str)):
        return "'data' is not a record of the data (sha256, classes, images)"
    return None


def data_difference(recorded: dict[str, Any], now: dict[str, Any]) -> str:
    """What changed between the data a checkpoint was made with and the data now, in words."""
    was, is_ = list(recorded.get("classes") or []), list(now.get("classes") or [])
    parts = []
    if was != is_:
        removed, added = sorted(set(was) - set(is_)), sorted(set(is_) - set(was))
        parts.append(f"classes removed {removed}, added {added}" if removed or added else "classes reordered")
    before, after = recorded.get("images") or {}, now.get("images") or {}
    parts += [f"{split} images {before.get(split)} -> {after.get(split)}" for split in ("train", "val", "test")
              if before.get(split) != after.get(split)]
    return "; ".join(parts) or "as many images of the same classes, other files (renamed, replaced or resized)"


def first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: checkpoint {a!r}, now {b!r}"


def restore_checkpoint(path: Path, params: dict[str, Any], data: dict[str, Any], model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, scheduler: Any, loader_generator: torch.Generator,
                       log: Callable[[str], None]) -> tuple[int, list[dict[str, Any]]]:
    """Load `path` into the model, optimizer, scheduler and RNGs; (first epoch to train, history so far).

    CheckpointError, naming the file, when it is not a checkpoint, or was made with other params or
    other data, or does not fit the model: nothing of it is used then (callers start over or stop).
    """
    ckpt = load_checkpoint(path)
    problem = checkpoint_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path} is not a training checkpoint: {problem}")
    if ckpt["params"] != params:
        raise CheckpointError(f"{path} was made with other params: {first_difference(ckpt['params'], params)}")
    recorded = ckpt.get("data")
    if recorded is None:
        log(f"{path} predates data records: resuming without checking that the data is the same")
    elif recorded["sha256"] != data["sha256"]:
        raise CheckpointError(f"{path} was made with other data: {data_difference(recorded, data)}")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], loader_generator)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path} does not fit this run ({type(e).__name__}: {first})") from None
    log(f"resuming {path.parent} after epoch {ckpt['epoch']}")
    return ckpt["epoch"] + 1, ckpt["history"]
