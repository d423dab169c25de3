"""What every transfer model (SpotTune and the baselines) offers the engine."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from spottune.config import OptimParams


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    decisions: torch.Tensor | None = None  # (B, L) in {0, 1}: 1 = block ran its tuned copy
    tune_probability: torch.Tensor | None = None  # (B, L) the policy's noise-free probability of tuning


class TransferModel(nn.Module):
    """A backbone adapted to a target task.

    Subclasses list the modules that must never train in `frozen_modules`: they are kept in eval
    mode (BN statistics untouched) whatever `train()` says, and receive no gradients.
    """

    frozen_modules: list[nn.Module]
    # True when the caller keeps none of a training step's autograd graph and uses its gradients within
    # the step (spottune.training does): the step's trainable part may then replay as a CUDA graph
    # (spottune/models/block_graphs.py). Off by default: a replay rewrites the previous step's gradients.
    graph_blocks: bool = False

    def _replays_as_graph(self, images: torch.Tensor) -> bool:
        """Whether this forward is a training step whose trainable part may replay as a CUDA graph."""
        return self.graph_blocks and images.is_cuda and self.training and torch.is_grad_enabled()

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        for m in self.frozen_modules:
            m.eval()
        return self

    def freeze(self, *modules: nn.Module) -> None:
        for m in modules:
            m.requires_grad_(False)
            m.eval()
        self.frozen_modules = [*getattr(self, "frozen_modules", []), *modules]

    def parameter_groups(self, optim: OptimParams) -> list[dict]:
        """Optimizer parameter groups with their own learning rates; frozen parameters are absent."""
        raise NotImplementedError

    def regularization(self, output: ModelOutput) -> torch.Tensor | None:
        """Extra loss term (global-k, L2-SP); None when the method has none."""
        return None

    def graph_failure(self) -> str | None:
        """Why this model's CUDA graphs were given up in training (then it ran eagerly), or None."""
        from spottune.models.block_graphs import BlockGraphs

        return next((g.failure for g in vars(self).values() if isinstance(g, BlockGraphs) and g.failure), None)

    def set_epoch(self, epoch: int, epochs: int = 1) -> None:
        """Called before each epoch of `epochs` (temperature and noise schedules)."""

    def infer_batches(self, batches: Iterable[torch.Tensor]) -> Iterator[ModelOutput]:
        """Outputs for a stream of batches, in order; a model may queue work for the next batch early."""
        for images in batches:
            yield self(images)


def trainable(params) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def new_head(num_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """The new task's classifier: dropout, then a linear layer (keys head.1.*).

    No Dropout(0): on CUDA it still launches a kernel and draws random numbers; an Identity keeps the keys.
    """
    return nn.Sequential(nn.Dropout(dropout) if dropout > 0 else nn.Identity(), nn.Linear(num_features, num_classes))
