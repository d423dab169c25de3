"""Split training: autograd through a SpotTune block's branch only where some image of the batch chose it.

A block whose decisions all agree runs the branch no image chose without autograd (its output only
feeds the decisions' gradient <g, F~ - F>); a block with mixed decisions runs both with autograd.
The routed output is the chosen branch's own output (decisions are exactly 0 or 1), and its
backward is the mixed form's, each in one pass over the block output on CUDA
(spottune/models/route_kernels.py). SpotTuneNet (spottune/models/spottune.py) calls `split_block`
per block; in training on CUDA it replays them as CUDA graphs (spottune/models/block_graphs.py),
keeping mixed blocks' outputs as recipes (`RemadeRoutes`).

A tuned copy that no image of the batch chose runs without autograd; its gradient in the mixed
form is exactly zero, and split training hands it that zero in the backward (_ZeroGradients): SGD's
momentum and weight decay still apply, and DistributedDataParallel needs no search for unused
parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from spottune.models.base import trainable
from spottune.models.route_kernels import route_backward, route_forward


def split_block(frozen: nn.Module, tuned: nn.Module, x: torch.Tensor, d: torch.Tensor, n_tuned: int,
                recompute: bool = False, remade: RemadeRoutes | None = None) -> torch.Tensor:
    """Training: autograd through a branch only where some image chose it; see the module docstring.

    recompute: where some image chose the tuned copy, keep nothing of the frozen branch (neither its
    activations nor F~ - F) and run it again in the backward pass: it has no state and no randomness,
    so the gradients are the same.
    remade: where images disagree, the routed output is kept by the layers that read it as its recipe.
    """
    if n_tuned == 0:
        f = frozen(x)
        with torch.no_grad():  # still in train mode: its BN statistics move as in the mixed form
            t = tuned(x)
        return _ZeroGradients.apply(_Route.apply(f.to(t.dtype), t, d, False, True), *trainable(tuned.parameters()))
    all_tuned = n_tuned == x.shape[0]
    t = tuned(x)
    if recompute:
        return _RecomputedRoute.apply(x, t, d, frozen, all_tuned)
    with torch.no_grad() if all_tuned else nullcontext():  # all tuned: F only feeds the decision gradient
        f = frozen(x).to(t.dtype)
    y = _Route.apply(f, t, d, all_tuned, False)
    if remade is not None and not all_tuned:
        remade.routed(y, f, t, d)
    return y


class RemadeRoutes:
    """Saved-tensor hooks: a mixed block's routed output is kept as its recipe (F, F~, d) and made again in the backward.

    Why: that output is a third block-output-sized tensor beside F and F~ (which the branches' last
    ReLUs and the route keep anyway), and the layers that read it (the next block's first convolutions,
    the neck) would each keep it. Its recipe keeps nothing new; remaking it is one select pass over the
    block output in the backward, the same bits (route_forward), shared by the layers of a block that
    read it (their backward steps come one after another). Only the latest routed output is known, and
    only while the next block reads it, so a tensor that later takes its memory is never mistaken for it.
    """

    def __init__(self) -> None:
        self._latest: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._remade: tuple[tuple, torch.Tensor] | None = None  # (recipe, output) last made in the backward

    def routed(self, y: torch.Tensor, f: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> None:
        self._latest = (y, (f.detach(), t.detach(), d.detach().to(t.dtype)))

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Armed around the blocks, neck and head; the latest output is let go at the end (each kept
        recipe refers to these hooks until the backward pass)."""
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._latest = None

    def _pack(self, saved: torch.Tensor):
        if self._latest is not None:
            y, recipe = self._latest
            if (saved.data_ptr() == y.data_ptr() and saved.shape == y.shape and saved.stride() == y.stride()
                    and saved.dtype == y.dtype):
                return recipe
        return saved

    def _unpack(self, saved):
        if not isinstance(saved, tuple):
            return saved
        if self._remade is None or self._remade[0] is not saved:
            self._remade = (saved, route_forward(*saved))
        return self._remade[1]


class _ZeroGradients(torch.autograd.Function):
    """The identity on x, whose backward gives `params` an exact zero gradient.

    Why: a tuned copy that no image of the batch took has, in the mixed formulation, a gradient of
    exactly zero, and autograd would leave it None. Handed over in the step (a memset per tensor),
    every trainable parameter has a gradient after every backward: SGD applies its momentum and weight
    decay as the mixed form would, and DistributedDataParallel needs no search for unused parameters
    (a traversal of the autograd graph and a host-device synchronisation every step).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.params = params  # their shapes and layouts only: nothing is read in the backward
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return (g, *(torch.zeros_like(p) for p in ctx.params))


class _Route(torch.autograd.Function):
    """F + d * (F~ - F) per image for decisions d in {0, 1}, with the mixed formulation's backward.

    The output is the chosen branch's own tensor where all images agree (no kernel), else a per-image
    select. Backward: g to the chosen branch, <g, F~ - F> to each decision. For that it keeps F and F~
    where autograd keeps one of them anyway (a ResNet block's last ReLU keeps its output), else F~ - F:
    one block output at most. The arithmetic is spottune/models/route_kernels.py's.
    """

    @staticmethod
    def forward(ctx, f: torch.Tensor, t: torch.Tensor, d: torch.Tensor, all_tuned: bool, all_frozen: bool):
        w = d.detach().to(t.dtype)
        ctx.all_tuned, ctx.all_frozen, ctx.d_dtype = all_tuned, all_frozen, d.dtype
        ctx.has_f = ctx.needs_input_grad[2] and (_kept_by_autograd(f) or _kept_by_autograd(t))
        if ctx.has_f:
            ctx.save_for_backward(t, f, w)
        else:
            ctx.save_for_backward(t - f if ctx.needs_input_grad[2] else None, None, w)
        if all_tuned:
            return t
        if all_frozen:
            return f
        return route_forward(f, t, w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        t, f, w = ctx.saved_tensors
        need_f = ctx.needs_input_grad[0] and not ctx.all_frozen
        need_t = ctx.needs_input_grad[1] and not ctx.all_tuned
        grad_f, grad_t, grad_d = route_backward(g, t, f, w, need_f, need_t, ctx.needs_input_grad[2])
        if ctx.needs_input_grad[0] and ctx.all_frozen:
            grad_f = g
        if ctx.needs_input_grad[1] and ctx.all_tuned:
            grad_t = g
        return grad_f, grad_t, None if grad_d is None else grad_d.to(ctx.d_dtype), None, None


def _kept_by_autograd(x: torch.Tensor) -> bool:
    """Whether autograd keeps x itself for its own backward (a ReLU keeps its output): keeping it again is free."""
    saved = getattr(x.grad_fn, "_saved_result", None) if x.grad_fn is not None else None
    return isinstance(saved, torch.Tensor) and saved.data_ptr() == x.data_ptr()


class _RecomputedRoute(torch.autograd.Function):
    """_Route with the frozen branch F run inside: F's output is not kept, and the backward runs F again.

    Saves the block input and F~, which autograd keeps anyway (the tuned copy's first convolution
    and, in a ResNet block, its last ReLU), so the frozen branch costs no memory for the backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, frozen: nn.Module, all_tuned: bool):
        with torch.no_grad():
            f = frozen(x).to(t.dtype)
        w = d.detach().to(t.dtype)
        ctx.frozen, ctx.all_tuned, ctx.d_dtype = frozen, all_tuned, d.dtype
        ctx.autocast = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else None
        ctx.save_for_backward(x, t, w)
        return t if all_tuned else route_forward(f, t, w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, t, w = ctx.saved_tensors
        grad_x = grad_t = None
        through_frozen = ctx.needs_input_grad[0] and not ctx.all_tuned
        autocast = torch.autocast("cuda", ctx.autocast, cache_enabled=False) if ctx.autocast else nullcontext()
        with torch.enable_grad(), autocast:  # the forward's precision, so F is the forward's F
            xx = x.detach().requires_grad_(through_frozen)
            f = ctx.frozen(xx).to(t.dtype)
        grad_f, grad_t, grad_d = route_backward(g, t, f.detach(), w, through_frozen,
                                                ctx.needs_input_grad[1] and not ctx.all_tuned, ctx.needs_input_grad[2])
        if through_frozen:
            (grad_x,) = torch.autograd.grad(f, xx, grad_f)
        if ctx.needs_input_grad[1] and ctx.all_tuned:
            grad_t = g
        return grad_x, grad_t, None if grad_d is None else grad_d.to(ctx.d_dtype), None, None
