"""SpotTune: per image and block, run the frozen pretrained block or its fine-tuned copy.

    x_{l+1} = (1 - I_l(x)) * F_l(x_l) + I_l(x) * F~_l(x_l),   I_l(x) in {0, 1} from the policy

Training uses the mixed form above with straight-through Gumbel-Softmax decisions (the policy's
gradient is <g, F~_l(x_l) - F_l(x_l)>, so both branches run). Without a decision gradient
(evaluation, inference) each image runs only the branch it chose: the batch is split per block.
Unlike the 2019 code, the frozen copy is truly frozen (eval-mode BN, no gradients) and evaluation
decisions are deterministic argmax by default.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import nn

from spottune.config import OptimParams, PolicyParams
from spottune.models.backbones import Backbone
from spottune.models.base import ModelOutput, TransferModel, trainable
from spottune.models.policy import RoutingPolicy, sample_decisions

Execution = Literal["auto", "mixed", "conditional"]


class SpotTuneNet(TransferModel):
    def __init__(
        self, backbone: Backbone, num_classes: int, policy: PolicyParams, *, train_stem: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.stem = backbone.stem
        self.frozen_blocks = backbone.blocks
        self.tuned_blocks = copy.deepcopy(backbone.blocks)
        self.neck = backbone.neck
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, num_classes))
        self.policy = RoutingPolicy(len(backbone.blocks), policy.width, policy.input_scale)
        self.policy_params = policy
        self.temperature = policy.temperature
        self.execution: Execution = "auto"
        self.frozen_modules = []
        self.freeze(self.frozen_blocks)
        if not train_stem:
            self.freeze(self.stem)

    @property
    def num_blocks(self) -> int:
        return len(self.frozen_blocks)

    def decide(self, images: torch.Tensor) -> torch.Tensor:
        """(B, L) decisions: Gumbel straight-through in training, `eval_decisions` otherwise."""
        logits = self.policy(images)
        mode = "gumbel" if self.training else self.policy_params.eval_decisions
        return sample_decisions(logits, self.temperature, mode)

    def forward(self, images: torch.Tensor, decisions: torch.Tensor | None = None) -> ModelOutput:
        if decisions is None:
            decisions = self.decide(images)
        execution = self.execution
        if execution == "auto":
            needs_decision_grad = torch.is_grad_enabled() and decisions.requires_grad
            execution = "mixed" if needs_decision_grad else "conditional"
        x = self.stem(images)
        for l, (frozen, tuned) in enumerate(zip(self.frozen_blocks, self.tuned_blocks)):
            d = decisions[:, l]
            x = _mixed(frozen, tuned, x, d) if execution == "mixed" else _conditional(frozen, tuned, x, d)
        return ModelOutput(self.head(self.neck(x)), decisions)

    def parameter_groups(self, optim: OptimParams) -> list[dict]:
        net = trainable([*self.stem.parameters(), *self.tuned_blocks.parameters(), *self.neck.parameters()])
        return [
            {"name": "net", "params": net, "lr": optim.lr_net, "weight_decay": optim.weight_decay},
            {"name": "head", "params": list(self.head.parameters()), "lr": optim.lr_head, "weight_decay": optim.weight_decay},
            {"name": "policy", "params": list(self.policy.parameters()), "lr": optim.lr_policy,
             "weight_decay": optim.policy_weight_decay},
        ]

    def regularization(self, output: ModelOutput) -> torch.Tensor | None:
        """Global-k: pull the number of tuned blocks toward k, and each block's tuning rate to 0 or 1."""
        p = self.policy_params
        if p.global_k is None or output.decisions is None:
            return None
        v = output.decisions.float().mean(0)  # fraction of the batch that tunes each block
        k_term = (v.sum() - p.global_k) ** 2
        vc = v.clamp(1e-6, 1 - 1e-6)
        entropy = -(vc * vc.log() + (1 - vc) * (1 - vc).log()).sum()
        return p.k_weight * k_term + p.entropy_weight * entropy

    def set_epoch(self, epoch: int) -> None:
        p = self.policy_params
        self.temperature = max(p.temperature_min, p.temperature * math.pow(p.temperature_decay, epoch))


def _mixed(frozen: nn.Module, tuned: nn.Module, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Both branches on the whole batch, mixed per image: F + d * (F~ - F)."""
    f, t = frozen(x), tuned(x)
    return torch.lerp(f, t, d.to(f.dtype).view(-1, *([1] * (f.dim() - 1))))


def _conditional(frozen: nn.Module, tuned: nn.Module, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Each image through the branch it chose only; the whole batch through one branch when all agree."""
    chosen = d > 0.5
    n_tuned = int(chosen.sum())
    if n_tuned == 0:
        return frozen(x)
    if n_tuned == x.shape[0]:
        return tuned(x)
    idx_t = chosen.nonzero().squeeze(1)
    idx_f = (~chosen).nonzero().squeeze(1)
    y_t = tuned(x.index_select(0, idx_t))
    y_f = frozen(x.index_select(0, idx_f))
    fmt = torch.channels_last if y_t.dim() == 4 and y_t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((x.shape[0], *y_t.shape[1:]), dtype=y_t.dtype, device=y_t.device, memory_format=fmt)
    out.index_copy_(0, idx_t, y_t)
    out.index_copy_(0, idx_f, y_f.to(y_t.dtype))
    return out
