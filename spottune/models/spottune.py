"""SpotTune: per image and block, run the frozen pretrained block or its fine-tuned copy.

    x_{l+1} = (1 - I_l(x)) * F_l(x_l) + I_l(x) * F~_l(x_l),   I_l(x) in {0, 1} from the policy

Three ways to execute it, all computing the same function:

  mixed        both branches on the whole batch with autograd, then mixed (the 2019 design; the
               reference the others are tested against)
  split        training: the tuned copy runs on the whole batch (its BN statistics are the batch's,
               as in the mixed form); the frozen copy, a per-image function (eval-mode BN), keeps an
               autograd graph only for the images routed to it and runs the others without one
               (their output is needed only for the policy's gradient <g, F~ - F>)
  conditional  no decision gradient (evaluation, inference): each image runs only its chosen branch

Sub-batches are cut from one sort of the decisions per step and padded to a multiple of `bucket`
images, so there is one host synchronisation per forward and few distinct shapes (cuDNN's autotuner
sees each once). Unlike the 2019 code, the frozen copy is truly frozen (eval-mode BN, no gradients)
and evaluation decisions are deterministic argmax by default.

With `policy.frozen_bn: target` the frozen copy's BatchNorm normalises with the target batch's
statistics in training and adapts its running statistics, as the 2019 code's "frozen" copy did
(which also trained its BN affine weights; here every weight stays frozen). That copy is then no
per-image function either, so training runs `mixed`.
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

Execution = Literal["auto", "mixed", "split", "conditional"]


class RoutingPlan:
    """Per block: how many images take each branch (host ints, one sync) and the order that groups them."""

    def __init__(self, decisions: torch.Tensor, bucket: int) -> None:
        chosen = decisions.detach() > 0.5  # (B, L)
        self.batch = chosen.shape[0]
        self.bucket = bucket
        self.tuned_counts: list[int] = chosen.sum(0).tolist()  # the one host sync
        # Stable sort per block: frozen-routed images first, then tuned-routed, each in batch order.
        self.order = torch.argsort(chosen.T.to(torch.uint8), dim=1, stable=True)  # (L, B)
        self.inverse = torch.argsort(self.order, dim=1)

    def groups(self, block: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(frozen indices, tuned indices, n_frozen, n_tuned); index tensors padded to a bucket multiple."""
        n_t = self.tuned_counts[block]
        n_f = self.batch - n_t
        order = self.order[block]
        return self._pad(order[:n_f]), self._pad(order[n_f:]), n_f, n_t

    def _pad(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.numel()
        size = -(-n // self.bucket) * self.bucket if n else 0
        return idx if size == n else torch.cat([idx, idx[:1].expand(size - n)])


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
        self.policy = RoutingPolicy(len(backbone.blocks), policy.width, policy.input_size)
        self.policy_params = policy
        self.temperature = policy.temperature
        self.execution: Execution = "auto"
        self.bucket = 32
        self.frozen_modules = []
        self.freeze(self.frozen_blocks)
        if not train_stem:
            self.freeze(self.stem)
        # BN layers of the frozen copy that follow train()/eval() although frozen ('target' statistics).
        self.adapting_norms: list[nn.Module] = []
        if policy.frozen_bn == "target":
            self.adapting_norms = [m for m in self.frozen_blocks.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for m in self.adapting_norms:
                m.train(self.training)

    def train(self, mode: bool = True) -> SpotTuneNet:
        super().train(mode)
        for m in self.adapting_norms:
            m.train(mode)
        return self

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
            # Training keeps the tuned copy on the whole batch (its BN uses batch statistics);
            # evaluation has per-image blocks only, so each image can run its chosen branch alone.
            # With target statistics in the frozen copy too, training has no per-image branch: mixed.
            if not self.training:
                execution = "conditional"
            else:
                execution = "mixed" if self.adapting_norms else "split"
        plan = RoutingPlan(decisions, self.bucket) if execution != "mixed" else None
        x = self.stem(images)
        for l, (frozen, tuned) in enumerate(zip(self.frozen_blocks, self.tuned_blocks)):
            d = decisions[:, l]
            if execution == "mixed":
                x = _mixed(frozen, tuned, x, d)
            elif execution == "split":
                x = _split(frozen, tuned, x, d, plan, l)
            else:
                x = _conditional(frozen, tuned, x, plan, l)
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


def _split(frozen: nn.Module, tuned: nn.Module, x: torch.Tensor, d: torch.Tensor, plan: RoutingPlan, l: int) -> torch.Tensor:
    """Training step at the cost floor for a batch-statistics tuned copy: see the module docstring."""
    t = tuned(x)
    idx_f, idx_t, n_f, n_t = plan.groups(l)
    if n_t == 0:
        f = frozen(x)
    elif n_f == 0:
        with torch.no_grad():
            f = frozen(x)
    else:
        f_f = frozen(x.index_select(0, idx_f))[:n_f]
        with torch.no_grad():
            f_t = frozen(x.index_select(0, idx_t))[:n_t]
        f = torch.cat([f_f, f_t.to(f_f.dtype)]).index_select(0, plan.inverse[l])
    return _Mix.apply(f.to(t.dtype), t, d)


class _Mix(torch.autograd.Function):
    """F + d * (F~ - F) per image, keeping only F~ - F for backward (torch.lerp keeps F and F~)."""

    @staticmethod
    def forward(ctx, f: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        w = d.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))
        diff = t - f
        ctx.save_for_backward(diff, w)
        ctx.d_dtype = d.dtype
        return f + w * diff

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        diff, w = ctx.saved_tensors
        grad_f = g * (1 - w) if ctx.needs_input_grad[0] else None
        grad_t = g * w if ctx.needs_input_grad[1] else None
        grad_d = None
        if ctx.needs_input_grad[2]:  # a reduction over the whole block output: accumulate in float32 at least
            acc = torch.promote_types(g.dtype, torch.float32)
            grad_d = (g * diff).flatten(1).sum(1, dtype=acc).to(ctx.d_dtype)
        return grad_f, grad_t, grad_d


def _conditional(frozen: nn.Module, tuned: nn.Module, x: torch.Tensor, plan: RoutingPlan, l: int) -> torch.Tensor:
    """Each image through the branch it chose only; the whole batch through one branch when all agree."""
    idx_f, idx_t, n_f, n_t = plan.groups(l)
    if n_t == 0:
        return frozen(x)
    if n_f == 0:
        return tuned(x)
    y_f = frozen(x.index_select(0, idx_f))[:n_f]
    y_t = tuned(x.index_select(0, idx_t))[:n_t]
    return torch.cat([y_f, y_t.to(y_f.dtype)]).index_select(0, plan.inverse[l])
