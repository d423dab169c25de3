"""Training and evaluation loops, and checkpoints. Plain functions in the style of torchvision's references.

A checkpoint is a dict of state_dicts, the epoch and every RNG state, written atomically (temporary
name, fsync, rename) and read with `torch.load(weights_only=True)`: no code runs on load.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from spottune.atomic import atomic_write
from spottune.errors import CheckpointError
from spottune.models.base import TransferModel
from spottune.stats import mixed_blocks


@dataclass
class DeviceSetup:
    """Where tensors go and how they are computed there: bf16 + channels_last on CUDA, float32 on CPU.

    `mean` and `std` are the backbone's input normalisation, applied here to the loaders' uint8
    batches: on the device, not in the loader's workers (see `images`).
    """

    device: torch.device
    amp: bool = False
    channels_last: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def resolve(cls, name: str, amp: bool, channels_last: bool,
                normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> DeviceSetup:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
        on_cuda = device.type == "cuda"
        mean, std = normalization or (None, None)
        return cls(device, amp=amp and on_cuda, channels_last=channels_last and on_cuda, mean=mean, std=std)

    def autocast(self):
        # No weight-cast cache: each weight is used once per forward, and a CUDA graph captured
        # under it (SpotTune's policy at inference) would read cast copies freed at its exit.
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if self.amp else nullcontext()

    @cached_property
    def _mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (1, C, 1, 1) device tensors, made once: no host-to-device copy per step."""
        if self.mean is None or self.std is None:
            raise ValueError("uint8 images need the backbone's normalisation: DeviceSetup(..., mean=..., std=...)")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        return mean, std

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the device in the model's memory format; uint8 images (the loaders') normalised there.

        Float conversion and normalisation cost a CPU loader worker twice what decoding and resizing
        a 224 px image does, and a float32 batch is 4x the bytes to pin and copy: done on the GPU,
        the same arithmetic ((x / 255 - mean) / std in float32, as torchvision's ToTensor and
        Normalize do it) is nearly free.
        """
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            mean, std = self._mean_std
            x = x.float().div_(255).sub_(mean).div_(std)
        return x.contiguous(memory_format=fmt)


@dataclass
class RunningStats:
    """Loss, accuracy and routing accumulated over an epoch, kept on the device (no per-step host sync)."""

    loss_sum: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    tuned_per_block: torch.Tensor | None = None
    images: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, decisions: torch.Tensor | None) -> None:
        n = labels.shape[0]
        batch_loss = loss.detach().float() * n
        batch_correct = (logits.argmax(1) == labels).sum()
        self.loss_sum = batch_loss if self.loss_sum is None else self.loss_sum + batch_loss
        self.correct = batch_correct if self.correct is None else self.correct + batch_correct
        if decisions is not None:
            tuned = decisions.detach().float().sum(0)
            self.tuned_per_block = tuned if self.tuned_per_block is None else self.tuned_per_block + tuned
        self.images += n

    def sum_over(self, all_reduce: Callable[[torch.Tensor], None], device: torch.device) -> None:
        """Replace this process's totals by their sums over every process (one all_reduce of a flat tensor).

        Why: under DDP each rank trains on its own shard; the loss and accuracy of rank 0's shard alone
        are a sample, not the epoch's. Sums and counts add up exactly; means would not when shards differ.
        Every rank must call this at the same point (it is a collective).
        """
        zero = torch.zeros((), dtype=torch.float64, device=device)
        parts = [(self.loss_sum if self.loss_sum is not None else zero).double().reshape(1).to(device),
                 (self.correct if self.correct is not None else zero).double().reshape(1).to(device),
                 torch.tensor([float(self.images)], dtype=torch.float64, device=device)]
        if self.tuned_per_block is not None:
            parts.append(self.tuned_per_block.double().to(device))
        flat = torch.cat(parts)
        all_reduce(flat)
        self.loss_sum, self.correct, self.images = flat[0], flat[1], int(flat[2].item())
        if self.tuned_per_block is not None:
            self.tuned_per_block = flat[3:]

    def summary(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        out: dict[str, Any] = {
            "loss": float(self.loss_sum) / max(self.images, 1),
            "accuracy": float(self.correct) / max(self.images, 1),
            "images": self.images,
            "seconds": seconds,
            "images_per_s": self.images / seconds if seconds > 0 else 0.0,
        }
        if self.tuned_per_block is not None:
            out["tuned_fraction_per_block"] = (self.tuned_per_block / max(self.images, 1)).tolist()
            out["tuned_blocks_per_image"] = float(self.tuned_per_block.sum()) / max(self.images, 1)
        return out


def _progress(iterable: Iterable, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in logs (epoch summaries are logged instead).
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)


def train_one_epoch(
    model: TransferModel,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    setup: DeviceSetup,
    *,
    epoch: int,
    epochs: int = 1,
    max_steps: int | None = None,
    progress: bool = True,
    forward: Callable[[torch.Tensor], Any] | None = None,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """One pass over `loader`; returns mean loss, accuracy, images/s and routing statistics.

    `forward` is what computes the outputs when it is not `model` itself: its DistributedDataParallel
    wrapper under torchrun (the regularisers and the epoch's temperature still come from `model`).
    `all_reduce` (under torchrun) sums a tensor over every process in place: the epoch's statistics then
    cover every rank's shard, not this rank's alone, and every rank returns the same numbers.
    """
    forward = model if forward is None else forward
    model.train()
    model.set_epoch(epoch, epochs)
    stats = RunningStats()
    total = min(len(loader), max_steps) if max_steps else len(loader)
    bar = _progress(loader, f"epoch {epoch}", progress, total)
    for step, (images, labels) in enumerate(bar):
        if max_steps is not None and step >= max_steps:
            break
        images, labels = setup.images(images), labels.to(setup.device, non_blocking=True)
        loss, out = train_step(model, forward, optimizer, images, labels, setup)
        stats.add(loss, out.logits, labels, out.decisions)
        if progress and step % 10 == 0:  # a tqdm bar
            s = stats.summary()
            bar.set_postfix(loss=f"{s['loss']:.3f}", acc=f"{s['accuracy']:.3f}", img_s=f"{s['images_per_s']:.0f}")
    if all_reduce is not None:
        stats.sum_over(all_reduce, setup.device)
    if not torch.isfinite(stats.loss_sum):
        raise FloatingPointError(f"training loss is not finite in epoch {epoch}: lower the learning rates")
    return stats.summary()


def train_step(model: TransferModel, forward: Callable[[torch.Tensor], Any], optimizer: torch.optim.Optimizer,
               images: torch.Tensor, labels: torch.Tensor, setup: DeviceSetup) -> tuple[torch.Tensor, Any]:
    """One optimisation step on a batch already on the device; returns (classification loss, model output)."""
    with setup.autocast():
        out = forward(images)
        loss = F.cross_entropy(out.logits.float(), labels)
        extra = model.regularization(out)
        total_loss = loss if extra is None else loss + extra
    optimizer.zero_grad(set_to_none=True)
    total_loss.backward()
    optimizer.step()
    # Values only: nothing of this step's autograd graph outlives it. A CUDA graph captured in the next
    # step (spottune/models/block_graphs.py) must not meet this step's gradient accumulators.
    decisions = None if out.decisions is None else out.decisions.detach()
    probability = None if out.tune_probability is None else out.tune_probability.detach()
    return loss.detach(), out._replace(logits=out.logits.detach(), decisions=decisions, tune_probability=probability)


@torch.inference_mode()
def predict(model: TransferModel, loader: Iterable, setup: DeviceSetup, progress: bool = False) -> dict[str, torch.Tensor]:
    """Labels, predictions, logits and routing decisions for every image in `loader`, in order.

    The batches go through `model.infer_batches` as one stream and the outputs come back to the host
    without waiting for each batch (non-blocking copies, one synchronisation at the end), so the GPU
    is never idle between batches while the host reads results.
    """
    model.eval()
    labels: list[torch.Tensor] = []

    def device_batches() -> Iterator[torch.Tensor]:
        for images, y in _progress(loader, "evaluate", progress):
            labels.append(y)
            yield setup.images(images)

    logits, decisions = [], []
    with setup.autocast():
        for out in model.infer_batches(device_batches()):
            logits.append(out.logits.float().to("cpu", non_blocking=True))
            if out.decisions is not None:
                decisions.append(out.decisions.float().to("cpu", non_blocking=True))
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)  # the non-blocking copies have landed
    result = {"labels": torch.cat(labels), "logits": torch.cat(logits)}
    result["predictions"] = result["logits"].argmax(1)
    if decisions:
        result["decisions"] = torch.cat(decisions)
    return result


def evaluate(model: TransferModel, loader: Iterable, setup: DeviceSetup, num_classes: int, progress: bool = False) -> dict[str, Any]:
    """Top-1 and per-class accuracy, loss, and (SpotTune) routing statistics overall and per class."""
    started = time.perf_counter()
    p = predict(model, loader, setup, progress)
    seconds = time.perf_counter() - started
    return summarise_predictions(p, num_classes) | {"images_per_s": len(p["labels"]) / seconds if seconds else 0.0}


def summarise_predictions(p: dict[str, torch.Tensor], num_classes: int) -> dict[str, Any]:
    labels, preds = p["labels"], p["predictions"]
    correct = preds == labels
    per_class = [float(correct[labels == c].float().mean()) if (labels == c).any() else None for c in range(num_classes)]
    out: dict[str, Any] = {
        "accuracy": float(correct.float().mean()),
        "loss": float(F.cross_entropy(p["logits"], labels)),
        "per_class_accuracy": per_class,
        "images": int(labels.numel()),
    }
    if "decisions" in p:
        # Expectation decisions are probabilities: the routing is the branch each image leans to (argmax's).
        d = (p["decisions"] > 0.5).float()
        fraction = d.float().mean(0)
        out["tuned_fraction_per_block"] = fraction.tolist()
        out["tuned_blocks_per_image"] = float(d.sum(1).mean())
        # How per-image the routing is: the share of images that take a block's less common branch,
        # and the blocks where 5% to 95% of images tune (a per-block choice has none).
        out["minority_fraction_per_block"] = torch.minimum(fraction, 1 - fraction).tolist()
        out["mixed_blocks"] = mixed_blocks(out["tuned_fraction_per_block"])
        out["tuned_fraction_per_class_block"] = [
            d[labels == c].mean(0).tolist() if (labels == c).any() else None for c in range(num_classes)
        ]
    return out


def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated file or a pickle with code are both refused
        raise CheckpointError(f"cannot load checkpoint {path} safely: {e}") from None
