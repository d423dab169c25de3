"""SpotTune: per image and block, run the frozen pretrained block or its fine-tuned copy.

    x_{l+1} = (1 - I_l(x)) * F_l(x_l) + I_l(x) * F~_l(x_l),   I_l(x) in {0, 1} from the policy

Three ways to execute it, all computing the same function (`SpotTuneNet.execution`; "auto" takes
split in training and conditional otherwise):

  mode         what runs                                                   where
  mixed        both branches on the whole batch with autograd, then mixed  `_mixed`, this module
               (the 2019 design; the reference the others are tested against)
  split        training: autograd through a branch only where some image   split_training.py
               chose it, with the mixed form's gradients
  conditional  no decision gradient (evaluation, inference): each image    conditional.py
               runs only its chosen branch, in bucketed sub-batches

Each forward reads the per-block counts of tuned images on the host once (one synchronisation,
taken after the stem is queued, so the GPU works while the host waits). Unlike the 2019 code, the
frozen copy is truly frozen (eval-mode BN, no gradients), and evaluation decisions are
deterministic argmax by default. Its BatchNorm layers are folded into the convolutions before
them and each conv -> (add ->) ReLU chain runs as one fused cuDNN kernel (`fold_frozen_bn`,
spottune/models/fold.py). On CUDA the policy runs on a side stream, beside the stem (in training
its backward then runs beside the stem's); at inference as a replayed CUDA graph (`graph_policy`)
and, over a stream of batches (`infer_batches`, what evaluation uses), one batch ahead beside the
previous batch's blocks: the same function, computed faster. In training (`graph_blocks`, on in
spottune.training, on one GPU or under DDP) split execution replays the blocks, neck and head as
CUDA graphs, one per routing pattern (spottune/models/block_graphs.py).

With `policy.frozen_bn: target` the frozen copy's BatchNorm normalises with the target batch's
statistics in training and adapts its running statistics, as the 2019 code's "frozen" copy did
(which also trained its BN affine weights; here every weight stays frozen). That copy is then no
per-image function either, so training runs `mixed` and nothing is folded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Literal

import torch
from torch import nn

from spottune.config import OptimParams, PolicyParams
from spottune.models.backbones import Backbone
from spottune.models.base import ModelOutput, TransferModel, new_head, trainable
from spottune.models.block_graphs import BlockGraphs
from spottune.models.conditional import RoutingPlan, conditional_block
from spottune.models.fold import FrozenConvReLU, fold_batchnorm
from spottune.models.policy import (
    GraphedPolicy,
    RoutingPolicy,
    sample_decisions,
    tune_probability,
    usage_term,
)
from spottune.models.route_kernels import per_image
from spottune.models.split_training import RemadeRoutes, split_block

Execution = Literal["auto", "mixed", "split", "conditional"]
# (decisions, tune probabilities, the decisions' plan (None for mixed execution), the event after which
# all are ready (None: current stream))
_Routing = tuple[torch.Tensor, torch.Tensor, "RoutingPlan | None", "torch.cuda.Event | None"]


class SpotTuneNet(TransferModel):
    def __init__(
        self, backbone: Backbone, num_classes: int, policy: PolicyParams, *, train_stem: bool = True,
        dropout: float = 0.0, tuned_l2sp_alpha: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = backbone.stem
        self.frozen_blocks = backbone.blocks
        self.tuned_blocks = copy.deepcopy(backbone.blocks)
        self.neck = backbone.neck
        self.head = new_head(backbone.num_features, num_classes, dropout)
        self.policy = RoutingPolicy(len(backbone.blocks), policy.width, policy.input_size,
                                    policy.init_tune_probability, policy.init_weight_std)
        # Registered first: DistributedDataParallel fills its gradient buckets in reverse registration
        # order and all-reduces them in that order, and the policy's gradients are the last of a
        # backward pass (every block's decision gradient flows into it). Registered last, they held
        # back the first bucket and so every all-reduce until the backward had finished.
        modules = {"policy": self._modules.pop("policy"), **self._modules}
        self._modules.clear()
        self._modules.update(modules)
        self.policy_params = policy
        self.temperature = policy.temperature
        self.noise = 1.0  # scale of the Gumbel noise in training decisions (set_epoch)
        self.tuned_l2sp_alpha = tuned_l2sp_alpha
        self.execution: Execution = "auto"
        self.bucket = 32
        self.fold_frozen_bn = policy.frozen_bn == "pretrained"
        self.graph_policy = True
        self._folded: list[nn.Module] | None = None  # derived from frozen_blocks; not a submodule, not saved
        self._graphed_policy = GraphedPolicy(self.policy)
        self._block_graphs = BlockGraphs()
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}  # per device, for the policy
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

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .double(), memory formats: rebuild derived copies
        super()._apply(fn, recurse)
        self._reset_derived()
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._reset_derived()
        return result

    def __deepcopy__(self, memo: dict) -> SpotTuneNet:
        """A copy with its own policy graphs, folded blocks and side streams (CUDA graphs and streams cannot be copied)."""
        twin = self.__class__.__new__(self.__class__)
        memo[id(self)] = twin
        for k, v in self.__dict__.items():
            if k not in ("_folded", "_graphed_policy", "_side_streams"):
                twin.__dict__[k] = copy.deepcopy(v, memo)
        twin._folded = None
        twin._graphed_policy = GraphedPolicy(twin.policy)
        twin._side_streams = {}
        return twin

    def _reset_derived(self) -> None:
        self._folded = None
        self._graphed_policy.reset()
        self._block_graphs.reset()

    def runtime_frozen_blocks(self) -> nn.ModuleList | list[nn.Module]:
        """The frozen copy as executed: BN folded into the convolutions, conv -> ReLU chains fused (fold.py).

        In training and at inference alike: the frozen blocks are per-image functions either way. Not
        where the frozen copy's BN adapts to the target (its statistics are then the batch's).
        """
        if not self.fold_frozen_bn or self.adapting_norms:
            return self.frozen_blocks
        if self._folded is None:
            self._folded = [fold_batchnorm(b) for b in self.frozen_blocks]
        return self._folded

    @property
    def num_blocks(self) -> int:
        return len(self.frozen_blocks)

    def decide(self, images: torch.Tensor) -> torch.Tensor:
        """(B, L) decisions: Gumbel straight-through in training, `eval_decisions` otherwise."""
        return self.route(images)[0]

    def route(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) decisions and the policy's (B, L) noise-free probabilities of tuning."""
        logits = self._graphed_policy(images) if self.graph_policy else self.policy(images)
        mode = "gumbel" if self.training else self.policy_params.eval_decisions
        return sample_decisions(logits, self.temperature, mode, self.noise), tune_probability(logits)

    def forward(self, images: torch.Tensor, decisions: torch.Tensor | None = None) -> ModelOutput:
        execution = self._execution()
        if decisions is None and self._routes_beside(images):
            return self._run(images, self._route_beside(images, execution), execution)
        probability = None
        if decisions is None:
            decisions, probability = self.route(images)
        plan = RoutingPlan(decisions, self.bucket) if execution != "mixed" else None
        return self._run(images, (decisions, probability, plan, None), execution)

    def infer_batches(self, batches: Iterable[torch.Tensor]) -> Iterator[ModelOutput]:
        """Inference over a stream of batches, each batch's policy queued before the previous batch's blocks.

        Why: a batch's blocks wait for its decisions, and the host reads their per-block counts once
        (to pick each block's branch). Queued one batch ahead on a side stream, the policy runs beside
        the previous batch's blocks and its counts reach the host before those finish: the GPU waits
        for neither. Same outputs as calling the model on each batch.
        """
        execution, pending = self._execution(), None
        for images in batches:
            # CPU or autograd: one call, after any batch still pending
            if not self._routes_beside(images) or torch.is_grad_enabled():
                if pending is not None:
                    yield self._run(*pending, execution)
                    pending = None
                yield self(images)
                continue
            ahead = (images, self._route_beside(images, execution))
            if pending is not None:
                yield self._run(*pending, execution)
            pending = ahead
        if pending is not None:
            yield self._run(*pending, execution)

    def _execution(self) -> Execution:
        if not self.training and self.policy_params.eval_decisions == "expectation":
            return "mixed"  # fractional decisions: every image runs both branches
        if self.execution != "auto":
            return self.execution
        # Training: both branches see the whole batch (the tuned copy's BN uses its statistics),
        # autograd only where an image chose the branch. Evaluation: per-image blocks only, so each
        # image runs its chosen branch alone. With target statistics in the frozen copy, training
        # has no per-image branch: mixed.
        if not self.training:
            return "conditional"
        return "mixed" if self.adapting_norms else "split"

    @staticmethod
    def _routes_beside(images: torch.Tensor) -> bool:
        """On CUDA the policy's small kernels run on a side stream, beside the stem.

        In training autograd runs each backward kernel on its forward's stream: the policy's backward
        then runs beside the stem's, the last work of a step (docs/performance.md).
        """
        return images.is_cuda

    def _route_beside(self, images: torch.Tensor, execution: Execution) -> _Routing:
        """Queue the policy and the copy of its counts to the host on the side stream; returns at once."""
        if images.device not in self._side_streams:
            self._side_streams[images.device] = torch.cuda.Stream(images.device)
        main, side = torch.cuda.current_stream(images.device), self._side_streams[images.device]
        side.wait_stream(main)  # the images are ready
        images.record_stream(side)  # and read on the side stream
        with torch.cuda.stream(side):
            decisions, probability = self.route(images)
            plan = RoutingPlan(decisions, self.bucket) if execution != "mixed" else None
            done = torch.cuda.Event()
            done.record(side)
        for t in (decisions, probability, *((plan.chosen,) if plan else ())):
            t.record_stream(main)  # made on the side stream, used on the main one
        return decisions, probability, plan, done

    def _run(self, images: torch.Tensor, routing: _Routing, execution: Execution) -> ModelOutput:
        decisions, probability, plan, done = routing
        x = self.stem(images)
        if done is not None:
            torch.cuda.current_stream(images.device).wait_event(done)
        counts = plan.tuned_counts if plan is not None else None
        if execution == "split" and self._graphable(x):
            batch = x.shape[0]
            pattern = tuple(0 if n == 0 else batch if n == batch else 1 for n in counts)  # as the blocks branch on it
            modules = [*self.runtime_frozen_blocks(), self.tuned_blocks, self.neck, self.head]
            logits = self._block_graphs((x, decisions), self._lean_blocks, modules, pattern)
            return ModelOutput(logits, decisions, probability)
        return ModelOutput(self._blocks(x, decisions, counts, execution, plan), decisions, probability)

    def _lean_blocks(self, x: torch.Tensor, decisions: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Split training as the CUDA graphs run it, keeping less for the backward: the frozen copy's fused
        units run under autograd with their own backward, keeping a ReLU mask rather than their output
        (fold.py), and mixed blocks' outputs are kept as recipes (RemadeRoutes). Their Python costs host
        time only where this runs: the eager steps before a capture and the capture itself, which then
        keep no more memory than the graph."""
        units = [m for b in self.runtime_frozen_blocks() for m in b.modules() if isinstance(m, FrozenConvReLU)]
        for u in units:
            u.fused_under_autograd = True
        try:
            return self._blocks(x, decisions, counts, remake=True)
        finally:
            for u in units:
                u.fused_under_autograd = False

    def _blocks(self, x: torch.Tensor, decisions: torch.Tensor, counts: list[int] | None,
                execution: Execution = "split", plan: RoutingPlan | None = None, remake: bool = False) -> torch.Tensor:
        """Blocks, neck and head: logits. Split training needs only the per-block tuned counts (a CUDA graph runs this).

        remake: split training keeps a mixed block's output as its recipe (RemadeRoutes), for the CUDA
        graphs, in which the hooks' Python runs only while capturing.
        """
        # One autograd node hands each block its column; its backward stacks their decision gradients
        # (a column per block, `decisions[:, l]`, costs a zero-filled (B, L) gradient and an add per block).
        columns = decisions.unbind(1)
        remade = RemadeRoutes() if remake and execution == "split" else None
        with remade.hooks() if remade else nullcontext():
            for l, (frozen, tuned) in enumerate(zip(self.runtime_frozen_blocks(), self.tuned_blocks)):
                if execution == "mixed":
                    x = _mixed(frozen, tuned, x, columns[l])
                elif execution == "split":
                    x = split_block(frozen, tuned, x, columns[l], counts[l], self.policy_params.recompute_frozen, remade)
                else:
                    x = conditional_block(frozen, tuned, x, plan, l)
            return self.head(self.neck(x))

    def _graphable(self, x: torch.Tensor) -> bool:
        """Split training replays its blocks as CUDA graphs (block_graphs.py) on CUDA, when the caller allows it."""
        return self._replays_as_graph(x) and not self.policy_params.recompute_frozen

    def parameter_groups(self, optim: OptimParams) -> list[dict]:
        shared = [*self.stem.parameters(), *self.neck.parameters()]
        net = [{"name": "net", "params": trainable([*shared, *self.tuned_blocks.parameters()]), "lr": optim.lr_net,
                "weight_decay": optim.weight_decay}]
        if self.tuned_l2sp_alpha:  # the tuned copy is pulled toward the pretrained weights instead of toward zero
            net = [{**net[0], "params": trainable(shared)},
                   {"name": "tuned", "params": trainable(self.tuned_blocks.parameters()), "lr": optim.lr_net,
                    "weight_decay": 0.0}]
        return [
            *net,
            {"name": "head", "params": list(self.head.parameters()), "lr": optim.lr_head, "weight_decay": optim.weight_decay},
            {"name": "policy", "params": list(self.policy.parameters()), "lr": optim.lr_policy,
             "weight_decay": optim.policy_weight_decay},
        ]

    def regularization(self, output: ModelOutput) -> torch.Tensor | None:
        """Global-k: pull the number of tuned blocks toward k, and each block's tuning rate to 0 or 1.
        Usage (`usage_weight`): reward decisions that differ between the images of a batch (usage_term).
        L2-SP (`tuned_l2sp_alpha`): alpha/2 ||w~ - w||^2, the tuned copy's distance from the frozen copy."""
        p = self.policy_params
        terms = []
        if p.global_k is not None and output.decisions is not None:
            v = output.decisions.float().mean(0)  # fraction of the batch that tunes each block
            k_term = (v.sum() - p.global_k) ** 2
            vc = v.clamp(1e-6, 1 - 1e-6)
            entropy = -(vc * vc.log() + (1 - vc) * (1 - vc).log()).sum()
            terms.append(p.k_weight * k_term + p.entropy_weight * entropy)
        if p.usage_weight > 0 and output.tune_probability is not None:
            terms.append(p.usage_weight * usage_term(output.tune_probability))
        if self.tuned_l2sp_alpha:
            pairs = zip(self.tuned_blocks.parameters(), self.frozen_blocks.parameters())
            terms.append(0.5 * self.tuned_l2sp_alpha * sum(((t - f) ** 2).sum() for t, f in pairs if t.requires_grad))
        return sum(terms) if terms else None

    def set_epoch(self, epoch: int, epochs: int = 1) -> None:
        p = self.policy_params
        self.temperature = max(p.temperature_min, p.temperature * math.pow(p.temperature_decay, epoch))
        if p.noise_schedule == "cosine":
            self.noise = 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs - 1)))
        else:
            self.noise = 1.0


def _mixed(frozen: nn.Module, tuned: nn.Module, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Both branches on the whole batch, mixed per image: F + d * (F~ - F)."""
    f, t = frozen(x), tuned(x)
    return torch.lerp(f, t, per_image(d.to(f.dtype), f))
