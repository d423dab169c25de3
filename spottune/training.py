"""One training run, from validated params to a run directory:

    RUN/checkpoint.pt      after every epoch (model, optimizer, scheduler, epoch, RNG): --resume continues it
    RUN/model.safetensors  final weights (loads without executing code)
    RUN/model.json         what is needed to rebuild the model: params and class names
    RUN/metrics.json       test metrics, per-epoch history, throughput
    LIVE/...               (live_dir) per-epoch train/val metrics and learning rates in DVCLive's layout,
                           after every epoch, for `dvc exp show` / `dvc plots` while the run trains

The final files are written only when the run completes, each atomically.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from spottune.atomic import atomic_write, write_json
from spottune.checkpoints import restore_checkpoint
from spottune.config import OptimParams, Params, validate_params
from spottune.data.loaders import build_datasets, make_loader
from spottune.distributed import Distributed
from spottune.engine import DeviceSetup, evaluate, rng_state, save_checkpoint, train_one_epoch
from spottune.errors import CheckpointError, ConfigError
from spottune.live import clear_live, write_live
from spottune.models import TransferModel, build_model
from spottune.models.backbones import input_normalization
from spottune.rundir import MODEL_FORMAT, RunDir
from spottune.runlock import RunLock
from spottune.settings import RuntimeSettings


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(optim: OptimParams) -> Callable[[int], float]:
    """Multiplier of every group's base learning rate at an epoch."""
    if optim.schedule == "cosine":
        return lambda e: 0.5 * (1 + math.cos(math.pi * e / optim.epochs))
    if optim.schedule == "step":
        return lambda e: optim.gamma ** sum(e >= m for m in optim.step_milestones)
    return lambda e: 1.0


def fit(
    params: Params,
    out_dir: Path,
    runtime: RuntimeSettings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    resume_unfinished: bool = False,
    stop_after_epochs: int | None = None,
    live_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Train `params.model.method` on `params.data`, checkpoint every epoch, evaluate on test.

    stop_after_epochs ends this invocation after that many epochs (a time slice on a preemptible
    machine); the run is then unfinished (returns None) and `resume=True` continues it.
    resume_unfinished continues an unfinished run (a checkpoint, no model yet) when it was made with
    these params and this data, and otherwise starts over, replacing what the folder holds: what a
    retried pipeline stage wants. live_dir: where the per-epoch metrics go after every epoch
    (spottune/live.py), so a run can be followed while it trains. The run folder is locked (RunLock) for the whole call, so a second
    training into it fails at once instead of mixing or deleting the first one's files.
    """
    dist = Distributed.from_env()
    if resume and (overwrite or resume_unfinished):
        raise ConfigError("--resume excludes --overwrite and --resume-unfinished")
    run = RunDir(out_dir)
    with RunLock(run.root) if dist.is_main else nullcontext():  # rank 0 writes; the others only read
        if resume_unfinished:
            resume = run.checkpoint.is_file() and not run.weights.is_file()
            overwrite = not resume
        try:
            return _fit(params, run, runtime, dist, resume=resume, overwrite=overwrite,
                        stop_after_epochs=stop_after_epochs, live_dir=live_dir, log=log)
        except CheckpointError as e:
            if not (resume_unfinished and resume):
                raise
            if dist.is_main:
                print(f"cannot resume ({e}): starting over", file=sys.stderr)
            return _fit(params, run, runtime, dist, resume=False, overwrite=True,
                        stop_after_epochs=stop_after_epochs, live_dir=live_dir, log=log)


def _fit(params: Params, run: RunDir, runtime: RuntimeSettings, dist: Distributed, *, resume: bool,
         overwrite: bool, stop_after_epochs: int | None, live_dir: Path | None,
         log: Callable[[str], None]) -> dict[str, Any] | None:
    """fit() once the run folder is locked."""
    if not resume and any(p.exists() for p in run.outputs()):
        if not overwrite:
            raise ConfigError(f"{run.root} already holds a run: pass --resume to continue it or --overwrite to replace it")
        if dist.is_main:
            for p in run.outputs():
                p.unlink(missing_ok=True)
    if not resume and live_dir is not None and dist.is_main:
        clear_live(live_dir)

    seed_everything(params.optim.seed)
    setup = DeviceSetup.resolve(dist.device_name(runtime.device), params.optim.amp, params.optim.channels_last,
                                input_normalization(params.model.backbone))
    dist.start(setup.device)
    log = log if dist.is_main else (lambda _: None)
    splits = build_datasets(params.data, params.optim.seed)
    num_classes = len(splits.classes)
    loader_gen = torch.Generator().manual_seed(params.optim.seed)
    pin = setup.device.type == "cuda"
    sampler = None
    if dist.enabled:  # each rank its own shard of every epoch; the order depends on the seed and epoch only
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(splits.train, dist.world_size, dist.rank, shuffle=True, seed=params.optim.seed,
                                     drop_last=True)
    train_loader = make_loader(splits.train, params.data.batch_size, shuffle=sampler is None,
                               num_workers=params.data.num_workers, generator=loader_gen, pin_memory=pin,
                               drop_last=len(splits.train) > params.data.batch_size * dist.world_size, sampler=sampler)
    eval_loader = lambda ds: make_loader(ds, params.data.eval_batch_size, shuffle=False,
                                         num_workers=params.data.num_workers, generator=torch.Generator(), pin_memory=pin)

    model = build_model(params, num_classes).to(setup.device)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # train_one_epoch keeps no step's autograd graph alive and uses each step's gradients within it: the
    # step's trainable part may replay as a CUDA graph (spottune/models/block_graphs.py)
    model.graph_blocks = runtime.cuda_graphs
    optimizer = torch.optim.SGD(model.parameter_groups(params.optim), lr=params.optim.lr_net, momentum=params.optim.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(params.optim))
    params_json = params.model_dump(mode="json")

    start_epoch, history = 0, []
    data = splits.identity()
    if resume:
        start_epoch, history = restore_checkpoint(run.checkpoint, params_json, data, model, optimizer, scheduler,
                                                  loader_gen, log)
    forward = dist.wrap(model, setup.device)

    log(f"{params.model.method} on {params.model.backbone}: {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {num_classes} classes, device {setup.device}"
        + (f" x {dist.world_size} processes" if dist.enabled else ""))
    end_epoch = params.optim.epochs if stop_after_epochs is None else min(params.optim.epochs, start_epoch + stop_after_epochs)
    for epoch in range(start_epoch, end_epoch):
        if sampler is not None:
            sampler.set_epoch(epoch)
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        train_stats = train_one_epoch(model, optimizer, train_loader, setup, epoch=epoch, epochs=params.optim.epochs,
                                      forward=forward, max_steps=params.optim.max_steps_per_epoch,
                                      progress=runtime.progress and dist.is_main,
                                      all_reduce=dist.all_reduce_sum if dist.enabled else None)
        scheduler.step()
        if dist.is_main:
            val_stats = evaluate(model, eval_loader(splits.val), setup, num_classes) if len(splits.val) else {}
            history.append({"epoch": epoch, "lr": lrs, "train": train_stats, "val": val_stats})
            log(f"epoch {epoch}: train loss {train_stats['loss']:.4f} acc {train_stats['accuracy']:.4f} "
                f"({train_stats['images_per_s']:.0f} img/s)" + (f", val acc {val_stats['accuracy']:.4f}" if val_stats else ""))
            save_checkpoint(run.checkpoint, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "rng": rng_state(loader_gen), "history": history, "params": params_json,
                "data": data,
            })
            if live_dir is not None:  # after the checkpoint: the live view never shows an epoch a resume would redo
                write_live(live_dir, history)
        dist.barrier()

    if end_epoch < params.optim.epochs:
        log(f"stopped after epoch {end_epoch - 1} of {params.optim.epochs}: continue with --resume")
    if end_epoch < params.optim.epochs or not dist.is_main:
        dist.stop()
        return None
    test_stats = evaluate(model, eval_loader(splits.test), setup, num_classes, progress=runtime.progress)
    metrics = {
        "method": params.model.method, "backbone": params.model.backbone, "classes": splits.classes,
        "device": str(setup.device) if setup.device.type == "cpu" else torch.cuda.get_device_name(setup.device),
        "processes": dist.world_size,
        # CPU results are bit-identical only at the same thread count: `spottune reproduce` sets this one
        "threads": torch.get_num_threads(),
        # an optional speed-up that failed is recorded, not fatal (spottune/models/block_graphs.py)
        "cuda_graphs": {"enabled": bool(model.graph_blocks) and setup.device.type == "cuda", "fell_back": model.graph_failure()},
        "test": test_stats, "history": history,
        "train_images_per_s": sum(h["train"]["images"] for h in history)  # every rank's images
        / max(sum(h["train"]["seconds"] for h in history), 1e-9),
    }
    save_model(model, params, splits.classes, run)
    write_json(run.metrics, metrics)
    log(f"test accuracy {test_stats['accuracy']:.4f} -> {run.root}")
    dist.stop()
    return metrics


def save_model(model: TransferModel, params: Params, classes: list[str], run: RunDir) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run.weights, lambda tmp: save_file(state, str(tmp), metadata={"format": MODEL_FORMAT}))
    write_json(run.model_card, {"format": MODEL_FORMAT, "params": params.model_dump(mode="json"), "classes": classes})


def read_model_card(path: Path) -> dict[str, Any]:
    """A run's model.json, checked for the shape load_model needs: CheckpointError naming the file otherwise."""
    try:
        card = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a readable model card ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(card, dict) or card.get("format") != MODEL_FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise CheckpointError(f"{path}: unknown format {str(got)[:100]!r}, expected {MODEL_FORMAT}")
    params, classes = card.get("params"), card.get("classes")
    if not isinstance(params, dict) or not isinstance(params.get("model", {}), dict):
        raise CheckpointError(f"{path}: 'params' must be a mapping of sections (with 'model' a mapping)")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path}: 'classes' must be a non-empty list of class names")
    return card


def load_model(run_dir: Path) -> tuple[TransferModel, Params, list[str]]:
    """Rebuild a trained model from its run directory; no pretrained download, no pickle."""
    from safetensors.torch import load_file

    run = RunDir(run_dir)
    if not run.model_card.is_file() or not run.weights.is_file():
        raise CheckpointError(f"{run.root} holds no finished model (model.json and model.safetensors)")
    card = read_model_card(run.model_card)
    raw = card["params"]
    raw["model"] = {**raw.get("model", {}), "weights": "none"}  # the saved state holds every weight
    params = validate_params(raw, str(run.model_card))
    model = build_model(params, len(card["classes"]), pretrained=False)
    try:
        model.load_state_dict(load_file(str(run.weights)))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{run.weights} does not match the model in {run.model_card}: {e}") from None
    return model.eval(), params, card["classes"]


def export_backbone(run_dir: Path, out: Path) -> dict[str, Any]:
    """Write a baseline run's trained backbone as a plain weights file that `model.weights` accepts.

    This is how a network pretrained inside the pipeline (say ResNet-26 trained on Fashion-MNIST)
    becomes the starting point of transfer runs. The file is in the source network's own key format
    (what `build_backbone(name, weights=FILE)` loads); the run's head becomes the source classifier
    when their shapes match. Only baselines export: a SpotTune run has two copies of every block.
    """
    from safetensors.torch import save_file

    from spottune.models.backbones import build_backbone
    from spottune.models.baselines import FineTuneNet

    model, params, classes = load_model(run_dir)
    if not isinstance(model, FineTuneNet):
        raise ConfigError(f"{run_dir}: a {params.model.method} run has no single backbone to export; "
                          "export a finetune, l2sp, lastk or linear run")
    backbone = build_backbone(params.model.backbone, "none", params.data.image_size)
    for part in ("stem", "blocks", "neck"):
        getattr(backbone, part).load_state_dict(getattr(model, part).state_dict())
    head = model.head[-1]
    if backbone.classifier.weight.shape == head.weight.shape:
        backbone.classifier.load_state_dict(head.state_dict())
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.net.state_dict().items()}
    out = Path(out)
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={"backbone": params.model.backbone}))
    return {"backbone": params.model.backbone, "source_classes": classes, "tensors": len(state), "path": str(out)}


# Files for `dvc metrics` and `dvc plots` of one run: small, flat, deterministic (no timings).


def training_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalars of a finished run that `dvc metrics show/diff` should list."""
    last = metrics["history"][-1] if metrics["history"] else {}
    out = {
        "test_accuracy": metrics["test"]["accuracy"],
        "test_loss": metrics["test"]["loss"],
        "train_loss": last.get("train", {}).get("loss"),
        "train_accuracy": last.get("train", {}).get("accuracy"),
        "val_accuracy": last.get("val", {}).get("accuracy"),
        "epochs": len(metrics["history"]),
    }
    if "tuned_blocks_per_image" in metrics["test"]:
        out["tuned_blocks_per_image"] = metrics["test"]["tuned_blocks_per_image"]
    return {k: v for k, v in out.items() if v is not None}


def learning_curve(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per epoch: train and val loss/accuracy (and SpotTune's tuned blocks per image)."""
    rows = []
    for h in metrics["history"]:
        row = {"epoch": h["epoch"], "train_loss": h["train"]["loss"], "train_accuracy": h["train"]["accuracy"]}
        if h.get("val"):
            row |= {"val_loss": h["val"]["loss"], "val_accuracy": h["val"]["accuracy"]}
            if "tuned_blocks_per_image" in h["val"]:
                row["val_tuned_blocks_per_image"] = h["val"]["tuned_blocks_per_image"]
        rows.append(row)
    return rows
